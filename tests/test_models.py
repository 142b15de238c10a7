"""The model-family registry: exact prompt strings, stop strings, detection, and finding models on disk."""

from __future__ import annotations

import json

import pytest

from localgpt.errors import ConfigError, ModelNotFound
from localgpt.models import FAMILIES, ModelFamily, detect_family, format_prompt, get_family, locate_model
from tiny_models import CHATML_TEMPLATE, build_tiny_tokenizer

ONE_TURN = [
    {"role": "system", "content": "Answer from the context."},
    {"role": "user", "content": "What is the refund window?"},
]
MULTI_TURN = [
    {"role": "system", "content": "Answer from the context."},
    {"role": "user", "content": "What is the refund window?"},
    {"role": "assistant", "content": "Thirty days."},
    {"role": "user", "content": "And for sale items?"},
]
NO_SYSTEM = [{"role": "user", "content": "Hello"}]


# --- exact prompts per family ----------------------------------------------------------------


def test_llama2_prompt_is_meta_chat_format():
    assert format_prompt(ONE_TURN, "llama2") == (
        "<s>[INST] <<SYS>>\nAnswer from the context.\n<</SYS>>\n\nWhat is the refund window? [/INST]"
    )
    assert format_prompt(MULTI_TURN, "llama2") == (
        "<s>[INST] <<SYS>>\nAnswer from the context.\n<</SYS>>\n\nWhat is the refund window? [/INST]"
        " Thirty days. </s><s>[INST] And for sale items? [/INST]"
    )
    assert format_prompt(NO_SYSTEM, "llama2") == "<s>[INST] Hello [/INST]"


def test_falcon_prompt_follows_tiiuae_instruct_template():
    assert format_prompt(ONE_TURN, "falcon") == (
        "Answer from the context.\n\nUser: What is the refund window?\n\nAssistant:"
    )
    assert format_prompt(MULTI_TURN, "falcon") == (
        "Answer from the context.\n\nUser: What is the refund window?\n\nAssistant: Thirty days."
        "\n\nUser: And for sale items?\n\nAssistant:"
    )
    # Blank lines inside a turn would read as a new speaker: tiiuae's template folds them.
    folded = format_prompt([{"role": "user", "content": "line one\n\nline two"}], "falcon")
    assert folded == "\n\nUser: line one\nline two\n\nAssistant:"


def test_falcon_mamba_prompt_is_chatml_without_default_system():
    assert format_prompt(MULTI_TURN, "falcon-mamba") == (
        "<|im_start|>system\nAnswer from the context.<|im_end|>\n"
        "<|im_start|>user\nWhat is the refund window?<|im_end|>\n"
        "<|im_start|>assistant\nThirty days.<|im_end|>\n"
        "<|im_start|>user\nAnd for sale items?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert format_prompt(NO_SYSTEM, "falcon-mamba") == (
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    )


def test_smollm2_prompt_is_chatml_with_its_default_system_prompt():
    assert format_prompt(NO_SYSTEM, "smollm2") == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    )
    assert format_prompt(ONE_TURN, "smollm2") == (
        "<|im_start|>system\nAnswer from the context.<|im_end|>\n"
        "<|im_start|>user\nWhat is the refund window?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_qwen2_prompt_is_chatml_with_qwens_default_system_prompt():
    assert format_prompt(NO_SYSTEM, "qwen2").startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    )
    assert detect_family("Qwen/Qwen2.5-1.5B-Instruct") == "qwen2"
    assert detect_family("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf") == "qwen2"


def test_mamba_base_prompt_is_urial_few_shot_ending_in_an_open_answer():
    prompt = format_prompt(MULTI_TURN, "mamba")
    assert prompt.startswith(
        "# Instruction\n\nBelow is a list of conversations between a human and an AI assistant (you).\n"
        'Users place their queries under "# Query:", and your responses are under "# Answer:".\n'
        "Answer from the context.\n\n\n# Query:\n```\n"
    )
    assert prompt.endswith(
        "# Query:\n```\nWhat is the refund window?\n```\n\n"
        "# Answer:\n```\nThirty days.\n```\n\n"
        "# Query:\n```\nAnd for sale items?\n```\n\n"
        "# Answer:\n```\n"
    )
    assert prompt.count("# Answer:\n```") == 3  # the in-context example, the earlier answer, the open one
    # The stop strings end the answer where the layout closes it.
    assert any(stop in "Thirty days.\n```\n\n# Query:" for stop in FAMILIES["mamba"].stop)


def test_every_family_has_stops_and_a_context_window():
    for family in FAMILIES.values():
        assert family.stop and all(family.stop)
        assert family.context_window >= 2048
        assert family.build_prompt(ONE_TURN)


# --- tokenizer templates first, registry for the gaps ----------------------------------------


