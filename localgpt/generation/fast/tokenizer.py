"""The model's tokenizer without transformers' ``AutoTokenizer`` import chain on every start after the first.

``AutoTokenizer`` takes ~5 s of a start on the H200 image (transformers 5.17's ``auto_factory`` pulls in
``torch.distributed.tensor``, sympy, sklearn and ``torch._dynamo``), more than the 7B weights take to stream to
the GPU. What the engine uses of a tokenizer is small: encode (with or without special tokens), decode (skipping
special tokens), the special tokens and their ids, token -> id, and the chat template. All but the template live
in the Rust ``tokenizers.Tokenizer`` that transformers builds (``backend_tokenizer``; transformers 5 may rebuild
it from tokenizer.json for a class such as ``LlamaTokenizer``, so tokenizer.json itself is not used as is).

So the first start loads the tokenizer with ``AutoTokenizer`` as before, checks that ``CachedTokenizer`` built
from what it resolved (its backend pipeline serialised, its special tokens, its chat template, whether decode
cleans up spaces) encodes, decodes, maps tokens and renders chat prompts exactly as it does on a set of probes
(texts with special tokens inline, non-ASCII, whitespace runs; random id sequences; chat turns), and only then
writes it to the disk cache. Later starts with the same tokenizer files, transformers and tokenizers versions
load that file with ``tokenizers`` alone (~0.1 s). A tokenizer that fails a probe is never cached: every start
keeps using ``AutoTokenizer``. Chat templates render through transformers' own ``render_jinja_template``
(``transformers.utils.chat_template_utils``: jinja2, no model or tokenizer classes), with the same special
tokens ``apply_chat_template`` passes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

FORMAT = 1
# Files whose content decides what AutoTokenizer builds (config.json: model type, tokenizer_class fallback).
_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
          "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja", "chat_template.json",
          "config.json", "generation_config.json")
_NAMED = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

PROBE_TEXTS = (
    "Hello world",
    " leading space, two  spaces and a trailing one ",
    "Line one\nline two\n\n  indented\tand a tab",
    "Context: the invoice was paid on March 3 by the finance team. Question: what does the report say?",
    "Numbers 1234567 3.14159 -42 and 2023-11-30, plus punctuation!? (yes) [no] {maybe} <tag> a/b c\\d",
    "Grüße aus Köln – naïve café, 東京の天気は晴れ, Привет мир, emoji 🙂👍",
    "don't won't it's we're they've I'm . , ? ! ' ",
    "[INST] <<SYS>>\nYou are helpful.\n<</SYS>>\n\nWhat is 2+2? [/INST]",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "",
    " ",
)
PROBE_CHATS = (
    [{"role": "user", "content": "What does the report say about revenue?"}],
    [{"role": "system", "content": "Answer from the context."},
     {"role": "user", "content": "Context: pumps.\n\nQuestion: pumps?"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Summarise: naïve café 東京."}],
)


def package_version(package: str) -> str:
    """An installed package's version, "none" when it is not installed."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "none"


def files_key(folder: Path, names: Sequence[str], *labels: str) -> str:
    """A start cache's key: the folder, ``labels`` (cache format, library versions) and each named file's size
    and mtime there, hashed (the tokenizer cache here, the config snapshot in load.py)."""
    folder = Path(folder)
    parts = [str(folder.resolve()), *labels]
    for name in names:
        f = folder / name
        if f.is_file():
            st = f.stat()
            parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def cache_key(folder: Path) -> str:
    """Names the tokenizer files (path, size, mtime) and the libraries that built the tokenizer from them."""
    return files_key(folder, _FILES, f"format {FORMAT}", f"transformers {package_version('transformers')}",
                     f"tokenizers {package_version('tokenizers')}")


def clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (applied by decode when the tokenizer asks for it)."""
    return (text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",").replace(" ' ", "'")
            .replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s").replace(" 've", "'ve")
            .replace(" 're", "'re"))


class CachedTokenizer:
    """The parts of a transformers tokenizer the engine uses, over the ``tokenizers.Tokenizer`` it resolved."""

    def __init__(self, state: dict[str, Any]):
        from tokenizers import Tokenizer

        self.state = state
        self._tokenizer = Tokenizer.from_str(state["backend"])
        self.clean_up = bool(state["clean_up"])
        self.chat_template: str | None = state.get("chat_template") or None
        self.special_tokens_map: dict[str, str] = dict(state["special_tokens_map"])
        self.name_or_path = state.get("name_or_path", "")
        for attr in _NAMED:
            token = state["named"].get(attr)
            setattr(self, attr, token)
            setattr(self, attr + "_id", state["named_ids"].get(attr))

    @property
    def backend_tokenizer(self):
        return self._tokenizer

    def __len__(self) -> int:
        return int(self.state["length"])

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str, add_special_tokens: bool = True, return_tensors: str | None = None) -> dict:
        if not isinstance(text, str):
            raise TypeError("CachedTokenizer encodes one string at a time")
        ids = self.encode(text, add_special_tokens=add_special_tokens)
        if return_tensors == "pt":
            import torch

            return {"input_ids": torch.tensor([ids], dtype=torch.long)}
        if return_tensors is not None:
            raise ValueError(f"return_tensors {return_tensors!r} not supported here")
        return {"input_ids": ids}

    def decode(self, ids: Sequence[int] | Any, skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        text = self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if self.clean_up else text

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]):
        if isinstance(tokens, str):
            index = self._tokenizer.token_to_id(tokens)
            return self.unk_token_id if index is None else index
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def apply_chat_template(self, conversation: Sequence[dict], tokenize: bool = False,
                            add_generation_prompt: bool = False, **kwargs: Any):
        """The rendered prompt (``tokenize=False``), or its ids without special tokens added (``tokenize=True``),
        as transformers' ``apply_chat_template`` gives them for one conversation."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        if len(conversation) == 0:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        if not kwargs and plain_chat(conversation) and renders_locally(self.chat_template):
            text = render_chat(self.chat_template, list(conversation), add_generation_prompt, self.special_tokens_map)
        else:  # what the local renderer does not cover: transformers' own (imports transformers)
            from transformers.utils.chat_template_utils import render_jinja_template

            rendered, _ = render_jinja_template(conversations=[list(conversation)], chat_template=self.chat_template,
                                                add_generation_prompt=add_generation_prompt,
                                                **{**self.special_tokens_map, **kwargs})
            text = rendered[0]
        return self.encode(text, add_special_tokens=False) if tokenize else text


# --- chat templates without transformers ------------------------------------------------------------------

_REASONING = ("reasoning_content", "thinking", "reasoning")


def plain_chat(conversation: Sequence[Any]) -> bool:
    """Messages that transformers' renderer passes to the template unchanged: dicts of plain strings, no reasoning
    fields (which it aliases) and no None values (which apply_chat_template drops)."""
    return all(type(m) is dict and all(type(k) is str and type(v) is str for k, v in m.items())
               and not any(k in m for k in _REASONING) for m in conversation)


def renders_locally(template: str) -> bool:
    """Templates ``render_chat`` renders as transformers does in every version the direct path covers: not those
    with a ``{% generation %}`` block (transformers' assistant-mask extension) or an underscore-named attribute
    (transformers 5.24's namespace rejects them, 5.17's accepts them)."""
    import re

    return not re.search(r"\{%-?\s*generation\b", template) and not re.search(r"(?<![\w.])_\w*\s*=|\.\s*_\w", template)


