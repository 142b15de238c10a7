"""Continuous batching: many streams decoded together by one network (``transformer``: Llama / Falcon;
``mamba``: Mamba / FalconMamba).

A fixed number of slots, each with its own KV cache (``Transformer.setup_slots``) and its own length, or its own
conv / SSM state (``Mamba.setup_slots``: an idle slot's state does not move, a joining request resets it). Every
``BatchEngine.step``: waiting requests take free slots; up to ``prompt_passes`` chunks of new requests' prompts
are prefilled straight into their slots' caches, one request's chunk a pass (chunked prefill, so a long prompt
delays the others' next token by a few chunks, not by the whole prompt; on CUDA each pass runs at a fixed row
count from a captured CUDA graph, ``Transformer.prefill_fixed``); then one decode step runs for every slot that
is decoding, each at its own position, with its own temperature / top-p; finished requests (a stop id, ``max_new_tokens``) leave and free their slot
at once. The decode step runs over the first B slots, B the smallest of ``buckets`` that covers the busy slots
(requests take the lowest free slot; by default B is always ``slots``), and on CUDA each (B, greedy-or-sampled)
step is captured once as a CUDA graph; an idle slot inside B decodes a dummy token at its scratch position
``max_seq`` and is ignored (the fused attention reads only that position for it).

The batch-1 ``engine.Engine`` is untouched and stays the path of ``FastGenerator``; this one is additive.
Greedy tokens of a request equal the ones it gets alone up to the rounding of the batch's matrix shapes:
exactly on the CPU in fp32 (tests/test_batching.py, all four families), bit for bit on CUDA at a fixed bucket
(Llama / Falcon, H200; the Mamba slot path has run on the CPU only).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch

from localgpt.generation.fast.engine import greedy, sample


def pick_rows(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, sampled: bool) -> torch.Tensor:
    """One token id per row [B] from logits [B, vocab]; a row with temperature 0 is greedy, others nucleus-sampled."""
    best = logits.argmax(dim=-1)
    if not sampled:
        return best
    drawn = sample(logits, temperature.clamp(min=1e-5)[:, None], top_p[:, None])[:, 0]
    return torch.where(temperature > 0, drawn, best)


@dataclass(eq=False)
class Request:
    """One stream: its prompt, settings, and what it produced so far (``tokens``, ``times`` on the host clock)."""

    ids: list[int]
    max_new_tokens: int
    stop_ids: frozenset = frozenset()
    temperature: float = 0.0
    top_p: float = 1.0
    tokens: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    submitted: float = 0.0
    done: bool = False
    finish_reason: str | None = None  # "stop" (a stop id, included in tokens), "length" or "cancelled"
    cancelled: bool = False  # set by BatchEngine.cancel (any thread); the scheduler frees the slot next step
    slot: int | None = None
    prefilled: int = 0  # prompt tokens already written to the slot's cache
    _on_device: bool = False  # the engine's device buffers hold its next token and position (it decodes there)
    _in_flight: bool = False  # a launched decode step computes its next token; not read back yet
    _queue: queue.Queue | None = None

    def _emit(self, token: int, now: float) -> None:
        self.tokens.append(token)
        self.times.append(now)
        if token in self.stop_ids:
            self.done, self.finish_reason = True, "stop"
        elif len(self.tokens) >= self.max_new_tokens:
            self.done, self.finish_reason = True, "length"
        if self._queue is not None:
            self._queue.put(token)
            if self.done:
                self._queue.put(None)


class _Graph:
    """``fn()`` (over the engine's static buffers) captured once as a CUDA graph; calling replays it."""

    def __init__(self, fn: Callable[[], torch.Tensor]):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up outside the graph (cuBLAS handles, Triton builds, workspaces)
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn()

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        return self.out


class BatchEngine:
    """Serves many requests at once with one network (see the module docstring).

    ``slots``: streams decoded together at most; ``max_seq``: positions each slot's cache holds (prompt + new
    tokens); ``prefill_chunk``: prompt tokens a prompt pass takes (one request's, or with ``share_prefill`` several
    requests' in one pass: fewer passes, but a prompt's matrix shapes then depend on its neighbours); default 512
    with fixed-shape passes, else 256; ``prompt_passes``: prompt passes a scheduler step at most before its decode
    step (default 4 with fixed-shape passes, else 1: more prompt tokens a step, longer pauses for the streams
    already decoding); ``fixed_prompts``: each request's chunks run at fixed row counts (``prompt_rows``: the
    chunk and its 3/4, 1/2, 1/4, 1/8, a chunk padded to the smallest that holds it), each captured once as a CUDA
    graph (default: on in graph mode for Llama / Falcon without ``share_prefill``); ``buckets``:
    batch sizes a decode step may run at besides ``slots`` (e.g. 1, 4, 16: faster at low load for int4, whose
    kernel's cost grows with the rows; default none: one shape, answers independent of the load);
    ``kernels``: Llama / Falcon decode-step kernels ("fused" Triton on CUDA, "eager"); ``mode``: "graph" (CUDA
    graphs, the CUDA default) or "eager".
    Not thread-safe by itself: drive it from one thread (``step`` / ``run``), or let ``start`` run it in its
    own thread and talk to it through ``submit`` and ``Request`` streams (``stream``).
    """

    def __init__(self, model, *, slots: int = 16, max_seq: int = 2048, prefill_chunk: int | None = None,
                 buckets: Iterable[int] | None = None, mode: str | None = None, kernels: str | None = None,
                 share_prefill: bool = False, prompt_passes: int | None = None, fixed_prompts: bool | None = None):
        if getattr(model, "kind", "") not in ("transformer", "mamba"):
            raise ValueError("continuous batching runs Llama / Falcon (transformer) and Mamba networks")
        self.model = model
        self.device = model.device
        self.share_prefill = share_prefill
        self.mode = mode or ("graph" if self.device.type == "cuda" else "eager")
        if self.device.type != "cuda":
            self.mode = "eager"
        # Own-chunk prompt passes at fixed row counts (Transformer.prefill_fixed), one CUDA graph each: a chunk of
        # t tokens runs padded to the smallest of ``prompt_rows`` >= t, the same padding alone and under load.
        if fixed_prompts is None:
            fixed_prompts = self.mode == "graph" and not share_prefill and hasattr(model, "prefill_fixed")
        if fixed_prompts and (share_prefill or not hasattr(model, "prefill_fixed")):
            raise ValueError("fixed-shape prompt passes are for Llama / Falcon networks, one request a pass")
        self.fixed_prompts = bool(fixed_prompts)
        # Measured on an H200 (Llama-2-7B bf16, 16 streams): passes of 512 rows ran at ~550 TFLOP/s against ~505
        # for 256, and up to 4 passes a step left fewer decode steps waiting between them (bench/RESULTS.md).
        if prefill_chunk is None:
            prefill_chunk = 512 if self.fixed_prompts else 256
        if prompt_passes is None:
            prompt_passes = 4 if self.fixed_prompts else 1
        if prompt_passes < 1:
            raise ValueError("prompt_passes must be at least 1")
        self.slots, self.max_seq, self.prefill_chunk = slots, max_seq, prefill_chunk
        self.prompt_passes = prompt_passes
        # One decode shape by default: a request's arithmetic then never depends on how many others run, so its
        # greedy answer is the same under any load, bit for bit on CUDA too (each GEMM shape rounds its own way).
        self.buckets = sorted({b for b in buckets if b < slots} | {slots}) if buckets else [slots]
        if kernels is None:
            model.setup_slots(slots, max_seq)
        else:  # Llama / Falcon: "fused" (Triton, the CUDA default) or "eager" decode-step kernels
            model.setup_slots(slots, max_seq, kernels=kernels)
        dev = self.device
        self.tokens = torch.zeros(slots, dtype=torch.long, device=dev)
        self.positions = torch.full((slots,), max_seq, dtype=torch.long, device=dev)
        self.temperature = torch.zeros(slots, dtype=torch.float32, device=dev)
        self.top_p = torch.ones(slots, dtype=torch.float32, device=dev)
        self.pending: deque[Request] = deque()
        self.active: list[Request | None] = [None] * slots
        self._steps: dict[tuple[int, bool], Callable[[], torch.Tensor]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.steps_run = 0
        self._in_flight = None  # (requests, host buffer, event) of the decode step launched last, not read yet
        pin = self.device.type == "cuda"
        self._host = [torch.empty(slots, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self.prefill_s = 0.0  # host seconds in prompt chunks / decode steps (each decode step ends in a sync)
        self.decode_s = 0.0
        fractions = [(1, 8), (1, 4), (1, 2), (3, 4)]  # of the chunk: less padding for short chunks
        self.prompt_rows = sorted({prefill_chunk * a // b for a, b in fractions
                                   if prefill_chunk * a % b == 0 and prefill_chunk * a // b >= 16} | {prefill_chunk})
        self._prompts: dict[int, Callable[[], torch.Tensor]] = {}
        # [slot, start, t, ids...]: one host-to-device copy a pass; t = 1 until the first pass (a warm-up or
        # capture before it then writes slot 0's position 0 and its scratch row only: no request is there yet).
        self._prompt_in = torch.zeros(3 + prefill_chunk, dtype=torch.long, device=dev)
        self._prompt_in[2] = 1
        self.prompt_passes_run = 0
        self.cancelled_total = 0  # requests ended by cancel (waiting or in a slot)
        self.error: Exception | None = None  # the last exception a step raised in the thread (its requests ended)

    # --- requests -------------------------------------------------------------------------------------------

    def submit(self, ids: list[int], max_new_tokens: int, *, stop_ids: Iterable[int] = (), temperature: float = 0.0,
               top_p: float = 1.0, stream: bool = False) -> Request:
        """Queue a request; it joins at the next step with a free slot. ``stream``: tokens also go to a queue
        that ``BatchEngine.stream(request)`` reads (None marks the end)."""
        if not ids:
            raise ValueError("a request needs at least one prompt token")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if len(ids) + max_new_tokens > self.max_seq:
            raise ValueError(f"{len(ids)} prompt + {max_new_tokens} new tokens exceed a slot's cache of "
                             f"{self.max_seq} positions")
        req = Request(list(ids), max_new_tokens, frozenset(stop_ids), float(temperature), float(top_p),
                      submitted=time.perf_counter(), _queue=queue.Queue() if stream else None)
        with self._lock:
            self.pending.append(req)
        self._wake.set()
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request (a client went away): it leaves its slot or the queue at the next step. Any thread."""
        req.cancelled = True
        self._wake.set()

    def _sweep(self) -> None:
        def end(req: Request) -> None:
            self.cancelled_total += 1
            req.done, req.finish_reason = True, "cancelled"
            if req._queue is not None:
                req._queue.put(None)

        with self._lock:
            for req in [r for r in self.pending if r.cancelled]:
                self.pending.remove(req)
                end(req)
        for req in self.active:
            if req is not None and req.cancelled and not req.done:
                self._free(req)
                end(req)

    @property
    def busy(self) -> bool:
        return bool(self.pending) or any(r is not None for r in self.active)

    # --- the decode step ------------------------------------------------------------------------------------

    def _step_fn(self, bucket: int, sampled: bool) -> Callable[[], torch.Tensor]:
        fn = self._steps.get((bucket, sampled))
        if fn is not None:
            return fn
        model = self.model
        tokens, positions = self.tokens[:bucket], self.positions[:bucket]
        temperature, top_p = self.temperature[:bucket], self.top_p[:bucket]

        def step() -> torch.Tensor:
            return pick_rows(model.step_slots(tokens, positions), temperature, top_p, sampled)

        if self.mode == "graph":
            # The warm-up runs before the capture execute the step: with every slot at the scratch position, so
            # that they touch no busy slot (a Mamba slot's state would move once per run). The capture itself
            # only records; the buffers get their values back for the real step.
            held = self.positions.clone()
            self.positions.fill_(self.max_seq)
            try:
                with torch.inference_mode():
                    fn = _Graph(step)
            finally:
                self.positions.copy_(held)
        else:
            fn = step
        self._steps[(bucket, sampled)] = fn
        return fn

    def warm_up(self, buckets: Iterable[int] | None = None, sampled: Iterable[bool] = (False,)) -> float:
        """Capture the decode steps ahead of the first requests (all slots idle); seconds taken."""
        started = time.perf_counter()
        assert not any(self.active), "warm_up runs before any request is admitted"
        for b in buckets or self.buckets:
            for s in sampled:
                self._step_fn(b, s)
        if self.fixed_prompts:
            for rows in self.prompt_rows:
                self._prompt_fn(rows)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    def _prompt_fn(self, rows: int) -> Callable[[], torch.Tensor]:
        """The prompt pass at ``rows`` rows over ``_prompt_in`` (a CUDA graph in graph mode). Its warm-up and
        capture runs redo the pass in ``_prompt_in`` at the time: idempotent (the same k / v to the same
        positions of the same slot, padding to its scratch row)."""
        fn = self._prompts.get(rows)
        if fn is not None:
            return fn
        model, ids, meta = self.model, self._prompt_in[3:3 + rows], self._prompt_in[:3]

        def prompt() -> torch.Tensor:
            return model.prefill_fixed(ids, meta)

        if self.mode == "graph":
            with torch.inference_mode():
                fn = _Graph(prompt)
        else:
            fn = prompt
        self._prompts[rows] = fn
        return fn

    # --- scheduling -----------------------------------------------------------------------------------------

    def _admit(self) -> None:
        with self._lock:
            for slot in range(self.slots):
                if not self.pending:
                    return
                if self.active[slot] is None:
                    req = self.pending.popleft()
                    req.slot, req.prefilled = slot, 0
                    self.active[slot] = req

    def _to_device(self, ids: list[int]) -> torch.Tensor:
        """Token ids on the device without a host wait: a copy from pageable memory would first wait for every
        GPU step queued before it (the decode step in flight)."""
        ids = torch.tensor(ids, dtype=torch.long)
        if self.device.type != "cuda":
            return ids
        return ids.pin_memory().to(self.device, non_blocking=True)

    def _free(self, req: Request) -> None:
        slot = req.slot
        self.active[slot] = None
        req.slot, req._on_device = None, False
        # Idle from the next launched step on (a step already in flight may still move it: never read).
        self.positions[slot] = self.max_seq
        self.temperature[slot] = 0.0

    @torch.inference_mode()
    def _prefill_one(self) -> list[Request]:
        """Prompt chunks of the earliest admitted requests still prefilling: one request's next ``prefill_chunk``
        tokens, or with ``share_prefill`` up to ``prefill_chunk`` tokens in all, taken from as many requests as
        fit, in one pass. The requests whose prompt this completed get their first token."""
        waiting = sorted((r for r in self.active if r is not None and r.prefilled < len(r.ids)),
                         key=lambda r: r.submitted)
        if not waiting:
            return []
        self.prompt_passes_run += 1
        if self.fixed_prompts:
            req = waiting[0]
            chunk = req.ids[req.prefilled:req.prefilled + self.prefill_chunk]
            rows = next(r for r in self.prompt_rows if r >= len(chunk))
            host = torch.zeros(3 + rows, dtype=torch.long)  # padding ids 0: they write only the scratch row
            host[0], host[1], host[2] = req.slot, req.prefilled, len(chunk)
            host[3:3 + len(chunk)] = torch.tensor(chunk, dtype=torch.long)
            if self.device.type == "cuda":  # pinned: a pageable copy would wait for the decode step in flight
                host = host.pin_memory()
            self._prompt_in[:3 + rows].copy_(host, non_blocking=True)
            parts, logits = [(req, chunk)], self._prompt_fn(rows)()
        else:
            parts, logits = self._shared_pass(waiting)
        return self._first_tokens(parts, logits)

    def _shared_pass(self, waiting: list[Request]):
        parts, budget = [], self.prefill_chunk
        for req in waiting[:None if self.share_prefill else 1]:
            if budget <= 0:
                break
            chunk = req.ids[req.prefilled:req.prefilled + budget]
            parts.append((req, chunk))
            budget -= len(chunk)
        logits = self.model.prefill_slots([(req.slot, self._to_device(chunk), req.prefilled) for req, chunk in parts])
        return parts, logits

    def _first_tokens(self, parts, logits: torch.Tensor) -> list[Request]:
        done = []
        for i, (req, chunk) in enumerate(parts):
            req.prefilled += len(chunk)
            if req.prefilled == len(req.ids):
                done.append((req, logits[i:i + 1]))
        if not done:
            return []
        firsts = []
        for req, row in done:
            if req.temperature > 0:
                t = torch.full((), req.temperature, device=self.device)
                p = torch.full((), req.top_p, device=self.device)
                firsts.append(sample(row, t, p).view(1))
            else:
                firsts.append(greedy(row, None, None).view(1))
        got = torch.cat(firsts).tolist()  # one host sync for all of them
        now = time.perf_counter()
        for (req, _), token in zip(done, got):
            req._emit(int(token), now)
            if req.done:
                self._free(req)
        return [req for req, _ in done]

    @torch.inference_mode()
    def _decode(self) -> list[Request]:
        """Launch one decode step, then read back the one launched before it (so the host's work on a step's
        tokens overlaps the GPU's next step). Each launched step leaves every live slot's next token and position
        in the device buffers; the host writes them only for a request's first step. A request whose last token
        is in flight is not stepped again; one that ends on a stop id may get one more step, never read."""
        launch = [r for r in self.active if r is not None and r.prefilled == len(r.ids) and not r.done
                  and len(r.tokens) + r._in_flight < r.max_new_tokens]
        previous, self._in_flight = self._in_flight, None
        if launch:
            top = max(r.slot for r in launch) + 1
            bucket = next(b for b in self.buckets if b >= top)
            sampled = any(r.temperature > 0 for r in launch)
            for r in launch:
                if not r._on_device:  # its first step: the prompt's last token / first new one
                    s = r.slot
                    self.tokens[s] = r.tokens[-1]
                    self.positions[s] = len(r.ids) + len(r.tokens) - 1
                    self.temperature[s], self.top_p[s] = r.temperature, r.top_p
                    r._on_device = True
            step = self._step_fn(bucket, sampled)
            out = step()
            self.tokens[:bucket].copy_(out)
            self.positions[:bucket] += self.positions[:bucket] < self.max_seq  # idle slots stay at the scratch
            host = self._host[self.steps_run % 2][:bucket]
            host.copy_(out, non_blocking=True)
            done = torch.cuda.Event() if self.device.type == "cuda" else None
            if done is not None:
                done.record()
            for r in launch:
                r._in_flight = True
            self._in_flight = ([(r, r.slot) for r in launch], host, done)
            self.steps_run += 1
        return self._collect(previous)

    def _collect(self, launched) -> list[Request]:
        """Emit the tokens of a launched decode step (waits for it); requests that ended since are skipped."""
        if launched is None:
            return []
        reqs, host, done = launched
        if done is not None:
            done.synchronize()
        got = host.tolist()
        now = time.perf_counter()
        emitted = []
        for r, slot in reqs:
            r._in_flight = False
            if r.done or r.slot != slot:
                continue
            r._emit(int(got[slot]), now)
            emitted.append(r)
            if r.done:
                self._free(r)
        return emitted

    def step(self) -> list[Request]:
        """One scheduler iteration: admit, up to ``prompt_passes`` prompt passes, one decode step. The requests
        that got a token."""
        self._sweep()
        self._admit()
        t0 = time.perf_counter()
        got = []
        for _ in range(self.prompt_passes):
            if not any(r is not None and r.prefilled < len(r.ids) for r in self.active):
                break
            got += self._prefill_one()
        t1 = time.perf_counter()
        got += self._decode()
        self.prefill_s += t1 - t0
        self.decode_s += time.perf_counter() - t1
        self._admit()  # slots freed this step take waiting requests before the next one
        return got

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Step until no request is waiting or running (or ``until()`` is true)."""
        while self.busy and not (until and until()):
            self.step()

    # --- in a thread (for servers) --------------------------------------------------------------------------

    def start(self) -> None:
        """Run the scheduler in a daemon thread; ``submit(..., stream=True)`` + ``stream(req)`` from any thread."""
        if self._thread is not None:
            return
        self._stop = False

        def loop() -> None:
            while not self._stop:
                if not self.busy:
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                try:
                    self.step()
                except Exception as exc:  # noqa: BLE001 - a failed step ends its requests, not the server
                    self.error = exc
                    self._fail_all()

        self._thread = threading.Thread(target=loop, name="localgpt-batch", daemon=True)
        self._thread.start()

    def _fail_all(self) -> None:
        """A step raised: every waiting and running request ends with finish_reason "error" (slots freed)."""
        with self._lock:
            failed = list(self.pending)
            self.pending.clear()
        self._in_flight = None
        for req in self.active:
            if req is not None:
                self._free(req)
                failed.append(req)
        for req in failed:
            req.done, req.finish_reason = True, "error"
            if req._queue is not None:
                req._queue.put(None)

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @staticmethod
    def stream(req: Request, until: Callable[[], bool] | None = None, poll_s: float = 0.1) -> Iterator[int]:
        """The request's tokens as they come (it must have been submitted with ``stream=True``). ``until``:
        asked every ``poll_s`` while no token comes; true ends the stream early (the caller cancels)."""
        if req._queue is None:
            raise ValueError("submit the request with stream=True to stream it")
        while True:
            if until is None:
                token = req._queue.get()
            else:
                try:
                    token = req._queue.get(timeout=poll_s)
                except queue.Empty:
                    if until():
                        return
                    continue
            if token is None:
                return
            yield token
