"""The model-family registry: how each family wants its prompt, where it stops, how much it reads.

One table (``FAMILIES``); adding a family is one entry. ``format_prompt`` prefers a tokenizer's own
chat template and falls back to the registry; ``detect_family`` recognises a model from its config,
its GGUF metadata or its name; ``locate_model`` finds a model on this machine. Nothing here ever
downloads anything or loads weights.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from localgpt.errors import ConfigError, ModelNotFound

Message = Mapping[str, str]  # {"role": "system" | "user" | "assistant", "content": str}


# --- prompt builders -------------------------------------------------------------------------


def _split_system(messages: Sequence[Message]) -> tuple[str | None, list[Message]]:
    """The leading system message (if any) and the turns after it; roles are checked here once."""
    messages = list(messages)
    if not messages:
        raise ConfigError("a chat prompt needs at least one message")
    for message in messages:
        if message.get("role") not in ("system", "user", "assistant"):
            raise ConfigError(f"message role must be system, user or assistant, not {message.get('role')!r}")
    system = None
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    if any(m["role"] == "system" for m in messages):
        raise ConfigError("only the first message may be a system message")
    return system, messages


def _llama2(messages: Sequence[Message]) -> str:
    # Meta's reference format (and the template in the Llama-2-chat tokenizers): every user turn is
    # "<s>[INST] … [/INST]", every answer " … </s>"; the system prompt sits inside the first [INST].
    system, turns = _split_system(messages)
    out: list[str] = []
    for i, message in enumerate(turns):
        content = message["content"].strip()
        if message["role"] == "user":
            if i == 0 and system is not None:
                content = f"<<SYS>>\n{system.strip()}\n<</SYS>>\n\n{content}"
            out.append(f"<s>[INST] {content} [/INST]")
        else:
            out.append(f" {content} </s>")
    return "".join(out)


def _falcon(messages: Sequence[Message]) -> str:
    # The chat template tiiuae ship in falcon-7b-instruct's tokenizer_config.json: system text first,
    # then "\n\nUser: …" / "\n\nAssistant: …" with blank lines inside a turn folded to one newline.
    system, turns = _split_system(messages)

    def clean(text: str) -> str:
        return text.strip().replace("\r\n", "\n").replace("\n\n", "\n")

    out = [(system or "").strip()]
    for message in turns:
        speaker = "User" if message["role"] == "user" else "Assistant"
        out.append(f"\n\n{speaker}: {clean(message['content'])}")
    out.append("\n\nAssistant:")
    return "".join(out)


def _chatml(default_system: str | None) -> Callable[[Sequence[Message]], str]:
    def build(messages: Sequence[Message]) -> str:
        system, turns = _split_system(messages)
        if system is None:
            system = default_system
        out = [] if system is None else [f"<|im_start|>system\n{system}<|im_end|>\n"]
        out += [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in turns]
        out.append("<|im_start|>assistant\n")
        return "".join(out)

    return build


URIAL_HEADER = (
    "Below is a list of conversations between a human and an AI assistant (you).\n"
    'Users place their queries under "# Query:", and your responses are under "# Answer:".\n'
)
URIAL_SYSTEM = (
    "You are a helpful, respectful, and honest assistant. You answer from the context you are "
    "given, say so when it does not hold the answer, and keep answers short."
)
_URIAL_EXAMPLE = (
    ("Context: The Eiffel Tower was finished in 1889 for the World's Fair in Paris.\n\n"
     "Question: When was the Eiffel Tower finished?"),
    "The Eiffel Tower was finished in 1889, for the World's Fair in Paris.",
)


def _urial(messages: Sequence[Message]) -> str:
    # Base models have no chat format; URIAL (Lin et al., 2023) shows that a short instruction plus
    # one in-context example in a markdown-like layout makes them answer and then stop at "# Query:".
    system, turns = _split_system(messages)
    # The header explains the layout to the model; a system message replaces only the persona.
    out = [f"# Instruction\n\n{URIAL_HEADER}{(system or URIAL_SYSTEM).strip()}\n\n\n"]
    example = [{"role": "user", "content": _URIAL_EXAMPLE[0]}, {"role": "assistant", "content": _URIAL_EXAMPLE[1]}]
    for message in [*example, *turns]:
        header = "# Query:" if message["role"] == "user" else "# Answer:"
        out.append(f"{header}\n```\n{message['content'].strip()}\n```\n\n")
    out.append("# Answer:\n```\n")
    return "".join(out)


# --- the registry ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFamily:
    """Everything localgpt needs to know to prompt one family of models."""

    name: str
    build_prompt: Callable[[Sequence[Message]], str]
    stop: tuple[str, ...]
    context_window: int
    model_types: tuple[str, ...] = ()  # config.json "model_type" / GGUF "general.architecture"
    architectures: tuple[str, ...] = ()  # config.json "architectures"
    name_patterns: tuple[str, ...] = ()  # regexes matched against the folder, file or repo name
    description: str = ""


SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Order matters for detection: a name match wins over a model_type match, and the more specific
# names come first ("falcon-mamba" before "falcon" and "mamba", "smollm" before llama).
FAMILIES: dict[str, ModelFamily] = {
    family.name: family
    for family in (
        ModelFamily(
            name="smollm2",
            build_prompt=_chatml(SMOLLM2_SYSTEM),
            stop=("<|im_end|>", "<|im_start|>"),
            context_window=8192,
            name_patterns=(r"smollm",),
            description="SmolLM2 instruct (ChatML with its default system prompt); the embedded CPU default.",
        ),
        ModelFamily(
            name="qwen2",
            build_prompt=_chatml(QWEN_SYSTEM),
            stop=("<|im_end|>", "<|im_start|>", "<|endoftext|>"),
            context_window=8192,  # Qwen2.5 reads 32k; 8k keeps llama.cpp's KV cache small on a laptop
            model_types=("qwen2",),
            architectures=("Qwen2ForCausalLM",),
            name_patterns=(r"qwen[-_ ]?2",),
            description="Qwen2 / Qwen2.5 instruct, also as GGUF (ChatML with Qwen's default system prompt).",
        ),
        ModelFamily(
            name="falcon-mamba",
            build_prompt=_chatml(None),
            stop=("<|im_end|>", "<|im_start|>"),
            context_window=8192,
            model_types=("falcon_mamba",),
            architectures=("FalconMambaForCausalLM",),
            name_patterns=(r"falcon[-_ ]?mamba",),
            description="FalconMamba-7B-instruct (ChatML, no default system prompt).",
        ),
        ModelFamily(
            name="mamba",
            build_prompt=_urial,
            stop=("\n```", "# Query:"),
            context_window=4096,
            model_types=("mamba", "mamba2"),
            architectures=("MambaForCausalLM", "Mamba2ForCausalLM"),
            name_patterns=(r"mamba",),
            description="Mamba base models: no chat format, a URIAL-style few-shot prompt.",
        ),
        ModelFamily(
            name="falcon",
            build_prompt=_falcon,
            stop=("\nUser:", "User:"),
            context_window=2048,
            model_types=("falcon", "RefinedWeb", "RefinedWebModel"),
            architectures=("FalconForCausalLM", "RWForCausalLM"),
            name_patterns=(r"falcon",),
            description="Falcon-7B/40B-instruct ('User:' / 'Assistant:' turns).",
        ),
        ModelFamily(
            name="llama2",
            build_prompt=_llama2,
            stop=("</s>", "[INST]"),
            context_window=4096,
            model_types=("llama",),
            architectures=("LlamaForCausalLM",),
            name_patterns=(r"llama[-_ ]?2",),
            description="Llama-2-chat ([INST] <<SYS>> … [/INST]).",
        ),
    )
}


def get_family(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"unknown model family {name!r}; choose one of: {', '.join(FAMILIES)}") from None


def format_prompt(messages: Sequence[Message], family: str | ModelFamily, tokenizer: Any = None) -> str:
    """The prompt string for ``messages``: the tokenizer's chat template when it has one, else the family's."""
    fam = family if isinstance(family, ModelFamily) else get_family(family)
    _split_system(messages)  # same validation whichever path formats the prompt
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - a template that rejects e.g. a system turn: the registry still knows
            pass
    return fam.build_prompt(messages)


# --- recognising a model ---------------------------------------------------------------------


def _read_gguf_metadata(path: Path) -> dict[str, Any]:
    from gguf import GGUFReader  # imported here: reading metadata is the only use

    reader = GGUFReader(str(path))
    out: dict[str, Any] = {}
    for key in ("general.architecture", "general.name", "general.basename"):
        field = reader.fields.get(key)
        if field is not None:
            out[key] = field.contents()
    return out


def _config_dict(source: Any) -> tuple[dict[str, Any], str]:
    """(config-like dict, a name to match patterns against) from a path, a dict or a PretrainedConfig."""
    if isinstance(source, Mapping):
        return dict(source), str(source.get("_name_or_path", ""))
    if hasattr(source, "to_dict") and hasattr(source, "model_type"):
        return source.to_dict() | {"model_type": source.model_type}, str(getattr(source, "name_or_path", "") or "")
    path = Path(str(source)).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        meta = _read_gguf_metadata(path)
        name = " ".join([path.stem, str(meta.get("general.name", "")), str(meta.get("general.basename", ""))])
        return {"model_type": meta.get("general.architecture")}, name
    if path.is_dir() and (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text(encoding="utf-8")), _folder_name(path)
    return {}, str(source)


def _folder_name(path: Path) -> str:
    """The name that says what a model folder holds: its own name, or the repo of an HF cache snapshot."""
    parts = path.resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--"):].replace("--", "/")
    return path.name


def _short_name(name: str) -> str:
    # "org/model" stays whole; a filesystem path keeps its last part, so that the folders above a
    # model (a temp dir called test_falcon, say) never decide its family.
    return name if re.fullmatch(r"[\w.-]+/[\w.-]+", name) else Path(name).name


def _match_names(name: str) -> str | None:
    for family in FAMILIES.values():
        if any(re.search(pattern, name) for pattern in family.name_patterns):
            return family.name
    return None


def detect_family(source: Any) -> str | None:
    """The registry family of a model: a folder, a GGUF file, a repo id, a config dict or a PretrainedConfig.

    Names win over architectures (SmolLM2 and Llama-2 share the llama architecture); returns None when
    nothing matches, and the caller picks a default.
    """
    if isinstance(source, (str, Path)) and str(source).endswith(".gguf"):
        # The file name usually says it all; reading GGUF metadata parses the whole vocabulary (~2 s).
        by_name = _match_names(Path(source).stem.lower())
        if by_name:
            return by_name
    config, name = _config_dict(source)
    name = " ".join(_short_name(n) for n in (name, str(config.get("_name_or_path", "")))).lower()
    by_name = _match_names(name)
    if by_name:
        return by_name
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    for family in FAMILIES.values():
        if model_type in family.model_types or any(a in family.architectures for a in architectures):
            return family.name
    return None


# --- finding a model on this machine ---------------------------------------------------------


def missing_model_advice(name: str) -> str:
    """One line that says how to put a model on this machine (used by every ModelNotFound)."""
    repo = name if re.fullmatch(r"[\w.-]+/[\w.-]+", name) else "<org>/<model>"
    return (
        f"model {name!r} is not on this machine: set model to a folder that holds config.json (or a .gguf file), "
        f"or run `huggingface-cli download {repo}` on a machine with internet and copy its "
        f"~/.cache/huggingface folder here; localgpt never downloads"
    )


def locate_model(name: str) -> Path:
    """A local folder or file for ``name``: a path as given, or a repo id already in the user's HF cache."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if (path / "config.json").is_file() or any(path.glob("*.gguf")):
            return path
        raise ModelNotFound(missing_model_advice(name))
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not name.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            # local_files_only: resolved from the cache folder alone, no request is ever made.
            cached = Path(snapshot_download(name, local_files_only=True))
        except Exception:  # noqa: BLE001 - LocalEntryNotFoundError, a bad id, no cache at all
            raise ModelNotFound(missing_model_advice(name)) from None
        if (cached / "config.json").is_file() or any(cached.glob("*.gguf")):
            return cached
    raise ModelNotFound(missing_model_advice(name))
