"""Crashes and Ctrl-C: whatever moment ingest dies, the next run gives exactly the clean store."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from localgpt.config import Settings
from localgpt.store import Store

pytestmark = pytest.mark.slow

PARAGRAPH = (
    "Section {i}.{j} of the field manual explains procedure {i}-{j}: inspect valve {j}, record the pressure, "
    "and report anomalies to station {i}. Operators must log every reading before the end of the shift. "
)


def make_corpus(folder: Path, files: int = 8) -> Path:
    folder.mkdir(parents=True)
    for i in range(files):
        text = "\n\n".join(PARAGRAPH.format(i=i, j=j) * 3 for j in range(8))
        (folder / f"manual_{i:02d}.txt").write_text(text, encoding="utf-8")
    return folder


def snapshot(data_dir: Path) -> dict:
    settings = Settings(data_dir=data_dir, collection="crash")
    with Store.open(settings) as store:
        return {
            "files": sorted((Path(f.path).name, f.sha256, f.chunks) for f in store.files()),
            "chunks": store.chunk_ids(),
            "chroma": sorted(store.collection.get(include=[])["ids"]),
        }


def ingest_cmd(folder: Path) -> list[str]:
    return [sys.executable, "-m", "localgpt.cli", "ingest", str(folder), "--workers", "1", "--collection", "crash"]


def manifest_state(data_dir: Path) -> tuple[int, int]:
    """(committed files, pending contents) as another process sees them right now."""
    path = data_dir / "collections" / "crash.sqlite"
    if not path.exists():
        return 0, 0
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
        try:
            files = db.execute("SELECT COUNT(*) FROM files").fetchone()[0]
            pending = db.execute("SELECT COUNT(*) FROM pending").fetchone()[0]
        finally:
            db.close()
        return files, pending
    except sqlite3.Error:
        return 0, 0


def committed_files_are_whole(data_dir: Path) -> bool:
    """Read straight from the manifest, before any recovery: every visible content has all its chunks."""
    db = sqlite3.connect(str(data_dir / "collections" / "crash.sqlite"))
    try:
        rows = db.execute(
            "SELECT c.n_chunks, (SELECT COUNT(*) FROM chunks k WHERE k.sha256 = c.sha256) FROM contents c"
        ).fetchall()
        orphans = db.execute("SELECT COUNT(*) FROM chunks WHERE sha256 NOT IN (SELECT sha256 FROM contents)").fetchone()[0]
    finally:
        db.close()
    return all(a == b for a, b in rows) and orphans == 0


def run_until(cmd, env, condition, sig, timeout=180.0):
    from conftest import default_sigint

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    deadline = time.monotonic() + timeout
    hit = False
    while time.monotonic() < deadline and proc.poll() is None:
        if condition():
            proc.send_signal(sig)
            hit = True
            break
        time.sleep(0.005)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, hit, out, err


@pytest.fixture(scope="module")
def clean(tmp_path_factory, request):
    """The store a single uninterrupted run builds."""
    base = tmp_path_factory.mktemp("clean")
    folder = make_corpus(base / "docs")
    return folder, base


def _clean_snapshot(folder: Path, base: Path, env: dict) -> dict:
    data = base / "data"
    if not data.exists():
        done = subprocess.run(ingest_cmd(folder), env={**env, "LOCALGPT_DATA_DIR": str(data)}, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
    return snapshot(data)


@pytest.mark.parametrize(
    "moment",
    ["mid_file_first", "mid_file_later", "after_some_files"],
)
def test_sigkill_at_any_moment_then_rerun_gives_the_clean_store(tmp_path, clean, subprocess_env, moment):
    folder, base = clean
    expected = _clean_snapshot(folder, base, subprocess_env)
    data = tmp_path / "data"
    # Small embedding batches (about a file each), so that "some files committed, one in flight"
    # lasts long enough to be caught; the store must come out the same whatever the batch size.
    env = {**subprocess_env, "LOCALGPT_DATA_DIR": str(data), "LOCALGPT_EMBED_BATCH_SIZE": "8"}
    conditions = {
        "mid_file_first": lambda: manifest_state(data)[1] > 0,
        "mid_file_later": lambda: manifest_state(data)[0] >= 3 and manifest_state(data)[1] > 0,
        "after_some_files": lambda: manifest_state(data)[0] >= 5,
    }
    code, hit, _, err = run_until(ingest_cmd(folder), env, conditions[moment], signal.SIGKILL)
    assert hit, f"the run ended before the kill point: {err[-2000:]}"
    assert code == -signal.SIGKILL
    assert committed_files_are_whole(data)  # no half file is visible, even before recovery
    rerun = subprocess.run(ingest_cmd(folder), env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    got = snapshot(data)
    assert got == expected
    assert len(got["chroma"]) == len(set(got["chroma"]))


def test_ctrl_c_stops_cleanly_and_the_next_run_finishes(tmp_path, clean, subprocess_env):
    folder, base = clean
    expected = _clean_snapshot(folder, base, subprocess_env)
    data = tmp_path / "data"
    # Small embedding batches: files then commit a few at a time, so Ctrl-C after the second one
    # lands while there is work left (with 128-chunk batches the last files commit in one burst).
    env = {**subprocess_env, "LOCALGPT_DATA_DIR": str(data), "LOCALGPT_EMBED_BATCH_SIZE": "8"}
    code, hit, out, err = run_until(
        ingest_cmd(folder), env, lambda: manifest_state(data)[0] >= 2, signal.SIGINT
    )
    assert hit
    assert code == 130, err[-2000:]
    assert "Traceback" not in err
    assert "interrupted" in (out + err).lower()
    assert manifest_state(data)[1] == 0  # nothing left pending: the half-written file was undone
    partial = snapshot(data)
    assert partial["chunks"] == partial["chroma"]
    rerun = subprocess.run(ingest_cmd(folder), env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert snapshot(data) == expected


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the parser processes")
def test_a_parser_process_killed_mid_run_does_not_stop_the_run(tmp_path, subprocess_env):
    """As when the OOM killer takes a parser: its files are retried one at a time and the run ends well."""
    import json

    folder = make_corpus(tmp_path / "docs", files=10)
    data = tmp_path / "data"
    env = {**subprocess_env, "LOCALGPT_DATA_DIR": str(data)}
    proc = subprocess.Popen(ingest_cmd(folder) + ["--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = 0
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not killed:
        if manifest_state(data)[0] >= 2:
            family = _descendants(proc.pid)  # one snapshot: a process may end between two reads of /proc
            for pid in family:
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                # the parser: a forkserver child (not the forkserver, the first of them) with no children
                if b"forkserver" in cmd and not _descendants(pid) and family.index(pid) > 0:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
        time.sleep(0.02)
    out, err = proc.communicate(timeout=300)
    assert killed, "no parser process was found to kill"
    assert proc.returncode == 0, err[-3000:]
    report = json.loads(out)
    assert report["new"] == 10 and report["skipped"] == []