_COMPILED: dict[str, Any] = {}


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool, special: dict[str, str]) -> str:
    """transformers' ``render_jinja_template`` for one conversation of plain messages, no tools or documents: the
    same jinja2 sandbox (trim_blocks, lstrip_blocks, loopcontrols), its ``tojson`` filter, ``raise_exception`` and
    ``strftime_now`` globals, and the special tokens passed as variables."""
    compiled = _COMPILED.get(template)
    if compiled is None:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        def strftime_now(format):
            from datetime import datetime

            return datetime.now().strftime(format)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        compiled = _COMPILED[template] = env.from_string(template)
    return compiled.render(messages=[dict(m) for m in messages], tools=None, documents=None,
                           add_generation_prompt=add_generation_prompt, **special)


# --- the tokenizer straight from its files, on a first start ------------------------------------------------

# transformers versions whose AutoTokenizer was checked to build, from the files accepted below, exactly the
# tokenizer that ``direct_tokenizer`` builds (tests/test_fast_direct.py); any other version: AutoTokenizer.
DIRECT_TOKENIZER_VERSIONS = ("5.17.0", "5.24.0")
# tokenizer classes that transformers 5 builds from tokenizer.json as it is
DIRECT_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
# Llama-2's class (``LlamaTokenizerFast`` is its alias in transformers 5). transformers 5 reads only the vocabulary,
# merges, added tokens and post-processor of tokenizer.json and rebuilds the rest as ``LlamaTokenizer.__init__``
# writes it (models/llama/tokenization_llama.py): ``_llama_backend`` does the same; tokenizer.model is not read
# when tokenizer.json is there. Other named classes also rebuild their pipelines: AutoTokenizer for those.
LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")
_LLAMA_CONFIG_KEYS = {"add_bos_token", "add_eos_token", "legacy", "add_prefix_space", "sp_model_kwargs",
                      "use_default_system_prompt"}
_DIRECT_CONFIG_KEYS = {"tokenizer_class", "backend", "added_tokens_decoder", *_NAMED, "model_max_length",
                       "clean_up_tokenization_spaces", "extra_special_tokens", "additional_special_tokens",
                       "chat_template", "model_input_names", "padding_side", "truncation_side"}
_FORCE_BPE_CLEAN_UP = "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"
_DIRECT_CONFIG_KEYS.add(_FORCE_BPE_CLEAN_UP)


class NotDirect(ValueError):
    """The tokenizer files hold something ``direct_tokenizer`` does not reproduce: AutoTokenizer builds it."""


def _content(token: Any) -> str | None:
    if token is None or isinstance(token, str):
        return token
    if isinstance(token, dict) and isinstance(token.get("content"), str):
        return token["content"]
    raise NotDirect(f"special token {token!r}")