def test_tokenizer_chat_template_is_preferred_over_the_registry():
    tokenizer = build_tiny_tokenizer("falcon-mamba", chat_template=CHATML_TEMPLATE)
    # Asked for the llama2 family, but the tokenizer knows its own format: the template wins.
    assert format_prompt(NO_SYSTEM, "llama2", tokenizer) == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"


def test_registry_fills_in_for_a_tokenizer_without_template():
    tokenizer = build_tiny_tokenizer("llama2")
    assert not tokenizer.chat_template
    assert format_prompt(ONE_TURN, "llama2", tokenizer) == format_prompt(ONE_TURN, "llama2")


def test_bad_messages_and_unknown_family_are_config_errors():
    with pytest.raises(ConfigError, match="role"):
        format_prompt([{"role": "narrator", "content": "x"}], "llama2")
    with pytest.raises(ConfigError, match="first message"):
        format_prompt([NO_SYSTEM[0], {"role": "system", "content": "late"}], "llama2")
    with pytest.raises(ConfigError, match="unknown model family 'gpt9'.*llama2"):
        get_family("gpt9")


def test_adding_a_family_is_one_entry(monkeypatch, tmp_path):
    zephyr = ModelFamily(
        name="zephyr",
        build_prompt=lambda messages: "".join(f"<|{m['role']}|>\n{m['content']}</s>\n" for m in messages) + "<|assistant|>\n",
        stop=("</s>",),
        context_window=4096,
        name_patterns=(r"zephyr",),
    )
    monkeypatch.setitem(FAMILIES, "zephyr", zephyr)
    assert format_prompt(NO_SYSTEM, "zephyr") == "<|user|>\nHello</s>\n<|assistant|>\n"
    (tmp_path / "zephyr-7b-beta").mkdir()
    (tmp_path / "zephyr-7b-beta" / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    assert detect_family(tmp_path / "zephyr-7b-beta") == "zephyr"


# --- detection ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "family"),
    [
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "llama2"),
        ({"model_type": "falcon"}, "falcon"),
        ({"model_type": "RefinedWebModel"}, "falcon"),  # the first Falcon checkpoints' remote-code type
        ({"architectures": ["RWForCausalLM"]}, "falcon"),
        ({"model_type": "falcon_mamba"}, "falcon-mamba"),
        ({"model_type": "mamba"}, "mamba"),
        ({"model_type": "llama", "_name_or_path": "HuggingFaceTB/SmolLM2-360M-Instruct"}, "smollm2"),
        ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, "qwen2"),
        ({"model_type": "gpt_neox"}, None),
    ],
)
def test_detect_family_from_config(config, family):
    assert detect_family(config) == family


def test_detect_family_from_transformers_config_objects():
    from transformers import FalconMambaConfig, LlamaConfig, MambaConfig

    assert detect_family(FalconMambaConfig()) == "falcon-mamba"
    assert detect_family(MambaConfig()) == "mamba"
    assert detect_family(LlamaConfig()) == "llama2"


def test_detect_family_from_folder_names_and_repo_ids(tmp_path):
    # A Llama-architecture folder named like SmolLM2 is SmolLM2: names beat architectures.
    folder = tmp_path / "SmolLM2-1.7B-Instruct"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert detect_family(folder) == "smollm2"
    # The temp folders around a model never decide its family.
    nested = tmp_path / "test_falcon_stuff" / "model"
    nested.mkdir(parents=True)
    (nested / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    assert detect_family(nested) == "mamba"
    # An HF cache snapshot is named by its repo.
    snapshot = tmp_path / "models--tiiuae--falcon-mamba-7b-instruct" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "falcon_mamba"}))
    assert detect_family(snapshot) == "falcon-mamba"
    assert detect_family("TheBloke/Llama-2-7B-Chat-GGUF") == "llama2"
    assert detect_family("state-spaces/mamba-130m-hf") == "mamba"
    assert detect_family("tiiuae/falcon-7b-instruct") == "falcon"


def test_detect_family_reads_gguf_metadata_when_the_file_name_says_nothing(tmp_path):
    from localgpt.generation.gguf import embedded_model_path

    assert detect_family(embedded_model_path()) == "smollm2"  # by its file name
    anonymous = tmp_path / "model.gguf"
    anonymous.symlink_to(embedded_model_path())
    assert detect_family(anonymous) == "smollm2"  # by general.name inside the file


# --- finding a model -----------------------------------------------------------------------------


def test_missing_model_folder_says_how_to_provide_one(tmp_path):
    with pytest.raises(ModelNotFound) as info:
        locate_model(str(tmp_path / "no-such-model"))
    message = str(info.value)
    assert "\n" not in message
    assert "config.json" in message and "huggingface-cli download" in message


def test_folder_without_config_is_not_a_model(tmp_path):
    with pytest.raises(ModelNotFound, match="config.json"):
        locate_model(str(tmp_path))


def test_repo_id_not_in_the_cache_names_the_download_command():
    with pytest.raises(ModelNotFound, match="huggingface-cli download nobody-here/no-such-model-xyz"):
        locate_model("nobody-here/no-such-model-xyz")
