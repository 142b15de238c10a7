"""`localgpt serve`: the real server in a child process on a loopback port, used through the
official `openai` client, LangChain's ChatOpenAI and plain HTTP."""

from __future__ import annotations

import contextlib

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import ingested_collection
from test_chroma_server import chroma_server  # noqa: F401 - a fixture: `chroma run` on a loopback port

KEY = "test-key-0123"
DOCS = {
    "bridge.md": "# The Bergen bridge\n\nThe Bergen bridge opened to traffic in 2004. It is 1,200 metres long.\n",
    "roses.txt": "Roses need six hours of sun every day. Water them at the roots in the morning.\n",
    "harbour.md": "# Harbour rules\n\nFerries to the island leave the harbour every 40 minutes between 6 and 22.\n",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], env: dict, cwd: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "localgpt.cli", "serve", "--port", str(port), *args],
                                env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited: {log.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.terminate()
    pytest.fail(f"the server did not start: {log.read_text()}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@contextlib.contextmanager
def guarded_server(base: Path, args: list[str], **env_extra: str):
    """`localgpt serve ARGS` in a child whose sockets are watched (conftest's net guard): yields
    (process, url); on exit stops it and fails if it reached past loopback."""
    from conftest import _SITECUSTOMIZE

    guard = base / "_netguard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(guard), os.environ.get("PYTHONPATH", "")])),
               LOCALGPT_NETGUARD_LOG=str(base / "_netguard.log"), LOCALGPT_API_KEY=KEY, **env_extra)
    proc, url = start_server(args, env, base, base / "server.log")
    try:
        yield proc, url
    finally:
        stop_server(proc)
        log = base / "_netguard.log"
        assert not log.exists() or not log.read_text(), f"the server reached the network: {log.read_text()}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from localgpt.store import Store

    base = tmp_path_factory.mktemp("serve")
    settings = ingested_collection(base, DOCS, "docs")
    with Store.open(settings, create=False) as store:
        chunk_id = store.chunk_ids()[0]
        stored = {"id": chunk_id, "text": store.chunks_by_id([chunk_id])[chunk_id].text,
                  "vector": store.vectors([chunk_id])[chunk_id]}
    watched = base / "watched"
    watched.mkdir()
    args = ["--data-dir", str(base / "data"), "--collection", "docs", "--watch", f"{watched}:watched"]
    # settings, as from a config file
    with guarded_server(base, args, LOCALGPT_MAX_UPLOAD_MB="0.05", LOCALGPT_WATCH_DEBOUNCE_MS="300") as (proc, url):
        yield {"url": url, "base": base, "stored": stored, "watched": watched, "proc": proc}


def api(server) -> httpx.Client:
    return httpx.Client(base_url=server["url"], headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def openai_client(server):
    import openai

    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


# ---------------------------------------------------------------------------------- answers
def test_openai_client_streams_an_answer_that_cites_the_file(server):
    stream = openai_client(server).chat.completions.create(
        model="localgpt/docs", stream=True, max_tokens=8, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "When did the Bergen bridge open to traffic?"}],
    )
    text, extra, usage = "", None, None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            extra = (chunk.model_extra or {}).get("localgpt") or extra
        if chunk.usage:
            usage = chunk.usage
    assert text.strip()
    assert extra is not None and not extra["abstained"] and extra["confidence"] in ("high", "low")
    assert extra["sources"][0]["source"].endswith("bridge.md") and extra["sources"][0]["number"] == 1
    assert any("2004" in s["sentence"] and s["number"] == 1 for s in extra["support"])
    assert usage.completion_tokens == 8 and usage.prompt_tokens > 0