def direct_state(folder: Path) -> dict[str, Any]:
    """``CachedTokenizer``'s state from tokenizer.json + tokenizer_config.json (+ special_tokens_map.json,
    chat_template.jinja) alone; raises ``NotDirect`` for anything it does not cover."""
    folder = Path(folder)
    version = package_version("transformers")
    if version != "none" and version not in DIRECT_TOKENIZER_VERSIONS:
        raise NotDirect(f"transformers {version} is not one the direct path was checked against")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (folder / name).is_file():
            raise NotDirect(f"no {name}")
    try:
        text = (folder / "tokenizer.json").read_text(encoding="utf-8")
        backend = json.loads(text)
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        smap = json.loads((folder / "special_tokens_map.json").read_text(encoding="utf-8")) \
            if (folder / "special_tokens_map.json").is_file() else {}
    except (OSError, ValueError) as exc:
        raise NotDirect(f"unreadable: {exc}") from None
    if not (isinstance(backend, dict) and isinstance(config, dict) and isinstance(smap, dict)):
        raise NotDirect("a file is not a JSON object")
    llama = config.get("tokenizer_class") in LLAMA_CLASSES
    if config.get("tokenizer_class") not in DIRECT_CLASSES and not llama:
        raise NotDirect(f"tokenizer_class {config.get('tokenizer_class')!r}")
    for name in ("added_tokens.json", "chat_template.json", "additional_chat_templates", "tokenizer.model"):
        if (folder / name).exists() and not (name == "tokenizer.model" and llama):  # Llama: tokenizer.json wins
            raise NotDirect(f"{name} present")
    if config.get("backend", "tokenizers") != "tokenizers":
        raise NotDirect(f"backend {config.get('backend')!r}")
    unknown = set(config) - _DIRECT_CONFIG_KEYS - (_LLAMA_CONFIG_KEYS if llama else set())
    if unknown:
        raise NotDirect(f"tokenizer_config.json keys {sorted(unknown)}")
    if backend.get("truncation") is not None or backend.get("padding") is not None or backend.get("post_processor") is None:
        raise NotDirect("tokenizer.json sets truncation or padding, or has no post-processor")
    if set(smap) - set(_NAMED) - {"additional_special_tokens"}:
        raise NotDirect(f"special_tokens_map.json keys {sorted(set(smap) - set(_NAMED))}")
    added = {t.get("id"): t for t in backend.get("added_tokens") or []}
    by_content = {t.get("content"): t for t in added.values()}
    for index, token in (config.get("added_tokens_decoder") or {}).items():
        mine = added.get(int(index)) if str(index).isdigit() else None
        if not isinstance(token, dict) or mine is None or any(
                token.get(k) != mine.get(k) for k in ("content", "lstrip", "rstrip", "normalized", "single_word",
                                                       "special")):
            raise NotDirect(f"added token {index} differs from tokenizer.json's")
    named = {}
    for attr in _NAMED:
        token = _content(config.get(attr))
        other = _content(smap.get(attr))
        if other is not None and other != token:
            raise NotDirect(f"{attr}: special_tokens_map.json and tokenizer_config.json differ")
        named[attr] = token
    extras = []
    for key in ("extra_special_tokens", "additional_special_tokens"):
        for source in (config, smap):
            value = source.get(key) or []
            if not isinstance(value, list):
                raise NotDirect(f"{key} {value!r}")
            extras += [_content(t) for t in value]
    for token in [t for t in named.values() if t is not None] + extras:
        entry = by_content.get(token)
        if entry is None or not entry.get("special"):
            raise NotDirect(f"special token {token!r} is not a special added token of tokenizer.json")
    clean_up = config.get("clean_up_tokenization_spaces", False)
    force = config.get(_FORCE_BPE_CLEAN_UP, False)
    if type(clean_up) is not bool or type(force) is not bool:
        raise NotDirect(f"clean_up_tokenization_spaces {clean_up!r}")
    # TokenizersBackend.decode (5.17 and 5.24 alike) ignores the flag for a BPE model unless forced
    model_type = (backend.get("model") or {}).get("type")
    clean_up = clean_up and (model_type != "BPE" or force)
    template = config.get("chat_template")
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        if template is not None:
            raise NotDirect("a chat template in both tokenizer_config.json and chat_template.jinja")
        template = jinja_file.read_text(encoding="utf-8")
    if template is not None and not isinstance(template, str):
        raise NotDirect("named chat templates")
    from tokenizers import Tokenizer

    if llama:
        text = _llama_backend(backend, config, named)
    tok = Tokenizer.from_str(text)
    named_ids = {a: (tok.token_to_id(t) if t is not None else None) for a, t in named.items()}
    return {"format": FORMAT, "backend": text, "clean_up": clean_up, "chat_template": template or None,
            "special_tokens_map": {a: t for a, t in named.items() if t is not None}, "named": named,
            "named_ids": named_ids, "length": tok.get_vocab_size(with_added_tokens=True),
            "class": config["tokenizer_class"], "name_or_path": str(folder)}


