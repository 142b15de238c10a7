"""Ingest as a user relies on it: incremental, deduplicating, safe with bad files."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from ingest.pipeline import ingest_folder
from localgpt.config import Settings
from localgpt.embeddings import get_embedder
from localgpt.errors import EmbedderMismatch
from localgpt.store import Store

ROOT = Path(__file__).resolve().parent.parent

ALPHA = "# Alpha\n\nThe alpha reactor runs at 42 degrees. It was built in Oslo in 1999.\n"
BETA = "Beta notes.\n\nThe beta bridge spans the fjord near Bergen and opened to traffic in 2004.\n"
GAMMA = "常见问题\n\n本地问答系统把所有数据保存在本机。检索使用混合搜索。\n"


def make_corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "alpha.md").write_text(ALPHA, encoding="utf-8")
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "beta.txt").write_text(BETA, encoding="utf-8")
    (folder / "gamma.txt").write_text(GAMMA, encoding="utf-8")
    return folder


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path / "data", collection="test", workers=1)


def snapshot(settings: Settings) -> dict:
    """Everything a query could see: manifest files, committed chunks and Chroma's ids."""
    with Store.open(settings) as store:
        chroma_ids = sorted(store.collection.get(include=[])["ids"])
        return {
            "files": sorted((Path(f.path).name, f.sha256) for f in store.files()),
            "chunks": store.chunk_ids(),
            "chroma": chroma_ids,
        }


def search_text(settings: Settings, text: str) -> list[str]:
    with Store.open(settings) as store:
        return [r.text for r in store.keyword_search(text, 10)]


def test_ingest_reads_every_file_and_stores_citable_chunks(tmp_path, settings):
    folder = make_corpus(tmp_path / "docs")
    report = ingest_folder(folder, settings)
    assert (report.new, report.changed, report.unchanged, report.skipped) == (3, 0, 0, [])
    assert report.chunks_added >= 3
    snap = snapshot(settings)
    assert snap["chunks"] == snap["chroma"]  # every vector is committed, nothing extra
    with Store.open(settings) as store:
        hits = store.keyword_search("reactor degrees", 3)
        assert hits and hits[0].source.endswith("alpha.md") and "42 degrees" in hits[0].text
        assert hits[0].heading == "Alpha"
        # Document frequency without ranking: what the search would find, counted up to a cap.
        assert store.keyword_count("reactor degrees", 10) == len(store.keyword_search("reactor degrees", 10)) >= 1
        assert store.keyword_count("reactor bridge", 1) == 1 and store.keyword_count("zyxwvut", 10) == 0
        vec = get_embedder(settings.embedder).embed(["Where is the bridge?"], query=True)[0]
        dense = store.dense_search(vec, 1)
        assert dense[0].source.endswith("beta.txt")


def test_reingest_with_nothing_changed_embeds_nothing(tmp_path, settings):
    folder = make_corpus(tmp_path / "docs")
    ingest_folder(folder, settings)
    before = snapshot(settings)
    report = ingest_folder(folder, settings)
    assert (report.new, report.changed, report.unchanged, report.chunks_added) == (0, 0, 3, 0)
    assert snapshot(settings) == before


def test_touched_but_identical_file_is_not_reembedded(tmp_path, settings):
    folder = make_corpus(tmp_path / "docs")
    ingest_folder(folder, settings)
    path = folder / "alpha.md"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 5_000_000_000))
    report = ingest_folder(folder, settings)
    assert report.unchanged == 3 and report.chunks_added == 0


def test_changed_file_replaces_its_chunks(tmp_path, settings):
    folder = make_corpus(tmp_path / "docs")
    ingest_folder(folder, settings)
    (folder / "alpha.md").write_text("# Alpha\n\nThe alpha reactor was moved to Trondheim.\n", encoding="utf-8")
    report = ingest_folder(folder, settings)
    assert report.changed == 1 and report.unchanged == 2
    assert not any("42 degrees" in t for t in search_text(settings, "alpha reactor"))
    assert any("Trondheim" in t for t in search_text(settings, "alpha reactor"))
    snap = snapshot(settings)
    assert snap["chunks"] == snap["chroma"]


def test_deleted_file_loses_its_chunks(tmp_path, settings):
    folder = make_corpus(tmp_path / "docs")
    ingest_folder(folder, settings)
    (folder / "sub" / "beta.txt").unlink()
    report = ingest_folder(folder, settings)
    assert report.removed == 1 and report.chunks_removed >= 1
    assert search_text(settings, "bridge fjord") == []
    snap = snapshot(settings)
    assert snap["chunks"] == snap["chroma"] and len(snap["files"]) == 2


def test_identical_content_under_two_names_is_embedded_once_and_cites_both(tmp_path, settings):
    folder = make_corpus(tmp_path / "docs")
    shutil.copy(folder / "alpha.md", folder / "alpha-copy.md")
    report = ingest_folder(folder, settings)
    assert report.new + report.renamed_or_copied == 4 and report.renamed_or_copied == 1
    with Store.open(settings) as store:
        hit = store.keyword_search("reactor", 1)[0]
        assert sorted(Path(p).name for p in hit.sources) == ["alpha-copy.md", "alpha.md"]
        assert store.count_chunks() == len(set(store.chunk_ids()))


def test_renamed_file_is_not_reembedded(tmp_path, settings):
    folder = make_corpus(tmp_path / "docs")
    ingest_folder(folder, settings)
    chunks_before = snapshot(settings)["chunks"]
    (folder / "alpha.md").rename(folder / "renamed.md")
    report = ingest_folder(folder, settings)
    assert report.chunks_added == 0 and report.renamed_or_copied == 1 and report.removed == 1
    snap = snapshot(settings)
    assert snap["chunks"] == chunks_before
    assert ("renamed.md" in [name for name, _ in snap["files"]]) and "alpha.md" not in [n for n, _ in snap["files"]]


