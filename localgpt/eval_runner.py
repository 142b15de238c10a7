"""Running an evaluation: question sets through the real retriever and chain, BEIR folders
through every retrieval mode. ``localgpt.evaluation`` scores and renders what this collects.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

from localgpt.config import Settings
from localgpt.evaluation import (
    BeirScores, EvalCase, EvalReport, QuestionResult, RetrievedChunk, evaluate, load_beir, score_beir,
)

Tick = Callable[[], None]


def ensure_collection(corpus: Path | None, settings: Settings) -> None:
    """Ingest the corpus into the collection when one is given (incremental: cheap when done)."""
    if corpus is None:
        return
    from ingest.pipeline import ingest_folder

    ingest_folder(corpus, settings)


def run_qa(
    cases: list[EvalCase], settings: Settings, *, retrieval_only: bool = False, name: str = "run",
    tick: Tick | None = None, retrieve_k: int = 10,
) -> EvalReport:
    """Every question through retrieval (top ``retrieve_k`` for the retrieval metrics) and, unless
    ``retrieval_only``, through the whole chain (answer, citations, abstention)."""
    from localgpt.chain import QAChain

    chain = QAChain(settings)
    results: list[QuestionResult] = []
    for case in cases:
        t0 = time.perf_counter()
        search = chain.retriever.search(case.question, k=max(retrieve_k, settings.k))
        timings = {"retrieve": time.perf_counter() - t0}
        result = QuestionResult(case, [RetrievedChunk.from_source_ref(h) for h in search.hits], timings=timings)
        if retrieval_only:
            result.abstained = not search.hits or search.best_similarity < chain.threshold
        else:
            try:
                answer = chain.ask(case.question)
            except Exception as exc:  # one failing question must not end the run
                result.error = f"{type(exc).__name__}: {exc}"
            else:
                result.answer = answer.text
                result.abstained = answer.abstained
                result.cited = [RetrievedChunk.from_source_ref(c.ref) for c in answer.citations if c.cited] or [
                    RetrievedChunk.from_source_ref(answer.citations[s.number - 1].ref) for s in answer.support
                ]
                result.timings.update({k: v for k, v in answer.timings.items() if k in ("generate", "support", "total")})
        results.append(result)
        if tick:
            tick()
    config = {k: v for k, v in settings.model_dump(mode="json").items() if k in _CONFIG_KEYS}
    return evaluate(results, name=name, config=config)


_CONFIG_KEYS = ("collection", "embedder", "chunk_size", "chunk_overlap", "retrieval_mode", "k", "score_threshold",
                "backend", "model", "reranker")


def run_beir(folder: Path, settings: Settings, modes: list[str], *, tick: Tick | None = None) -> list[BeirScores]:
    """Ingest a BEIR corpus (one file per document) into a temporary collection and score each mode."""
    from ingest.pipeline import ingest_folder
    from localgpt.retrieval import Retriever

    data = load_beir(folder)
    with tempfile.TemporaryDirectory(prefix="localgpt-beir-") as tmp:
        docs = Path(tmp) / "docs"
        docs.mkdir()
        for doc_id in data.corpus:
            (docs / f"{_safe(doc_id)}.txt").write_text(data.doc_text(doc_id), encoding="utf-8")
        bsettings = settings.with_overrides(data_dir=Path(tmp) / "data", collection="beir")
        ingest_folder(docs, bsettings)
        ids = {f"{_safe(d)}.txt": d for d in data.corpus}
        retriever = Retriever.from_settings(bsettings)
        out = []
        for mode in modes:
            rankings, timings = {}, []
            for qid in data.qrels:
                t0 = time.perf_counter()
                hits = retriever.search(data.queries.get(qid, ""), mode=mode, k=100, fetch=100).hits
                timings.append({"retrieve": time.perf_counter() - t0})
                rankings[qid] = [ids[Path(h.source).name] for h in hits if Path(h.source).name in ids]
                if tick:
                    tick()
            out.append(score_beir(data, rankings, name=mode, timings=timings))
        retriever.store.close()
    return out


def _safe(doc_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in doc_id)[:120] or "doc"


def load_config(path: Path) -> dict:
    """A --compare configuration: TOML with Settings fields, and an optional ``name``."""
    import tomllib

    return tomllib.loads(path.read_text(encoding="utf-8"))