def _llama_backend(backend: dict[str, Any], config: dict[str, Any], named: dict[str, str | None]) -> str:
    """The ``tokenizers`` pipeline transformers 5 builds for ``LlamaTokenizer`` from tokenizer.json (serialised):
    BPE over the file's vocabulary and merges with byte fallback, fused unknowns and no unknown token of its own;
    no normalizer; a Metaspace pre-tokenizer that prepends "▁" to the first piece ("first"; every piece when
    ``legacy``; none without ``add_prefix_space``) and does not split; the decoder that undoes it; the file's
    added tokens, in id order; and the file's post-processor (only where it is what tokenizer_config.json's
    add_bos_token / add_eos_token make of it, if it names them)."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    model = backend.get("model") or {}
    vocab, merges = model.get("vocab"), model.get("merges")
    if model.get("type") != "BPE" or not isinstance(vocab, dict) or not isinstance(merges, list):
        raise NotDirect("LlamaTokenizer over a tokenizer.json without a BPE vocabulary and merges")
    if len(vocab) > 100000:  # transformers may patch a Mistral pre-tokenizer regex on such vocabularies
        raise NotDirect("LlamaTokenizer with more than 100,000 tokens")
    flags = {k: config.get(k) for k in ("add_bos_token", "add_eos_token", "legacy", "add_prefix_space",
                                        "use_default_system_prompt")}
    if any(v is not None and type(v) is not bool for v in flags.values()) or config.get("sp_model_kwargs", {}) != {}:
        raise NotDirect(f"LlamaTokenizer settings {flags} / sp_model_kwargs {config.get('sp_model_kwargs')!r}")
    tok = Tokenizer(BPE(vocab=vocab, merges=[tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges],
                        fuse_unk=True, byte_fallback=True, dropout=None))
    prefix = flags["add_prefix_space"] is not False
    scheme = ("always" if flags["legacy"] else "first") if prefix else "never"
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(steps)
    for entry in sorted(backend.get("added_tokens") or [], key=lambda t: t.get("id", -1)):
        token = AddedToken(entry["content"], single_word=entry.get("single_word", False),
                           lstrip=entry.get("lstrip", False), rstrip=entry.get("rstrip", False),
                           normalized=entry.get("normalized", True), special=entry.get("special", False))
        (tok.add_special_tokens if token.special else tok.add_tokens)([token])
        if tok.token_to_id(entry["content"]) != entry.get("id"):
            raise NotDirect(f"added token {entry['content']!r} would not keep id {entry.get('id')}")
    out = json.loads(tok.to_str())
    out["post_processor"] = backend["post_processor"]
    if flags["add_bos_token"] is not None or flags["add_eos_token"] is not None:
        # What update_post_processor would write from the flags. transformers 5.24 keeps the file's post-processor
        # even when the flags say otherwise: cover only files where the two agree, whichever a version applies.
        bos, eos = named.get("bos_token"), named.get("eos_token")
        add_bos, add_eos = bool(flags["add_bos_token"]) and bos is not None, bool(flags["add_eos_token"]) and eos is not None
        single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
        pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
        specials = [(t, tok.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
        if json.loads(tok.to_str())["post_processor"] != backend["post_processor"]:
            raise NotDirect("add_bos_token / add_eos_token disagree with tokenizer.json's post-processor")
    return json.dumps(out, ensure_ascii=False)


def direct_tokenizer(folder: Path) -> CachedTokenizer:
    return CachedTokenizer(direct_state(folder))


def _state_of(tok: Any) -> dict[str, Any] | None:
    """What ``CachedTokenizer`` needs of a transformers tokenizer; None when it has no Rust backend."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return None
    template = None
    if getattr(tok, "chat_template", None):
        try:
            template = tok.get_chat_template()
        except Exception:  # noqa: BLE001 - a template dict without a default: not cacheable
            return None
    special = {k: str(v) for k, v in dict(getattr(tok, "special_tokens_map", {}) or {}).items()
               if isinstance(v, str) or hasattr(v, "content")}
    named = {a: (str(getattr(tok, a)) if getattr(tok, a, None) is not None else None) for a in _NAMED}
    named_ids = {a: getattr(tok, a + "_id", None) for a in _NAMED}
    return {"format": FORMAT, "backend": backend.to_str(), "clean_up": None, "chat_template": template,
            "special_tokens_map": special, "named": named, "named_ids": named_ids, "length": len(tok),
            "class": type(tok).__name__, "name_or_path": str(getattr(tok, "name_or_path", ""))}


