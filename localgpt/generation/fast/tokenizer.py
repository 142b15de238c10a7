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


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "none"


def cache_key(folder: Path) -> str:
    """Names the tokenizer files (path, size, mtime) and the libraries that built the tokenizer from them."""
    folder = Path(folder)
    parts = [str(folder.resolve()), f"format {FORMAT}", f"transformers {_version('transformers')}",
             f"tokenizers {_version('tokenizers')}"]
    for name in _FILES:
        f = folder / name
        if f.is_file():
            st = f.stat()
            parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


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
        from transformers.utils.chat_template_utils import render_jinja_template

        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        if len(conversation) == 0:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        rendered, _ = render_jinja_template(conversations=[list(conversation)], chat_template=self.chat_template,
                                            add_generation_prompt=add_generation_prompt,
                                            **{**self.special_tokens_map, **kwargs})
        text = rendered[0]
        return self.encode(text, add_special_tokens=False) if tokenize else text


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
        tok = auto_tokenizer(folder)
        return tok, "AutoTokenizer; " + write_checked(tok, folder, cache_dir, stop_tokens=stop_tokens)
    return auto_tokenizer(folder), "AutoTokenizer (cache off)"
