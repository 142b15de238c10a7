"""The README's main job, as a newcomer runs it: ingest the bundled samples, ask, get cited pages."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A copy of the samples ingested through the CLI, as `localgpt ingest` does with no arguments."""
    work = tmp_path_factory.mktemp("readme")
    shutil.copytree(ROOT / "source_documents", work / "source_documents")
    return work


def cli(workspace: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "localgpt.cli", *args], cwd=workspace, env=env,
                          capture_output=True, text=True, timeout=600)


def test_ingest_then_ask_answers_with_the_cited_page(workspace, subprocess_env):
    ingest = cli(workspace, subprocess_env, "ingest")
    assert ingest.returncode == 0, ingest.stderr
    assert "skipped" in ingest.stdout and (workspace / "local_data").is_dir()

    done = cli(workspace, subprocess_env, "ask", "Where does localgpt keep the database it builds?", "--json")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["answer"].strip() and not answer["abstained"]
    assert answer["stats"]["backend"] == "llama.cpp" and answer["stats"]["new_tokens"] > 0
    guide = [s for s in answer["sources"] if s["source"].endswith("localgpt-guide.pdf")]
    assert guide and guide[0]["page"] == 2 and "local_data" in guide[0]["text"]
    assert any("local_data" in s["sentence"] for s in answer["support"])
    # The 135M model tends to continue the prompt (a made-up "[5] (retrieval.md, page 2)" header, the next
    # "Question:" line, a loop): none of that reaches the reader, and its answer says to check the quotes.
    numbers = [int(n) for n in re.findall(r"(?<!\w)\[(\d+)\]", answer["answer"])]
    assert all(1 <= n <= len(answer["sources"]) for n in numbers), answer["answer"]
    assert not any(line.lstrip().startswith(("Question:", "Context:")) for line in answer["answer"].splitlines())
    assert answer["confidence"] == "low" and any("135M-parameter model" in d for d in answer["doubts"])

    streamed = cli(workspace, subprocess_env, "ask", "Where does localgpt keep the database it builds?", "--stats")
    assert streamed.returncode == 0, streamed.stderr
    assert "Sources" in streamed.stdout and "localgpt-guide.pdf, page 2" in streamed.stdout
    assert "ttft_s" in streamed.stdout

    checked = cli(workspace, subprocess_env, "ask", "Where does localgpt keep the database it builds?",
                  "--answer-check", "on", "--json")  # forced on the 135M model, which auto skips
    assert checked.returncode == 0, checked.stderr
    assert 0.0 < json.loads(checked.stdout)["answer_check"] < 1.0
    assert answer["answer_check"] is None
    assert not Path(subprocess_env["LOCALGPT_NETGUARD_LOG"]).exists()


def test_off_topic_question_abstains_and_chinese_question_finds_the_chinese_faq(workspace, subprocess_env):
    if not (workspace / "local_data").exists():
        assert cli(workspace, subprocess_env, "ingest").returncode == 0
    off = json.loads(cli(workspace, subprocess_env, "ask", "What is the melting point of tungsten?", "--json").stdout)
    assert off["abstained"] and off["sources"] == [] and "don't know" in off["answer"]
    zh = cli(workspace, subprocess_env, "ask", "默认的嵌入模型是什么？", "--extractive", "--json")
    data = json.loads(zh.stdout)
    assert not data["abstained"] and "multilingual-e5-small" in data["answer"]
    assert data["sources"][0]["source"].endswith("faq-zh.md")


def test_chat_keeps_history_and_answers_follow_ups(workspace, subprocess_env, tmp_path):
    if not (workspace / "local_data").exists():
        assert cli(workspace, subprocess_env, "ingest").returncode == 0
    log = tmp_path / "qa.jsonl"
    session = subprocess.run(
        [sys.executable, "-m", "localgpt.cli", "chat", "--extractive", "--save-qa", str(log)],
        cwd=workspace, env=subprocess_env, input="Which embedding model is the default?\n/sources\n/reset\n/exit\n",
        capture_output=True, text=True, timeout=300,
    )
    assert session.returncode == 0, session.stderr
    assert "e5" in session.stdout and "Sources" in session.stdout and "history cleared" in session.stdout
    saved = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(saved) == 1 and saved[0]["sources"]


def test_ctrl_c_in_chat_stops_the_answer_but_not_the_chat(workspace, subprocess_env):
    import os
    import select
    import signal
    import time

    if not (workspace / "local_data").exists():
        assert cli(workspace, subprocess_env, "ingest").returncode == 0
    # About Ctrl-C, not abstention: the answer must stream (an essay request scores low on answerability).
    env = {**subprocess_env, "LOCALGPT_MAX_NEW_TOKENS": "4000", "LOCALGPT_TEMPERATURE": "1.0", "LOCALGPT_ABSTAIN": "false"}
    from conftest import default_sigint

    proc = subprocess.Popen([sys.executable, "-m", "localgpt.cli", "chat"], cwd=workspace, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=default_sigint)
    out = b""
    try:
        proc.stdin.write(b"Write a very long essay about every command of localgpt.\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 120
        while b"localgpt>" not in out and time.monotonic() < deadline:
            if select.select([proc.stdout], [], [], 0.5)[0]:
                out += os.read(proc.stdout.fileno(), 4096)
        assert b"localgpt>" in out, out
        time.sleep(1.0)  # a few tokens in
        proc.send_signal(signal.SIGINT)
        proc.stdin.write(b"/exit\n")
        proc.stdin.flush()
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    out += rest
    assert proc.returncode == 0, err.decode()[-2000:]
    assert b"answer stopped" in out
    assert b"Traceback" not in err
