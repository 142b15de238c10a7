"""What ``localgpt serve`` reports at ``/metrics``: requests by route and status, latency
percentiles, answer tokens per second and the generation queue. In memory, per process; never
sent anywhere.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque

import numpy as np

WINDOW = 1000  # latest answers the percentiles and speeds are computed over


class ServerMetrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.started = time.time()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.in_flight = 0
        self.disconnected = 0  # answers stopped because their client went away
        self.tokens_total = 0
        self._latency: deque[float] = deque(maxlen=WINDOW)  # seconds, whole answer
        self._first_token: deque[float] = deque(maxlen=WINDOW)  # seconds to the first answer text
        self._decode: deque[float] = deque(maxlen=WINDOW)  # tokens/s of each generated answer

    def request_started(self) -> None:
        with self._lock:
            self.in_flight += 1

    def request_finished(self, route: str, status: int) -> None:
        with self._lock:
            self.in_flight -= 1
            self.requests[(route, status)] += 1

    def answer(self, seconds: float, first_token_s: float | None, stats: dict | None) -> None:
        with self._lock:
            self._latency.append(seconds)
            if first_token_s is not None:
                self._first_token.append(first_token_s)
            stats = stats or {}
            self.tokens_total += int(stats.get("new_tokens") or 0)
            if stats.get("decode_tokens_per_s"):
                self._decode.append(float(stats["decode_tokens_per_s"]))

    def snapshot(self, queues: dict) -> dict:
        with self._lock:
            return {
                "uptime_s": round(time.time() - self.started, 1),
                "requests_in_flight": self.in_flight,
                "requests": [{"route": r, "status": s, "count": n} for (r, s), n in sorted(self.requests.items())],
                "answers": len(self._latency),
                "disconnected": self.disconnected,
                "latency_s": _percentiles(self._latency),
                "first_token_s": _percentiles(self._first_token),
                "tokens_total": self.tokens_total,
                "decode_tokens_per_s": round(float(np.mean(self._decode)), 1) if self._decode else None,
                "queues": queues,
            }


def _percentiles(values) -> dict:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    arr = np.asarray(values)
    return {f"p{q}": round(float(np.percentile(arr, q)), 3) for q in (50, 95, 99)}


def prometheus_text(snapshot: dict) -> str:
    """The snapshot in Prometheus' text format, for scrapers."""
    lines = [f"localgpt_uptime_seconds {snapshot['uptime_s']}", f"localgpt_requests_in_flight {snapshot['requests_in_flight']}"]
    for r in snapshot["requests"]:
        lines.append(f'localgpt_requests_total{{route="{r["route"]}",status="{r["status"]}"}} {r["count"]}')
    lines.append(f"localgpt_answers_disconnected_total {snapshot['disconnected']}")
    lines.append(f"localgpt_tokens_total {snapshot['tokens_total']}")
    for name in ("latency_s", "first_token_s"):
        for q, v in snapshot[name].items():
            if v is not None:
                lines.append(f'localgpt_answer_{name[:-2]}_seconds{{quantile="0.{q[1:]}"}} {v}')
    if snapshot["decode_tokens_per_s"] is not None:
        lines.append(f"localgpt_decode_tokens_per_second {snapshot['decode_tokens_per_s']}")
    for name, q in snapshot["queues"].items():
        lines.append(f'localgpt_generation_queue_waiting{{generator="{name}"}} {q["waiting"]}')
        lines.append(f'localgpt_generation_queue_busy{{generator="{name}"}} {int(q["busy"])}')
        lines.append(f'localgpt_generation_served_total{{generator="{name}"}} {q["served"]}')
    return "\n".join(lines) + "\n"
