"""Fit the answerability calibration (localgpt.chain.ANSWERABILITY) on the dev half of the
evaluation set, and never on the test half that bench/RESULTS.md reports.

For every dev question the real retriever runs (default settings), the chain computes the two
answerability features (best sentence similarity, IDF-weighted coverage of the question's terms
in the top chunks), a logistic regression is fitted (numpy, Newton's method, a little L2), and
the threshold is the highest answerability under which at most ``--max-false`` of the dev
answerable questions fall. Prints the Calibration line to paste into localgpt/chain.py.

With ``--answer-check MODEL`` it measures the answer check instead (localgpt.chain.ANSWER_CHECK_THRESHOLD):
for every dev question the chain prepares the answer as ``ask`` would, the generator gives its P(yes)
that the passages state the answer, and a table shows abstention and false abstention on dev for a
range of thresholds (on top of the abstention the chain already does), with the AUC of P(yes).

    python bench/eval_calibrate.py --collection evalset          # after building the corpus and ingesting it
    python bench/eval_calibrate.py --collection evalset --answer-check qwen2.5-1.5b-instruct-q4_k_m.gguf
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, steps: int = 50) -> np.ndarray:
    """Weights (features..., bias) maximising the L2-penalised log-likelihood."""
    X = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros(X.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-X @ w))
        grad = X.T @ (p - y) + l2 * np.r_[w[:-1], 0]
        hess = (X * (p * (1 - p))[:, None]).T @ X + l2 * np.diag(np.r_[np.ones(len(w) - 1), 0])
        w -= np.linalg.solve(hess, grad)
    return w


def main(argv: list[str] | None = None) -> int:
    from localgpt.chain import QAChain
    from localgpt.config import load_settings
    from localgpt.evaluation import load_qa, split_cases

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qa", type=Path, default=ROOT / "bench" / "eval" / "qa.jsonl")
    ap.add_argument("--collection", default="evalset")
    ap.add_argument("--data-dir", type=Path)
    ap.add_argument("--split", default="dev", choices=["dev"], help="only dev: the test half stays unseen")
    ap.add_argument("--max-false", type=float, default=0.05, help="false abstention allowed on dev (margin under the 0.10 target)")
    ap.add_argument("--answer-check", metavar="MODEL", help="measure the answer check of this generator instead")
    args = ap.parse_args(argv)
    if args.answer_check:
        return answer_check_table(args)

    overrides = {"collection": args.collection, "data_dir": args.data_dir}
    chain = QAChain(load_settings(**overrides), extractive=True)
    rows, labels = [], []
    for case in split_cases(load_qa(args.qa), args.split):
        search = chain.retriever.search(case.question)
        features = chain.answerability_features(case.question, search)
        if features is None:
            continue
        rows.append(features)
        labels.append(float(case.answerable))
    x, y = np.array(rows), np.array(labels)
    w = fit_logistic(x, y)
    p = 1 / (1 + np.exp(-(x @ w[:-1] + w[-1])))
    answerable = p[y == 1]
    candidates = sorted(set(np.round(p, 3)))
    threshold = max((t for t in candidates if np.mean(answerable < t) <= args.max_false), default=0.0)
    print(f"dev: {int(y.sum())} answerable, {int((1 - y).sum())} unanswerable")
    print(f"dev at threshold {threshold:.3f}: abstention {np.mean(p[y == 0] < threshold):.3f}, "
          f"false abstention {np.mean(answerable < threshold):.3f}")
    kind = chain.settings.evidence if chain.settings.verifier != "off" else "embedder"
    print(f'    ("{chain.retriever.embedder.name}", "{kind}"): Calibration(sentence={w[0]:.2f}, coverage={w[1]:.2f}, '
          f"bias={w[2]:.2f}, threshold={threshold:.3f}),")
    return 0


def answer_check_table(args) -> int:
    from localgpt.chain import ANSWER_CHECK_THRESHOLD, QAChain
    from localgpt.config import load_settings
    from localgpt.evaluation import load_qa, split_cases

    settings = load_settings(collection=args.collection, data_dir=args.data_dir, model=args.answer_check,
                             answer_check="on", answer_check_threshold=0.0)
    chain = QAChain(settings)
    before, p_yes, labels = [], [], []
    cases = split_cases(load_qa(args.qa), args.split)
    for i, case in enumerate(cases, 1):
        prepared = chain.prepare.invoke({"question": case.question, "history": [], "filters": None})
        verdict = prepared["verdict"]
        p = verdict.check
        if p is None:  # abstained before the check: ask it anyway, for the AUC
            context = prepared["context"] or prepared["search"].hits[: settings.k]
            p = chain.generator.yes_probability(chain.check_messages(case.question, context)) if context else 0.0
        before.append(verdict.abstain)
        p_yes.append(p)
        labels.append(case.answerable)
        print(f"{i}/{len(cases)} {case.id}: P(yes) {p:.3f}{' (abstained before the check)' if verdict.abstain else ''}",
              file=sys.stderr, flush=True)
    y, p, ab = np.array(labels), np.array(p_yes), np.array(before)
    pos, neg = p[y], p[~y]
    auc = float(np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])) if len(pos) and len(neg) else float("nan")
    print(f"{chain.generator.name}, {args.split}: {int(y.sum())} answerable, {int((~y).sum())} unanswerable; "
          f"AUC of P(yes) {auc:.3f}")
    print("| threshold | abstention | false abstention |\n|---:|---:|---:|")
    print(f"| no check | {ab[~y].mean():.3f} | {ab[y].mean():.3f} |")
    for t in (0.3, 0.4, 0.45, ANSWER_CHECK_THRESHOLD, 0.55, 0.6):
        final = ab | (p < t)
        print(f"| {t:.2f} | {final[~y].mean():.3f} | {final[y].mean():.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