def test_a_store_refuses_another_embedder(tmp_path, settings):
    folder = make_corpus(tmp_path / "docs")
    ingest_folder(folder, settings)
    with pytest.raises(EmbedderMismatch, match="e5-small|--rebuild"):
        ingest_folder(folder, settings.with_overrides(embedder="minilm"))


def test_bad_files_are_reported_and_the_rest_is_ingested(tmp_path, settings):
    folder = make_corpus(tmp_path / "docs")
    (folder / "empty.txt").write_bytes(b"")
    (folder / "junk.txt").write_bytes(os.urandom(4096))
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4\n this is not really a pdf \x00\x01")
    (folder / "tool.exe").write_bytes(b"MZ\x90\x00")
    (folder / "latin1.txt").write_bytes("Café crème, naïve façade — 5 €".encode("cp1252"))
    (folder / "utf16.txt").write_text("Grüße aus Zürich. 你好，世界。", encoding="utf-16")
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    (folder / "dangling.md").symlink_to(folder / "missing.md")
    secret = folder / "secret.txt"
    secret.write_text("top secret")
    secret.chmod(0)
    report = ingest_folder(folder, settings)
    reasons = {Path(p.path).name: p.reason for p in report.skipped}
    assert "empty" in reasons["empty.txt"].lower()
    assert "binary" in reasons["junk.txt"].lower()
    assert "broken.pdf" in reasons
    assert "unsupported" in reasons["tool.exe"]
    assert "loop" in reasons["loop"]
    assert "dangling.md" in reasons
    if os.geteuid() != 0:  # root reads anything
        assert "secret.txt" in reasons
    assert report.new >= 5  # the three good files and both re-encoded texts
    assert any("Café crème" in t for t in search_text(settings, "façade"))
    assert any("Zürich" in t for t in search_text(settings, "Grüße"))



def test_an_unreadable_file_is_reported_again_without_parsing_until_it_changes(tmp_path, settings, monkeypatch):
    folder = make_corpus(tmp_path / "docs")
    bad = folder / "broken.pdf"
    bad.write_bytes(b"%PDF-1.4\n this is not really a pdf \x00\x01")
    first = ingest_folder(folder, settings)
    reason = {Path(p.path).name: p.reason for p in first.skipped}["broken.pdf"]

    import ingest.pipeline as pipeline

    def no_parsing(*args, **kwargs):
        raise AssertionError("nothing should be parsed: the good files are unchanged, the bad one is known")

    monkeypatch.setattr(pipeline, "_run_jobs", no_parsing)
    again = ingest_folder(folder, settings)
    assert [(Path(p.path).name, p.reason) for p in again.skipped] == [("broken.pdf", reason)]  # --strict still fails
    monkeypatch.undo()

    # Replaced by a readable file (new bytes): read again and ingested.
    bad.unlink()
    good = folder / "broken.md"
    good.write_text("# Fixed\n\nThe repaired manual mentions the turbine.\n", encoding="utf-8")
    fixed = ingest_folder(folder, settings)
    assert fixed.skipped == [] and fixed.new == 1
    assert any("turbine" in t for t in search_text(settings, "turbine"))


def test_a_file_that_turns_bad_keeps_its_stored_chunks(tmp_path, settings):
    folder = make_corpus(tmp_path / "docs")
    ingest_folder(folder, settings)
    (folder / "alpha.md").write_bytes(b"")
    report = ingest_folder(folder, settings)
    assert [Path(p.path).name for p in report.skipped] == ["alpha.md"]
    assert any("42 degrees" in t for t in search_text(settings, "reactor"))


def test_cli_ingest_json_and_strict(tmp_path, subprocess_env):
    folder = make_corpus(tmp_path / "docs")
    (folder / "empty.txt").write_bytes(b"")
    env = {**subprocess_env, "LOCALGPT_DATA_DIR": str(tmp_path / "data")}
    cmd = [sys.executable, "-m", "localgpt.cli", "ingest", str(folder), "--json", "--workers", "1"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["new"] == 3 and out["skipped"][0]["path"].endswith("empty.txt") and out["skipped"][0]["reason"]
    strict = subprocess.run(cmd + ["--strict"], env=env, capture_output=True, text=True, timeout=300)
    assert strict.returncode == 1
    listing = subprocess.run(
        [sys.executable, "-m", "localgpt.cli", "sources", "--json"], env=env, capture_output=True, text=True, timeout=120
    )
    assert sorted(Path(f["path"]).name for f in json.loads(listing.stdout)) == ["alpha.md", "beta.txt", "gamma.txt"]
    assert not Path(env["LOCALGPT_NETGUARD_LOG"]).exists()


def test_sources_remove_and_collections_drop(tmp_path, settings, subprocess_env):
    folder = make_corpus(tmp_path / "docs")
    ingest_folder(folder, settings)
    env = {**subprocess_env, "LOCALGPT_DATA_DIR": str(settings.data_dir), "LOCALGPT_COLLECTION": "test"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "localgpt.cli", *a], env=env, capture_output=True, text=True, timeout=120)
    removed = run("sources", "remove", str(folder / "alpha.md"))
    assert removed.returncode == 0, removed.stderr
    assert search_text(settings, "reactor") == []
    missing = run("sources", "remove", str(folder / "nope.md"))
    assert missing.returncode == 2 and "not in collection" in missing.stderr
    listed = run("collections", "--json")
    assert [c["name"] for c in json.loads(listed.stdout)] == ["test"]
    dropped = run("collections", "drop", "test", "--yes")
    assert dropped.returncode == 0
    assert json.loads(run("collections", "--json").stdout) == []
