"""Turns at a shared generator: one first-in-first-out queue per loaded model, so that many callers
(the HTTP server's requests) are all answered in turn, never dropped and never interleaved.

A loaded model (a llama.cpp context, a static KV cache) serves one stream at a time. Its own lock
would serialise callers too, but in no particular order and without telling anyone how many wait;
this queue hands out turns in arrival order, counts who waits, and lets a caller that gave up (a
client that disconnected) leave the line. Never loads a model itself.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from typing import Any, Iterator


def generator_key(settings: Any) -> str:
    """What identifies a loaded model: callers with equal keys share it, and its queue."""
    fields = ("backend", "model", "family", "quantization", "device", "engine", "openai_url", "openai_model", "context_window")
    return json.dumps({f: getattr(settings, f) for f in fields}, sort_keys=True, default=str)


class Cancelled(Exception):
    """The caller gave up (its client disconnected) while waiting for its turn or generating."""


class GenerationQueue:
    """First come, first served turns at one generator."""

    def __init__(self, name: str = ""):
        self.name = name
        self._cond = threading.Condition()
        self._line: deque[object] = deque()
        self._busy: object | None = None
        self.served = 0
        self.wait_s_total = 0.0

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._line)

    @property
    def busy(self) -> bool:
        return self._busy is not None

    def acquire(self, cancelled: threading.Event | None = None) -> object:
        """Wait for this caller's turn; raises ``Cancelled`` when ``cancelled`` is set meanwhile."""
        ticket = object()
        started = time.perf_counter()
        with self._cond:
            self._line.append(ticket)
            try:
                while self._busy is not None or self._line[0] is not ticket:
                    if cancelled is not None and cancelled.is_set():
                        raise Cancelled()
                    self._cond.wait(0.1 if cancelled is not None else None)
            except BaseException:
                self._line.remove(ticket)
                self._cond.notify_all()  # the one behind may be first now
                raise
            self._line.popleft()
            self._busy = ticket
            self.wait_s_total += time.perf_counter() - started
        return ticket

    def release(self, ticket: object) -> None:
        with self._cond:
            if self._busy is ticket:
                self._busy = None
                self.served += 1
                self._cond.notify_all()


class QueuedGenerator:
    """A generator seen through a ``GenerationQueue``: each ``stream`` and ``yes_probability`` call
    takes one turn, and a set ``cancelled`` event ends the wait or the stream after the current token.
    Everything else (``stats``, ``count_tokens``, ``context_window``…) is the wrapped generator's."""

    def __init__(self, generator: Any, queue: GenerationQueue, cancelled: threading.Event | None = None):
        self._generator = generator
        self._queue = queue
        self._cancelled = cancelled
        if hasattr(generator, "yes_probability"):  # the chain asks hasattr() whether a backend can judge
            self.yes_probability = self._yes_probability

    def __getattr__(self, name: str) -> Any:
        return getattr(self._generator, name)

    def stream(self, prompt, **kwargs) -> Iterator[str]:
        ticket = self._queue.acquire(self._cancelled)
        try:
            pieces = self._generator.stream(prompt, **kwargs)
            try:
                for piece in pieces:
                    yield piece
                    if self._cancelled is not None and self._cancelled.is_set():
                        raise Cancelled()
            finally:
                getattr(pieces, "close", lambda: None)()  # stops the backend's decode loop (llama.cpp: after the current token)
        finally:
            self._queue.release(ticket)

    def _yes_probability(self, prompt):
        ticket = self._queue.acquire(self._cancelled)
        try:
            return self._generator.yes_probability(prompt)
        finally:
            self._queue.release(ticket)


class BatchLine:
    """What /metrics shows for a generator that batches (the fast engine's ``BatchEngine``) in place of a
    ``GenerationQueue``: ``waiting`` requests wait for a slot, ``busy`` while any slot decodes, ``served``
    streams ended (finished, stopped or cancelled), ``slots`` / ``active`` the slots there are / in use,
    ``cancelled`` requests the engine dropped because their client left."""

    def __init__(self, name: str, batch: Any):
        self.name = name
        self.batch = batch
        self.served = 0
        self._lock = threading.Lock()

    @property
    def waiting(self) -> int:
        return len(self.batch.pending)

    @property
    def active(self) -> int:
        return sum(r is not None for r in list(self.batch.active))

    @property
    def busy(self) -> bool:
        return self.active > 0

    @property
    def slots(self) -> int:
        return self.batch.slots

    @property
    def cancelled(self) -> int:
        return self.batch.cancelled_total

    def ended(self) -> None:
        with self._lock:
            self.served += 1


class BatchedGenerator:
    """A generator that batches (``start_batching`` ran), seen by one request: ``stream`` calls run at once,
    each in its own slot of the shared ``BatchEngine`` (no turn taken); a set ``cancelled`` ends the stream
    (waiting for a slot or decoding) and frees its slot. ``yes_probability`` and the rest are the generator's."""

    def __init__(self, generator: Any, line: BatchLine, cancelled: threading.Event | None = None):
        self._generator = generator
        self._line = line
        self._cancelled = cancelled
        generator.cancelled = cancelled  # a per-request view (get_generator's copy): its batched stream polls it
        if hasattr(generator, "yes_probability"):
            self.yes_probability = generator.yes_probability

    def __getattr__(self, name: str) -> Any:
        return getattr(self._generator, name)

    def stream(self, prompt, **kwargs) -> Iterator[str]:
        gone = self._cancelled.is_set if self._cancelled is not None else (lambda: False)
        if gone():
            raise Cancelled()
        pieces = self._generator.stream(prompt, **kwargs)
        try:
            for piece in pieces:
                yield piece
                if gone():
                    raise Cancelled()
            if gone():
                raise Cancelled()  # it ended because its client left (while it waited for a slot, say)
        finally:
            pieces.close()  # leaves the slot at once
            self._line.ended()
