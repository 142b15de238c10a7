"""Query benchmark: retrieval latency by mode at 1k / 10k / 100k chunks, and the embedded
default's end-to-end answer latency on the CPU.

Synthetic stores hold Zipf-distributed text over a 20k-word vocabulary with random unit
vectors (embedding 100k chunks for real would take hours on 2 cores; the query is embedded
for real). Prints a table and appends it to bench/RESULTS.md.
Usage: python bench/query.py [--sizes 1000 10000 100000] [--queries 50] [--skip-e2e]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from localgpt.config import Settings  # noqa: E402
from localgpt.documents import Chunk  # noqa: E402
from localgpt.embeddings import get_embedder  # noqa: E402
from localgpt.retrieval import Retriever  # noqa: E402
from localgpt.store import Store  # noqa: E402

sys.path.append(str(HERE))  # after the project root: bench/ingest.py must not shadow the ingest package
from record import commit, publish  # noqa: E402


def vocabulary(rng: np.random.Generator, n: int = 20000) -> list[str]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return ["".join(rng.choice(letters, size=rng.integers(3, 10))) for _ in range(n)]


def build_store(settings: Settings, n: int, rng: np.random.Generator, vocab: list[str], dim: int) -> None:
    zipf = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
    zipf /= zipf.sum()
    with Store.open(settings) as store:
        store.set_meta(embedder=get_embedder(settings.embedder).name, dim=dim)
        per_file = 500
        for f in range(0, n, per_file):
            sha = f"{f:064x}"
            chunks = []
            for i in range(min(per_file, n - f)):
                words = rng.choice(vocab, size=120, p=zipf)
                chunks.append(Chunk(id=f"{sha[:32]}-{i:05d}", text=" ".join(words) + ".", content_hash=sha, chunk_index=i))
            vecs = rng.standard_normal((len(chunks), dim)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            store.begin_content(sha, [c.id for c in chunks])
            store.write_vectors(chunks, vecs, ".txt")
            store.commit_content(f"/synthetic/file{f}.txt", 1, 1, sha, chunks, None, ".txt")


# The default path before generation, and what it replaced (same run, same machine: compare ratios).
# (label, settings overrides, whether the verifier also reads the k whole passages after the search).
PATHS = (
    ("hybrid + embedder sentence evidence (top 10, rerank) + verifier score of the k hits (session 6 default)",
     {"evidence": "embedder", "verifier": "score"}, False),
    ("hybrid + verifier sentence evidence of the k hits + verifier score of the k whole hits (session 7 default)",
     {}, True),
    ("hybrid + verifier sentence evidence of the k hits, a hit's score its best sentence's (default)", {}, False),
)


def real_documents(collection: str, data_dir: Path | None, questions: Path, limit: int) -> list[tuple]:
    """The same paths on a real collection (e.g. the evaluation corpus), over its dev questions:
    random-word chunks have no sentences, so only real text measures the sentence stage."""
    from localgpt.config import load_settings
    from localgpt.evaluation import load_qa, split_cases

    settings = load_settings(collection=collection, data_dir=data_dir)
    qs = [c.question for c in split_cases(load_qa(questions), "dev")][:limit]
    base = Retriever.from_settings(settings)
    size = base.store.count_chunks()
    rows = []
    for label, o, whole in PATHS:
        r = Retriever(base.store, base.embedder, settings.with_overrides(**o))
        p50, p95 = measure(r, qs, "hybrid", whole)
        rows.append((f"{collection} ({len(qs)} dev questions{f', {size} chunks' if size else ''})", label, p50, p95))
        print(f"{collection}: {label}: p50 {p50:.1f} ms p95 {p95:.1f} ms", flush=True)
    return rows


def measure(retriever: Retriever, queries: list[str], mode: str, whole: bool = False) -> tuple[float, float]:
    retriever.search(queries[0], mode=mode)  # warm caches
    times = []
    for q in queries:
        t0 = time.perf_counter()
        hits = retriever.search(q, mode=mode, k=4).hits
        if whole:
            retriever.verify(q, hits)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))]


def e2e(tmp: Path) -> dict:
    """Ingest the bundled samples and time `ask` with the embedded generator, in-process."""
    from ingest.pipeline import ingest_folder
    from localgpt.chain import QAChain

    settings = Settings(data_dir=tmp / "e2e", collection="samples")
    ingest_folder(ROOT / "source_documents", settings)
    chain = QAChain(settings)
    t0 = time.perf_counter()
    chain.generator  # load once, as the CLI/UI keep it loaded
    load_s = time.perf_counter() - t0
    results = []
    for q in ["Where does localgpt keep the database it builds?", "Which embedding model is the default?",
              "What happens when I run ingest twice?"]:
        t0 = time.perf_counter()
        first = None
        for ev in chain.stream(q):
            if ev.kind == "token" and first is None:
                first = time.perf_counter() - t0
            if ev.kind == "done":
                ans = ev.answer
        results.append((time.perf_counter() - t0, first or 0.0, ans.generator_stats.get("decode_tokens_per_s") or 0.0,
                        ans.generator_stats.get("new_tokens") or 0))
    return {
        "load_s": load_s,
        "total_s": statistics.median(r[0] for r in results),
        "ttft_s": statistics.median(r[1] for r in results),
        "tok_s": statistics.median(r[2] for r in results),
        "new_tokens": statistics.median(r[3] for r in results),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--real", metavar="COLLECTION", help="also measure the paths on this ingested collection "
                    "(e.g. evalset: python bench/eval_corpus.py, then localgpt ingest bench/corpus/eval -c evalset)")
    ap.add_argument("--real-questions", type=Path, default=ROOT / "bench" / "eval" / "qa.jsonl")
    ap.add_argument("--data-dir", type=Path, help="where --real's collection lives (default: the settings')")
    a = ap.parse_args()
    rng = np.random.default_rng(3)
    vocab = vocabulary(rng)
    embedder = get_embedder("e5-small")
    queries = [" ".join(rng.choice(vocab[:3000], size=rng.integers(3, 8))) for _ in range(a.queries)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for n in a.sizes:
            settings = Settings(data_dir=tmp / f"s{n}", collection=f"bench{n}")
            t0 = time.perf_counter()
            build_store(settings, n, rng, vocab, embedder.dim)
            build_s = time.perf_counter() - t0
            # Retrieval alone (sentence_rerank = 0), then the default: hybrid plus the sentence
            # evidence that reranks the top 10 and feeds the supporting sentences and abstention.
            # The answer verifier (verifier = "rerank") scores the top rerank_top fused candidates.
            retriever = Retriever.from_settings(settings.with_overrides(sentence_rerank=0, evidence="embedder", verifier="off"))
            for label, r, mode, whole in (("dense", retriever, "dense", False), ("keyword", retriever, "keyword", False),
                                          ("hybrid", retriever, "hybrid", False)) + tuple(
                    (label, Retriever(retriever.store, retriever.embedder, settings.with_overrides(**o)), "hybrid", whole)
                    for label, o, whole in PATHS):
                p50, p95 = measure(r, queries, mode, whole)
                rows.append((n, label, p50, p95))
                print(f"{n:>7} chunks {label:>8}: p50 {p50:6.1f} ms  p95 {p95:6.1f} ms  (store built in {build_s:.0f}s)", flush=True)
            retriever.store.close()
        if a.real:
            rows += real_documents(a.real, a.data_dir, a.real_questions, a.queries)
        e2e_row = None if a.skip_e2e else e2e(tmp)

    lines = [
        f"### Query benchmark — {datetime.date.today()} — commit {commit()} — {platform.machine()}, {os.cpu_count()} cores",
        "",
        f"Retrieval latency per question (query embedding included), {a.queries} questions, k=4; "
        f"command: `python bench/query.py`.",
        "",
        "| chunks | mode | p50 ms | p95 ms |",
        "|---:|---|---:|---:|",
    ]
    lines += [f"| {n} | {mode} | {p50:.1f} | {p95:.1f} |" for n, mode, p50, p95 in rows]
    hybrid_100k = [r for r in rows if r[0] == max(a.sizes) and r[1] == "hybrid"]
    lines.append("\nThe three last rows of each size are what `ask` does before generation: the session-6 default embeds "
                 "the sentences of the top 10 chunks (reranks by the best, picks the supporting sentences, scores "
                 "answerability) and then the answer verifier scores the 4 hits; the session-7 default reads each "
                 "sentence of the 4 hits with the question through the verifier (`evidence = \"verifier\"`) and "
                 "then the 4 whole hits again; the default takes a hit's score from its best sentence (the refusal "
                 "model reads the best sentence only). Random-word chunks hold one long 'sentence' each, "
                 "so the rows on a real collection (`--real`) are the ones that measure the sentence stage.")
    if hybrid_100k:
        lines.append(f"\n- hybrid p50 at {max(a.sizes)} chunks: {hybrid_100k[0][2]:.1f} ms (target ≤ 30 ms at 100k)")
    if e2e_row:
        lines.append(
            f"- embedded default (SmolLM2-135M Q4_1, llama.cpp, CPU) over the samples: median end-to-end "
            f"{e2e_row['total_s']:.2f} s (target ≤ 5 s), first token after {e2e_row['ttft_s']:.2f} s, "
            f"{e2e_row['tok_s']:.0f} tokens/s decode, {e2e_row['new_tokens']:.0f} tokens; model load {e2e_row['load_s']:.2f} s once per process"
        )
    publish(lines, record=not a.no_record)


if __name__ == "__main__":
    main()
