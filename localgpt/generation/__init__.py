"""Text generation: ``get_generator(settings)`` is the one way the CLI, the UI and the tests get a model.

Backends (each a short module): ``transformers_backend`` (CUDA bf16, bitsandbytes, MPS, CPU),
``gguf`` (llama.cpp, the embedded SmolLM2 default), ``openai_http`` (a vLLM/TGI/llama.cpp/Ollama
server) and, when another module provides it, ``fast`` (a static-cache GPU decode engine).
Loaded models are kept per process, so the UI loads a model once; nothing loads at import.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from pathlib import Path
from typing import Any

from localgpt.errors import ConfigError
from localgpt.generation.base import GenerationStats, Generator, StreamTimer

__all__ = ["GenerationStats", "Generator", "StreamTimer", "clear_generator_cache", "get_generator", "resolve_backend"]

_CACHE: dict[tuple, Any] = {}
_CACHE_LOCK = threading.Lock()


def _is_gguf(model: str | None) -> bool:
    if not model:
        return True  # unset: the embedded SmolLM2 GGUF
    path = Path(model).expanduser()
    return path.suffix.lower() == ".gguf"


def resolve_backend(settings: Any) -> str:
    """Which backend ``settings`` mean: "openai", "llamacpp", "gguf", "fast" or "transformers"."""
    backend = settings.backend
    if backend == "extractive":
        raise ConfigError("backend 'extractive' answers with quoted passages and has no generator; "
                          "pick auto, transformers, gguf, llamacpp or openai to generate text")
    if backend == "auto":
        if settings.openai_url:
            return "openai"
        backend = "gguf" if _is_gguf(settings.model) else "transformers"
    if backend == "transformers" and settings.engine == "fast":
        return "fast"
    return backend


def _cache_key(backend: str, settings: Any) -> tuple:
    model = settings.model
    if model and Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())
    key = (backend, model, settings.family, settings.context_window)
    if backend in ("transformers", "fast"):
        key += (settings.device, settings.quantization)
    if backend == "openai":
        key += (settings.openai_url, settings.openai_model)
    if backend == "fast":
        # The fast engine's sampling settings are fixed at load (its compiled sampled step); the number
        # of new tokens is not (every caller passes max_new_tokens), so a serve request's max_tokens
        # does not load another copy of the model.
        key += (settings.temperature, settings.top_p)
    return key


def _load(backend: str, settings: Any):
    if backend == "openai":
        from localgpt.generation.openai_http import load_openai_generator

        return load_openai_generator(settings)
    if backend in ("gguf", "llamacpp"):
        from localgpt.generation.gguf import load_gguf_generator

        return load_gguf_generator(settings, prefer="llamacpp" if backend == "llamacpp" else "auto")
    if backend == "fast":
        try:
            from localgpt.generation.fast import load_fast_generator
        except ModuleNotFoundError as exc:
            if exc.name != "localgpt.generation.fast":
                raise
            raise ConfigError("engine 'fast' is not part of this install; use engine='hf'") from None
        return load_fast_generator(settings)
    if backend == "transformers":
        from localgpt.generation.transformers_backend import load_transformers_generator

        return load_transformers_generator(settings)
    raise ConfigError(f"unknown generator backend {backend!r}")


def _view(generator: Any, settings: Any):
    """A per-caller copy that shares the loaded model but has its own sampling settings and stats."""
    if not all(hasattr(generator, a) for a in ("max_new_tokens", "temperature", "top_p")):
        return generator
    view = copy.copy(generator)
    view.max_new_tokens = settings.max_new_tokens
    view.temperature = settings.temperature
    view.top_p = settings.top_p
    view.stats = dataclasses.replace(generator.stats, extra=dict(generator.stats.extra))
    return view


def get_generator(settings: Any) -> Generator:
    """The generator ``settings`` describe, loaded once per process and shared by later calls.

    Sampling settings (max_new_tokens, temperature, top_p) can change between calls without a
    reload; each call gets its own ``stats``. Raises ``ModelNotFound`` or ``ConfigError`` with a
    one-line message; never downloads.
    """
    from localgpt.offline import enforce_offline

    enforce_offline()
    backend = resolve_backend(settings)
    key = _cache_key(backend, settings)
    with _CACHE_LOCK:  # two UI sessions asking at once load the model once
        generator = _CACHE.get(key)
        if generator is None:
            generator = _CACHE[key] = _load(backend, settings)
    return _view(generator, settings)


def clear_generator_cache() -> None:
    """Forget every loaded model (their memory goes when the last user lets go)."""
    with _CACHE_LOCK:
        for generator in _CACHE.values():
            close = getattr(generator, "close", None)
            if callable(close):
                try:
                    close()
                except Exception:  # noqa: BLE001 - closing is best effort
                    pass
        _CACHE.clear()
