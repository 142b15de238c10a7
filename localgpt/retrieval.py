"""Finding the chunks that answer a question: dense, keyword (BM25), hybrid (RRF) or MMR,
with metadata filters, near-duplicate removal, sentence-level evidence and an optional local
cross-encoder.

Every returned chunk carries ``score`` (the mode's own ranking score) and ``similarity``
(cosine similarity of the question and the chunk under the collection's embedder), so
abstention can use one calibrated number whatever the mode. With ``sentence_rerank`` the top
candidates are split into sentences and embedded too: a chunk whose best sentence is close to
the question moves up (one precise sentence in a long chunk is diluted in the chunk's vector),
and the chain reuses those sentences for the supporting evidence and the answerability score.
Never touches the network.
"""

from __future__ import annotations

import math
import re
import time
from collections import OrderedDict
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
from localgpt.text import has_cjk, keyword_terms, split_sentences, text_language

RRF_K = 60
DUPLICATE_COSINE = 0.97
SENTENCE_CACHE = 4096  # chunks whose sentence vectors a Retriever keeps
DF_CAP = 50
# A Latin-script word of a CJK question in at least this share of the chunks (and DF_CAP of them)
# is too common to search on its own (Retriever.rare_latin_terms).
LATIN_COMMON_SHARE = 0.02
# A sentence's evidence score = cosine similarity + LEXICAL_WEIGHT × the IDF-weighted share of
# the question's terms it holds: e5 alone rates a sentence that merely shares the topic ("localgpt
# was built for …") close to one that answers ("… stores their embeddings under local_data/").
# Chosen on the dev half of bench/eval/qa.jsonl.
LEXICAL_WEIGHT = 0.1
# The same for the verifier's P(states the answer) (``evidence = "verifier"``): half the weight,
# since it reads the question with the sentence; set by that reasoning, not tuned on a dev set.
VERIFIER_LEXICAL_WEIGHT = 0.05
# Words that make a question a question, not what it asks about (as keyword terms: CJK bigrams).
QUESTION_WORDS = frozenset(keyword_terms(
    "什么 哪个 哪些 哪里 怎么 怎样 如何 为什么 多少 是否 可以 能否 需要 ですか ますか でしょうか どの どう どこ どれ"
    " いつ 誰 何 なぜ 教えて ください please tell much many long often",
    stopwords=False,
))
# Latin-script words inside a Chinese or Japanese question (command names, paths, product
# names): searched on their own too, so they are not drowned by the question's CJK bigrams.
_LATIN_TERM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/+:-]*[A-Za-z0-9]|[A-Za-z]")


@dataclass
class Filters:
    """Restrict a search to a file, a folder or a file type (extension)."""

    file: str | None = None
    folder: str | None = None
    ext: str | None = None

    def active(self) -> bool:
        return bool(self.file or self.folder or self.ext)


@dataclass
class Evidence:
    """The statements of one chunk: how close each is to the question, and their evidence score
    (that plus a little for holding the question's rare terms). ``kind`` says what "close" is:
    "embedder", the cosine similarity of sentence and question vectors, or "verifier", the answer
    verifier's probability that the sentence states the answer."""

    sentences: list[str]
    similarities: np.ndarray
    scores: np.ndarray
    kind: str = "embedder"

    @property
    def best(self) -> float:
        """The best sentence's similarity (cosine or P(states the answer), as ``kind`` says)."""
        return float(self.similarities.max()) if len(self.similarities) else 0.0

    @property
    def best_score(self) -> float:
        return float(self.scores.max()) if len(self.scores) else 0.0


def stem(term: str) -> str:
    """A light English suffix strip, so 'opened' covers 'open' and 'profiles' covers 'profile'."""
    if not term.isascii() or not term.isalpha():
        return term
    for suffix in ("ing", "ed", "s"):
        if term.endswith(suffix) and len(term) - len(suffix) >= 3 and not term.endswith("ss"):
            return term[: -len(suffix)]
    return term


def coverage(weights: dict[str, float], text: str) -> float:
    """The weighted share of the terms (stemmed keys of ``weights``) that ``text`` holds."""
    total = sum(weights.values())
    if total <= 0:
        return 1.0
    held = {stem(t) for t in keyword_terms(text)}
    return sum(w for t, w in weights.items() if t in held) / total


@dataclass
class SearchResult:
    hits: list[SourceRef]
    query_vector: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    evidence: dict[str, Evidence] = field(default_factory=dict)  # chunk id -> its sentences, scored

    @property
    def best_similarity(self) -> float:
        return max((h.similarity for h in self.hits), default=0.0)

    @property
    def best_verifier_score(self) -> float | None:
        """The answer verifier's highest P(states the answer) among the hits; None when it did not run."""
        return max((h.verifier_score for h in self.hits if h.verifier_score is not None), default=None)


