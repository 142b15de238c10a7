"""What a repeated start of the fast engine reads from its caches instead of transformers: the tokenizer
(``localgpt.generation.fast.tokenizer``) and the model's configs (``load.load_configs``).

What a user relies on: a start that finds the checked cache tokenizes, decodes, maps stop tokens and renders
chat prompts exactly as transformers' ``AutoTokenizer`` does for the same files (so answers do not change), it
does so without importing transformers' tokenizer classes (the seconds a start saves), and a tokenizer the
cache cannot reproduce is never cached. Real tokenizers built here with the ``tokenizers`` library: WordLevel
(the tiny models'), a SentencePiece-style byte-fallback BPE saved as ``LlamaTokenizer`` (which transformers 5
rebuilds from tokenizer.json), a byte-level BPE asking for space clean-up, and a ChatML template.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from localgpt.generation.fast.tokenizer import (
    CachedTokenizer, _state_of, cache_path, load_tokenizer, mismatches, read_cached, write_checked,
)
from tiny_models import (
    CHATML_TEMPLATE, CORPUS, build_tiny_model, build_tiny_tokenizer, save_byte_level_tokenizer, save_tiny_tokenizers,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _transformers_path_on_a_first_start(monkeypatch):
    """These tests are about the start caches that a start through transformers writes: the direct path (a first
    start without transformers, tests/test_fast_direct.py) is switched off here, children included."""
    monkeypatch.setenv("LOCALGPT_DIRECT_CONFIG", "0")
    monkeypatch.setenv("LOCALGPT_DIRECT_TOKENIZER", "0")


def _auto(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _sentencepiece_bpe(folder: Path) -> Path:
    """Llama-2's kind of tokenizer: BPE over Metaspace pieces with byte fallback, saved as ``LlamaTokenizer``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    t = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    t.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", *bytes_],
                                                          show_progress=False))
    model = json.loads(t.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    LlamaTokenizer(vocab=model["vocab"], merges=merges).save_pretrained(folder)
    return folder


def _byte_level(folder: Path) -> Path:
    return save_byte_level_tokenizer(folder, clean_up=True)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    out = save_tiny_tokenizers(root)
    out["sentencepiece-bpe"] = _sentencepiece_bpe(root / "sentencepiece-bpe")
    out["byte-level"] = _byte_level(root / "byte-level")
    return out


def _texts(seed: int, n: int = 40) -> list[str]:
    """Random texts from the corpus' words, punctuation, special tokens, non-ASCII and whitespace runs."""
    rng = random.Random(seed)
    words = " ".join(CORPUS).split() + ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "Grüße", "東京", "🙂", "n't",
                                        "'s", ".", ",", "?", "\n", "\t", "  ", "1234", "naïve"]
    return [rng.choice(["", " "]) + "".join(rng.choice(words) + rng.choice([" ", "", "  ", "\n"])
                                            for _ in range(rng.randrange(1, 30))) for _ in range(n)]


@pytest.mark.parametrize("kind", ["wordlevel", "chatml", "sentencepiece-bpe", "byte-level"])
def test_the_cached_tokenizer_equals_autotokenizer(folders, kind, tmp_path):
    tok = _auto(folders[kind])
    note = write_checked(tok, folders[kind], tmp_path)
    assert note.startswith("cached"), note
    cached = read_cached(folders[kind], tmp_path)
    assert isinstance(cached, CachedTokenizer)
    # probes the write did not see: random texts, their ids decoded one growing prefix at a time (as streamed)
    assert mismatches(tok, cached, extra_texts=_texts(1), seed=7, random_sequences=64) == []
    for text in _texts(2, 10):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for i in range(len(ids) + 1):
            assert tok.decode(ids[:i], skip_special_tokens=True) == cached.decode(ids[:i], skip_special_tokens=True)
    assert cached.bos_token == tok.bos_token and cached.eos_token_id == tok.eos_token_id
    if kind == "chatml":
        chat = [{"role": "user", "content": "hello there"}]
        assert cached.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
            tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def test_a_tokenizer_the_cache_cannot_reproduce_is_not_cached(folders, tmp_path):
    """The check is real: another tokenizer's pipeline under this one's name differs on the probes."""
    tok = _auto(folders["sentencepiece-bpe"])
    other = _state_of(_auto(folders["byte-level"]))
    state = _state_of(tok) | {"backend": other["backend"], "clean_up": False}
    assert mismatches(tok, CachedTokenizer(state))
    assert read_cached(folders["sentencepiece-bpe"], tmp_path) is None


