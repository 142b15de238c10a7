"""Load on `localgpt serve`: many clients at once against the embedded generator.

Starts the server on a loopback port over the bundled samples (ingested into a temporary data
folder), then 16 clients each ask 5 questions at the same time (streaming, the `openai` client's
way). Checks every request was answered, none lost and none mixed (each answer's sources are its
own question's file and its text equals the answer the same question gets alone: greedy decoding,
so an interleaved token would show), reports p50/p95 latency and time to first token, then sends
500 more requests (extractive: what is measured is the server, not the model) and reports the
server's RSS before and after. Appends a table to bench/RESULTS.md.

    python bench/serve_load.py [--clients 16] [--questions 5] [--max-tokens 24] [--requests 500]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = [  # (question, the file its answer is in)
    ("Where does localgpt keep the database it builds?", "localgpt-guide.pdf"),
    ("Which file formats can localgpt read?", "supported-formats.csv"),
    ("Does localgpt send my documents anywhere?", "privacy.html"),
    ("How do I ask a question from the command line?", "quick-start.docx"),
    ("默认的嵌入模型是什么？", "faq-zh.md"),
]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ask(client: httpx.Client, question: str, max_tokens: int, extractive: bool = False) -> dict:
    body = {"model": "localgpt/default", "stream": True, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": question}]}
    if extractive:
        body["localgpt"] = {"extractive": True}
    started = time.perf_counter()
    first, text, extra, ids = None, "", None, set()
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            ids.add(chunk["id"])
            for choice in chunk.get("choices", []):
                piece = choice["delta"].get("content")
                if piece:
                    first = first or time.perf_counter() - started
                    text += piece
            extra = chunk.get("localgpt") or extra
    return {"seconds": time.perf_counter() - started, "first": first, "text": text, "extra": extra, "ids": ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--questions", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    exe = [sys.executable, "-m", "localgpt.cli"]
    subprocess.run([*exe, "ingest", str(ROOT / "source_documents"), "--data-dir", str(work / "data"), "--json"],
                   check=True, capture_output=True, cwd=work)
    port = free_port()
    server = subprocess.Popen([*exe, "serve", "--port", str(port), "--data-dir", str(work / "data")],
                              cwd=work, stdout=subprocess.DEVNULL, stderr=open(work / "server.log", "wb"))
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        client = httpx.Client(base_url=url, timeout=3600)
        alone = {q: ask(client, q, args.max_tokens)["text"] for q, _ in QUESTIONS}  # warm-up and the reference answers
        rss_start = rss_mib(server.pid)

        results: list[dict] = []
        lock = threading.Lock()

        def user(i: int) -> None:
            with httpx.Client(base_url=url, timeout=3600) as own:
                for j in range(args.questions):
                    question, source = QUESTIONS[(i + j) % len(QUESTIONS)]
                    try:
                        r = ask(own, question, args.max_tokens)
                        r.update(question=question, source=source, ok=True)
                    except Exception as exc:  # noqa: BLE001 - counted as lost
                        r = {"question": question, "ok": False, "error": repr(exc)}
                    with lock:
                        results.append(r)

        started = time.perf_counter()
        threads = [threading.Thread(target=user, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        health_s = []
        while any(t.is_alive() for t in threads):
            t0 = time.perf_counter()
            httpx.get(url + "/health", timeout=60)
            health_s.append(time.perf_counter() - t0)
            time.sleep(0.5)
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
        expected = args.clients * args.questions
        answered = [r for r in results if r["ok"]]
        mixed = [r for r in answered if len(r["ids"]) != 1 or r["text"] != alone[r["question"]]
                 or not r["extra"]["sources"] or not any(s["source"].endswith(r["source"]) for s in r["extra"]["sources"])]
        lat = np.array([r["seconds"] for r in answered])
        ttft = np.array([r["first"] for r in answered if r["first"] is not None])
        metrics = client.get("/metrics").json()

        rss_mid = rss_mib(server.pid)
        t0 = time.perf_counter()
        for i in range(args.requests):
            ask(client, QUESTIONS[i % len(QUESTIONS)][0], args.max_tokens, extractive=True)
        more_s = time.perf_counter() - t0
        rss_end = rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)

    rows = [
        ("requests (clients x questions)", f"{expected} ({args.clients} x {args.questions}), {args.max_tokens} new tokens each"),
        ("answered / lost / mixed", f"{len(answered)} / {expected - len(answered)} / {len(mixed)}"),
        ("wall time", f"{wall:.1f} s ({len(answered) / wall:.2f} answers/s)"),
        ("latency p50 / p95", f"{np.percentile(lat, 50):.2f} s / {np.percentile(lat, 95):.2f} s"),
        ("first token p50 / p95", f"{np.percentile(ttft, 50):.2f} s / {np.percentile(ttft, 95):.2f} s"),
        ("decode tokens/s (server's mean)", f"{metrics['decode_tokens_per_s']}"),
        ("/health while loaded, max", f"{max(health_s) * 1000:.0f} ms over {len(health_s)} calls"),
        (f"+{args.requests} extractive requests", f"{more_s:.1f} s ({more_s / args.requests * 1000:.0f} ms each, one client)"),
        ("server RSS: start / after load / after +" + str(args.requests), f"{rss_start:.0f} / {rss_mid:.0f} / {rss_end:.0f} MiB"),
    ]
    width = max(len(k) for k, _ in rows)
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    if mixed:
        print("MIXED:", [(r["question"], r["text"][:60]) for r in mixed[:5]])
    if args.no_record:
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as fh:
        fh.write(
            f"\n## localgpt serve under load ({time.strftime('%Y-%m-%d')}, commit {commit})\n\n"
            f"`python bench/serve_load.py --clients {args.clients} --questions {args.questions} --max-tokens {args.max_tokens} "
            f"--requests {args.requests}` on {platform.node()} ({os.cpu_count()} CPU cores, shared), the embedded "
            "SmolLM2-135M through llama.cpp, the bundled samples; every client streams. Mixed = an answer whose SSE "
            "chunks carry two ids, whose text differs from the same question's answer asked alone (greedy), or "
            "whose sources miss its question's file.\n\n| measure | value |\n|---|---|\n" + table + "\n"
        )


if __name__ == "__main__":
    main()
