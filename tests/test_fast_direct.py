"""A first start of the fast engine without transformers: the model's configs straight from config.json
(``load.direct_configs``) and the tokenizer straight from tokenizer.json (``tokenizer.direct_state``).

What a user relies on: the first start after copying a model builds the same network and the same tokenizer as
transformers would (same config values for everything the engine reads, same encode / decode / special tokens /
chat prompts), it imports nothing of transformers (the 7-11 s that start spent on the H200 image), and anything
the direct path does not cover (a scaled rotary, another model type, an unknown key, a tokenizer class transformers
rebuilds other than Llama-2's LlamaTokenizer, which the direct path rebuilds the same way) goes through transformers
exactly as before. No mocks: real config.json files and real tokenizers.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from importlib import metadata

from localgpt.generation.fast import load as fast_load
from localgpt.generation.fast import tokenizer as fast_tokenizer
from localgpt.generation.fast.load import (
    DIRECT_ABSENT, DIRECT_READS, DirectConfig, NotCached, Unsupported, direct_configs, load_configs,
)
from localgpt.generation.fast.tokenizer import (
    CachedTokenizer, NotDirect, direct_state, direct_tokenizer, load_tokenizer, mismatches, render_chat,
    renders_locally,
)
from tiny_models import (
    CHATML_TEMPLATE, LLAMA2_CHAT_TEMPLATE, build_tiny_model, build_tiny_tokenizer, save_byte_level_tokenizer,
    save_llama2_tokenizer, save_tiny_tokenizers,
)

ROOT = Path(__file__).resolve().parent.parent
_MISSING = object()
INSTALLED = metadata.version("transformers")
# Whether the shipped lists admit the installed transformers (CI installs the newest release, which may be newer).
LISTED = INSTALLED in fast_load.DIRECT_CONFIG_VERSIONS and INSTALLED in fast_tokenizer.DIRECT_TOKENIZER_VERSIONS


@pytest.fixture(autouse=True)
def _admit_the_installed_transformers(monkeypatch):
    """The equality tests below are the check a transformers release must pass before it joins the lists;
    in this process they run against the installed release whether or not it is listed yet."""
    monkeypatch.setattr(fast_load, "DIRECT_CONFIG_VERSIONS", (*fast_load.DIRECT_CONFIG_VERSIONS, INSTALLED))
    monkeypatch.setattr(fast_tokenizer, "DIRECT_TOKENIZER_VERSIONS", (*fast_tokenizer.DIRECT_TOKENIZER_VERSIONS, INSTALLED))

# config.json files as they are found: saved by transformers 5, by transformers 4 (the Hub's Llama-2 / Falcon /
# FalconMamba files), minimal ones that lean on every default, and odd but valid values.
LLAMA2_7B = {"_name_or_path": "meta-llama/Llama-2-7b-hf", "architectures": ["LlamaForCausalLM"], "bos_token_id": 1,
             "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
             "intermediate_size": 11008, "max_position_embeddings": 4096, "model_type": "llama",
             "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32, "pretraining_tp": 1,
             "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16",
             "transformers_version": "4.31.0.dev0", "use_cache": True, "vocab_size": 32000}
FALCON_7B = {"alibi": False, "apply_residual_connection_post_layernorm": False, "architectures": ["FalconForCausalLM"],
             "attention_dropout": 0.0, "auto_map": {"AutoConfig": "configuration_falcon.FalconConfig"}, "bias": False,
             "bos_token_id": 11, "eos_token_id": 11, "hidden_dropout": 0.0, "hidden_size": 4544,
             "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "falcon", "multi_query": True,
             "new_decoder_architecture": False, "num_attention_heads": 71, "num_hidden_layers": 32,
             "parallel_attn": True, "torch_dtype": "bfloat16", "transformers_version": "4.27.4", "use_cache": True,
             "vocab_size": 65024}
FALCON_MAMBA_7B = {"architectures": ["FalconMambaForCausalLM"], "bos_token_id": 0, "conv_kernel": 4,
                   "eos_token_id": 11, "expand": 16, "hidden_act": "silu", "hidden_size": 4096,
                   "initializer_range": 0.1, "intermediate_size": 8192, "layer_norm_epsilon": 1e-05,
                   "model_type": "falcon_mamba", "num_hidden_layers": 64, "pad_token_id": 11,
                   "rescale_prenorm_residual": False, "residual_in_fp32": True, "state_size": 16,
                   "time_step_floor": 0.0001, "time_step_init_scheme": "random", "time_step_max": 0.1,
                   "time_step_min": 0.001, "time_step_rank": 256, "time_step_scale": 1.0, "torch_dtype": "bfloat16",
                   "transformers_version": "4.45.0.dev0", "use_bias": False, "use_cache": True,
                   "use_conv_bias": True, "vocab_size": 65024, "mixer_rms_eps": 1e-06}

CONFIGS = {
    "llama2-7b": LLAMA2_7B,
    "llama-minimal": {"model_type": "llama"},
    "llama-gqa-theta": LLAMA2_7B | {"num_key_value_heads": 8, "rope_theta": 500000.0, "head_dim": 64,
                                    "eos_token_id": [2, 7], "max_position_embeddings": 8192},
    "llama-null-kv-heads": {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                            "num_key_value_heads": None, "tie_word_embeddings": True, "eos_token_id": None},
    "llama-rope-parameters": {"model_type": "llama", "rope_parameters": {"rope_theta": 20000.0, "rope_type": "default"}},
    "falcon-7b": FALCON_7B,
    "falcon-minimal": {"model_type": "falcon"},
    "falcon-40b-style": FALCON_7B | {"new_decoder_architecture": True, "num_kv_heads": 8, "hidden_size": 8192,
                                     "num_attention_heads": 128, "num_ln_in_parallel_attn": 2,
                                     "rope_theta": 30000.0},
    "falcon-sequential": FALCON_7B | {"parallel_attn": False, "multi_query": False, "tie_word_embeddings": False},
    "falcon-mamba-7b": FALCON_MAMBA_7B,
    "falcon-mamba-minimal": {"model_type": "falcon_mamba"},
    "falcon-mamba-auto-rank": {k: v for k, v in FALCON_MAMBA_7B.items() if k != "intermediate_size"}
    | {"time_step_rank": "auto", "expand": 2},
}
GENERATION = {"none": None, "int": {"eos_token_id": 5, "bos_token_id": 1}, "list": {"eos_token_id": [5, 6]},
              "without-eos": {"bos_token_id": 1, "do_sample": True, "temperature": 0.6}}


def _write(folder: Path, config: dict, generation: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


def _assert_same(direct: DirectConfig, real, direct_generation, real_generation) -> None:
    family = direct.model_type
    for name in DIRECT_READS[family]:
        want, got = getattr(real, name), getattr(direct, name)
        assert got == want and type(got) is type(want), (name, got, want)
    for name in DIRECT_ABSENT[family]:
        assert getattr(real, name, _MISSING) is _MISSING, name
        assert getattr(direct, name, _MISSING) is _MISSING, name
    assert direct_generation.eos_token_id == real_generation.eos_token_id


@pytest.mark.parametrize("generation", list(GENERATION))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_json_read_directly_equals_transformers(name, generation, tmp_path):
    folder = _write(tmp_path / name, copy.deepcopy(CONFIGS[name]), copy.deepcopy(GENERATION[generation]))
    config, generation_config = direct_configs(folder)
    real, real_generation = fast_load.transformers_configs(folder)
    _assert_same(config, real, generation_config, real_generation)


@pytest.mark.parametrize("family", ["llama2", "falcon", "falcon-mamba"])
def test_configs_transformers_saved_build_the_same_network(family, tmp_path):
    """config.json as transformers itself writes it, and the network built from it, weight for weight."""
    import torch

    from localgpt.generation.fast.load import load_network

    folder = build_tiny_model(family, tmp_path / family)
    config, generation_config = direct_configs(folder)
    real, real_generation = fast_load.transformers_configs(folder)
    _assert_same(config, real, generation_config, real_generation)
    with torch.inference_mode():  # the builders read nothing the direct config lacks (that would raise NotCached)
        a = load_network(folder, real, "cpu", torch.float32).network.state_dict()
        b = load_network(folder, config, "cpu", torch.float32).network.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


FALLBACKS = {
    "scaled rotary": LLAMA2_7B | {"rope_scaling": {"type": "linear", "factor": 2.0}},
    "scaled rotary parameters": {"model_type": "llama", "rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                                                            "rope_theta": 10000.0}},
    "partial rotary": LLAMA2_7B | {"partial_rotary_factor": 0.5},
    "mamba": {"model_type": "mamba"},
    "gpt2": {"model_type": "gpt2"},
    "old falcon names": {k: v for k, v in FALCON_7B.items() if k != "hidden_size"} | {"n_embed": 4544},
    "unknown key": LLAMA2_7B | {"sliding_window": 4096},
    "integer eps": LLAMA2_7B | {"rms_norm_eps": 0},
    "integer theta": LLAMA2_7B | {"rope_theta": 10000},
    "string size": LLAMA2_7B | {"hidden_size": "4096"},
}


@pytest.mark.parametrize("name", list(FALLBACKS))
def test_what_the_direct_path_does_not_cover_goes_through_transformers(name, tmp_path):
    folder = _write(tmp_path / "m", FALLBACKS[name])
    with pytest.raises(Unsupported):
        direct_configs(folder)
    if name in ("gpt2", "mamba", "scaled rotary", "old falcon names"):
        config, _, note = load_configs(folder, tmp_path / "cache")
        assert note.startswith("transformers (not direct:"), note
        assert type(config).__module__.startswith("transformers.")


def test_a_bad_generation_config_goes_through_transformers(tmp_path):
    folder = _write(tmp_path / "m", LLAMA2_7B, {"eos_token_id": "</s>"})
    with pytest.raises(Unsupported):
        direct_configs(folder)


def test_the_direct_config_refuses_names_it_does_not_hold(tmp_path):
    config, generation = direct_configs(_write(tmp_path / "m", LLAMA2_7B))
    with pytest.raises(NotCached):  # never a silent default for a field it did not read
        getattr(config, "attention_bias", None)
    with pytest.raises(NotCached):
        getattr(generation, "pad_token_id", None)
    assert getattr(config, "layer_norm_epsilon", None) is None  # Llama's config has none either


# --- the tokenizer ------------------------------------------------------------------------------------------


def _auto(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _byte_level(folder: Path, clean_up: bool) -> Path:
    return save_byte_level_tokenizer(folder, clean_up=clean_up)


def _bench_wordlevel(folder: Path) -> Path:
    """bench/gpu_load.py's tokenizer: a WordLevel vocabulary of w3, w4, ... saved as PreTrainedTokenizerFast."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_load

    folder.mkdir(parents=True)
    gpu_load.write_tokenizer(folder, 2000)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("direct-tokenizers")
    out = save_tiny_tokenizers(root)
    tok = build_tiny_tokenizer("falcon")
    tok.clean_up_tokenization_spaces = True
    tok.chat_template = LLAMA2_CHAT_TEMPLATE
    tok.save_pretrained(root / "wordlevel-clean-up")
    out["wordlevel-clean-up"] = root / "wordlevel-clean-up"
    out["byte-level"] = _byte_level(root / "byte-level", clean_up=False)
    out["byte-level-clean-up"] = _byte_level(root / "byte-level-clean-up", clean_up=True)
    out["bench"] = _bench_wordlevel(root / "bench")
    return out