def test_extractive_answer_carries_markers_and_cited_sources(server):
    reply = openai_client(server).chat.completions.create(
        model="localgpt/docs", messages=[{"role": "user", "content": "How often do ferries leave the harbour?"}],
        extra_body={"localgpt": {"extractive": True, "k": 2}},
    )
    answer = reply.choices[0].message.content
    extra = reply.model_extra["localgpt"]
    assert "40 minutes" in answer and "[1]" in answer
    cited = [s for s in extra["sources"] if s["cited"]]
    assert cited and cited[0]["source"].endswith("harbour.md") and cited[0]["heading"] == "Harbour rules"
    assert len(extra["sources"]) <= 2


def test_abstention_is_a_normal_answer_with_a_flag(server):
    reply = openai_client(server).chat.completions.create(
        model="localgpt/docs", messages=[{"role": "user", "content": "What is the capital of Mongolia?"}],
    )
    assert reply.model_extra["localgpt"]["abstained"] is True
    assert reply.choices[0].message.content.startswith("I don't know")


def test_langchain_chat_openai_works(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server["url"] + "/v1", api_key=KEY, model="localgpt/docs", max_retries=0,
                     extra_body={"localgpt": {"extractive": True}})
    assert "2004" in llm.invoke("When did the Bergen bridge open?").content


def test_embeddings_equal_the_cli_vectors(server):
    from localgpt.embeddings import get_embedder

    texts = ["When did the Bergen bridge open?", "默认的嵌入模型是什么？"]
    client = openai_client(server)
    got = client.embeddings.create(model="localgpt/docs", input=texts)  # the client asks for base64
    vectors = np.array([d.embedding for d in got.data], dtype=np.float32)
    expected = get_embedder("e5-small").embed(texts, query=True)  # what `localgpt ask` searches with
    assert vectors.shape == (2, 384) and np.allclose(vectors, expected, atol=1e-6)
    stored = server["stored"]
    got = client.embeddings.create(model="localgpt/docs", input=stored["text"], extra_body={"input_type": "passage"})
    assert float(np.dot(got.data[0].embedding, stored["vector"])) > 0.999  # what ingest stored for that chunk


