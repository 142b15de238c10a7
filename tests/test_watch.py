"""`localgpt ingest --watch`: a file written, changed and deleted in the watched folder shows up,
changes and disappears within seconds; Ctrl-C stops the watch cleanly."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import default_sigint


@pytest.mark.slow
def test_ingest_watch_follows_writes_changes_and_deletes(tmp_path, subprocess_env):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "first.md").write_text("The archive opens at nine.", encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, "-m", "localgpt.cli", "ingest", str(folder), "--watch", "--json",
         "--data-dir", str(tmp_path / "data"), "--workers", "1"],
        env=subprocess_env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=default_sigint,
    )
    reports: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [reports.put(json.loads(line)) for line in proc.stdout], daemon=True).start()

    def next_report(timeout: float = 30) -> dict:
        return reports.get(timeout=timeout)

    try:
        assert next_report(90)["new"] == 1  # the first, ordinary run
        note = folder / "note.txt"
        started = time.monotonic()
        note.write_text("The reading room closes at 19:00.", encoding="utf-8")
        report = next_report()
        assert report["new"] == 1 and time.monotonic() - started < 15
        (folder / ".hidden.txt").write_text("never ingested", encoding="utf-8")  # ignored: no run for it
        note.write_text("The reading room closes at 21:00 on Thursdays.", encoding="utf-8")
        assert next_report()["changed"] == 1
        (folder / "broken.pdf").write_bytes(b"%PDF-1.7 not a pdf at all")
        report = next_report()
        assert [p["path"] for p in report["skipped"]] == [str(folder / "broken.pdf")] and report["skipped"][0]["reason"]
        note.unlink()
        assert next_report()["removed"] == 1
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err  # Ctrl-C between runs is how a watch ends
    listed = subprocess.run([sys.executable, "-m", "localgpt.cli", "sources", "--json", "--data-dir", str(tmp_path / "data")],
                            env=subprocess_env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert [s["path"] for s in json.loads(listed.stdout)] == [str(folder / "first.md")]