NAMESPACE_TEMPLATE = (
    "{%- set ns = namespace(count=0, sys='') -%}\n"
    "{%- for m in messages -%}\n"
    "  {%- if m.role == 'system' %}{% set ns.sys = m.content %}{% continue %}{% endif -%}\n"
    "  {%- set ns.count = ns.count + 1 -%}\n"
    "  {{ ns.count }}. {{ m.role | upper }}: {{ m.content | tojson }} {{ {'n': ns.count, 'é': 'ü'} | tojson }}\n"
    "  {%- if loop.last %}{% break %}{% endif %}\n"
    "{%- endfor %}\n"
    "{% if ns.sys %}[{{ ns.sys | trim }}]{% endif %}{% if add_generation_prompt %}{{ eos_token }}>{% endif %}")


@pytest.mark.parametrize("kind", ["wordlevel", "chatml", "wordlevel-clean-up", "byte-level", "byte-level-clean-up",
                                  "bench"])
def test_the_tokenizer_read_directly_equals_autotokenizer(folders, kind):
    from test_fast_tokenizer import _texts

    tok = _auto(folders[kind])
    direct = direct_tokenizer(folders[kind])
    assert mismatches(tok, direct, extra_texts=_texts(11), seed=5, random_sequences=64) == []
    for text in _texts(12, 10):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for i in range(len(ids) + 1):  # streamed: growing prefixes
            assert tok.decode(ids[:i], skip_special_tokens=True) == direct.decode(ids[:i], skip_special_tokens=True)
    assert len(direct) == len(tok) and direct.special_tokens_map == {
        k: str(v) for k, v in tok.special_tokens_map.items() if isinstance(v, str)}


