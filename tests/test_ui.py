"""The web page's behaviour, driven through Streamlit's AppTest (no browser): uploads that are
refused or saved, ingest with its summary, cited answers, "I don't know", collections and the
library, per-session history. Real parts throughout: a real store, the real embedder, the
extractive answerer (no generator, so the answers do not depend on a model's speed)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from ingest.pipeline import ingest_folder  # noqa: E402
from localgpt.config import Settings, load_settings  # noqa: E402
from localgpt.store import collection_names  # noqa: E402
from ui.app import UploadRefused, clean_upload_name, highlighted_html, save_upload, upload_folder  # noqa: E402
from ui.launch import settings_env, streamlit_command  # noqa: E402

APP = str(Path(__file__).resolve().parent.parent / "ui" / "app.py")
REACTOR = (
    "# The alpha reactor\n\nThe alpha reactor runs at 42 degrees Celsius. It was built in Oslo in 1999.\n\n"
    "Its cooling loop uses water from the fjord.\n"
)
ALLOWED = {".pdf", ".txt", ".md"}


@pytest.fixture
def page_env(tmp_path, monkeypatch) -> Settings:
    """Settings the page reads from the environment: a temp store, the extractive answerer."""
    monkeypatch.setenv("LOCALGPT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("LOCALGPT_BACKEND", "extractive")
    monkeypatch.setenv("LOCALGPT_WORKERS", "1")
    monkeypatch.chdir(tmp_path)  # no ./localgpt.toml from the checkout
    return load_settings()


def new_page() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def texts(elements) -> list[str]:
    return [e.value for e in elements]


def page_text(at: AppTest) -> str:
    parts = []
    for kind in ("markdown", "caption", "success", "warning", "error", "info"):
        parts += [str(e.value) for e in getattr(at, kind)]
    return "\n".join(parts)


def ingest_through_page(at: AppTest, files: list[tuple[str, bytes, str]]) -> AppTest:
    at.file_uploader[0].set_value(files)
    at.run()
    at.button(key="ingest").click().run()
    deadline = time.monotonic() + 120  # a limit, not a measurement: ingest of one file takes seconds
    while "Ingested into" not in page_text(at) and "failed" not in page_text(at):
        assert time.monotonic() < deadline, page_text(at)
        time.sleep(0.3)
        at.run()
    assert not at.exception, at.exception
    return at


def ask(at: AppTest, question: str) -> AppTest:
    at.chat_input[0].set_value(question).run()
    assert not at.exception, at.exception
    return at


# ---------------------------------------------------------------------------- upload safety
@pytest.mark.parametrize(
    "name, why",
    [
        ("../../etc/x.pdf", "folder"),
        ("..\\..\\x.pdf", "folder"),
        ("sub/x.pdf", "folder"),
        ("..", "folder"),
        ("evil.exe", "'.exe'"),
        ("README", "without an extension"),
        (".hidden.txt", "hidden"),
        ("bad\x00name.txt", "control"),
        ("x" * 300 + ".txt", "200 bytes"),
    ],
)
def test_unsafe_or_unsupported_upload_names_are_refused_with_a_reason(name, why):
    with pytest.raises(UploadRefused, match=why):
        clean_upload_name(name, ALLOWED)


def test_chinese_and_japanese_file_names_are_kept():
    assert clean_upload_name("报告.pdf", ALLOWED) == "报告.pdf"
    assert clean_upload_name("議事録 2024.TXT", ALLOWED | {".txt"}) == "議事録 2024.TXT"


def test_an_upload_never_overwrites_a_different_file(tmp_path):
    folder = tmp_path / "uploads" / "default"
    first, note = save_upload(folder, "notes.txt", b"one", allowed=ALLOWED, max_bytes=100)
    assert (first.name, note) == ("notes.txt", None)
    again, note = save_upload(folder, "notes.txt", b"one", allowed=ALLOWED, max_bytes=100)
    assert again == first and "same content" in note
    second, note = save_upload(folder, "notes.txt", b"two", allowed=ALLOWED, max_bytes=100)
    assert second.name == "notes (2).txt" and "saved as notes (2).txt" in note
    assert first.read_bytes() == b"one" and second.read_bytes() == b"two"
    assert sorted(p.name for p in folder.iterdir()) == ["notes (2).txt", "notes.txt"]  # no temp files left


def test_an_upload_over_the_size_limit_is_refused_and_not_written(tmp_path):
    folder = tmp_path / "up"
    with pytest.raises(UploadRefused, match="over the"):
        save_upload(folder, "big.txt", b"x" * 101, allowed=ALLOWED, max_bytes=100)
    assert not folder.exists() or not any(folder.iterdir())


def test_page_refuses_traversal_and_disallowed_types_and_writes_nothing_outside(page_env, tmp_path):
    at = new_page()
    before = {p for p in tmp_path.rglob("*")}
    at.file_uploader[0].set_value([
        ("../../etc/x.pdf", b"%PDF-1.4 not really", "application/pdf"),
        ("tool.exe", b"MZ", "application/octet-stream"),
    ])
    at.run()
    at.button(key="ingest").click().run()
    errors = " ".join(texts(at.error))
    assert "'../../etc/x.pdf' was refused: a file name may not contain a folder" in errors
    assert "'tool.exe' was refused" in errors and "'.exe'" in errors
    created = {p for p in tmp_path.rglob("*")} - before
    outside = [p for p in created if not p.is_relative_to(upload_folder(page_env)) and "chroma" not in p.parts]
    assert not [p for p in created if p.is_file() and p.is_relative_to(upload_folder(page_env))]
    assert not [p for p in outside if p.is_file()], outside
    assert not (tmp_path / "etc").exists()


def test_chunk_text_is_escaped_and_only_the_supporting_sentence_is_marked():
    text = "Intro <script>alert(1)</script>.\nThe reactor runs at 42 degrees. Tail & end."
    shown = highlighted_html(text, ["The reactor runs at 42 degrees."])
    assert "<script>" not in shown and "&lt;script&gt;" in shown and "&amp; end" in shown
    assert "<mark>The reactor runs at 42 degrees.</mark>" in shown and shown.count("<mark>") == 1


# ---------------------------------------------------------------------------- ingest and answers
def test_upload_ingests_with_a_summary_and_a_question_gets_a_cited_answer(page_env):
    at = ingest_through_page(at=new_page(), files=[
        ("reactor.md", REACTOR.encode(), "text/markdown"),
        ("broken.pdf", b"this is not a pdf", "application/pdf"),
    ])
    summary = page_text(at)
    assert "Ingested into 'default': 1 new" in summary and "1 skipped" in summary
    tables = [t.value for t in at.table]
    assert tables[0]["new"].tolist() == [1] and tables[0]["chunks +"].tolist()[0] >= 1
    assert tables[1]["file"].tolist() == ["broken.pdf"]  # the skipped file, with its reason
    assert (upload_folder(page_env) / "reactor.md").read_text() == REACTOR

    library = at.dataframe[0].value
    assert library["file"].tolist() == ["reactor.md"] and library["chunks"].tolist()[0] >= 1

    at = ask(at, "At what temperature does the alpha reactor run?")
    answer = at.chat_message[1]
    shown = "\n".join(str(m.value) for m in answer.markdown)
    assert "42 degrees" in shown
    assert "Sources: **[1]** reactor.md" in shown  # numbered, and [1] is cited by the answer
    assert "runs at 42 degrees Celsius.</mark>" in shown and shown.count("<mark>") >= 1  # the passage, highlighted
    assert at.get("download_button")  # the file is offered for download
    assert "peak memory" in " ".join(texts(answer.caption))


def test_question_about_something_absent_shows_i_dont_know(page_env, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "reactor.md").write_text(REACTOR)
    ingest_folder(docs, page_env)
    at = ask(new_page(), "What is the recipe for Sachertorte?")
    answer = at.chat_message[1]
    assert "I don't know" in answer.warning[0].value
    assert not any("Sources:" in str(m.value) for m in answer.markdown)


def test_question_before_any_document_is_a_clear_message_not_a_traceback(page_env):
    at = ask(new_page(), "Anything there?")
    assert "has no documents yet" in at.chat_message[1].error[0].value
    assert not at.exception


def test_history_belongs_to_one_browser_session(page_env, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "reactor.md").write_text(REACTOR)
    ingest_folder(docs, page_env)
    first, second = new_page(), new_page()
    ask(first, "Where was the alpha reactor built?")
    ask(second, "Where does the cooling water come from?")
    ask(first, "And in which year?")
    questions = [[str(m.markdown[0].value) for m in p.chat_message if m.name == "user"] for p in (first, second)]
    assert questions == [
        ["Where was the alpha reactor built?", "And in which year?"],
        ["Where does the cooling water come from?"],
    ]
    assert not first.chat_message[3].error and "reactor.md" in str(first.chat_message[3].markdown[1].value)


# ---------------------------------------------------------------------------- collections and library
def test_collections_are_created_switched_and_dropped_only_after_confirmation(page_env, tmp_path):
    at = new_page()
    at.text_input(key="new_collection").input("bad/name").run()
    at.button(key="create_collection").click().run()
    assert "Collection name" in at.error[0].value and "bad/name" not in collection_names(page_env)

    at.text_input(key="new_collection").input("papers").run()
    at.button(key="create_collection").click().run()
    assert at.selectbox(key="collection").value == "papers"
    assert "papers" in collection_names(page_env)
    assert at.header[0].value.endswith("papers")

    at.selectbox(key="collection").select("default").run()
    assert at.header[0].value.endswith("default")
    at.selectbox(key="collection").select("papers").run()

    assert at.button(key="drop_collection").disabled  # not before the box is ticked
    at.checkbox(key="confirm_drop").check().run()
    at.button(key="drop_collection").click().run()
    assert "papers" not in collection_names(page_env)
    assert "Dropped collection 'papers'" in at.success[0].value
    assert at.selectbox(key="collection").value == "default"


def test_library_removes_a_file_and_its_uploaded_copy(page_env):
    at = ingest_through_page(new_page(), [
        ("reactor.md", REACTOR.encode(), "text/markdown"),
        ("bridge.txt", b"The beta bridge spans the fjord near Bergen and opened in 2004.", "text/plain"),
    ])
    assert sorted(at.dataframe[0].value["file"]) == ["bridge.txt", "reactor.md"]
    at.selectbox(key="remove_pick").select("bridge.txt").run()
    at.button(key="remove_file").click().run()
    assert at.dataframe[0].value["file"].tolist() == ["reactor.md"]
    assert not (upload_folder(page_env) / "bridge.txt").exists()
    assert "Removed bridge.txt" in at.success[0].value


def test_retrieval_settings_apply_to_the_next_question_without_a_restart(page_env, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    facts = ["was built in Oslo in 1999", "runs at 42 degrees", "is cooled by fjord water",
             "has a red control room", "was inspected in March", "employs twelve engineers"]
    for i, fact in enumerate(facts):
        (docs / f"note{i}.md").write_text(f"# Note {i}\n\nThe alpha reactor {fact}.\n")
    ingest_folder(docs, page_env)
    at = new_page()
    at.slider(key="k").set_value(1).run()
    at = ask(at, "How warm does the alpha reactor run?")
    assert str(at.chat_message[1].markdown[1].value).count("[") == 1  # one source
    at.slider(key="k").set_value(3).run()
    at = ask(at, "How warm does the alpha reactor run?")
    assert str(at.chat_message[3].markdown[1].value).count("[") == 3


# ---------------------------------------------------------------------------- launching
def test_launch_binds_loopback_headless_without_usage_stats_or_file_watcher(tmp_path):
    settings = Settings(data_dir=tmp_path / "d", collection="papers", k=7, backend="extractive")
    cmd = streamlit_command(settings, port=8765)
    flags = dict(zip(cmd[5::2], cmd[6::2]))
    assert cmd[1:5] == ["-m", "streamlit", "run", APP]
    assert flags["--server.address"] == "127.0.0.1" and flags["--server.port"] == "8765"
    assert flags["--server.headless"] == "true" and flags["--browser.gatherUsageStats"] == "false"
    assert flags["--server.fileWatcherType"] == "none"


def test_the_page_sees_the_settings_the_cli_resolved(tmp_path, monkeypatch):
    settings = Settings(data_dir=tmp_path / "d", collection="papers", k=7, backend="extractive", temperature=0.3)
    monkeypatch.chdir(tmp_path)
    for key in list(os.environ):
        if key.startswith("LOCALGPT_"):
            monkeypatch.delenv(key)
    for key, value in settings_env(settings).items():
        monkeypatch.setenv(key, value)
    assert load_settings() == settings.with_overrides(data_dir=(tmp_path / "d").resolve(), source_dir=settings.source_dir.resolve())


# ---------------------------------------------------------------------------- errors for people
def test_a_missing_model_is_a_clear_message_on_the_page(page_env, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "reactor.md").write_text(REACTOR)
    ingest_folder(docs, page_env)
    at = new_page()
    at.selectbox(key="backend").select("auto").run()
    at.text_input(key="model").input(str(tmp_path / "no-such-model.gguf")).run()
    at = ask(at, "At what temperature does the alpha reactor run?")
    message = at.chat_message[1].error[0].value
    assert "no-such-model.gguf" in message and "Traceback" not in message


def test_out_of_memory_reads_as_advice():
    from ui.app import explain

    assert "out of memory" in explain(MemoryError()) and "quantization" in explain(MemoryError())


def test_localgpt_ui_serves_the_page_on_loopback_and_stops_on_sigterm(tmp_path, subprocess_env):
    import signal
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "localgpt.cli", "ui", "--port", str(port), "--data-dir", str(tmp_path / "data"),
         "--backend", "extractive"],
        env=subprocess_env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with opener.open(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    assert r.read() == b"ok"
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
                time.sleep(0.2)
        with opener.open(f"http://127.0.0.1:{port}/", timeout=5) as r:
            assert b"<html" in r.read().lower()
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0].decode()
    assert "http://127.0.0.1:%d" % port in out and "Traceback" not in out
    assert not Path(subprocess_env["LOCALGPT_NETGUARD_LOG"]).exists()