def _decide_clean_up(tok: Any, state: dict[str, Any]) -> bool | None:
    """Whether ``tok.decode`` applies ``clean_up_tokenization`` (transformers decides it per class and version:
    read it off the tokenizer's behaviour on text where the two differ); None: neither explains it."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(state["backend"])
    for text in ("a . b ? c ! d , e ' f n't g 'm h 's i 've j 're k", "Yes . It is , isn 't it ?"):
        ids = backend.encode(text, add_special_tokens=False).ids
        raw = backend.decode(ids, skip_special_tokens=True)
        got = tok.decode(ids, skip_special_tokens=True)
        if raw == clean_up_tokenization(raw):
            continue
        if got == raw:
            return False
        if got == clean_up_tokenization(raw):
            return True
        return None
    return bool(getattr(tok, "clean_up_tokenization_spaces", False))  # no probe told them apart: either is exact


def _ids(x: Any) -> list[int]:
    x = x["input_ids"] if isinstance(x, dict) or hasattr(x, "keys") else x
    x = x.tolist() if hasattr(x, "tolist") else list(x)
    return x[0] if x and isinstance(x[0], list) else x


def mismatches(tok: Any, cached: CachedTokenizer, *, extra_texts: Sequence[str] = (), stop_tokens: Sequence[str] = (),
               seed: int = 0, random_sequences: int = 24) -> list[str]:
    """Where ``cached`` differs from ``tok`` on the probes (empty: they agree everywhere tried)."""
    bad: list[str] = []
    specials = [t for t in cached.special_tokens_map.values() if t]
    texts = list(PROBE_TEXTS) + list(extra_texts) + [" ".join(specials) + " text " + "".join(specials)]
    for a in _NAMED:
        if getattr(tok, a, None) is not None and str(getattr(tok, a)) != getattr(cached, a):
            bad.append(f"{a}: {getattr(tok, a)!r} vs {getattr(cached, a)!r}")
        if getattr(tok, a + "_id", None) != getattr(cached, a + "_id"):
            bad.append(f"{a}_id: {getattr(tok, a + '_id', None)!r} vs {getattr(cached, a + '_id')!r}")
    if len(tok) != len(cached):
        bad.append(f"len: {len(tok)} vs {len(cached)}")
    seqs: list[list[int]] = []
    for text in texts:
        for special in (True, False):
            want = _ids(tok(text, add_special_tokens=special))
            got = _ids(cached(text, add_special_tokens=special))
            pt = _ids(cached(text, add_special_tokens=special, return_tensors="pt"))
            if want != got or pt != got:
                bad.append(f"encode({text!r}, add_special_tokens={special}): {want[:12]} vs {got[:12]}")
            seqs.append(want)
    rng = random.Random(seed)
    n = len(tok)
    for i in range(random_sequences):
        seqs.append([rng.randrange(n) for _ in range(1 + rng.randrange(48))])
    seqs.append([])
    for ids in seqs:
        for skip in (True, False):
            want, got = tok.decode(ids, skip_special_tokens=skip), cached.decode(ids, skip_special_tokens=skip)
            if want != got:
                bad.append(f"decode({ids[:8]}..., skip_special_tokens={skip}): {want[:40]!r} vs {got[:40]!r}")
        # the streamed answer decodes growing prefixes: the last id alone too
        if ids and tok.decode(ids[-1:], skip_special_tokens=True) != cached.decode(ids[-1:], skip_special_tokens=True):
            bad.append(f"decode([{ids[-1]}])")
    for token in list(stop_tokens) + specials + ["<s>", "</s>", "<|im_end|>", "[/INST]", "no-such-token-xyz"]:
        if tok.convert_tokens_to_ids(token) != cached.convert_tokens_to_ids(token):
            bad.append(f"convert_tokens_to_ids({token!r})")
    if bool(getattr(tok, "chat_template", None)) != bool(cached.chat_template):
        bad.append("chat template present in one only")
    elif cached.chat_template:
        for chat in PROBE_CHATS:
            try:
                want = tok.apply_chat_template(list(chat), tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # noqa: BLE001 - a template that rejects e.g. a system turn must reject both
                want = f"raised {type(exc).__name__}"
            try:
                got = cached.apply_chat_template(list(chat), tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # noqa: BLE001
                got = f"raised {type(exc).__name__}"
            if want != got:
                bad.append(f"apply_chat_template({chat[-1]['content'][:20]!r}): {want[:60]!r} vs {got[:60]!r}")
    return bad


def cache_path(folder: Path, cache_dir: Path) -> Path:
    return Path(cache_dir) / "tokenizers" / f"{cache_key(folder)}.json"


def read_cached(folder: Path, cache_dir: Path | None) -> CachedTokenizer | None:
    """The tokenizer cached for ``folder``'s files and these library versions, if a start wrote one."""
    if cache_dir is None:
        return None
    path = cache_path(folder, cache_dir)
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        if state.get("format") != FORMAT or not state.get("checked"):
            return None
        return CachedTokenizer(state)
    except (OSError, ValueError, KeyError, TypeError, Exception):  # noqa: BLE001 - a bad cache file is a miss
        return None