def test_changed_tokenizer_files_miss_the_cache(folders, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(folders["wordlevel"], folder)
    tok, note = load_tokenizer(folder, tmp_path / "cache")
    assert "cached for the next start" in note
    again, note = load_tokenizer(folder, tmp_path / "cache")
    assert isinstance(again, CachedTokenizer) and note.startswith("cache")
    config = folder / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"<pad>"', '"<unk>"'))
    third, note = load_tokenizer(folder, tmp_path / "cache")
    assert not isinstance(third, CachedTokenizer) and third.pad_token == "<unk>"


def test_a_second_start_answers_the_same_with_the_cached_tokenizer(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from localgpt.generation import clear_generator_cache
    from localgpt.generation.fast import load_fast_generator

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = build_tiny_model("llama2", tmp_path / "llama2")
    settings = SimpleNamespace(model=str(folder), family=None, quantization="none", device="cpu", max_new_tokens=12,
                               temperature=0.0, top_p=1.0, context_window=None)
    messages = [{"role": "user", "content": "Context: the invoice was paid on March 3. Question: when was it paid?"}]
    answers, kinds = [], []
    for _ in range(2):
        g = load_fast_generator(settings)
        kinds.append((type(g.tokenizer).__name__, g.stats.extra["tokenizer"]))
        answers.append(("".join(g.stream(messages)), g.format(messages), g.count_tokens("the invoice"), g._eos_ids()))
        clear_generator_cache()
    assert kinds[0][0] != "CachedTokenizer" and "cached for the next start" in kinds[0][1]
    assert kinds[1][0] == "CachedTokenizer", kinds
    assert answers[0] == answers[1]


def test_a_cached_start_imports_no_transformers_tokenizer_class(folders, tmp_path, subprocess_env):
    load_tokenizer(folders["chatml"], tmp_path)  # writes the cache
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from localgpt.generation.fast.tokenizer import load_tokenizer
        tok, note = load_tokenizer(Path({str(folders["chatml"])!r}), Path({str(tmp_path)!r}))
        tok("hello there")
        tok.decode([1, 2, 3])
        print(note)
        print(sorted(m for m in sys.modules if m.startswith("transformers")))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=subprocess_env,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    note, loaded = out.stdout.strip().splitlines()[-2:]
    assert note.startswith("cache"), note
    assert loaded == "[]", loaded


# --- the configs' snapshot (load.load_configs) -------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama2", "falcon", "falcon-mamba", "mamba"])
def test_the_config_snapshot_builds_the_same_network(family, tmp_path):
    import torch
    from transformers import AutoConfig, GenerationConfig

    from localgpt.generation.fast.load import CachedConfig, load_configs, load_network

    folder = build_tiny_model(family, tmp_path / family)
    config, generation, note = load_configs(folder, tmp_path / "cache")
    assert note == "transformers (direct off); cached for the next start", note
    cached, cached_generation, note = load_configs(folder, tmp_path / "cache")
    assert note == "cache" and isinstance(cached, CachedConfig)
    real, real_generation = AutoConfig.from_pretrained(folder), GenerationConfig.from_pretrained(folder)
    for name in vars(cached):
        if not name.startswith("_"):
            assert getattr(cached, name) == getattr(real, name), name
    assert cached_generation.eos_token_id == real_generation.eos_token_id
    with torch.inference_mode():
        a = load_network(folder, real, "cpu", torch.float32).network.state_dict()
        b = load_network(folder, cached, "cpu", torch.float32).network.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_config_value_the_snapshot_could_not_keep_fails_loudly(tmp_path):
    from localgpt.generation.fast.load import NotCached, load_configs

    folder = build_tiny_model("llama2", tmp_path / "llama2")
    load_configs(folder, tmp_path / "cache")
    cached = load_configs(folder, tmp_path / "cache")[0]
    assert "dtype" in cached._dropped  # a torch.dtype: not plain data
    with pytest.raises(NotCached):
        getattr(cached, "dtype", None)
    assert getattr(cached, "no_such_attribute", "default") == "default"


def test_a_scaled_rotary_config_is_not_snapshotted(tmp_path):
    from localgpt.generation.fast.load import load_configs

    folder = build_tiny_model("llama2", tmp_path / "llama2",
                              rope_scaling={"rope_type": "linear", "factor": 2.0})
    for _ in range(2):
        config, _, note = load_configs(folder, tmp_path / "cache")
        assert note.startswith("transformers (direct off); not cached (scaled rotary)"), note


def test_a_repeated_start_imports_nothing_of_transformers(tmp_path, subprocess_env):
    folder = build_tiny_model("llama2", tmp_path / "llama2")
    script = textwrap.dedent(f"""
        import sys
        from types import SimpleNamespace
        from localgpt.generation.fast import load_fast_generator
        g = load_fast_generator(SimpleNamespace(model={str(folder)!r}, family=None, quantization="none", device="cpu",
                                                max_new_tokens=4, temperature=0.0, top_p=1.0, context_window=None),
                                cache_dir={str(tmp_path / "cache")!r})
        print("".join(g.stream("the invoice was paid")))
        print(g.stats.extra["configs"], "|", g.stats.extra["tokenizer"])
        print(sorted(m for m in sys.modules if m.startswith("transformers")))
    """)
    outs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=subprocess_env,
                             cwd=ROOT, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        outs.append(out.stdout.strip().splitlines()[-3:])
    assert outs[0][1].startswith("transformers (direct off); cached") and \
        "AutoTokenizer (direct off); cached" in outs[0][1], outs[0]
    assert outs[1][1] == "cache | cache (tokenizers only)", outs[1]
    assert outs[1][2] == "[]", outs[1][2]
    assert outs[0][0] == outs[1][0]  # the same answer
