"""An OpenAI-compatible HTTP server as the generator: vLLM, TGI, llama.cpp server, Ollama.

Chat messages go to ``/v1/chat/completions`` (the server applies the model's chat template), finished
prompt strings to ``/v1/completions``; both stream over server-sent events. This module only ever talks
to the URL the user configured (``openai_url``), with proxies from the environment ignored, and turns
connection and HTTP failures into one line that says what to fix.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Iterator, Sequence
from urllib.parse import urlsplit

from localgpt.errors import ConfigError, LocalGPTError, ModelNotFound
from localgpt.generation.base import GenerationStats, StreamTimer
from localgpt.models import FAMILIES

DEFAULT_MODEL_NAME = "local"  # Settings.openai_model's default: "whatever the server serves" when it serves one
DEFAULT_CONTEXT_WINDOW = 4096
MAX_STOPS = 4  # the OpenAI API (and vLLM, TGI) accept at most four stop strings


class ServerUnavailable(LocalGPTError):
    """The OpenAI-compatible server cannot be reached or answered with an error."""


def normalise_base_url(url: str) -> str:
    """``http://host:8000`` and ``http://host:8000/v1/`` both become ``http://host:8000/v1``."""
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"openai_url must be an http(s) URL such as http://127.0.0.1:8000/v1, not {url!r}")
    return url if parts.path else url + "/v1"


def _error_text(response: Any) -> str:
    """The server's own words from a read error response (OpenAI, vLLM, TGI and Ollama shapes)."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200].strip()
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        return str(error.get("message") or error.get("detail") or error)
    return str(error)


class OpenAIGenerator:
    """Streams from an OpenAI-compatible server behind the ``Generator`` interface."""

    def __init__(self, base_url: str, model: str, *, context_window: int = DEFAULT_CONTEXT_WINDOW,
                 family: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 0.95, timeout_s: float = 300.0, load_s: float = 0.0):
        import httpx

        self.base_url = normalise_base_url(base_url)
        self.model = model
        self.name = f"{model} @ {self.base_url}"
        self.context_window = context_window
        self.family = FAMILIES.get(family) if family else None
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        # trust_env=False: a proxy from the environment must never see a "local" request.
        self._client = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=5.0), trust_env=False)
        self.stats = GenerationStats(backend="openai", model=self.name, device="server", load_s=load_s)

    # --- the Generator interface ---------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        # The server's tokenizer is not here; three characters per token overestimates for English
        # and most European text, so context packing errs on the safe side.
        return math.ceil(len(text) / 3)

    def stream(self, prompt: str | Sequence[dict], *, max_new_tokens: int | None = None,
               stop: list[str] | None = None) -> Iterator[str]:
        chat = not isinstance(prompt, str)
        if stop is None:
            stop = list(self.family.stop) if self.family else []
        body: dict[str, Any] = {
            "model": self.model,
            "stream": True,
            "max_tokens": max_new_tokens or self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p if self.temperature > 0 else 1.0,
        }
        if stop:
            body["stop"] = list(stop)[:MAX_STOPS]
        if chat:
            body["messages"] = [{"role": m["role"], "content": m["content"]} for m in prompt]
            estimate = sum(self.count_tokens(m["content"]) for m in prompt)
        else:
            body["prompt"] = prompt
            estimate = self.count_tokens(prompt)
        endpoint = "/chat/completions" if chat else "/completions"

        timer = StreamTimer(self.stats, prompt_tokens=estimate)
        self.stats.extra["prompt_tokens_estimated"] = True
        try:
            for event in self._events(endpoint, body):
                usage = event.get("usage")
                if usage:  # vLLM and llama.cpp send it when asked (stream_options) or at the end
                    self.stats.prompt_tokens = int(usage.get("prompt_tokens") or self.stats.prompt_tokens)
                    self.stats.extra["prompt_tokens_estimated"] = False
                for choice in event.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if piece:  # one chunk per token on every server we know; role-only chunks carry none
                        timer.token()
                        yield piece
        finally:
            timer.finish()

    # --- HTTP ------------------------------------------------------------------------------

    def _events(self, endpoint: str, body: dict) -> Iterator[dict]:
        import httpx

        url = self.base_url + endpoint
        try:
            with self._client.stream("POST", url, json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    self._raise_for(response, url)
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue  # SSE comments (": ping"), event names, blank separators
                    data = line[len("data:"):].strip()
                    if data == "[DONE]":
                        return
                    event = json.loads(data)
                    if isinstance(event, dict) and event.get("error"):
                        raise ServerUnavailable(f"server at {self.base_url} failed mid-answer: {_error_text_from(event)}")
                    yield event
        except httpx.ConnectError as exc:
            raise ServerUnavailable(self._unreachable(exc)) from None
        except httpx.TimeoutException as exc:
            raise ServerUnavailable(f"server at {self.base_url} did not answer in time ({type(exc).__name__}); "
                                    "is it overloaded, or is openai_url right?") from None
        except httpx.HTTPError as exc:
            raise ServerUnavailable(f"talking to {self.base_url} failed: {exc}") from None

    def _unreachable(self, exc: Exception) -> str:
        return (f"cannot connect to the OpenAI-compatible server at {self.base_url} ({exc or 'connection refused'}): "
                "start it (for example `python -m llama_cpp.server --model model.gguf`) or fix openai_url")

    def _raise_for(self, response: Any, url: str) -> None:
        detail = _error_text(response)
        if response.status_code == 404 and "model" in detail.lower():
            raise ModelNotFound(f"server at {self.base_url} does not know model {self.model!r}: {detail}; "
                                "set openai_model to a name it serves")
        raise ServerUnavailable(f"server at {self.base_url} answered HTTP {response.status_code} for "
                                f"{url.removeprefix(self.base_url)}: {detail or response.reason_phrase}")

    def served_models(self) -> list[dict]:
        """The server's ``/v1/models`` list (empty when it has no such endpoint)."""
        import httpx

        try:
            response = self._client.get(self.base_url + "/models", timeout=10.0)
        except httpx.ConnectError as exc:
            raise ServerUnavailable(self._unreachable(exc)) from None
        except httpx.HTTPError as exc:
            raise ServerUnavailable(f"talking to {self.base_url} failed: {exc}") from None
        if response.status_code >= 400:
            return []
        try:
            data = response.json().get("data") or []
        except (ValueError, AttributeError):
            return []
        return [m for m in data if isinstance(m, dict) and m.get("id")]

    def close(self) -> None:
        self._client.close()


