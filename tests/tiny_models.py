"""Tiny random-weight models of every family localgpt runs, built here and saved like real ones.

Each ``build_tiny_*`` writes a folder (config.json, safetensors, tokenizer files) of a few hundred KB
that ``AutoModelForCausalLM.from_pretrained`` and localgpt's own loaders open exactly as they open a
downloaded model. The tokenizers are real (a WordLevel vocabulary learnt from a few sentences with the
``tokenizers`` library); only FalconMamba's and Qwen2's carry a chat template, so the others exercise the
registry's prompt formats. Initialisation scales are raised above the checkpoint defaults so that
greedy decoding of random weights wanders through the vocabulary instead of repeating one token,
which makes "streamed text equals model.generate" a real comparison. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: what does the report say about revenue in 2023? Answer: it grew by ten percent.",
    "Context: the invoice was paid on March 3 by the finance team.",
    "You are a helpful assistant. Answer from the context and cite the source file and page.",
    "User: hello there Assistant: hi, how can I help you today?",
    "[INST] <<SYS>> system prompt <</SYS>> instruction [/INST]",
    "# Instruction # Query: # Answer: ``` below is a list of conversations between a human and an AI",
    "Mamba and Falcon and Llama models read documents, pages, tables and notes.",
]
# Words the answer-check tests need as single tokens. Passed as ``extra_corpus`` to the models that
# need them only: a larger vocabulary changes every random weight, and the GPU tests' tolerances were
# checked against the models built from CORPUS alone.
YES_NO_CORPUS = ("Do the passages state the answer to the question? Reply yes or no. Yes, they do. No, they do not.",)

# What each family's tokenizer calls its special tokens, as the real checkpoints do.
_SPECIALS: dict[str, dict[str, str]] = {
    "llama2": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "falcon": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<unk>"},
    "falcon-mamba": {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "unk_token": "<unk>"},
    "mamba": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<unk>"},
}

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_tokenizer(family: str, chat_template: str | None = None, extra_corpus: Sequence[str] = ()):
    """A real fast tokenizer (WordLevel, whitespace/punctuation split) with the family's special tokens.

    WordLevel keeps decoding stable token by token, so a streamed answer and a one-shot decode of the
    same ids are the same text even when random weights pick odd tokens.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = _SPECIALS[family]
    extra = ["<|im_start|>", "<|im_end|>"] if chat_template else []
    special_tokens = list(dict.fromkeys([specials["unk_token"], specials["bos_token"], specials["eos_token"], "<pad>", *extra]))
    tokenizer = Tokenizer(models.WordLevel(unk_token=specials["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([*CORPUS, *extra_corpus], trainers.WordLevelTrainer(special_tokens=special_tokens))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        additional_special_tokens=extra or None,
        **specials,
    )
    if chat_template:
        fast.chat_template = chat_template
    return fast


def _save(model, tokenizer, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# The shape of the tiny Llama-style decoders (Llama, Qwen2): 2 layers, grouped-query attention.
_SMALL_DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.2)


def _ids(tokenizer) -> dict[str, Any]:
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def build_tiny_llama(directory: Path, seed: int = 0, extra_corpus: Sequence[str] = (), **config: Any) -> Path:
    """A 2-layer Llama (grouped-query attention) with a template-less tokenizer: the llama2 registry format applies."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer("llama2", extra_corpus=extra_corpus)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**(_ids(tokenizer) | _SMALL_DECODER | {"tie_word_embeddings": False} | config)))
    return _save(model, tokenizer, Path(directory))


def build_tiny_falcon(directory: Path, seed: int = 0, extra_corpus: Sequence[str] = (), **config: Any) -> Path:
    """A 2-layer Falcon-7B-shaped model (multi-query, parallel attention, rotary)."""
    import torch
    from transformers import FalconConfig, FalconForCausalLM

    tokenizer = build_tiny_tokenizer("falcon", extra_corpus=extra_corpus)
    settings = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, multi_query=True,
                    parallel_attn=True, new_decoder_architecture=False, alibi=False, bias=False,
                    max_position_embeddings=1024, initializer_range=1.0)
    torch.manual_seed(seed)
    model = FalconForCausalLM(FalconConfig(**(_ids(tokenizer) | settings | config)))
    return _save(model, tokenizer, Path(directory))


def build_tiny_falcon_mamba(directory: Path, seed: int = 0, extra_corpus: Sequence[str] = (), **config: Any) -> Path:
    """A 2-layer FalconMamba whose tokenizer carries a ChatML chat template, like FalconMamba-7B-instruct."""
    import torch
    from transformers import FalconMambaConfig, FalconMambaForCausalLM

    tokenizer = build_tiny_tokenizer("falcon-mamba", chat_template=CHATML_TEMPLATE, extra_corpus=extra_corpus)
    settings = dict(hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4, time_step_rank=4,
                    initializer_range=1.0)
    torch.manual_seed(seed)
    model = FalconMambaForCausalLM(FalconMambaConfig(**(_ids(tokenizer) | settings | config)))
    return _save(model, tokenizer, Path(directory))


def build_tiny_mamba(directory: Path, seed: int = 0, extra_corpus: Sequence[str] = (), **config: Any) -> Path:
    """A 2-layer Mamba base model (no chat template: the URIAL few-shot prompt applies)."""
    import torch
    from transformers import MambaConfig, MambaForCausalLM

    tokenizer = build_tiny_tokenizer("mamba", extra_corpus=extra_corpus)
    settings = dict(hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4, time_step_rank=4,
                    initializer_range=1.0)
    torch.manual_seed(seed)
    model = MambaForCausalLM(MambaConfig(**(_ids(tokenizer) | settings | config)))
    return _save(model, tokenizer, Path(directory))


def build_tiny_qwen2_tokenizer():
    """A byte-level BPE learnt from the corpus, in Qwen2's tokenizer class with a ChatML template
    (transformers opens a qwen2 model's tokenizer as Qwen2Tokenizer, which needs BPE vocab and merges)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import Qwen2Tokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=400, min_frequency=1,
                            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, unk_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_qwen2(directory: Path, seed: int = 0, **config: Any) -> Path:
    """A 2-layer Qwen2 (biased q/k/v projections, grouped-query attention) with a ChatML template, as Qwen ship."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tiny_qwen2_tokenizer()
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**(_ids(tokenizer) | _SMALL_DECODER | {"tie_word_embeddings": True} | config)))
    return _save(model, tokenizer, Path(directory))


TINY_BUILDERS: dict[str, Callable[..., Path]] = {
    "llama2": build_tiny_llama,
    "falcon": build_tiny_falcon,
    "falcon-mamba": build_tiny_falcon_mamba,
    "mamba": build_tiny_mamba,
    "qwen2": build_tiny_qwen2,
}


def build_tiny_model(family: str, directory: Path, seed: int = 0, **config: Any) -> Path:
    """The tiny model of ``family`` ("llama2", "falcon", "falcon-mamba", "mamba") saved under ``directory``."""
    return TINY_BUILDERS[family](Path(directory), seed=seed, **config)


def save_byte_level_tokenizer(folder: Path, clean_up: bool = True) -> Path:
    """GPT-2 / Falcon's kind of tokenizer: byte-level BPE trained on CORPUS; ``clean_up`` is its
    tokenizer_config's clean_up_tokenization_spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                          show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            clean_up_tokenization_spaces=clean_up).save_pretrained(folder)
    return folder


def save_tiny_tokenizers(root: Path) -> dict[str, Path]:
    """The tokenizer folders the tokenizer tests share: "wordlevel" (Llama-2's tiny one) and "chatml"
    (FalconMamba's, with a ChatML chat template)."""
    build_tiny_tokenizer("llama2").save_pretrained(root / "wordlevel")
    build_tiny_tokenizer("falcon-mamba", chat_template=CHATML_TEMPLATE).save_pretrained(root / "chatml")
    return {"wordlevel": root / "wordlevel", "chatml": root / "chatml"}


LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")


def save_llama2_tokenizer(folder: Path, *, vocab_size: int = 700, config: dict | None = None, drop: tuple[str, ...] = (),
                          added: tuple[tuple[str, bool], ...] = (), eos_in_template: bool = False,
                          model_file: bool = True, decoder_in_config: bool = False) -> Path:
    """Llama-2's tokenizer files as the Hub holds them (meta-llama/Llama-2-7b-chat-hf, written by transformers 4
    from the SentencePiece model): tokenizer.json with the Prepend / Replace normalizer, no pre-tokenizer, the
    ByteFallback decoder and a BOS template; tokenizer_config.json naming LlamaTokenizer with add_bos_token,
    legacy false, AddedToken dicts and the chat template; special_tokens_map.json; tokenizer.model beside them
    (transformers 5 does not read it when tokenizer.json is there: a placeholder here). A BPE vocabulary with
    Llama's layout (<unk> <s> </s>, the 256 byte tokens, then pieces) learnt from a few sentences, and for a
    large ``vocab_size`` (Llama-2's 32000) from seeded pseudo-words as well."""
    import random
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    learner = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    learner.pre_tokenizer = pre_tokenizers.Metaspace()
    text = CORPUS * 3 + ["東京の天気は晴れ、日本語の文章です。北京和上海的中文句子。"]
    if vocab_size > 700:
        rng = random.Random(0)
        syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + list("xyq")
        text += [" ".join("".join(rng.choice(syllables) for _ in range(rng.randrange(1, 6)))
                          for _ in range(200)) for _ in range(vocab_size // 4)]
    learner.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=[
                                    "<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256))]))
    model = json.loads(learner.to_str())["model"]
    tok = Tokenizer(models.BPE(vocab=model["vocab"], merges=[tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                                                              for m in model["merges"]],
                               unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    for content, special in added:
        (tok.add_special_tokens if special else tok.add_tokens)([AddedToken(content, normalized=not special,
                                                                            special=special)])
    eos = " </s>:0" if eos_in_template else ""
    tok.post_processor = processors.TemplateProcessing(
        single=f"<s>:0 $A:0{eos}", pair=f"<s>:0 $A:0{eos} <s>:1 $B:1{eos.replace(':0', ':1')}",
        special_tokens=[("<s>", 1)] + ([("</s>", 2)] if eos_in_template else []))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))

    def token(content: str) -> dict:
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False}

    settings = {"add_bos_token": True, "add_eos_token": False, "bos_token": token("<s>"),
                "chat_template": LLAMA2_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
                "eos_token": token("</s>"), "legacy": False, "model_max_length": 1000000000000000019884624838656,
                "pad_token": None, "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
                "unk_token": token("<unk>"), "use_default_system_prompt": False}
    if decoder_in_config:  # later revisions of the Hub's files list the added tokens here too
        settings["added_tokens_decoder"] = {
            str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
            for t in json.loads((folder / "tokenizer.json").read_text())["added_tokens"]}
    settings.update(config or {})
    for key in drop:
        settings.pop(key, None)
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {a: {k: v for k, v in token(c).items() if k != "__type"}
         for a, c in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))}, indent=2))
    if model_file:
        (folder / "tokenizer.model").write_bytes(b"placeholder: transformers 5 reads tokenizer.json instead")
    return folder