LLAMA_VARIANTS = {
    "hub": {},
    "hub-later-revision": {"decoder_in_config": True},
    "fast-class-name": {"config": {"tokenizer_class": "LlamaTokenizerFast"}},
    "legacy": {"config": {"legacy": True}},
    "no-legacy-key": {"drop": ("legacy",)},
    "no-prefix-space": {"config": {"add_prefix_space": False}},
    "no-bos-eos-keys": {"drop": ("add_bos_token", "add_eos_token")},
    "eos-added": {"eos_in_template": True, "config": {"add_eos_token": True}},
    "pad-and-extra-tokens": {"added": (("<pad>", True), ("<|im_start|>", True), ("<extra>", False)),
                             "config": {"pad_token": "<pad>"}},
    "no-tokenizer-model": {"model_file": False, "drop": ("chat_template",)},
}


@pytest.mark.parametrize("variant", [*LLAMA_VARIANTS, "saved-by-transformers-5"])
def test_llama2_tokenizer_files_read_directly_equal_autotokenizer(variant, tmp_path):
    """Llama-2's LlamaTokenizer: transformers 5 rebuilds its pipeline from tokenizer.json's vocabulary; the direct
    path builds the same one, so a first start with a real Llama-2 folder needs no transformers import."""
    from test_fast_tokenizer import _sentencepiece_bpe, _texts
    from localgpt.generation.fast.tokenizer import _state_of

    if variant == "saved-by-transformers-5":
        folder = _sentencepiece_bpe(tmp_path / variant)
    else:
        folder = save_llama2_tokenizer(tmp_path / variant, **LLAMA_VARIANTS[variant])
    tok = _auto(folder)
    assert type(tok).__name__ == "LlamaTokenizer"
    want, got = _state_of(tok), direct_state(folder)
    assert json.loads(got.pop("backend")) == json.loads(want.pop("backend"))  # the whole tokenizers pipeline
    for key in ("chat_template", "special_tokens_map", "named", "named_ids", "length"):
        assert got[key] == want[key], key
    direct = CachedTokenizer(direct_state(folder))
    assert mismatches(tok, direct, extra_texts=_texts(11), seed=5, random_sequences=64) == []
    for text in _texts(12, 10) + ["東京の天気は晴れ。 北京和上海 <s> naïve"]:
        ids = tok(text)["input_ids"]
        for i in range(len(ids) + 1):  # streamed: growing prefixes
            assert tok.decode(ids[:i], skip_special_tokens=True) == direct.decode(ids[:i], skip_special_tokens=True)
    if want["chat_template"]:
        for chat in CHATS[:2]:
            prompt = tok.apply_chat_template(chat, tokenize=False)
            assert direct.apply_chat_template(chat, tokenize=False) == prompt
            assert direct.apply_chat_template(chat, tokenize=True) == tok(prompt, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("change", ["add_eos_token true, template without EOS", "add_bos_token false",
                                    "sp_model_kwargs", "another rebuilt class"])
def test_llama_files_the_direct_path_does_not_reproduce_go_through_autotokenizer(change, tmp_path):
    """transformers 5.24 keeps tokenizer.json's BOS template even when add_bos_token / add_eos_token say otherwise
    (a release may follow the flags): such files, odd SentencePiece settings and other classes whose pipelines
    transformers rebuilds are left to AutoTokenizer."""
    config = {"add_eos_token true, template without EOS": {"add_eos_token": True},
              "add_bos_token false": {"add_bos_token": False},
              "sp_model_kwargs": {"sp_model_kwargs": {"enable_sampling": True}},
              "another rebuilt class": {"tokenizer_class": "GemmaTokenizer"}}[change]
    folder = save_llama2_tokenizer(tmp_path / "llama", config=config)
    with pytest.raises(NotDirect):
        direct_state(folder)
    tok, note = load_tokenizer(folder, tmp_path / "cache")
    assert not isinstance(tok, CachedTokenizer) and note.startswith("AutoTokenizer (not direct: "), note


def test_missing_or_unusual_tokenizer_files_go_through_autotokenizer(folders, tmp_path):
    import shutil

    cases = {"no tokenizer_config.json": lambda f: (f / "tokenizer_config.json").unlink(),
             "add_bos_token": lambda f: _edit(f / "tokenizer_config.json", add_bos_token=True),
             "a special token outside the vocabulary": lambda f: _edit(f / "tokenizer_config.json", bos_token="<new>"),
             "conflicting special_tokens_map.json": lambda f: (f / "special_tokens_map.json").write_text(
                 json.dumps({"eos_token": "<pad>"})),
             "truncation": lambda f: _edit(f / "tokenizer.json", truncation={"max_length": 8, "strategy":
                                                                            "LongestFirst", "stride": 0,
                                                                            "direction": "Right"})}
    for name, change in cases.items():
        folder = tmp_path / name.replace(" ", "-")
        shutil.copytree(folders["chatml"], folder)
        change(folder)
        with pytest.raises(NotDirect):
            direct_state(folder)


def _edit(path: Path, **values) -> None:
    data = json.loads(path.read_text())
    data.update(values)
    path.write_text(json.dumps(data))


CHATS = [
    [{"role": "user", "content": "What does the report say?"}],
    [{"role": "system", "content": "  Answer from the context.  "}, {"role": "user", "content": "Grüße: 東京 🙂"},
     {"role": "assistant", "content": "It says \"yes\" <b>&amp;</b>"}, {"role": "user", "content": "and?\n\n"}],
    [{"role": "user", "content": "hi"}, {"role": "user", "content": "twice"}],  # Llama-2's template raises
]


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, LLAMA2_CHAT_TEMPLATE, NAMESPACE_TEMPLATE])
def test_chat_templates_render_as_transformers_renders_them(template):
    from transformers.utils.chat_template_utils import render_jinja_template

    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    assert renders_locally(template)
    for chat in CHATS:
        for prompt in (True, False):
            try:
                want = render_jinja_template(conversations=[copy.deepcopy(chat)], chat_template=template,
                                             add_generation_prompt=prompt, **special)[0][0]
            except Exception as exc:  # noqa: BLE001 - the same error from both
                want = type(exc).__name__
            try:
                got = render_chat(template, copy.deepcopy(chat), prompt, special)
            except Exception as exc:  # noqa: BLE001
                got = type(exc).__name__
            assert got == want


