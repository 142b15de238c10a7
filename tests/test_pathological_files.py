"""No hang, on any file: shapes that once made ingest run for hours are split in time linear in
their size, stored and searchable, or refused with a reason; a parser stuck on a file is stopped
and the rest of the run goes on.

The files come from ``bench/pathological.py`` (the bench measures MB/s on the same shapes). At
half a megabyte a single sentence took the old splitter about 15 minutes (it re-tokenized longer prefixes
of the rest for every chunk: 34 s at 100 KB, quadratic); ``pytest.mark.timeout`` is the bound.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ingest.load import load_file
from ingest.pipeline import ingest_folder
from ingest.split import split_document
from localgpt.config import Settings
from localgpt.embeddings import token_counter
from localgpt.store import Store
from test_ingest import make_corpus, search_text

ROOT = Path(__file__).resolve().parent.parent


def _bench_module(name: str):
    # By path: putting bench/ on sys.path would let bench/ingest.py shadow the ingest package.
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shapes = _bench_module("pathological")
PATHOLOGICAL = [kind for kind in shapes.KINDS if kind != "normal text"]


@pytest.fixture(scope="module")
def count():
    return token_counter("e5-small")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", PATHOLOGICAL)
def test_half_a_megabyte_without_sentence_ends_splits_into_chunks_that_fit(tmp_path, count, kind):
    name, make = shapes.KINDS[kind]
    data = make(500_000)
    path = tmp_path / name
    path.write_bytes(data)
    doc = load_file(path)
    chunks = split_document(doc, hashlib.sha256(data).hexdigest(), count, chunk_size=200, chunk_overlap=32)
    assert len(chunks) > 200
    assert max(c.tokens for c in chunks) <= 200
    assert shapes.MARKER in chunks[-1].text  # the end of the file was reached, nothing dropped on the way
    stored = sum(len(c.text) for c in chunks)
    assert stored >= 0.9 * sum(len(el.text) for el in doc.elements)


@pytest.mark.timeout(120)
def test_pathological_files_are_stored_and_searchable_or_refused_by_the_size_rule(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for kind in PATHOLOGICAL:
        name, make = shapes.KINDS[kind]
        (folder / name).write_bytes(make(2_000))
    (folder / "huge-line.txt").write_bytes(shapes.single_line(1_200_000))
    settings = Settings(data_dir=tmp_path / "data", collection="patho", workers=1, max_file_mb=1)
    report = ingest_folder(folder, settings)
    assert [(Path(p.path).name, "max_file_mb = 1" in p.reason) for p in report.skipped] == [("huge-line.txt", True)]
    assert "1.1 MB" in report.skipped[0].reason and "--max-file-mb" in report.skipped[0].reason
    assert report.new == len(PATHOLOGICAL)
    with Store.open(settings) as store:
        found = {Path(p).name for hit in store.keyword_search(shapes.MARKER, 10) for p in hit.sources}
    assert found == {shapes.KINDS[kind][0] for kind in PATHOLOGICAL}  # each file's last words are searchable


_NEVER_FINISHING_READER = '''
import time as _time

import ingest.load as _load


def _read_never(data):
    _time.sleep(600)  # a reader stuck on its file


_load.register_reader(".stuck", "a reader that never finishes (tests/test_pathological_files.py)", _read_never)
'''


@pytest.mark.timeout(180)
def test_a_file_whose_parser_never_finishes_is_stopped_and_the_run_goes_on(tmp_path, subprocess_env):
    """A reader registered for ``.stuck`` in every process of the CLI (through the sitecustomize
    that already guards their network) sleeps; the parse budget stops it, the file queued behind
    it in the same parser pool is parsed in a fresh one, and the run ends normally."""
    guard = Path(subprocess_env["PYTHONPATH"].split(":")[0]) / "sitecustomize.py"
    guard.write_text(guard.read_text() + _NEVER_FINISHING_READER)
    folder = make_corpus(tmp_path / "docs")  # alpha.md, gamma.txt, sub/beta.txt: parsed after the stuck file
    (folder / "frozen.stuck").write_bytes(b"anything")
    (folder / "big.txt").write_bytes(shapes.single_line(600_000))
    env = {**subprocess_env, "LOCALGPT_DATA_DIR": str(tmp_path / "data")}
    cmd = [sys.executable, "-m", "localgpt.cli", "ingest", str(folder), "--json", "--workers", "1",
           "--parse-timeout", "3", "--max-file-mb", "0.5"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    reasons = {Path(p["path"]).name: p["reason"] for p in out["skipped"]}
    assert set(reasons) == {"frozen.stuck", "big.txt"}
    assert reasons["frozen.stuck"].startswith("parsing took longer than 3 s") and "--parse-timeout" in reasons["frozen.stuck"]
    assert "max_file_mb = 0.5" in reasons["big.txt"] and "--max-file-mb" in reasons["big.txt"]
    assert out["new"] == 3 and not out["interrupted"]
    settings = Settings(data_dir=tmp_path / "data", collection="default")
    assert any("bridge" in t for t in search_text(settings, "beta bridge fjord"))  # sub/beta.txt, after the stuck one
    assert not Path(env["LOCALGPT_NETGUARD_LOG"]).exists()
