"""How often the chain refuses answerable and unanswerable questions under three policies, on a
question set's dev half (retrieval only, no generator):

- the hand rules alone (``verifier = "off"``: an evidence gap or a low answerability score refuses);
- the answer verifier alone, refusing under a threshold;
- both must agree (the default): a rule fires and the verifier's best score is under a threshold.

    python bench/abstention_policy.py bench/eval/qa.jsonl --collection evalset [--data-dir DIR]

Never reads the test half. Prints one table; ``--record`` appends it to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.record import commit, publish  # noqa: E402
from localgpt.chain import QAChain  # noqa: E402
from localgpt.config import load_settings  # noqa: E402
from localgpt.evaluation import load_qa, split_cases  # noqa: E402

THRESHOLDS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.7, 0.9)
FLOORS = (0.70, 0.74, 0.76, 0.78, 0.80)  # e5 cosine of the best chunk under which "nothing on topic" refuses alone


def verdicts(questions: Path, collection: str, data_dir: Path | None) -> list[dict]:
    """Per dev question: answerable, off topic, whether a hand rule fires, the verifier's best score."""
    settings = load_settings(collection=collection, data_dir=data_dir, verifier="score", verifier_refuse_threshold=0.0)
    chain = QAChain(settings, extractive=True)
    rows = []
    for case in split_cases(load_qa(questions), "dev"):
        search = chain.retriever.search(case.question)
        verdict = chain.should_abstain(case.question, search)
        rules = any(d.kind in ("names", "answer_type", "answerability") for d in verdict.doubts)
        rows.append({"answerable": case.answerable, "off_topic": verdict.abstain, "rules": rules,
                     "verifier": verdict.verifier, "similarity": search.best_similarity, "threshold": chain.threshold})
    return rows


def rates(rows: list[dict], refused, *, off_topic_alone: bool = True) -> tuple[float, float]:
    answerable = [r for r in rows if r["answerable"]]
    unanswerable = [r for r in rows if not r["answerable"]]
    alone = (lambda r: r["off_topic"]) if off_topic_alone else (lambda r: False)  # noqa: E731
    share = lambda rs: sum(bool(alone(r) or refused(r)) for r in rs) / max(1, len(rs))  # noqa: E731
    return share(answerable), share(unanswerable)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("questions", type=Path)
    ap.add_argument("--collection", required=True)
    ap.add_argument("--data-dir", type=Path)
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()
    rows = verdicts(a.questions, a.collection, a.data_dir)
    low = lambda r, t: r["verifier"] is not None and r["verifier"] < t  # noqa: E731
    lines = [f"### Abstention policies on {a.questions} (dev half, {len(rows)} questions, "
             f"{sum(r['answerable'] for r in rows)} answerable) — commit {commit()}", "",
             f"Command: `python bench/abstention_policy.py {a.questions} --collection {a.collection}`", "",
             "| policy | answerable refused | unanswerable refused |", "|---|---:|---:|"]
    fa, ab = rates(rows, lambda r: r["rules"])
    lines.append(f"| hand rules alone (verifier off) | {fa:.3f} | {ab:.3f} |")
    for t in THRESHOLDS:
        fa, ab = rates(rows, lambda r, t=t: low(r, t))
        lines.append(f"| verifier alone < {t} | {fa:.3f} | {ab:.3f} |")
    for t in THRESHOLDS:
        fa, ab = rates(rows, lambda r, t=t: r["rules"] and low(r, t))
        lines.append(f"| rules and verifier < {t} | {fa:.3f} | {ab:.3f} |")
    # The best chunk's similarity under the embedder's threshold as one more hand rule (refusing only
    # with the verifier), and only a lower floor refusing alone as "nothing on topic".
    for floor in FLOORS:
        fa, ab = rates(rows, lambda r, f=floor: r["similarity"] < f or (
            (r["rules"] or r["similarity"] < r["threshold"]) and low(r, 0.5)), off_topic_alone=False)
        lines.append(f"| similarity < {floor} alone, or (rules or similarity < threshold) and verifier < 0.5 | {fa:.3f} | {ab:.3f} |")
    publish(lines, record=a.record)


if __name__ == "__main__":
    main()
