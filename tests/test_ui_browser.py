"""The web page in a real browser: Debian's Chromium, headless, driven by Playwright, against
``localgpt ui``'s own Streamlit command on loopback. Upload → live ingest → cited answer; eight
sessions asking at once; refused uploads; one answer from the embedded default generator.

Needs /usr/bin/chromium (apt-get install chromium chromium-driver) and the playwright package;
skips with the reason otherwise. The server runs with the test network guard, and Chromium with
every background service off and host resolution limited to loopback.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from localgpt.config import Settings
from ui.launch import settings_env, streamlit_command

CHROMIUM = "/usr/bin/chromium"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing: apt-get install chromium chromium-driver"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (dev extra)")
expect = sync_api.expect

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "screenshot.png"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--metrics-recording-only", "--no-pings",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
]
LIMIT_MS = 120_000  # how long to wait for the page before failing; nothing measures time
SHORT_MS = 10_000  # for what must already be on the page once an answer is complete
expect.set_options(timeout=LIMIT_MS)

REACTOR = (
    "# The alpha reactor\n\n"
    "The alpha reactor runs at 42 degrees Celsius. It was built in Oslo in 1999.\n\n"
    "## Cooling\n\nIts cooling loop uses water from the fjord, filtered twice.\n"
)
# Eight facts, one per session, each in its own section (so its own chunk): each session must
# get its own answer and see only its own history.
FACTS = [
    ("Lighthouse", "What is the lighthouse keeper's cat called?", "The lighthouse keeper's cat is called Pepperoni.", "Pepperoni"),
    ("Observatory", "How heavy is the observatory telescope?", "The observatory telescope weighs 41 tonnes.", "41 tonnes"),
    ("Harbour", "Which colour is the harbour ferry painted?", "The harbour ferry is painted turquoise.", "turquoise"),
    ("Bakery", "When does the bakery open on Sundays?", "On Sundays the bakery opens at 7:15 in the morning.", "7:15"),
    ("Bridge", "Who designed the town bridge?", "The town bridge was designed by engineer Ingrid Halvorsen.", "Halvorsen"),
    ("Library", "How many books does the library hold?", "The public library holds 83,000 books.", "83,000"),
    ("Mountain hut", "What is the name of the mountain hut?", "The mountain hut is named Skarvheimen Lodge.", "Skarvheimen"),
    ("Choir", "Which instrument does the choir director play?", "The choir director plays the bassoon.", "bassoon"),
]
TOWN = "# Our town\n\n" + "\n\n".join(f"## {heading}\n\n{fact}" for heading, _, fact, _ in FACTS) + "\n"


# ---------------------------------------------------------------------------- fixtures
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, settings: Settings, env: dict, log: Path):
        self.settings = settings
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._out = open(log, "wb")
        self.proc = subprocess.Popen(
            streamlit_command(settings, "127.0.0.1", self.port), env={**env, **settings_env(settings)},
            stdout=self._out, stderr=subprocess.STDOUT, cwd=log.parent,
        )
        deadline = time.monotonic() + LIMIT_MS / 1000
        while True:
            try:
                with urllib.request.urlopen(self.url + "/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the page did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


@pytest.fixture
def serve(tmp_path, subprocess_env):
    """Start the page with given settings; always stopped, and it must not have tried the network."""
    servers: list[Server] = []
    urllib.request.install_opener(urllib.request.build_opener(urllib.request.ProxyHandler({})))

    def start(**overrides) -> Server:
        settings = Settings(data_dir=tmp_path / "data", workers=1, **overrides)
        server = Server(settings, subprocess_env, tmp_path / f"server{len(servers)}.log")
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
    guard_log = Path(subprocess_env["LOCALGPT_NETGUARD_LOG"])
    assert not guard_log.exists(), f"the page tried to reach the network: {guard_log.read_text()}"
    for server in servers:
        assert "Traceback" not in server.log.read_text(errors="replace"), server.log.read_text(errors="replace")[-3000:]


@pytest.fixture
def browser(tmp_path):
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


# ---------------------------------------------------------------------------- page helpers
def open_page(browser, server: Server, height: int = 1000):
    context = browser.new_context(viewport={"width": 1440, "height": height})
    page = context.new_page()
    page.set_default_timeout(LIMIT_MS)
    page.goto(server.url)
    page.get_by_test_id("stChatInputTextArea").wait_for()
    return page


def upload(page, files: list[tuple[str, bytes, str]]) -> None:
    page.get_by_test_id("stFileUploaderDropzoneInput").set_input_files(
        [{"name": name, "mimeType": mime, "buffer": data} for name, data, mime in files]
    )
    expect(page.get_by_test_id("stFileChip")).to_have_count(len(files))


def ingest(page, collection: str = "default") -> list[str]:
    """Click Ingest and wait for the summary; returns the texts the progress bar showed meanwhile."""
    page.evaluate("""() => {
        window.__progress = [];
        new MutationObserver(() => document.querySelectorAll('[data-testid="stProgress"]')
            .forEach(e => window.__progress.push(e.innerText)))
            .observe(document.body, {subtree: true, childList: true, characterData: true});
    }""")
    page.get_by_role("button", name=f"Ingest into '{collection}'").click()
    expect(page.get_by_text(f"Ingested into '{collection}'")).to_be_visible()
    return page.evaluate("window.__progress")


def ask(page, question: str) -> None:
    box = page.get_by_test_id("stChatInputTextArea")
    box.fill(question)
    box.press("Enter")


def answer(page, number: int):
    """The assistant message of the ``number``-th question (0-based), once it is complete."""
    message = page.get_by_test_id("stChatMessage").nth(2 * number + 1)
    message.get_by_text("peak memory").or_(message.get_by_test_id("stAlertContentError")).first.wait_for()
    return message


# ---------------------------------------------------------------------------- tests
def test_upload_ingest_and_ask_shows_the_answer_with_its_source(serve, browser, tmp_path):
    server = serve(backend="extractive")
    page = open_page(browser, server)
    upload(page, [
        ("reactor.md", REACTOR.encode(), "text/markdown"),
        ("town.md", TOWN.encode(), "text/markdown"),
        ("empty.txt", b"", "text/plain"),
    ])
    progress = ingest(page)
    assert any("Ingesting into 'default'" in text and "files" in text for text in progress), progress  # it was live
    expect(page.get_by_text("Ingested into 'default': 2 new, 0 changed, 0 unchanged, 1 skipped")).to_be_visible()
    skipped = page.get_by_test_id("stTable").filter(has_text="reason")
    expect(skipped).to_contain_text("empty.txt")  # the CLI's summary: skipped files with the reason
    expect(page.get_by_test_id("stSidebar").get_by_text("2 files")).to_be_visible()  # the library

    ask(page, "At what temperature does the alpha reactor run?")
    reply = answer(page, 0)
    expect(reply).to_contain_text("42 degrees Celsius", timeout=SHORT_MS)
    expect(reply).to_contain_text("Sources: [1] reactor.md", timeout=SHORT_MS)
    reply.get_by_text("Sources", exact=True).click()  # the expander
    expect(reply.locator("mark").filter(has_text="runs at 42 degrees Celsius")).to_be_visible(timeout=SHORT_MS)
    with page.expect_download() as download:
        reply.get_by_role("button", name="Download reactor.md").first.click()
    assert Path(download.value.path()).read_text() == REACTOR  # the cited file itself
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)


def test_traversal_names_and_disallowed_types_are_refused(serve, browser, tmp_path):
    server = serve(backend="extractive")
    page = open_page(browser, server)
    before = {p for p in tmp_path.rglob("*") if p.is_file()}
    upload(page, [
        ("../../etc/x.pdf", b"%PDF-1.4 fake", "application/pdf"),
        ("setup.exe", b"MZ\x90\x00", "application/octet-stream"),
    ])
    page.get_by_role("button", name="Ingest into 'default'").click()
    refusals = page.get_by_test_id("stAlertContentError")
    expect(refusals.filter(has_text="'setup.exe' was refused: files of type '.exe' are not supported")).to_be_visible()
    expect(refusals.filter(has_text="'../../etc/x.pdf' was refused: a file name may not contain a folder")).to_be_visible()
    written = {p for p in tmp_path.rglob("*") if p.is_file()} - before
    uploads = server.settings.data_dir / "uploads"
    assert not [p for p in written if p.is_relative_to(uploads)], written
    assert not (tmp_path / "etc").exists() and not (server.settings.data_dir / "etc").exists()


def test_eight_sessions_asking_at_once_each_get_their_own_answer(serve, browser):
    server = serve(backend="extractive")
    first = open_page(browser, server)
    upload(first, [("town.md", TOWN.encode(), "text/markdown")])
    ingest(first)

    pages = [first] + [open_page(browser, server) for _ in FACTS[1:]]
    for page, (_, question, _, _) in zip(pages, FACTS):
        ask(page, question)  # all eight are in flight before any answer is awaited
    for page, (_, question, _, expected) in zip(pages, FACTS):
        reply = answer(page, 0)
        expect(reply).to_contain_text(expected, timeout=5_000)  # the answer is complete already
        users = page.get_by_test_id("stChatMessage").filter(has=page.get_by_test_id("stChatMessageAvatarUser"))
        expect(users).to_have_count(1, timeout=SHORT_MS)
        expect(users.first.get_by_test_id("stMarkdownContainer")).to_have_text(question, timeout=SHORT_MS)
    expect(pages[3].get_by_test_id("stChatMessage")).to_have_count(2, timeout=SHORT_MS)  # no one else's turns


def test_the_default_generator_answers_with_a_cited_source(serve, browser, tmp_path):
    from localgpt.generation.gguf import embedded_model_path, llama_cpp_available

    try:
        embedded_model_path()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(str(exc))
    if not llama_cpp_available():
        pytest.skip("llama-cpp-python is not installed: the embedded model would be too slow to test here")
    server = serve(max_new_tokens=64)
    page = open_page(browser, server, height=1300)  # tall enough for the screenshot to hold a whole answer
    upload(page, [("reactor.md", REACTOR.encode(), "text/markdown")])
    ingest(page)
    ask(page, "At what temperature does the alpha reactor run?")
    reply = answer(page, 0)
    expect(reply).to_contain_text("Sources: [1] reactor.md", timeout=SHORT_MS)
    expect(reply).to_contain_text("tokens/s", timeout=SHORT_MS)  # the stats line of a real generator
    reply.get_by_text("Sources", exact=True).click()
    expect(reply.locator("mark").first).to_be_visible()
    expect(reply.get_by_role("button", name="Download reactor.md").first).to_be_visible()
    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot), full_page=True, animations="disabled")
    if os.environ.get("LOCALGPT_UPDATE_SCREENSHOT"):
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)