def write_checked(tok: Any, folder: Path, cache_dir: Path | None, *, stop_tokens: Sequence[str] = ()) -> str:
    """Cache ``tok`` for the next start if ``CachedTokenizer`` reproduces it on every probe; says what happened."""
    if cache_dir is None:
        return "not cached (no cache folder)"
    try:
        state = _state_of(tok)
        if state is None:
            return f"not cached ({type(tok).__name__} has no tokenizers backend)"
        clean = _decide_clean_up(tok, state)
        if clean is None:
            return "not cached (decode's space clean-up could not be matched)"
        state["clean_up"] = clean
        bad = mismatches(tok, CachedTokenizer(state), stop_tokens=stop_tokens)
        if bad:
            return f"not cached ({len(bad)} probe(s) differ: {bad[0]})"
        state["checked"] = True
        path = cache_path(folder, cache_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(state), encoding="utf-8")
        os.replace(tmp, path)
        return f"cached for the next start ({path.name})"
    except Exception as exc:  # noqa: BLE001 - caching is an optimisation: never fail a load over it
        return f"not cached ({type(exc).__name__}: {exc})"


def auto_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def load_tokenizer(folder: Path, cache_dir: Path | None, *, stop_tokens: Sequence[str] = ()) -> tuple[Any, str]:
    """(tokenizer, how it was loaded): the checked cache when this start finds one, else ``AutoTokenizer``
    (then checked against ``CachedTokenizer`` and cached for the next start)."""
    if os.environ.get("LOCALGPT_TOKENIZER_CACHE", "1") != "0":
        cached = read_cached(folder, cache_dir)
        if cached is not None:
            return cached, "cache (tokenizers only)"
        why = "direct off"
        if os.environ.get("LOCALGPT_DIRECT_TOKENIZER", "1") != "0":
            try:
                return direct_tokenizer(folder), "tokenizer.json (tokenizers only)"
            except NotDirect as exc:
                why = f"not direct: {exc}"
            except Exception as exc:  # noqa: BLE001 - a file the tokenizers library rejects: AutoTokenizer says why
                why = f"not direct: {type(exc).__name__}: {exc}"
        tok = auto_tokenizer(folder)
        return tok, f"AutoTokenizer ({why}); " + write_checked(tok, folder, cache_dir, stop_tokens=stop_tokens)
    return auto_tokenizer(folder), "AutoTokenizer (cache off)"
