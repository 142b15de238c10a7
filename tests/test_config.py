"""Settings layering and the offline guarantees a user relies on."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from ingest.pipeline import _Job, _parse, file_sha256
from localgpt.config import load_settings
from localgpt.errors import BadFile, ConfigError


def test_settings_layer_defaults_then_file_then_environment_then_flags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOCALGPT_CONFIG", raising=False)
    for key in ("LOCALGPT_K", "LOCALGPT_COLLECTION", "LOCALGPT_CHUNK_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert load_settings().k == 4  # default
    (tmp_path / "localgpt.toml").write_text('k = 6\ncollection = "from-file"\nchunk_size = 300\n')
    s = load_settings()
    assert (s.k, s.collection, s.chunk_size) == (6, "from-file", 300)
    monkeypatch.setenv("LOCALGPT_K", "8")
    monkeypatch.setenv("LOCALGPT_COLLECTION", "from-env")
    s = load_settings()
    assert (s.k, s.collection, s.chunk_size) == (8, "from-env", 300)
    s = load_settings(k=10)
    assert (s.k, s.collection) == (10, "from-env")


def test_bad_settings_name_the_setting(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="collection"):
        load_settings(collection="../etc")
    with pytest.raises(ConfigError) as bad:
        load_settings(answer_check="maybe", k=0)
    message = str(bad.value)  # one line per bad setting, as the config file names it, no pydantic links
    assert "answer_check: Input should be 'auto', 'on' or 'off'" in message and "k: " in message
    assert "pydantic.dev" not in message and "\n" not in message
    monkeypatch.setenv("LOCALGPT_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="missing.toml"):
        load_settings()


def test_the_suite_refuses_non_loopback_connections(network_probe):
    with pytest.raises(AssertionError, match="network|host name"):
        socket.create_connection(("10.255.255.1", 80), timeout=0.1)
    with pytest.raises(AssertionError, match="network|host name"):
        socket.getaddrinfo("huggingface.co", 443)
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with pytest.raises(AssertionError, match="network"):
        probe.connect(("192.0.2.1", 443))
    probe.close()
    assert len(network_probe) == 3


def test_a_file_that_changed_while_it_was_read_is_skipped_for_the_next_run(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("first version of the notes", encoding="utf-8")
    st = path.stat()
    job = _Job(str(path), st.st_size, st.st_mtime_ns, file_sha256(str(path)), "new")
    path.write_text("second, longer version of the notes", encoding="utf-8")  # changed after hashing
    with pytest.raises(BadFile, match="changed while it was being read"):
        _parse(job, "e5-small", 200, 32, False)


def test_a_file_over_the_size_limit_is_skipped_with_the_limit_named(tmp_path):
    from ingest.pipeline import ingest_folder
    from localgpt.config import Settings

    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "huge.txt").write_text("word " * 300_000, encoding="utf-8")
    (folder / "small.txt").write_text("A small note about pumps.", encoding="utf-8")
    report = ingest_folder(folder, Settings(data_dir=tmp_path / "data", collection="sizes", max_file_mb=1, workers=1))
    assert report.new == 1
    assert [Path(p.path).name for p in report.skipped] == ["huge.txt"]
    assert "max_file_mb" in report.skipped[0].reason
