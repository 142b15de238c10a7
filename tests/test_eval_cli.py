"""`localgpt eval` end to end: a question file over a real corpus, and a BEIR folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

DATA = Path(__file__).parent / "data"

QA = [
    {"question": "When did the Bergen bridge open?", "answer": "2004", "source": "bridge.txt"},
    {"question": "How many hours of sun do roses need?", "answer": "six hours", "aliases": ["6 hours"], "source": "roses.txt"},
    {"question": "玫瑰什么时候修剪？", "answer": "early spring", "source": "roses.txt"},
    {"question": "Who composed the Moonlight Sonata?", "answer": "", "source": ""},
]


def run(args, env):
    return subprocess.run([sys.executable, "-m", "localgpt.cli", *args], env=env, capture_output=True, text=True, timeout=600)


def test_eval_scores_retrieval_answers_and_abstention(tmp_path, subprocess_env):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "bridge.txt").write_text("The Bergen bridge spans the fjord. It opened to traffic in 2004.", encoding="utf-8")
    (corpus / "roses.txt").write_text("Roses need six hours of sun every day. Prune them in early spring.", encoding="utf-8")
    qa = tmp_path / "qa.jsonl"
    qa.write_text("\n".join(json.dumps(q, ensure_ascii=False) for q in QA), encoding="utf-8")
    env = {**subprocess_env, "LOCALGPT_DATA_DIR": str(tmp_path / "data")}
    done = run(["eval", str(qa), "--corpus", str(corpus), "--extractive", "--json"], env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    overall = report["overall"]
    assert overall["file_hit@1"] == 1.0 and overall["file_mrr"] == 1.0
    assert overall["answer_in_top1"] == 1.0
    assert overall["abstention_rate"] == 1.0 and overall["false_abstention_rate"] == 0.0
    assert overall["contains_answer"] >= 2 / 3
    per_q = report["questions"]
    assert per_q[0]["retrieved"][0]["source"].endswith("bridge.txt")

    table = run(["eval", str(qa), "--retrieval-only"], env)
    assert table.returncode == 0, table.stderr
    assert "MRR" in table.stdout


def test_eval_reads_a_beir_folder_and_reports_ndcg(tmp_path, subprocess_env):
    env = {**subprocess_env, "LOCALGPT_DATA_DIR": str(tmp_path / "data")}
    done = run(["eval", str(DATA / "beir_tiny"), "--json"], env)
    assert done.returncode == 0, done.stderr
    scores = {s["name"]: s for s in json.loads(done.stdout)}
    assert set(scores) == {"dense", "keyword", "hybrid"}
    for s in scores.values():
        assert 0.5 < s["ndcg@10"] <= 1.0
    # Dense search ranks the whole small corpus; BM25 only finds documents that share a word.
    assert scores["dense"]["recall@100"] == 1.0 and scores["hybrid"]["recall@100"] == 1.0
    assert scores["keyword"]["recall@100"] < 1.0