def evidence_sentences(text: str) -> list[str]:
    """The statements of a chunk: sentences, and lines within them (headings and list items are
    not sentences); very short lines and questions are left out (a passage that asks the
    reader's question back does not support an answer)."""
    out: list[str] = []
    for s in split_sentences(text):
        for line in s.splitlines():
            line = line.strip()
            if len(line) < 8 or line.rstrip("\"'”」』)）").endswith(("?", "？")):
                continue
            out.append(line)
    return out


def latin_terms(query: str) -> str:
    """The Latin-script words of a question that also has Chinese or Japanese in it ('' if none)."""
    if not has_cjk(query):
        return ""
    return " ".join(_LATIN_TERM.findall(query))


class Retriever:
    """Searches one collection. Build it once; ``search`` is cheap and thread-safe for reads."""

    def __init__(self, store: Store, embedder: Embedder, settings: Settings):
        self.store = store
        self.embedder = embedder
        self.settings = settings
        store.check_embedder(embedder.name, embedder.dim)
        self._reranker = None
        # (chunk id, hash of its text) -> its statements and their vectors
        self._sentences: OrderedDict[tuple[str, int], tuple[list[str], np.ndarray]] = OrderedDict()
        self._df: dict[tuple[str, int], int] = {}  # (keyword term, cap) -> chunks holding it, counted up to cap
        self._df_chunks = 0  # the collection's size when _df was filled

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
        fetch = fetch or max(2 * k, 20)  # the same candidates for k=4 (ask) and k=10 (eval)
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
            rankings = [self.store.dense_search(qvec, fetch, allowed), self.store.keyword_search(query, fetch, allowed)]
            latin = self.rare_latin_terms(query)
            if latin:
                rankings.append(self.store.keyword_search(latin, fetch, allowed))
            candidates = reciprocal_rank_fusion(rankings)
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
        if self.settings.verifier == "rerank":
            candidates = self._verifier_rerank(query, candidates)
        timings["postprocess"] = time.perf_counter() - t0
        evidence: dict[str, Evidence] = {}
        by_verifier = self.settings.evidence == "verifier" and self.settings.verifier != "off"
        depth = 0 if by_verifier else self.settings.sentence_rerank
        if depth and candidates:
            t0 = time.perf_counter()
            top = candidates[:depth]
            evidence = self.evidence(query, qvec, top)
            if not self.settings.reranker:  # a cross-encoder's order stands; evidence still scores answers
                by_sentence = sorted(top, key=lambda c: evidence[c.chunk_id].best, reverse=True)
                candidates = reciprocal_rank_fusion([top, by_sentence]) + candidates[depth:]
            timings["sentences"] = time.perf_counter() - t0
        hits = candidates[:k]
        if by_verifier and hits:  # the hits' sentences read with the question: P(states the answer)
            t0 = time.perf_counter()
            evidence = self.verifier_evidence(query, qvec, hits)
            timings["sentences"] = time.perf_counter() - t0
        if self.settings.verifier == "score":  # only what is returned: k passages, not rerank_top
            if hits and all(h.chunk_id in evidence and evidence[h.chunk_id].kind == "verifier" for h in hits):
                # The verifier already read every sentence of these passages: a passage's score is its
                # best sentence's (reading the whole passages again cost ~90 ms and added nothing to the
                # refusal model next to the best sentence: bench/RESULTS.md, "Refusal model").
                for h in hits:
                    h.verifier_score = evidence[h.chunk_id].best
            else:
                t0 = time.perf_counter()
                self.verify(query, hits)
                timings["verifier"] = time.perf_counter() - t0
        return SearchResult(hits, qvec, timings, evidence)

    def rare_latin_terms(self, query: str) -> str:
        """The Latin-script words of a Chinese or Japanese question that are rare in the collection
        (names, commands), searched as a ranking of their own. A word in a large share of the
        chunks ("Debian" in a Debian manual) names no particular passage: its ranking would only
        push random chunks up, so it is left to the question's own keyword search."""
        words = latin_terms(query).split()
        if not words:
            return ""
        self._check_df_fresh()
        cap = max(DF_CAP, math.ceil(LATIN_COMMON_SHARE * self._df_chunks))
        rare = [w for w in words if min((self.document_frequency(t, cap) for t in keyword_terms(w)), default=cap) < cap]
        return " ".join(rare)

    def _check_df_fresh(self) -> None:
        n = max(self.store.count_chunks(), 1)
        if n != self._df_chunks:  # the collection changed (an ingest meanwhile): counts are stale
            self._df.clear()
            self._df_chunks = n

    def document_frequency(self, term: str, cap: int = DF_CAP) -> int:
        """In how many chunks a keyword term occurs (counted up to ``cap``: beyond it a term is
        common, and how common no longer matters to its weight)."""
        if (term, cap) not in self._df:
            self._df[term, cap] = self.store.keyword_count(term, cap) if term.strip() else cap
        return self._df[term, cap]

    def term_weights(self, question: str) -> dict[str, float]:
        """The question's content terms (stemmed; CJK bigrams) weighted by IDF in this collection."""
        self._check_df_fresh()
        n = self._df_chunks
        terms = [t for t in dict.fromkeys(keyword_terms(question)) if t not in QUESTION_WORDS]
        weights: dict[str, float] = {}
        for t in terms:
            weights[stem(t)] = max(weights.get(stem(t), 0.0), math.log((n + 1) / (self.document_frequency(t) + 0.5)))
        return weights

    def evidence(self, question: str, qvec: np.ndarray, refs: list[SourceRef]) -> dict[str, Evidence]:
        """Each chunk's statements scored against the question; sentence vectors are cached."""
        keys = {r.chunk_id: (r.chunk_id, hash(r.text)) for r in refs}
        missing = [r for r in refs if keys[r.chunk_id] not in self._sentences]
        if missing:
            texts = [evidence_sentences(r.text) or [r.text.strip()] for r in missing]
            flat = [t for ts in texts for t in ts]
            vecs = self.embedder.embed(flat) if flat else np.zeros((0, 1), dtype=np.float32)
            offset = 0
            for ref, ts in zip(missing, texts):
                self._sentences[keys[ref.chunk_id]] = (ts, vecs[offset : offset + len(ts)])
                offset += len(ts)
        weights = self.term_weights(question)
        out = {}
        for ref in refs:
            sentences, vecs = self._sentences[keys[ref.chunk_id]]
            self._sentences.move_to_end(keys[ref.chunk_id])
            sims = vecs @ qvec if len(sentences) else np.zeros(0)
            lexical = np.array([coverage(weights, s) for s in sentences]) if weights else np.zeros(len(sentences))
            out[ref.chunk_id] = Evidence(sentences, sims, sims + LEXICAL_WEIGHT * lexical)
        while len(self._sentences) > SENTENCE_CACHE:
            self._sentences.popitem(last=False)
        return out

    def verifier_evidence(self, question: str, qvec: np.ndarray, refs: list[SourceRef]) -> dict[str, Evidence]:
        """Each chunk's statements scored by the answer verifier: P(the statement states the answer),
        read together with the question (a cross-encoder: better at picking the answer's sentence
        than comparing vectors, and ~3x cheaper than embedding the sentences). The
        verifier only knows same-language pairs, so when any chunk is in another language than
        the question all of them get embedder evidence instead (one scale for the whole answer)."""
        lang = text_language(question)
        if any(text_language(r.text) != lang for r in refs):
            return self.evidence(question, qvec, refs)
        from localgpt.verifier import get_verifier

        texts = [evidence_sentences(r.text) or [r.text.strip()] for r in refs]
        flat = [t for ts in texts for t in ts]
        probs = get_verifier().score(question, flat) if flat else np.zeros(0, dtype=np.float32)
        weights = self.term_weights(question)
        out, offset = {}, 0
        for ref, ts in zip(refs, texts):
            p = np.asarray(probs[offset : offset + len(ts)], dtype=np.float64)
            offset += len(ts)
            lexical = np.array([coverage(weights, s) for s in ts]) if weights else np.zeros(len(ts))
            out[ref.chunk_id] = Evidence(ts, p, p + VERIFIER_LEXICAL_WEIGHT * lexical, kind="verifier")
        return out

    def _rerank(self, query: str, candidates: list[SourceRef]) -> list[SourceRef]:
        """The top ``rerank_top`` candidates reordered by a local cross-encoder's score (kept in ``score``)."""
        if self._reranker is None:
            from pathlib import Path

            path = Path(self.settings.reranker).expanduser()
            if not path.is_dir():
                raise ModelNotFound(f"reranker {path} is not a folder: give a local cross-encoder model folder")
            from sentence_transformers import CrossEncoder

            self._reranker = CrossEncoder(str(path), local_files_only=True)
        if not candidates:
            return candidates
        top, rest = candidates[: self.settings.rerank_top], candidates[self.settings.rerank_top :]
        scores = self._reranker.predict([(query, c.text) for c in top])
        for c, s in zip(top, scores):
            c.score = float(s)
        return sorted(top, key=lambda c: c.score, reverse=True) + rest

    def verify(self, query: str, refs: list[SourceRef]) -> None:
        """Set each chunk's ``verifier_score``: the answer verifier's P(it states the answer)."""
        from localgpt.verifier import get_verifier

        for ref, s in zip(refs, get_verifier().score(query, [r.text for r in refs])):
            ref.verifier_score = float(s)

    def _verifier_rerank(self, query: str, candidates: list[SourceRef]) -> list[SourceRef]:
        """The top ``rerank_top`` candidates scored by the verifier, its order fused with the search's
        by RRF (its order alone lost to hybrid search on the project's dev set: bench/RESULTS.md,
        "Answer verifier")."""
        top, rest = candidates[: self.settings.rerank_top], candidates[self.settings.rerank_top :]
        self.verify(query, top)
        by_verifier = sorted(top, key=lambda c: c.verifier_score, reverse=True)
        return reciprocal_rank_fusion([top, by_verifier]) + rest if top else candidates

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
            "verifier_score": ref.verifier_score,
        },
    )