def test_templates_the_local_renderer_leaves_to_transformers():
    assert not renders_locally("{% generation %}{{ messages[0].content }}{% endgeneration %}")
    assert not renders_locally("{% set ns = namespace(_hidden=1) %}{{ ns._hidden }}")


# --- a whole first start ------------------------------------------------------------------------------------


_START = """
    import sys
    from types import SimpleNamespace
    from localgpt.generation.fast import load_fast_generator
    g = load_fast_generator(SimpleNamespace(model={folder!r}, family=None, quantization="none", device="cpu",
                                            max_new_tokens=6, temperature=0.0, top_p=1.0, context_window=None),
                            cache_dir={cache!r})
    messages = [{{"role": "user", "content": "Context: the invoice was paid on March 3. Question: when?"}}]
    print(repr(("".join(g.stream(messages)), g.format(messages), g.count_tokens("the invoice"), g._eos_ids(),
                g.context_window)))
    print(g.stats.extra["configs"], "|", g.stats.extra["tokenizer"])
    print(sorted(m for m in sys.modules if m.startswith("transformers")))
"""


def _tiny_llama_with_hub_tokenizer(folder: Path) -> Path:
    """A 2-layer random-weight Llama beside Llama-2's own kind of tokenizer files (LlamaTokenizer, chat template)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from tiny_models import _SMALL_DECODER

    save_llama2_tokenizer(folder)
    tok = _auto(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 tie_word_embeddings=False, **_SMALL_DECODER)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ["llama2", "llama2-hub-tokenizer", "falcon", "falcon-mamba"])
def test_a_first_start_imports_nothing_of_transformers_and_answers_the_same(family, tmp_path, subprocess_env):
    if family == "llama2-hub-tokenizer":
        folder = _tiny_llama_with_hub_tokenizer(tmp_path / family)
    else:
        folder = build_tiny_model(family, tmp_path / family)
    if family == "falcon-mamba":  # and a chat template, rendered without transformers
        tok = build_tiny_tokenizer("falcon-mamba", chat_template=CHATML_TEMPLATE)
        tok.save_pretrained(folder)
    outs = {}
    for path, env in (("direct", {}), ("transformers", {"LOCALGPT_DIRECT_CONFIG": "0",
                                                        "LOCALGPT_DIRECT_TOKENIZER": "0"})):
        script = textwrap.dedent(_START.format(folder=str(folder), cache=str(tmp_path / f"cache-{path}")))
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             env=subprocess_env | env, cwd=ROOT, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        outs[path] = out.stdout.strip().splitlines()[-3:]
    if LISTED:
        assert outs["direct"][1] == "config.json (direct) | tokenizer.json (tokenizers only)", outs["direct"]
        assert outs["direct"][2] == "[]", outs["direct"][2]
    else:  # a transformers release the lists do not hold yet: the subprocess goes through transformers
        assert "(direct)" not in outs["direct"][1] and "tokenizers only" not in outs["direct"][1], outs["direct"]
    assert outs["transformers"][1].startswith("transformers (direct off); cached"), outs["transformers"]
    assert outs["direct"][0] == outs["transformers"][0]  # same answer, prompt, token count, stop ids, window
