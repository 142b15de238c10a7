"""The decode loop: prefill, one captured decode step, sampling on the device, tokens streamed out.

``Engine`` drives any network with ``prefill(ids) -> logits`` and ``step(token, pos) -> logits``
(``transformer.Transformer``, ``mamba.Mamba``). On CUDA the step (network + sampling) is compiled by
``torch.compile(mode="reduce-overhead")`` (a CUDA graph of fused kernels) or captured as a plain CUDA
graph; the host never waits for the GPU except to read token ids, and reads each one a step late so the
GPU is already computing the next token while the host decodes text. On CPU everything runs eagerly.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

import torch


# mode="reduce-overhead" (CUDA graphs) plus coordinate-descent tuning of the generated kernels: on an
# H100 the tuning took Llama-2-7B int8 decode from 169 to 223 tok/s, for ~40 s more compile time.
COMPILE_OPTIONS = {"triton.cudagraphs": True, "coordinate_descent_tuning": True}


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """One token id [1, 1] from logits [1, vocab]: nucleus sampling at ``temperature``, all on the device.

    Keeps the smallest set of most likely tokens whose mass reaches ``top_p`` (as transformers'
    TopPLogitsWarper does) and draws with the exponential-race trick, which needs no host sync.
    """
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
    race = torch.empty_like(sorted_probs).exponential_(1)
    choice = (sorted_probs / race).argmax(dim=-1, keepdim=True)
    return order.gather(-1, choice)


def greedy(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1, keepdim=True)


def _decode_step(model, pick, token, input_pos, temperature, top_p):
    return pick(model.step(token, input_pos), temperature, top_p)


class _GraphedStep:
    """A decode step captured once as a CUDA graph over static input buffers (no compiler needed)."""

    def __init__(self, fn: Callable, token: torch.Tensor, input_pos: torch.Tensor, temperature, top_p):
        self.token, self.input_pos = token.clone(), input_pos.clone()
        self.temperature, self.top_p = temperature, top_p
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up outside the graph (workspaces, lazy inits)
                fn(self.token, self.input_pos, temperature, top_p)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn(self.token, self.input_pos, temperature, top_p)

    def __call__(self, token, input_pos, temperature, top_p):
        self.token.copy_(token)
        self.input_pos.copy_(input_pos)
        self.graph.replay()
        return self.out


class Engine:
    """Generates token ids from prompt ids with one network; ``mode`` is how the decode step runs.

    mode: "compile" (torch.compile, CUDA graphs + tuned kernels), "graph" (plain CUDA graph of the eager step),
    "eager" (the CPU path and the reference). The step is built on first use of each sampling kind.
    ``fused``: decode through the fused Triton kernels of the batch engine's step where the network has them
    (``Transformer.use_fused_decode``: Llama-style networks on CUDA); None = on wherever they apply.
    """

    def __init__(self, model, *, mode: str = "eager", max_seq: int = 4096, fused: bool | None = None):
        self.model = model
        self.device = model.device
        self.mode = mode if self.device.type == "cuda" else "eager"
        self.max_seq = max_seq
        model.setup_cache(max_seq)
        use = getattr(model, "use_fused_decode", None)
        self.fused = bool(use(fused is not False)) if use is not None else False
        self._steps: dict[bool, Callable] = {}
        self.temperature = torch.ones((), device=self.device)
        self.top_p = torch.ones((), device=self.device)
        self.token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.input_pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.prefill_chunk: int | None = None  # Mamba: tokens per parallel prefill pass

    # --- building the step ------------------------------------------------------------------

    def _step_fn(self, sampled: bool) -> Callable:
        fn = self._steps.get(sampled)
        if fn is not None:
            return fn
        pick = sample if sampled else greedy
        model = self.model

        def step(token, input_pos, temperature, top_p):
            return _decode_step(model, pick, token, input_pos, temperature, top_p)

        if self.mode == "compile" and sampled:
            # Inductor cannot yet generate top-p's cumulative sum over the vocabulary as one kernel
            # (NYI split-dim scan): the network is compiled, the few sampling kernels run eagerly after it.
            network = torch.compile(model.step, fullgraph=True, options=COMPILE_OPTIONS)

            def fn(token, input_pos, temperature, top_p):
                return sample(network(token, input_pos), temperature, top_p)
        elif self.mode == "compile":
            fn = torch.compile(step, fullgraph=True, options=COMPILE_OPTIONS)
        elif self.mode == "graph":
            with torch.inference_mode():
                fn = _GraphedStep(step, self.token, self.input_pos, self.temperature, self.top_p)
        else:
            fn = step
        self._steps[sampled] = fn
        return fn

    # --- generating -------------------------------------------------------------------------

    @torch.inference_mode()
    def _prompt_logits(self, ids: list[int]) -> torch.Tensor:
        """One prefill of the cache with ``ids``; the network's logits after the last of them."""
        prompt = torch.tensor([ids], dtype=torch.long, device=self.device)
        if getattr(self.model, "kind", "") == "mamba":
            return self.model.prefill(prompt, self.prefill_chunk)
        return self.model.prefill(prompt)

    @torch.inference_mode()
    def _prefill(self, ids: list[int], sampled: bool) -> torch.Tensor:
        logits = self._prompt_logits(ids)
        pick = sample if sampled else greedy
        self.token.copy_(pick(logits, self.temperature, self.top_p))
        self.input_pos.fill_(len(ids))
        return self.token

    def next_logits(self, ids: list[int]) -> torch.Tensor:
        """The logits [vocab] after ``ids`` (one prefill; the next ``generate`` prefills anew)."""
        logits = self._prompt_logits(ids)
        return logits.reshape(-1, logits.shape[-1])[-1]

    @torch.inference_mode()
    def _advance(self, step: Callable) -> torch.Tensor:
        nxt = step(self.token, self.input_pos, self.temperature, self.top_p)
        self.token.copy_(nxt)  # the compiled step's output lives in its graph pool: keep our own copy
        self.input_pos.add_(1)
        return self.token

    def warm_up(self, sampled: bool = False, steps: int = 3) -> float:
        """Build and run the decode step once (compilation happens here, not in the first answer)."""
        started = time.perf_counter()
        for _ in self.generate([1, 2, 3], steps, sampled=sampled):
            pass
        return time.perf_counter() - started

    def generate(self, ids: list[int], max_new_tokens: int, *, stop_ids: set[int] | frozenset = frozenset(),
                 temperature: float = 0.0, top_p: float = 1.0, sampled: bool | None = None) -> Iterator[int]:
        """Token ids after ``ids``, one at a time, ending at a stop id (included) or ``max_new_tokens``."""
        if len(ids) + max_new_tokens > self.max_seq:
            raise ValueError(f"{len(ids)} prompt + {max_new_tokens} new tokens exceed the engine's cache of "
                             f"{self.max_seq} positions")
        sampled = temperature > 0 if sampled is None else sampled
        self.temperature.fill_(max(temperature, 1e-5))
        self.top_p.fill_(top_p)
        step = self._step_fn(sampled)
        token = self._prefill(ids, sampled)
        first = int(token.item())
        yield first
        if first in stop_ids or max_new_tokens <= 1:
            return
        if self.device.type != "cuda":
            for _ in range(max_new_tokens - 1):
                tid = int(self._advance(step).item())
                yield tid
                if tid in stop_ids:
                    return
            return
        # CUDA: queue step i, then read step i-1's token (already copied to pinned memory), so the
        # host's work on a token overlaps the GPU's work on the next one.
        host = torch.empty(max_new_tokens, dtype=torch.long, pin_memory=True)
        done = [torch.cuda.Event() for _ in range(2)]
        for i in range(1, max_new_tokens):
            host[i:i + 1].copy_(self._advance(step).view(1), non_blocking=True)
            done[i % 2].record()
            if i > 1:
                done[(i - 1) % 2].synchronize()
                tid = int(host[i - 1])
                yield tid
                if tid in stop_ids:
                    return
        done[(max_new_tokens - 1) % 2].synchronize()
        yield int(host[max_new_tokens - 1])