def test_unknown_model_is_404_with_the_models_named(server):
    r = api(server).post("/v1/chat/completions", json={"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and "localgpt/docs" in r.json()["error"]["message"]


class RecordingGenerationServer:
    """An OpenAI-compatible generation server on loopback (as vLLM or llama.cpp's behind --openai-url)
    that records what localgpt sends it and answers with one fixed sentence."""

    REPLY = "The Bergen bridge opened to traffic in 2004 [1]."

    def __init__(self):
        import http.server

        self.bodies: list[dict] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(self, payload: bytes, ctype: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):
                self.send(json.dumps({"object": "list", "data": [{"id": "recorder", "object": "model"}]}).encode(), "application/json")

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.bodies.append(body)
                events = [{"choices": [{"index": 0, "delta": {"content": word}}]} for word in outer.REPLY.split(" ")]
                for i, e in enumerate(events[:-1]):
                    e["choices"][0]["delta"]["content"] += " "
                sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
                self.send(sse.encode(), "text/event-stream")

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_each_chain_samples_with_its_own_settings_from_one_loaded_model(tmp_path):
    """The generator is loaded once per process and shared (serve's requests, the web page's
    temperature slider); each chain's answer is still sampled with that chain's settings."""
    from localgpt.chain import QAChain

    settings = ingested_collection(tmp_path, DOCS, "docs")
    recorder = RecordingGenerationServer()
    try:
        for temperature, top_p in ((0.7, 0.5), (0.0, 0.95), (0.3, 0.8)):
            chain = QAChain(settings.with_overrides(backend="openai", openai_url=recorder.url, temperature=temperature,
                                                    top_p=top_p, abstain=False))
            chain.ask("When did the Bergen bridge open to traffic?")
            sent = recorder.bodies[-1]
            assert sent["temperature"] == temperature and sent["top_p"] == (top_p if temperature > 0 else 1.0)
    finally:
        recorder.close()


def test_openai_request_options_are_honoured_or_refused(tmp_path, subprocess_env):
    """System messages reach the generator after localgpt's own rules, stop sequences and top_p are
    passed on; n > 1, tools, JSON response formats and logprobs get a 400 that says why."""
    ingested_collection(tmp_path, DOCS, "docs")
    recorder = RecordingGenerationServer()
    proc, url = start_server(["--data-dir", str(tmp_path / "data"), "--collection", "docs", "--openai-url", recorder.url,
                              "--max-upload-mb", "0.01"], subprocess_env, tmp_path, tmp_path / "server.log")
    try:
        import openai

        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        question = {"role": "user", "content": "When did the Bergen bridge open to traffic?"}
        reply = client.chat.completions.create(
            model="localgpt/docs", stop=["\nQuestion:"], top_p=0.5, temperature=0.7,
            messages=[{"role": "system", "content": "Answer in the style of a pirate."}, question])
        assert reply.choices[0].message.content == RecordingGenerationServer.REPLY
        assert reply.model_extra["localgpt"]["sources"][0]["source"].endswith("bridge.md")
        sent = recorder.bodies[-1]
        system = sent["messages"][0]
        assert system["role"] == "system" and "Cite every passage" in system["content"]  # localgpt's rules first…
        assert system["content"].rstrip().endswith("Answer in the style of a pirate.")  # …then the client's
        assert not any("pirate" in m["content"] for m in sent["messages"][1:])
        assert "\nQuestion:" in sent["stop"] and sent["top_p"] == 0.5 and sent["temperature"] == 0.7

        client.chat.completions.create(model="localgpt/docs", messages=[question])  # no system message: localgpt's alone
        assert "application" not in recorder.bodies[-1]["messages"][0]["content"]
        # The generator was loaded by the first request; every request still samples with its own settings
        # (here none: the configured greedy default), not with those of whoever loaded the model.
        assert recorder.bodies[-1]["temperature"] == 0.0
        client.chat.completions.create(model="localgpt/docs", messages=[question], temperature=0.3, top_p=0.8)
        assert (recorder.bodies[-1]["temperature"], recorder.bodies[-1]["top_p"]) == (0.3, 0.8)

        refused = {
            "n": {"n": 2},
            "tools": {"tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]},
            "response_format": {"response_format": {"type": "json_object"}},
            "logprobs": {"logprobs": True},
        }
        asked = len(recorder.bodies)
        for name, extra in refused.items():
            for stream in (False, True):
                with pytest.raises(openai.BadRequestError) as exc:
                    client.chat.completions.create(model="localgpt/docs", messages=[question], stream=stream, **extra)
                assert name.split("_")[0] in exc.value.message, exc.value.message
                assert exc.value.code == "unsupported_parameter"
        assert len(recorder.bodies) == asked  # refused before anything was generated
        assert client.chat.completions.create(model="localgpt/docs", messages=[question], n=1).choices[0].message.content

        body, ctype = multipart(("notes.txt", b"word " * 4_000))  # 20 KB over the flag's 0.01 MB
        r = httpx.post(url + "/v1/collections/docs/documents", content=body, headers={"Content-Type": ctype}, timeout=120)
        assert r.status_code == 413 and "0.01 MB limit" in r.json()["error"]["message"]
    finally:
        stop_server(proc)
        recorder.close()


# ---------------------------------------------------------------------------------- auth and binding
def test_401_without_or_with_a_wrong_key_but_health_is_open(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(server["url"] + "/v1/models", headers=headers)
        assert r.status_code == 401, headers
        assert "API key" in r.json()["error"]["message"]
    assert httpx.post(server["url"] + "/v1/collections/docs/documents", files={"files": ("a.txt", b"x")}).status_code == 401
    assert httpx.get(server["url"] + "/health").status_code == 200
    models = api(server).get("/v1/models").json()["data"]
    assert {"localgpt/docs"} <= {m["id"] for m in models}
    assert api(server).get("/docs").status_code == 404  # no docs page pulling scripts from a CDN


def test_refuses_to_bind_a_public_address_without_a_key(tmp_path, subprocess_env):
    env = {k: v for k, v in subprocess_env.items() if k != "LOCALGPT_API_KEY"}
    result = subprocess.run([sys.executable, "-m", "localgpt.cli", "serve", "--host", "0.0.0.0", "--port", str(free_port())],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0 without an API key" in " ".join(result.stderr.split())


# ---------------------------------------------------------------------------------- documents
def multipart(*files: tuple[str, bytes]) -> tuple[bytes, str]:
    """A multipart body with the file names exactly as given (httpx would clean some)."""
    boundary = "lgbound7"
    body = b""
    for name, data in files:
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"".encode()
                 + name.encode("utf-8", "surrogateescape") + b"\"\r\nContent-Type: text/plain\r\n\r\n" + data + b"\r\n")
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_upload_refuses_traversal_and_oversize_and_stores_nothing(server):
    client = api(server)
    for name in ("../escape.txt", "/etc/escape.txt", "..\\escape.txt", "nul\x00byte.txt", ".hidden.txt", "x.exe"):
        body, ctype = multipart((name, b"The escape plan is hidden in the cellar."))
        r = client.post("/v1/collections/unsafe/documents", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 400, (name, r.text)
        assert "nothing was stored" in r.json()["error"]["message"]
    body, ctype = multipart(("big.txt", b"word " * 20_000))  # 100 KB, the server allows 0.05 MB
    r = client.post("/v1/collections/unsafe/documents", content=body, headers={"Content-Type": ctype})
    message = r.json()["error"]["message"]
    assert r.status_code == 413 and "0.05 MB limit" in message and "max_upload_mb" in message
    assert not (server["base"] / "data" / "uploads" / "unsafe").exists()
    assert not (server["base"] / "escape.txt").exists() and not (server["base"] / "data" / "escape.txt").exists()
    assert "unsafe" not in {c["name"] for c in client.get("/v1/collections").json()["data"]}
    assert client.get("/v1/collections/unsafe/sources").status_code == 404


def test_upload_never_writes_through_a_symlink(server, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("original")
    folder = server["base"] / "data" / "uploads" / "links"
    folder.mkdir(parents=True)
    (folder / "notes.txt").symlink_to(outside)
    body, ctype = multipart(("notes.txt", b"Otters hold hands while they sleep."))
    r = api(server).post("/v1/collections/links/documents", content=body, headers={"Content-Type": ctype})
    assert r.status_code == 200, r.text
    assert outside.read_text() == "original"
    assert r.json()["saved"][0]["path"].endswith("notes (2).txt")


def test_upload_ask_delete_ask_round_trip(server):
    client = api(server)
    question = {"model": "localgpt/trip", "localgpt": {"extractive": True},
                "messages": [{"role": "user", "content": "Since which year has Ingrid Dahl kept the Skerry lighthouse?"}]}
    body, ctype = multipart(("lighthouse.md", b"# Skerry\n\nThe Skerry lighthouse is kept by Ingrid Dahl since 1998.\n"),
                            ("broken.pdf", b"%PDF-1.7 this is not really a pdf"))
    r = client.post("/v1/collections/trip/documents", content=body, headers={"Content-Type": ctype})
    assert r.status_code == 200, r.text
    files = {Path(f["path"]).name: f for f in r.json()["files"]}
    assert files["lighthouse.md"]["status"] == "new"
    assert files["broken.pdf"]["status"] == "skipped" and files["broken.pdf"]["reason"]  # the CLI's reason
    answer = client.post("/v1/chat/completions", json=question).json()
    assert "since 1998" in answer["choices"][0]["message"]["content"]
    assert answer["localgpt"]["sources"][0]["source"].endswith("lighthouse.md")

    sources = client.get("/v1/collections/trip/sources").json()["data"]
    assert {Path(s["path"]).name for s in sources} == {"lighthouse.md"}
    r = client.delete("/v1/collections/trip/sources/lighthouse.md")
    assert r.status_code == 200 and r.json()["removed"][0].endswith("lighthouse.md")
    assert client.delete("/v1/collections/trip/sources/lighthouse.md").status_code == 404
    answer = client.post("/v1/chat/completions", json=question).json()
    assert "since 1998" not in answer["choices"][0]["message"]["content"]
    assert not any(s["source"].endswith("lighthouse.md") for s in answer["localgpt"]["sources"])

    body, ctype = multipart(("ferry.txt", b"The night ferry to Skerry leaves at 23:40 on Fridays."))
    r = client.post("/v1/collections/trip/documents?wait=false", content=body, headers={"Content-Type": ctype})
    assert r.status_code == 202
    job = r.json()
    for _ in range(300):
        job = client.get(f"/v1/jobs/{job['id']}").json()
        if job["status"] != "running":
            break
        time.sleep(0.1)
    assert job["status"] == "done" and job["report"]["new"] == 1
    assert client.delete("/v1/collections/trip").json()["deleted"] is True
    assert "trip" not in {c["name"] for c in client.get("/v1/collections").json()["data"]}
    assert not (server["base"] / "data" / "uploads" / "trip").exists()


def test_a_job_whose_process_died_reports_failed(server, subprocess_env):
    """Job state lives in <data_dir>/jobs/ for every serve process on the data folder. A process that
    wrote a running job and was then killed (here a stand-in that takes its upload job the way serve
    does and is killed with SIGKILL) does not leave it "running" for ever: its writer lock is free."""
    data = server["base"] / "data"
    code = ("import sys, time\nfrom localgpt.server import JobFiles, UploadJob\n"
            "job = UploadJob('orphans', saved=[{'name': 'late.txt', 'path': 'late.txt', 'note': None}])\n"
            "JobFiles(sys.argv[1]).save(job)\nprint(job.id, flush=True)\ntime.sleep(600)\n")
    owner = subprocess.Popen([sys.executable, "-c", code, str(data)], env=subprocess_env, stdout=subprocess.PIPE, text=True)
    try:
        job_id = owner.stdout.readline().strip()
        assert (data / "jobs" / f"{job_id}.json").is_file()
        client = api(server)
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "running" and job["collection"] == "orphans" and job["error"] is None  # its process lives
    finally:
        owner.kill()
        owner.wait()
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["id"] == job_id and job["object"] == "ingest.job"
    assert f"pid {owner.pid}" in job["error"] and "stopped before its ingest finished" in job["error"]
    assert client.get(f"/v1/jobs/{job_id}").json() == job
    for bad in (job_id.upper(), job_id[:-1], "x" * 32):
        assert client.get(f"/v1/jobs/{bad}").status_code == 404


# ---------------------------------------------------------------------------------- many users
QUESTIONS = {
    "bridge.md": "When did the Bergen bridge open to traffic?",
    "roses.txt": "How many hours of sun do roses need?",
    "harbour.md": "How often do ferries leave the harbour?",
}


@pytest.mark.slow
def test_concurrent_answers_all_come_in_turn_while_health_and_metrics_answer(server):
    client = api(server)
    served_before = sum(q["served"] for q in client.get("/health").json()["queues"].values())
    results: dict[int, dict] = {}

    def ask(i: int, source: str) -> None:
        with api(server) as own:
            r = own.post("/v1/chat/completions", json={
                "model": "localgpt/docs", "max_tokens": 3,
                "messages": [{"role": "user", "content": QUESTIONS[source]}]})
            results[i] = {"source": source, "status": r.status_code, "body": r.json()}

    jobs = [threading.Thread(target=ask, args=(i, src)) for i, src in enumerate(list(QUESTIONS) * 2)]
    for t in jobs:
        t.start()
    waiting_seen, health_s = 0, []
    while any(t.is_alive() for t in jobs):
        t0 = time.perf_counter()
        health = client.get("/health").json()
        health_s.append(time.perf_counter() - t0)
        waiting_seen = max(waiting_seen, sum(q["waiting"] for q in health["queues"].values()))
        assert client.get("/metrics").status_code == 200
        time.sleep(0.05)
    for t in jobs:
        t.join()
    assert len(results) == 6 and all(r["status"] == 200 for r in results.values())
    for r in results.values():  # each answer is its own question's: sources from its own file
        assert r["body"]["localgpt"]["sources"][0]["source"].endswith(r["source"])
        assert r["body"]["usage"]["completion_tokens"] == 3
    assert len({r["body"]["id"] for r in results.values()}) == 6
    assert waiting_seen >= 1  # they queued…
    assert max(health_s) < 1.0  # …and /health answered meanwhile
    health = client.get("/health").json()
    assert sum(q["served"] for q in health["queues"].values()) - served_before == 6
    metrics = client.get("/metrics").json()
    assert metrics["latency_s"]["p95"] is not None and metrics["tokens_total"] >= 18
    assert "localgpt_generation_queue_waiting" in client.get("/metrics?format=prometheus").text


def test_a_client_that_disconnects_stops_its_generation(server):
    client = api(server)
    before = client.get("/metrics").json()
    with httpx.Client(base_url=server["url"], headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as own:
        with own.stream("POST", "/v1/chat/completions", json={
                "model": "localgpt/docs", "stream": True, "max_tokens": 400,
                "messages": [{"role": "user", "content": "Tell me everything about the Bergen bridge."}]}) as r:
            for line in r.iter_lines():
                if '"content": "' in line and '"role"' not in line:
                    break  # the first token: now hang up
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        health = client.get("/health").json()
        metrics = client.get("/metrics").json()
        if metrics["disconnected"] > before["disconnected"] and not any(q["busy"] for q in health["queues"].values()):
            break
        time.sleep(0.1)
    assert metrics["disconnected"] == before["disconnected"] + 1
    assert not any(q["busy"] for q in health["queues"].values())
    assert metrics["tokens_total"] - before["tokens_total"] < 400  # it never generated the rest


# ---------------------------------------------------------------------------------- watch
def test_serve_watch_follows_a_folder(server):
    client = api(server)
    note = server["watched"] / "note.md"

    def sources() -> dict[str, dict]:
        r = client.get("/v1/collections/watched/sources")
        return {Path(s["path"]).name: s for s in r.json()["data"]} if r.status_code == 200 else {}

    def wait_for(check) -> dict:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            found = sources()
            if check(found):
                return found
            time.sleep(0.2)
        pytest.fail(f"the watched collection did not follow: {found}")

    note.write_text("The reading room closes at 19:00.")
    first = wait_for(lambda f: "note.md" in f)["note.md"]
    note.write_text("The reading room closes at 21:00 on Thursdays. The reading room opens at 9:00.")
    wait_for(lambda f: "note.md" in f and f["note.md"]["sha256"] != first["sha256"])
    note.unlink()
    wait_for(lambda f: "note.md" not in f)


# ---------------------------------------------------------------------------------- scale-out
@pytest.mark.slow
def test_two_servers_on_one_chroma_server_see_each_others_uploads(tmp_path, subprocess_env, chroma_server):  # noqa: F811
    """Behind a load balancer any request may reach either process: each sees what the other did."""
    args = ["--data-dir", str(tmp_path / "data"), "--chroma-url", chroma_server, "--extractive"]
    a, url_a = start_server(args, subprocess_env, tmp_path, tmp_path / "a.log")
    try:
        b, url_b = start_server(args, subprocess_env, tmp_path, tmp_path / "b.log")
        try:
            def upload(url: str, name: str, text: bytes) -> dict:
                body, ctype = multipart((name, text))
                r = httpx.post(url + "/v1/collections/shared/documents", content=body, headers={"Content-Type": ctype}, timeout=120)
                assert r.status_code == 200, r.text
                return r.json()

            def ask(url: str, question: str) -> dict:
                r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
                    "model": "localgpt/shared", "messages": [{"role": "user", "content": question}]})
                return r.json() if r.status_code == 200 else {"status": r.status_code, **r.json()}

            def sources(url: str) -> list[str]:
                r = httpx.get(url + "/v1/collections/shared/sources", timeout=120)
                return sorted(Path(s["path"]).name for s in r.json()["data"]) if r.status_code == 200 else []

            otters = "Why do sea otters hold hands while they sleep?"
            assert upload(url_a, "otters.md", b"# Otters\n\nSea otters hold hands while they sleep so that they do not drift apart.\n")["report"]["new"] == 1
            assert ask(url_a, otters)["localgpt"]["sources"][0]["source"].endswith("otters.md")  # A holds the collection open
            assert sources(url_b) == ["otters.md"]
            answer = ask(url_b, otters)
            assert "drift apart" in answer["choices"][0]["message"]["content"]
            assert answer["localgpt"]["sources"][0]["source"].endswith("otters.md")
            assert "localgpt/shared" in {m["id"] for m in httpx.get(url_b + "/v1/models", timeout=120).json()["data"]}

            # an upload through B is cited by A, and a removal through B is seen by A
            upload(url_b, "owls.md", b"# Owls\n\nBarn owls swallow their prey whole and cough up pellets of bone and fur.\n")
            assert sources(url_a) == ["otters.md", "owls.md"]
            assert ask(url_a, "What do barn owls cough up?")["localgpt"]["sources"][0]["source"].endswith("owls.md")
            assert httpx.delete(url_b + "/v1/collections/shared/sources/otters.md", timeout=120).status_code == 200
            assert sources(url_a) == ["owls.md"]
            assert not any(s["source"].endswith("otters.md") for s in ask(url_a, otters)["localgpt"]["sources"])

            # an upload job taken by A is polled through B (behind a load balancer, either may answer): same answers
            body, ctype = multipart(("voles.md", b"# Voles\n\nField voles dig runs under the snow all winter long.\n"))
            r = httpx.post(url_a + "/v1/collections/shared/documents?wait=false", content=body,
                           headers={"Content-Type": ctype}, timeout=120)
            assert r.status_code == 202 and r.json()["status"] == "running", r.text
            job_id = r.json()["id"]
            for _ in range(600):
                seen = httpx.get(f"{url_b}/v1/jobs/{job_id}", timeout=120)
                assert seen.status_code == 200, seen.text  # never "no job" in the process that did not take it
                if seen.json()["status"] != "running":
                    break
                time.sleep(0.1)
            from_b = seen.json()
            assert from_b["status"] == "done" and from_b["report"]["new"] == 1, from_b
            assert [Path(f["path"]).name for f in from_b["files"]] == ["voles.md"]
            assert httpx.get(f"{url_a}/v1/jobs/{job_id}", timeout=120).json() == from_b
            assert httpx.get(f"{url_b}/v1/jobs/{'0' * 32}", timeout=120).status_code == 404
            assert sources(url_b) == ["owls.md", "voles.md"]

            # the collection dropped through B is gone for A; made again through B, A answers from the new one
            assert httpx.delete(url_b + "/v1/collections/shared", timeout=120).json()["deleted"] is True
            assert ask(url_a, otters).get("status") == 404
            assert "shared" not in {c["name"] for c in httpx.get(url_a + "/v1/collections", timeout=120).json()["data"]}
            upload(url_b, "moles.md", b"# Moles\n\nStar-nosed moles find food with twenty-two pink tentacles on their nose.\n")
            assert sources(url_a) == ["moles.md"]
            answer = ask(url_a, "How many tentacles does the star-nosed mole have?")
            assert answer["localgpt"]["sources"][0]["source"].endswith("moles.md")
            assert "twenty-two" in answer["choices"][0]["message"]["content"]
        finally:
            stop_server(b)
    finally:
        stop_server(a)
