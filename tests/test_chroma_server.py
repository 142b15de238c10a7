"""Scale-out: the same ingest and search against a real `chroma run` server on loopback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ingest.pipeline import ingest_folder
from localgpt.config import Settings
from localgpt.errors import StoreError
from localgpt.retrieval import Retriever
from localgpt.store import Store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def chroma_server(tmp_path, subprocess_env):
    exe = shutil.which("chroma") or str(Path(sys.executable).parent / "chroma")
    if not Path(exe).exists():
        pytest.skip("the chroma command is not installed")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "run", "--path", str(tmp_path / "server"), "--host", "127.0.0.1", "--port", str(port)],
        env={**subprocess_env, "ANONYMIZED_TELEMETRY": "False"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("chroma run did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_ingest_and_search_through_a_chroma_server(tmp_path, chroma_server):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "bridge.txt").write_text("The Bergen bridge opened to traffic in 2004.", encoding="utf-8")
    (folder / "roses.txt").write_text("Roses need six hours of sun every day.", encoding="utf-8")
    settings = Settings(data_dir=tmp_path / "data", collection="remote", chroma_url=chroma_server, workers=1)
    report = ingest_folder(folder, settings)
    assert report.new == 2 and not report.skipped
    # The vectors live in the server, not in the local data folder.
    assert not (tmp_path / "data" / "chroma").exists()
    with Store.open(settings) as store:
        assert store.collection.count() == store.count_chunks() == 2
    hits = Retriever.from_settings(settings).search("When did the bridge open?", mode="dense", k=1).hits
    assert Path(hits[0].source).name == "bridge.txt"
    again = ingest_folder(folder, settings)
    assert again.unchanged == 2 and again.chunks_added == 0


def test_an_unreachable_server_is_a_clear_error(tmp_path):
    port = free_port()  # nothing listens there
    settings = Settings(data_dir=tmp_path / "data", collection="remote", chroma_url=f"http://127.0.0.1:{port}")
    with pytest.raises(StoreError, match=f"127.0.0.1:{port}"):
        Store.open(settings)
