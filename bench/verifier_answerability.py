"""How well the answer verifier's best score tells answerable from unanswerable questions on a
QA set's dev half, next to the chain's current answerability score (retrieval only, no generator).

    python bench/verifier_answerability.py bench/eval/qa.jsonl --collection evalset [--data-dir DIR] [--verifier rerank]

Prints, per language and overall, the AUC of each score (answerable = 1) over the dev questions.
Never reads the test half.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.append(str(HERE))

from localgpt.chain import QAChain  # noqa: E402
from localgpt.config import load_settings  # noqa: E402
from localgpt.evaluation import load_qa, split_cases  # noqa: E402
from train_verifier import auc  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("questions", type=Path)
    ap.add_argument("--collection", required=True)
    ap.add_argument("--data-dir", type=Path)
    ap.add_argument("--verifier", choices=["score", "rerank"], default="score",
                    help="score: the search's own order; rerank: the verifier's order fused in")
    a = ap.parse_args()
    settings = load_settings(collection=a.collection, data_dir=a.data_dir, verifier=a.verifier)
    chain = QAChain(settings)
    rows = []
    for case in split_cases(load_qa(a.questions), "dev"):
        search = chain.retriever.search(case.question)
        rows.append((case.lang or "?", case.answerable, search.best_verifier_score or 0.0,
                     chain.answerability(case.question, search) or 0.0))
    for lang in sorted({r[0] for r in rows}) + ["all"]:
        sel = [r for r in rows if lang in ("all", r[0])]
        label = np.array([r[1] for r in sel])
        cols = {"verifier (best of top k)": 2, "chain answerability": 3}
        scores = {name: auc(np.array([r[i] for r in sel if r[1]]), np.array([r[i] for r in sel if not r[1]]))
                  for name, i in cols.items()}
        print(f"{lang:4s} answerable {int(label.sum()):3d} unanswerable {int((~label).sum()):3d}  "
              + "  ".join(f"{k} AUC {v:.3f}" for k, v in scores.items()), flush=True)


if __name__ == "__main__":
    main()
