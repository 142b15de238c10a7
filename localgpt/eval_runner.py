"""Running an evaluation: question sets through the real retriever and chain, BEIR folders
through every retrieval mode. ``localgpt.evaluation`` scores and renders what this collects.

A configuration for ``--compare`` is a TOML file of settings (plus ``name``, and ``splitter``
for the baseline) or the name of a built-in one: ``defaults`` (localgpt as installed) or
``localgpt-baseline`` (what localGPT does: RecursiveCharacterTextSplitter 1000/200 characters,
dense similarity, k=4, no abstention, no sentence evidence).
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


BUILTIN_CONFIGS: dict[str, dict] = {
    "defaults": {"name": "localgpt defaults"},
    "localgpt-baseline": {
        "name": "localGPT-like baseline", "splitter": "characters", "chunk_size": 1000, "chunk_overlap": 200,
        "retrieval_mode": "dense", "k": 4, "abstain": False, "sentence_rerank": 0,
    },
}
SPLITTERS = ("tokens", "characters")


def ensure_collection(corpus: Path | None, settings: Settings, splitter: str = "tokens") -> None:
    """Ingest the corpus into the collection when one is given (incremental: cheap when done)."""
    if corpus is None:
        return
    if splitter == "characters":
        ingest_characters(corpus, settings)
        return
    from ingest.pipeline import ingest_folder

    ingest_folder(corpus, settings)


def ingest_characters(corpus: Path, settings: Settings) -> int:
    """The baseline's ingest: every file's text split by ``split_characters`` (chunk_size and
    chunk_overlap in characters), embedded and committed through the same store. Files already
    in the collection with the same size and mtime are skipped. Returns the chunks added."""
    from ingest.discover import Found, discover
    from ingest.load import SUPPORTED_FORMATS, load_file
    from ingest.pipeline import file_sha256
    from ingest.split import split_characters
    from localgpt.embeddings import get_embedder
    from localgpt.errors import LocalGPTError
    from localgpt.store import Store

    embedder = get_embedder(settings.embedder)
    added = 0
    with Store.open(settings) as store:
        store.check_embedder(embedder.name, embedder.dim)
        if store.meta("splitter") not in (None, "characters"):
            raise LocalGPTError(f"collection '{store.name}' was not split by characters: use another collection")
        for item in discover(corpus):
            if not isinstance(item, Found) or Path(item.path).suffix.lower() not in SUPPORTED_FORMATS:
                continue
            record = store.file(item.path)
            if record and (record.size, record.mtime_ns) == (item.size, item.mtime_ns):
                continue
            try:
                doc = load_file(Path(item.path), ocr=settings.ocr)
            except LocalGPTError:
                continue  # the baseline skips what it cannot read, as localGPT does
            sha = file_sha256(item.path)
            chunks = split_characters(doc, sha, settings.chunk_size, settings.chunk_overlap)
            if not chunks or store.has_content(sha):
                continue
            ext = Path(item.path).suffix.lower()
            store.begin_content(sha, [c.id for c in chunks])
            store.write_vectors(chunks, embedder.embed([c.text for c in chunks], bulk=True), ext)
            store.commit_content(item.path, item.size, item.mtime_ns, sha, chunks, doc.pages, ext)
            added += len(chunks)
        if store.meta("embedder") is None:
            store.set_meta(embedder=embedder.name, dim=embedder.dim, chunk_size=settings.chunk_size,
                           chunk_overlap=settings.chunk_overlap, splitter="characters", schema="1")
    return added


def run_qa(
    cases: list[EvalCase], settings: Settings, *, retrieval_only: bool = False, name: str = "run",
    tick: Tick | None = None, retrieve_k: int = 10,
) -> EvalReport:
    """Every question through retrieval (top ``retrieve_k`` for the retrieval metrics) and, unless
    ``retrieval_only``, through the whole chain (answer, citations, abstention). The top k are also
    packed as the chain packs them for the generator (``context_packer``)."""
    from localgpt.chain import QAChain

    chain = QAChain(settings)
    pack, packed_for = context_packer(chain, settings, retrieval_only=retrieval_only)
    results: list[QuestionResult] = []
    for case in cases:
        t0 = time.perf_counter()
        search = chain.retriever.search(case.question, k=max(retrieve_k, settings.k))
        timings = {"retrieve": time.perf_counter() - t0}
        result = QuestionResult(case, [RetrievedChunk.from_source_ref(h) for h in search.hits], timings=timings)
        if pack is not None:
            packed, result.context_tokens = pack(case.question, search.hits[: settings.k])
            result.context = [RetrievedChunk.from_source_ref(r) for r in packed]
        if retrieval_only:
            verdict = chain.should_abstain(case.question, search)
            result.abstained, result.confidence = verdict.abstain, verdict.confidence
        else:
            try:
                answer = chain.ask(case.question)
            except Exception as exc:  # one failing question must not end the run
                result.error = f"{type(exc).__name__}: {exc}"
            else:
                result.answer = answer.text
                result.abstained = answer.abstained
                result.confidence = answer.confidence
                result.cited = [RetrievedChunk.from_source_ref(c.ref) for c in answer.citations if c.cited] or [
                    RetrievedChunk.from_source_ref(answer.citations[s.number - 1].ref) for s in answer.support
                ]
                result.timings.update({k: v for k, v in answer.timings.items() if k in ("answer_check", "generate", "support", "total")})
        results.append(result)
        if tick:
            tick()
    config = {k: v for k, v in settings.model_dump(mode="json").items() if k in _CONFIG_KEYS}
    if packed_for:
        config["context_packed_for"] = packed_for
    return evaluate(results, name=name, config=config)


def context_packer(chain, settings: Settings, *, retrieval_only: bool = False):
    """``(pack, description)``: ``pack(question, top_k_hits)`` gives the chunks the chain would put in
    the generator's prompt (``localgpt.chain.pack_context``: rank order while they fit the window,
    leaving ``max_new_tokens``) and their tokens, and which generator's window that is; ``(None, None)`` when it cannot
    be measured cheaply. A generating run packs for its own generator. Retrieval-only and extractive
    runs pack for the generator the settings name (the embedded SmolLM2 unless ``--model``): it is
    loaded to read its window and tokenizer, never run, and only when it is a local GGUF file (a
    llama.cpp load of well under a second for the embedded model)."""
    from localgpt.chain import pack_context
    from localgpt.errors import LocalGPTError

    generator = None
    if not retrieval_only and not chain.extractive:
        generator = chain.generator
    else:
        from localgpt.generation import get_generator, resolve_backend

        gen_settings = settings if settings.backend != "extractive" else settings.with_overrides(backend="auto")
        try:
            if resolve_backend(gen_settings) in ("gguf", "llamacpp"):
                generator = get_generator(gen_settings)
        except LocalGPTError:
            generator = None
    if generator is None:
        return None, None
    max_new = settings.max_new_tokens

    def pack(question: str, hits):
        packed = pack_context(hits, question, generator, max_new)
        return packed, sum(generator.count_tokens(r.text) for r in packed)

    name = getattr(generator, "name", type(generator).__name__)
    return pack, f"{name}, window {generator.context_window} tokens, {max_new} kept for the answer"


_CONFIG_KEYS = ("collection", "embedder", "chunk_size", "chunk_overlap", "retrieval_mode", "k", "score_threshold",
                "sentence_rerank", "abstain", "evidence_checks", "answerability_threshold", "answer_check",
                "answer_check_threshold", "backend", "model", "reranker", "verifier", "verifier_refuse_threshold", "refusal_threshold")


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


def load_config(spec: str | Path) -> dict:
    """A --compare configuration: a built-in name, or a TOML file with Settings fields, an
    optional ``name`` and an optional ``splitter`` ("tokens", the default, or "characters")."""
    import tomllib

    from localgpt.errors import ConfigError

    if str(spec) in BUILTIN_CONFIGS:
        values = dict(BUILTIN_CONFIGS[str(spec)])
        values.setdefault("collection_suffix", str(spec))
        return values
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"--compare {spec}: not a file, nor a built-in configuration ({', '.join(BUILTIN_CONFIGS)})")
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc}") from exc
    if values.get("splitter", "tokens") not in SPLITTERS:
        raise ConfigError(f"{path}: splitter must be one of {', '.join(SPLITTERS)}")
    values.setdefault("collection_suffix", path.stem)
    return values