def _error_text_from(event: dict) -> str:
    error = event.get("error")
    return str(error.get("message", error)) if isinstance(error, dict) else str(error)


def load_openai_generator(settings: Any) -> OpenAIGenerator:
    """Connect to ``settings.openai_url`` and check that it serves ``settings.openai_model``.

    With the default model name ("local") and a server that serves exactly one model, that model is
    used; with any other name the server does not list, a ``ModelNotFound`` names the ones it has.
    """
    if not settings.openai_url:
        raise ConfigError("backend 'openai' needs openai_url, e.g. http://127.0.0.1:8000/v1")
    started = time.perf_counter()
    generator = OpenAIGenerator(settings.openai_url, settings.openai_model, family=settings.family,
                                context_window=settings.context_window or DEFAULT_CONTEXT_WINDOW,
                                max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                top_p=settings.top_p)
    served = generator.served_models()
    names = [m["id"] for m in served]
    if names and settings.openai_model not in names:
        if settings.openai_model == DEFAULT_MODEL_NAME and len(names) == 1:
            generator.model = names[0]
            generator.name = generator.stats.model = f"{names[0]} @ {generator.base_url}"
        else:
            generator.close()
            raise ModelNotFound(f"server at {generator.base_url} does not serve model {settings.openai_model!r}; "
                                f"it serves: {', '.join(names)}. Set openai_model to one of them")
    info = next((m for m in served if m["id"] == generator.model), {})
    # vLLM reports max_model_len; llama.cpp's server reports n_ctx_train in meta.
    served_window = info.get("max_model_len") or (info.get("meta") or {}).get("n_ctx_train")
    if not settings.context_window and served_window:
        generator.context_window = int(served_window)
    generator.stats.load_s = time.perf_counter() - started
    return generator
