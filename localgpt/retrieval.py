"""Finding the chunks that answer a question: dense, keyword (BM25), hybrid (RRF) or MMR,
with metadata filters, near-duplicate removal and an optional local cross-encoder.

Every returned chunk carries ``score`` (the mode's own ranking score) and ``similarity``
(cosine similarity of the question and the chunk under the collection's embedder), so
abstention can use one calibrated number whatever the mode. Never touches the network.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever

from localgpt.config import Settings
from localgpt.documents import SourceRef
from localgpt.embeddings import Embedder, get_embedder
from localgpt.errors import ModelNotFound
from localgpt.store import Store

RRF_K = 60
DUPLICATE_COSINE = 0.97


@dataclass
class Filters:
    """Restrict a search to a file, a folder or a file type (extension)."""

    file: str | None = None
    folder: str | None = None
    ext: str | None = None

    def active(self) -> bool:
        return bool(self.file or self.folder or self.ext)


@dataclass
class SearchResult:
    hits: list[SourceRef]
    query_vector: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def best_similarity(self) -> float:
        return max((h.similarity for h in self.hits), default=0.0)


class Retriever:
    """Searches one collection. Build it once; ``search`` is cheap and thread-safe for reads."""

    def __init__(self, store: Store, embedder: Embedder, settings: Settings):
        self.store = store
        self.embedder = embedder
        self.settings = settings
        store.check_embedder(embedder.name, embedder.dim)
        self._reranker = None

    @classmethod
    def from_settings(cls, settings: Settings) -> "Retriever":
        store = Store.open(settings, create=False)
        return cls(store, get_embedder(settings.embedder), settings)

    def search(
        self, query: str, *, k: int | None = None, mode: str | None = None, filters: Filters | None = None,
        fetch: int | None = None,
    ) -> SearchResult:
        k = k or self.settings.k
        mode = mode or self.settings.retrieval_mode
        fetch = max(fetch or 4 * k, 20)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        qvec = self.embedder.embed([query], query=True)[0]
        timings["embed_query"] = time.perf_counter() - t0
        allowed = None
        if filters and filters.active():
            allowed = self.store.sha256s_matching(file=filters.file, folder=filters.folder, ext=filters.ext)

        t0 = time.perf_counter()
        if mode == "dense":
            candidates = self.store.dense_search(qvec, fetch, allowed)
        elif mode == "keyword":
            candidates = self.store.keyword_search(query, fetch, allowed)
        elif mode == "hybrid":
            dense = self.store.dense_search(qvec, fetch, allowed)
            keyword = self.store.keyword_search(query, fetch, allowed)
            candidates = reciprocal_rank_fusion([dense, keyword])
        elif mode == "mmr":
            candidates = self.store.dense_search(qvec, fetch, allowed)
        else:
            raise ValueError(f"unknown retrieval mode {mode!r}: use dense, keyword, hybrid or mmr")
        timings["search"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        vectors = self.store.vectors([c.chunk_id for c in candidates])
        for c in candidates:
            vec = vectors.get(c.chunk_id)
            c.similarity = float(vec @ qvec) if vec is not None else 0.0
        candidates = drop_near_duplicates(candidates, vectors)
        if mode == "mmr":
            candidates = maximal_marginal_relevance(qvec, candidates, vectors, k)
        if self.settings.reranker:
            candidates = self._rerank(query, candidates)
        timings["postprocess"] = time.perf_counter() - t0
        return SearchResult(candidates[:k], qvec, timings)

    def _rerank(self, query: str, candidates: list[SourceRef]) -> list[SourceRef]:
        if self._reranker is None:
            from pathlib import Path

            path = Path(self.settings.reranker).expanduser()
            if not path.is_dir():
                raise ModelNotFound(f"reranker {path} is not a folder: give a local cross-encoder model folder")
            from sentence_transformers import CrossEncoder

            self._reranker = CrossEncoder(str(path), local_files_only=True)
        if not candidates:
            return candidates
        scores = self._reranker.predict([(query, c.text) for c in candidates])
        for c, s in zip(candidates, scores):
            c.score = float(s)
        return sorted(candidates, key=lambda c: c.score, reverse=True)

    def as_langchain(self, **search_kwargs: Any) -> "LangChainRetriever":
        return LangChainRetriever(retriever=self, search_kwargs=search_kwargs)


def reciprocal_rank_fusion(rankings: list[list[SourceRef]], k: int = RRF_K) -> list[SourceRef]:
    """Fuse rankings by 1/(k + rank); a chunk found by both ranks above one found by either."""
    scores: dict[str, float] = {}
    refs: dict[str, SourceRef] = {}
    for ranking in rankings:
        for rank, ref in enumerate(ranking):
            scores[ref.chunk_id] = scores.get(ref.chunk_id, 0.0) + 1.0 / (k + rank + 1)
            refs.setdefault(ref.chunk_id, ref)
    fused = sorted(refs.values(), key=lambda r: scores[r.chunk_id], reverse=True)
    for ref in fused:
        ref.score = scores[ref.chunk_id]
    return fused


def drop_near_duplicates(candidates: list[SourceRef], vectors: dict[str, np.ndarray]) -> list[SourceRef]:
    """Keep the first of chunks that say the same thing (same text, or vectors almost equal)."""
    kept: list[SourceRef] = []
    kept_vecs: list[np.ndarray] = []
    seen_text: set[str] = set()
    for c in candidates:
        norm = " ".join(c.text.split())
        if norm in seen_text:
            continue
        vec = vectors.get(c.chunk_id)
        if vec is not None and kept_vecs and float(np.max(np.stack(kept_vecs) @ vec)) >= DUPLICATE_COSINE:
            continue
        seen_text.add(norm)
        kept.append(c)
        if vec is not None:
            kept_vecs.append(vec)
    return kept


def maximal_marginal_relevance(
    qvec: np.ndarray, candidates: list[SourceRef], vectors: dict[str, np.ndarray], k: int, lambda_mult: float = 0.5
) -> list[SourceRef]:
    pool = [c for c in candidates if c.chunk_id in vectors]
    chosen: list[SourceRef] = []
    while pool and len(chosen) < k:
        def mmr(c: SourceRef) -> float:
            redundancy = max((float(vectors[c.chunk_id] @ vectors[s.chunk_id]) for s in chosen), default=0.0)
            return lambda_mult * float(vectors[c.chunk_id] @ qvec) - (1 - lambda_mult) * redundancy

        best = max(pool, key=mmr)
        chosen.append(best)
        pool.remove(best)
    return chosen


class LangChainRetriever(BaseRetriever):
    """The same search as a LangChain retriever (chunks as Documents with citation metadata)."""

    retriever: Any
    search_kwargs: dict = {}

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        result = self.retriever.search(query, **self.search_kwargs)
        return [ref_to_document(h) for h in result.hits]


def ref_to_document(ref: SourceRef) -> Document:
    return Document(
        page_content=ref.text,
        metadata={
            "id": ref.chunk_id, "source": ref.source, "sources": ref.sources, "page": ref.page,
            "heading": ref.heading, "score": ref.score, "similarity": ref.similarity,
        },
    )
