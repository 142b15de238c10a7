"""Several processes on one collection: opening a store (any `localgpt` command, a second `serve`)
while another process ingests must not remove that ingest's vectors in flight; what a killed
ingest left pending is still removed."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from localgpt.config import Settings
from localgpt.store import Store

pytestmark = pytest.mark.slow

# The real pipeline in its own process, stopped after its vectors are in Chroma and before the
# first file commits: the moment another process's recovery used to remove them.
PAUSED_INGEST = r'''
import json, os, signal, sys
from pathlib import Path
from ingest.pipeline import ingest_folder
from localgpt.config import Settings
from localgpt.store import Store

commit = Store.commit_content
paused = []

def commit_after_a_pause(self, *args, **kwargs):
    if not paused:
        paused.append(True)
        print("vectors written", flush=True)
        if sys.stdin.readline().strip() == "die":
            os.kill(os.getpid(), signal.SIGKILL)
    return commit(self, *args, **kwargs)

if __name__ == "__main__":  # the parser processes import this file again
    Store.commit_content = commit_after_a_pause
    report = ingest_folder(Path(sys.argv[1]), Settings(data_dir=sys.argv[2], collection="live", workers=1))
    print(json.dumps(report.as_dict()), flush=True)
'''

DOCS = {
    "bridge.md": "The Bergen bridge opened to traffic in 2004. It is 1,200 metres long.",
    "roses.txt": "Roses need six hours of sun every day. Water them at the roots in the morning.",
    "harbour.md": "Ferries to the island leave the harbour every 40 minutes between 6 and 22.",
}


def pending_rows(data: Path) -> int:
    db = sqlite3.connect(str(data / "collections" / "live.sqlite"))
    try:
        return db.execute("SELECT COUNT(*) FROM pending").fetchone()[0]
    finally:
        db.close()


def state(data: Path) -> dict:
    with Store.open(Settings(data_dir=data, collection="live"), create=False) as store:
        return {"files": sorted(Path(f.path).name for f in store.files()), "chunks": store.chunk_ids(),
                "vectors": sorted(store.collection.get(include=[])["ids"])}


def other_command(data: Path, env: dict) -> list[str]:
    """Another localgpt process opening the collection (as `serve` or `ask` would): its sources."""
    done = subprocess.run([sys.executable, "-m", "localgpt.cli", "sources", "--json", "--data-dir", str(data),
                           "--collection", "live"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return [Path(s["path"]).name for s in json.loads(done.stdout)]


@pytest.fixture
def paused_ingest(tmp_path, subprocess_env):
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in DOCS.items():
        (folder / name).write_text(text, encoding="utf-8")
    script = tmp_path / "paused_ingest.py"
    script.write_text(PAUSED_INGEST)
    data = tmp_path / "data"
    proc = subprocess.Popen([sys.executable, str(script), str(folder), str(data)], env=subprocess_env, cwd=Path.cwd(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "vectors written", proc.stderr.read()[-3000:]
        # The files whose vectors were written before the first commit: all 3 or fewer, as the parser's
        # results came in (a loaded machine parses the last file after the first batch is embedded).
        pending = pending_rows(data)
        assert pending >= 1
        yield proc, data, folder, pending
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)


def test_opening_the_store_leaves_a_live_ingest_alone(paused_ingest, subprocess_env):
    proc, data, _, pending = paused_ingest
    assert other_command(data, subprocess_env) == []  # nothing committed yet…
    assert pending_rows(data) == pending  # …and the live ingest's vectors kept
    with Store.open(Settings(data_dir=data, collection="live")):  # this process too
        pass
    out, err = proc.communicate("go\n", timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert json.loads(out.splitlines()[-1])["new"] == 3
    got = state(data)
    assert got["files"] == sorted(DOCS)
    assert got["chunks"] and got["vectors"] == got["chunks"]  # every committed chunk has its vector
    assert pending_rows(data) == 0
    assert sorted(other_command(data, subprocess_env)) == sorted(DOCS)


def test_a_killed_ingests_vectors_are_removed_by_the_next_open(paused_ingest, subprocess_env):
    proc, data, folder, pending = paused_ingest
    proc.stdin.write("die\n")
    proc.stdin.flush()
    proc.wait(timeout=60)
    assert proc.returncode < 0
    assert pending_rows(data) == pending
    assert other_command(data, subprocess_env) == []  # its open removes what the dead one left
    assert pending_rows(data) == 0
    assert state(data) == {"files": [], "chunks": [], "vectors": []}
    writers = data.resolve() / "collections" / ".writers"
    assert not any(f"-{proc.pid}-" in p.name for p in writers.iterdir())  # its lock file went too
    rerun = subprocess.run([sys.executable, "-m", "localgpt.cli", "ingest", str(folder), "--json", "--data-dir", str(data),
                            "--collection", "live", "--workers", "1"], env=subprocess_env, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    got = state(data)
    assert got["files"] == sorted(DOCS) and got["vectors"] == got["chunks"]


def test_manifests_of_before_writer_names_open_and_recover(tmp_path):
    """A manifest written by an earlier localgpt (pending rows without a writer) opens, and its
    leftovers are removed as before."""
    data = tmp_path / "data"
    manifest = data / "collections" / "live.sqlite"
    manifest.parent.mkdir(parents=True)
    db = sqlite3.connect(str(manifest))
    db.execute("CREATE TABLE pending (sha256 TEXT PRIMARY KEY, chunk_ids TEXT NOT NULL, started REAL NOT NULL)")
    db.execute("INSERT INTO pending VALUES ('abc', '[\"abc:0\"]', 1.0)")
    db.commit()
    db.close()
    with Store.open(Settings(data_dir=data, collection="live")) as store:
        assert store.count_chunks() == 0
    assert pending_rows(data) == 0


def test_many_threads_read_one_store_while_another_writes(tmp_path):
    """`localgpt serve` answers many requests at once over one open store: 16 threads searching and reading it
    while another links files get whole, consistent results every time (unserialised, 16 concurrent retrievals on
    a 16-core machine got `fetchone() is None` from a COUNT(*) and HTTP 500s)."""
    import threading
    import time

    from conftest import ingested_collection

    docs = {f"doc{i}.md": f"# Note {i}\n\nThe harbour ferry number {i} leaves at {6 + i} o'clock.\n" for i in range(12)}
    settings = ingested_collection(tmp_path, docs, "many")
    errors: list[str] = []
    with Store.open(settings, create=False) as store:
        total, ids = store.count_chunks(), store.chunk_ids()
        sha = store.files()[0].sha256
        stop = threading.Event()

        def read() -> None:
            for _ in range(150):
                try:
                    assert store.count_chunks() == total
                    assert store.chunk_ids() == ids
                    hits = store.keyword_search("harbour ferry", 5)
                    assert len(hits) == 5 and all("ferry" in h.text for h in hits)
                    assert set(store.chunks_by_id(ids[:4])) == set(ids[:4])
                except Exception as exc:  # noqa: BLE001 - collected and reported below
                    errors.append(f"{type(exc).__name__}: {exc}")

        def write() -> None:
            n = 0
            while not stop.is_set():
                store.link_file(f"linked/copy{n % 50}.md", 10, n, sha)
                with store._tx() as db:  # a transaction half done (as an ingest's is) must never be read
                    db.execute("INSERT INTO chunks(id, sha256, idx, text) VALUES('half-done', ?, 9999, 'x')", (sha,))
                    time.sleep(0.001)
                    db.execute("DELETE FROM chunks WHERE id='half-done'")
                n += 1

        writer = threading.Thread(target=write)
        readers = [threading.Thread(target=read) for _ in range(16)]
        writer.start()
        for t in readers:
            t.start()
        for t in readers:
            t.join()
        stop.set()
        writer.join()
        assert len(store.files(under="linked")) == 50
    assert errors == []
