"""A compact Llama / Falcon decoder with a static KV cache, built from a loaded transformers model.

The weights are the checkpoint's own (q/k/v and gate/up fused into one matrix each, so batch-1
decode reads every weight once per token in few launches); the forward pass is plain PyTorch that
``torch.compile`` can capture whole. Never loads files or touches the network: it is handed a model.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from torch.nn.attention import SDPBackend, sdpa_kernel

from localgpt.errors import ConfigError

# The batch-1 step's GEMVs one persistent launch a layer (``gemv_chain``): int4 544.7 tok/s on the H200 (Llama-2-7B;
# its bulk-copy kernel with fp16 operands, round 15) against 471 for a launch a GEMV; int8 366.8 against 359.8 for
# Triton's X2 kernel and the separate prologues (round 15; equal before the staged input's swizzle, round 12);
# Falcon-7B int8 (its inputs padded to whole blocks, quantize.INT8_PAD) 351.3 against 251.7 (round 15).
# LOCALGPT_GEMV_CHAIN=0 keeps a launch a GEMV (``_step_prologues``).
CHAIN = os.environ.get("LOCALGPT_GEMV_CHAIN", "1") != "0"
CHAIN_INT8 = CHAIN
# The decode attention as the first phase of each layer's chain (rotary, cache write, the attention over positions
# 0..pos): a layer one launch instead of two. LOCALGPT_GEMV_CHAIN_ATTN: "auto" (default) for int8 chains, whose
# consumers outrun the copy engine so the ring banks the phase's wait (Llama-2-7B int8 374.9 against 367.3 tok/s on
# an H200, round 16); int4's are level with the attention's own kernels (547.8 against 549.2), so not there; "1" for
# every chain, "0" for none.
CHAIN_ATTN = os.environ.get("LOCALGPT_GEMV_CHAIN_ATTN", "auto")
# The batch-1 step's attention by ``slot_triton.step_attention`` (rotary, cache write and attention in one kernel,
# runs that follow the position); LOCALGPT_STEP_ATTENTION=0: rope_store + decode_attention, as before.
STEP_ATTN = os.environ.get("LOCALGPT_STEP_ATTENTION", "1") != "0"
# With one kv head a query head (Llama-2-7B), as one launch: the step's parts combined by each head's last program
# (an arrival count a head, ``Block.step_counts``), the first tile's cache rows asked for before the dependent launch
# waits (``step_attention(counts=, early=STEP_EARLY)``, shape ``STEP_MERGE_ATTENTION``).
# H200, Llama-2-7B int4 after 512 tokens, same calls: 590.8 / 591.3 / 590.3 against 580.7 / 581.8 / 581.0 tok/s for
# rope_store + decode_attention's three launches; without the early rows 561.0, with two tiles early 581.5 (round 18).
# At every cache length since round 19 (4,096-position caches, one call): after 3,584 tokens 453.0 against 435.5
# for step_attention's two launches, after 512 590.1 against 580.4.
# LOCALGPT_STEP_ATTENTION_MERGE=0: step_attention and its combine (two launches) for long caches, else the three.
STEP_MERGE = os.environ.get("LOCALGPT_STEP_ATTENTION_MERGE", "1") != "0"
# Tiles a program asks for before the wait (step_attention's early; 2 was no faster), merged or not: Falcon-7B int4
# (two launches) 582.6 / 585.4 against 579.3 tok/s at 640-position caches, 496.0 against 489.9 after 3,584 tokens of
# a 4,096-position cache.
STEP_EARLY = 1
# Falcon's batch-1 step as a plain CUDA graph of fused kernels (``Transformer._step_parallel``: the residual adds
# and LayerNorm in one kernel, the attention's in one, GELU in one; no compiler, so no ~45 s warm-up):
# on by default since round 14 (H200, Falcon-7B int4 in one call: 462 against 417 tok/s compiled, TTFT at 512 27
# against 44 ms, warm-up 2.3 against ~45 s); LOCALGPT_FALCON_GRAPH=0 compiles its fused step instead.
FALCON_GRAPH = os.environ.get("LOCALGPT_FALCON_GRAPH", "1") != "0"

# Prompt chunks of the slot path (batch.BatchEngine): kernels that need no per-shape plan.
_CHUNK_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class TransformerShape:
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    norm: str  # "rms" (Llama) or "layer" (Falcon)
    norm_eps: float
    parallel: bool  # Falcon: attention and MLP read the same normed input and add to one residual
    two_norms: bool  # Falcon-40B style ln_attn + ln_mlp in a parallel block
    mlp: str  # "swiglu" (Llama) or "gelu" (Falcon)


class Linear(nn.Module):
    """``x @ weight.T (+ bias)``; quantize.py swaps these for int8 / int4 / bitsandbytes versions.

    ``gemv``: None (cuBLAS) or the (block, rows, split, warps, dependent launch) of the Triton bf16 GEMV that one
    token takes instead, set with its scratch buffers by ``quantize.use_bf16_gemv``.
    """

    gemv: tuple | None = None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemv is not None and x.numel() == x.shape[-1]:
            bk, bn, split, warps, pdl = self.gemv
            from localgpt.generation.fast.gemv_triton import bf16_gemv_call  # CUDA only: Triton is there

            out = bf16_gemv_call(x.reshape(-1).contiguous(), self.weight, self.gemv_ws, self.gemv_lock,
                                 bk, bn, split, warps, pdl)
            out = out.view(*x.shape[:-1], self.weight.shape[0])
            return out if self.bias is None else out + self.bias
        return F.linear(x, self.weight, self.bias)


class Fused(nn.Module):
    """Several linears of one input whose outputs are concatenated (used when weights cannot be fused)."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same order of operations as LlamaRMSNorm: fp32 statistics, scale after casting back.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _layer_norm(module: nn.Module) -> nn.LayerNorm:
    norm = nn.LayerNorm(module.weight.shape[0], eps=module.eps, device=module.weight.device, dtype=module.weight.dtype)
    norm.weight = nn.Parameter(module.weight.data, requires_grad=False)
    norm.bias = nn.Parameter(module.bias.data, requires_grad=False)
    return norm


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Block(nn.Module):
    def __init__(self, shape: TransformerShape, *, wqkv: nn.Module, wo: nn.Module, w_in: nn.Module, w_out: nn.Module,
                 norm1: nn.Module, norm2: nn.Module | None):
        super().__init__()
        self.shape = shape
        self.wqkv, self.wo, self.w_in, self.w_out = wqkv, wo, w_in, w_out
        self.norm1, self.norm2 = norm1, norm2
        self.register_buffer("k_cache", torch.empty(0), persistent=False)
        self.register_buffer("v_cache", torch.empty(0), persistent=False)
        self.register_buffer("step_counts", torch.empty(0, dtype=torch.int32), persistent=False)

    def setup_cache(self, max_seq: int, dtype: torch.dtype, device: torch.device) -> None:
        s = self.shape
        size = (1, s.n_kv_heads, max_seq, s.head_dim)
        self.k_cache = torch.zeros(size, dtype=dtype, device=device)
        self.v_cache = torch.zeros(size, dtype=dtype, device=device)
        self.step_counts = torch.zeros(s.n_heads, dtype=torch.int32, device=device)  # step_attention's merge

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w_in(x)
        if self.shape.mlp == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return self.w_out(h)

    def attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: torch.Tensor | None) -> torch.Tensor:
        s = self.shape
        t = x.shape[1]
        q, k, v = self.wqkv(x).split([s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim, s.n_kv_heads * s.head_dim], -1)
        q = q.view(1, t, s.n_heads, s.head_dim).transpose(1, 2)
        k = k.view(1, t, s.n_kv_heads, s.head_dim).transpose(1, 2)
        v = v.view(1, t, s.n_kv_heads, s.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = s.n_heads // s.n_kv_heads
        if input_pos is None:
            # Prefill of a fresh prompt at positions 0..t-1: causal attention over the prompt alone
            # (flash / memory-efficient SDPA), and the cache filled for the decode steps.
            self.k_cache[:, :, :t] = k
            self.v_cache[:, :, :t] = v
            if rep > 1:
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            with sdpa_kernel(_CHUNK_BACKENDS):  # not cuDNN: an execution plan per new prompt length (~45 ms, H200)
                out = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
        else:
            # One decode step: the query heads of a kv group become that group's "query rows", so
            # grouped and multi-query attention read the cache once, without repeating it.
            self.k_cache.index_copy_(2, input_pos, k)
            self.v_cache.index_copy_(2, input_pos, v)
            visible = torch.arange(self.k_cache.shape[2], device=x.device) <= input_pos
            qg = q.reshape(1, s.n_kv_heads, rep, s.head_dim)
            out = F.scaled_dot_product_attention(qg, self.k_cache, self.v_cache, attn_mask=visible.view(1, 1, 1, -1))
        out = out.reshape(1, s.n_heads, t, s.head_dim).transpose(1, 2).reshape(1, t, s.n_heads * s.head_dim)
        return self.wo(out)

    def attend_qkv(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: torch.Tensor,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """The attention of one decode step from its projections qkv [1, (heads + 2 kv heads) head_dim], before
        ``wo``: ``slot_triton.step_attention`` (rotary, cache write and the attention over positions 0..input_pos
        in one kernel; with one kv head a query head and STEP_MERGE its parts combined in it too, else in a second)
        or, without STEP_MERGE, for a short cache of one kv head a query head (``slot_triton.use_step_attention``),
        rotary + cache write in one kernel and the split attention in two. step_attention asks for its first tiles'
        rows before the dependent launch waits (STEP_EARLY).
        ``out``: a fixed [1, heads head_dim] buffer to write it in (the chained step's)."""
        from localgpt.generation.fast import slot_triton

        # merged: one kv head a query head only (Falcon-7B's 71 heads on one lost: 546.8 against 578.8 tok/s)
        merge = STEP_MERGE and self.k_cache.shape[1] == self.shape.n_heads and self.step_counts.numel() > 0
        if STEP_ATTN and (merge or slot_triton.use_step_attention(self.k_cache, self.shape.n_heads)):
            cfg = (tuple(slot_triton.STEP_MERGE_ATTENTION[k] for k in ("splits", "block_n", "warps", "dot", "stages"))
                   if merge else None)
            return slot_triton.step_attention(qkv.view(1, -1), self.k_cache, self.v_cache, input_pos,
                                              self.shape.n_heads, cos, sin, out=out, config=cfg,
                                              counts=self.step_counts if merge else None,
                                              early=STEP_EARLY)
        q = slot_triton.rope_store(qkv.view(1, -1), cos, sin, input_pos, self.k_cache, self.v_cache, self.shape.n_heads)
        if out is not None:
            return slot_triton.decode_attention(q, self.k_cache, self.v_cache, input_pos, -1, out=out)
        return slot_triton.decode_attention_call(q, self.k_cache, self.v_cache, input_pos, -1).view(1, -1)

    def attention_step_fused(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                             input_pos: torch.Tensor) -> torch.Tensor:
        """``attention`` for one decode step (x [1, 1, dim]) as torch.compile traces the fused step: the rotary and
        the cache write in PyTorch (inductor fuses them; a cache-mutating operator would be opaque to it), the
        attention over positions 0..input_pos only the ``localgpt::decode_attention`` operator. cos / sin: the whole
        [max_seq, head_dim] tables. (Without the compiler the step takes ``attend_qkv``.)"""
        from localgpt.generation.fast import slot_triton

        s = self.shape
        q, k, v = self._qkv(x, cos[input_pos], sin[input_pos])  # [1, heads, 1, head_dim]
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        if STEP_ATTN:
            out = slot_triton.step_attention_call(q.reshape(1, s.n_heads, s.head_dim), self.k_cache, self.v_cache,
                                                  input_pos)
        else:
            out = slot_triton.decode_attention_call(q.reshape(1, s.n_heads, s.head_dim), self.k_cache, self.v_cache,
                                                    input_pos, -1)
        return self.wo(out.view(1, 1, -1))

    # --- slots (continuous batching, ``batch.BatchEngine``): a cache per slot, separate from the one above ----

    def setup_slots(self, slots: int, max_seq: int, dtype: torch.dtype, device: torch.device) -> None:
        s = self.shape
        # Position max_seq: where idle slots write; rounded up to 16 positions (the masked SDPA kernels want the
        # mask's rows 16-aligned), the extra ones never visible.
        size = (slots, s.n_kv_heads, -(-(max_seq + 1) // 16) * 16, s.head_dim)
        self.k_slots = torch.zeros(size, dtype=dtype, device=device)
        self.v_slots = torch.zeros(size, dtype=dtype, device=device)
        self.scratch = max_seq

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        s = self.shape
        b, t = x.shape[:2]
        q, k, v = self.wqkv(x).split([s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim, s.n_kv_heads * s.head_dim], -1)
        q = q.view(b, t, s.n_heads, s.head_dim).transpose(1, 2)
        k = k.view(b, t, s.n_kv_heads, s.head_dim).transpose(1, 2)
        v = v.view(b, t, s.n_kv_heads, s.head_dim).transpose(1, 2)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def attention_slots(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                        visible: torch.Tensor) -> torch.Tensor:
        """One decode step of the first B slots: x [B, 1, dim], each slot's token at its own position [B];
        cos/sin [B, 1, 1, head_dim]; visible [B, 1, 1, cache length] (position <= the slot's)."""
        s = self.shape
        b = x.shape[0]
        q, k, v = self._qkv(x, cos, sin)
        rows = torch.arange(b, device=x.device)
        self.k_slots[rows, :, positions] = k[:, :, 0]
        self.v_slots[rows, :, positions] = v[:, :, 0]
        rep = s.n_heads // s.n_kv_heads
        qg = q.reshape(b, s.n_kv_heads, rep, s.head_dim)
        out = F.scaled_dot_product_attention(qg, self.k_slots[:b], self.v_slots[:b], attn_mask=visible)
        return self.wo(out.reshape(b, 1, s.n_heads * s.head_dim))

    def attention_slots_fused(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                              positions: torch.Tensor) -> torch.Tensor:
        """``attention_slots`` in three Triton kernels (``slot_triton``): rotary + cache write, then attention
        over each slot's own positions only. cos / sin: the whole [positions, head_dim] tables."""
        from localgpt.generation.fast import slot_triton

        s = self.shape
        b = x.shape[0]
        q = slot_triton.rope_store(self.wqkv(x).view(b, -1), cos, sin, positions, self.k_slots, self.v_slots,
                                   s.n_heads)
        out = slot_triton.slot_attention(q, self.k_slots, self.v_slots, positions, self.scratch)
        return self.wo(out.view(b, 1, -1))

    def forward_slots_fused(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                            positions: torch.Tensor) -> torch.Tensor:
        """A decode step of the first B slots with the fused kernels (CUDA): same arithmetic as ``forward_with`` +
        ``attention_slots`` up to rounding order, a third of the kernels."""
        return self.forward_with(x, lambda h: self.attention_slots_fused(h, cos, sin, positions), fused=True)

    def attention_chunks(self, x: torch.Tensor, parts: list[tuple[int, int, int]], cos: torch.Tensor,
                         sin: torch.Tensor) -> torch.Tensor:
        """Prompt chunks of several slots in one pass: x [1, T, dim] holds the chunks one after another; ``parts``
        (slot, start, t): a chunk of t tokens at positions start.. of slot ``slot``'s prompt, after start cached
        ones; cos / sin [T, head_dim] for those positions. The projections run once over all T rows, the
        attention per chunk over its own slot's cache."""
        s = self.shape
        total = x.shape[1]
        q, k, v = self._qkv(x, cos, sin)  # [1, heads, T, head_dim]
        rep = s.n_heads // s.n_kv_heads
        outs, row = [], 0
        for slot, start, t in parts:
            end = start + t
            self.k_slots[slot, :, start:end] = k[0, :, row:row + t]
            self.v_slots[slot, :, start:end] = v[0, :, row:row + t]
            kc, vc = self.k_slots[slot:slot + 1, :, :end], self.v_slots[slot:slot + 1, :, :end]
            if rep > 1:
                kc, vc = kc.repeat_interleave(rep, dim=1), vc.repeat_interleave(rep, dim=1)
            qc = q[:, :, row:row + t]
            # Not cuDNN: torch 2.11 sends SDPA to cuDNN first on Hopper, and cuDNN builds an execution plan for every
            # new (chunk, cached length) shape, ~0.1-0.4 s each (bench/gpu_notes.md, continuous batching).
            with sdpa_kernel(_CHUNK_BACKENDS):
                if start == 0 or t == 1:
                    out = F.scaled_dot_product_attention(qc, kc, vc, is_causal=start == 0 and t > 1)
                else:
                    mask = torch.arange(end, device=x.device)[None, :] <= torch.arange(start, end, device=x.device)[:, None]
                    out = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask)
            outs.append(out)
            row += t
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        return self.wo(out.transpose(1, 2).reshape(1, total, s.n_heads * s.head_dim))

    def attention_fixed(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                        meta: torch.Tensor, fused: bool) -> torch.Tensor:
        """One slot's prompt chunk at a fixed row count P (``Transformer.prefill_fixed``): x [1, P, dim]; meta
        [slot, start, t] on the device; ``positions`` [P]: start + i for the t valid rows, the scratch position for
        padding rows (their k / v go there; nothing reads them). cos / sin: the whole [positions, head_dim] tables.
        No host value is read, so the pass can be captured once per P and replayed for any slot, start and t."""
        s = self.shape
        p = x.shape[1]
        if fused:
            from localgpt.generation.fast import slot_triton

            q = slot_triton.rope_store_rows(self.wqkv(x).view(p, -1), cos, sin, positions, meta, self.k_slots,
                                            self.v_slots, s.n_heads)
            out = slot_triton.chunk_attention(q, self.k_slots, self.v_slots, meta)
            return self.wo(out.view(1, p, -1))
        q, k, v = self._qkv(x, cos[positions], sin[positions])  # [1, heads, P, head_dim]
        slot = meta[0].expand(p)
        self.k_slots[slot, :, positions] = k[0].transpose(0, 1)
        self.v_slots[slot, :, positions] = v[0].transpose(0, 1)
        kc, vc = self.k_slots.index_select(0, meta[:1]), self.v_slots.index_select(0, meta[:1])  # [1, kv, L, hd]
        rep = s.n_heads // s.n_kv_heads
        if rep > 1:
            kc, vc = kc.repeat_interleave(rep, dim=1), vc.repeat_interleave(rep, dim=1)
        rows = torch.arange(p, device=x.device)
        seen = meta[1] + torch.minimum(rows, meta[2] - 1)  # padding rows attend as the last valid row
        mask = torch.arange(kc.shape[2], device=x.device)[None, :] <= seen[:, None]
        with sdpa_kernel(_CHUNK_BACKENDS):
            out = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(1, p, s.n_heads * s.head_dim))

    def forward_with(self, x: torch.Tensor, attend, fused: bool = False) -> torch.Tensor:
        """``forward`` with the attention given as a function of the normed input (the slot paths); ``fused``: RMSNorm
        and silu·up as one Triton kernel each (``slot_triton``, CUDA)."""
        if fused:
            from localgpt.generation.fast import slot_triton

            def norm(module, h):
                return slot_triton.rms_norm(h, module.weight, module.eps) if isinstance(module, RMSNorm) else module(h)

            def mlp(h):
                if self.shape.mlp == "swiglu":
                    return self.w_out(slot_triton.silu_mul(self.w_in(h)))
                return self.mlp(h)
        else:
            norm, mlp = (lambda module, h: module(h)), self.mlp
        h1 = norm(self.norm1, x)
        if self.shape.parallel:
            h2 = norm(self.norm2, x) if self.shape.two_norms else h1
            return x + (mlp(h2) + attend(h1))
        x = x + attend(h1)
        return x + mlp(norm(self.norm2, x))

    def forward(self, x, cos, sin, input_pos):
        h1 = self.norm1(x)
        if self.shape.parallel:
            h2 = self.norm2(x) if self.shape.two_norms else h1
            return x + (self.mlp(h2) + self.attention(h1, cos, sin, input_pos))
        x = x + self.attention(h1, cos, sin, input_pos)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """``prefill(ids) -> logits of the last position``; ``step(token, pos) -> logits``; cache set by ``setup_cache``."""

    kind = "transformer"

    def __init__(self, shape: TransformerShape, embed: torch.Tensor, blocks: list[Block], norm: nn.Module,
                 lm_head: nn.Module, rope: nn.Module):
        super().__init__()
        self.shape = shape
        self.embed = nn.Parameter(embed, requires_grad=False)
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm
        self.lm_head = lm_head
        self.rope = rope  # the checkpoint's own rotary module: its scaling rules, its frequencies
        self.max_seq = 0
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def setup_cache(self, max_seq: int) -> None:
        if max_seq == self.max_seq:
            return
        self.max_seq = max_seq
        for block in self.blocks:
            block.setup_cache(max_seq, self.dtype, self.device)
        if self._chain:  # its attention phases hold the old caches' and tables' addresses: built again
            self._chain = None
        positions = torch.arange(max_seq, device=self.device)[None]
        cos, sin = self.rope(torch.empty(0, dtype=self.dtype, device=self.device), positions)
        self.cos, self.sin = cos[0].to(self.dtype), sin[0].to(self.dtype)  # [max_seq, head_dim]

    def _run(self, ids: torch.Tensor, cos, sin, input_pos) -> torch.Tensor:
        x = F.embedding(ids, self.embed)
        for block in self.blocks:
            x = block(x, cos, sin, input_pos)
        return self.lm_head(self.norm(x[:, -1:]))[:, -1].float()

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [1, vocab] after the prompt ``ids`` [1, t], written at positions 0..t-1."""
        t = ids.shape[1]
        return self._run(ids, self.cos[:t], self.sin[:t], None)

    def step(self, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Logits [1, vocab] after one token [1, 1] at position ``input_pos`` [1]."""
        if self.fused_decode:
            return self._step_fused(token, input_pos)
        return self._run(token, self.cos[input_pos], self.sin[input_pos], input_pos)

    # --- the batch-1 decode step through the fused kernels (CUDA, Llama-style networks) -------------------------

    fused_decode = False  # set by ``use_fused_decode`` (engine.Engine does on CUDA)

    def use_fused_decode(self, on: bool = True) -> bool:
        """Run ``step`` through ``slot_triton``'s kernels (``_step_fused``) where they apply: on CUDA with Triton
        (or under ``TRITON_INTERPRET=1``, for tests). A Llama-style network (RMSNorm, sequential blocks, SwiGLU)
        takes them for every part (``graph_step``); others (Falcon) for the attention over positions 0..pos,
        the rest as the plain step (which torch.compile fuses). Returns whether the fused step is now on."""
        import os

        where = self.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
        self.fused_decode = bool(on and where and _has_triton())
        return self.fused_decode

    @property
    def graph_step(self) -> bool:
        """Whether the fused step is whole without the compiler (norms, rotary, attention, silu·up in fused kernels
        or the GEMVs' prologues: a Llama-style network; Falcon's with FALCON_GRAPH), so a plain CUDA graph of it is
        the engine's default mode (``generator.default_engine_mode``); else Falcon's LayerNorm / GELU glue wants
        torch.compile."""
        return self._sequential_rms() or (FALCON_GRAPH and self._parallel_gelu())

    def _parallel_gelu(self) -> bool:
        """A Falcon-style network: parallel blocks, LayerNorms, a GELU MLP (``_step_parallel``'s kernels)."""
        s = self.shape
        return (s.parallel and s.mlp == "gelu" and isinstance(self.norm, nn.LayerNorm)
                and all(isinstance(b.norm1, nn.LayerNorm) and (b.norm2 is None or isinstance(b.norm2, nn.LayerNorm))
                        for b in self.blocks))

    def _step_parallel(self, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Falcon's step through ``slot_triton``'s kernels, without the compiler: a layer is the previous layer's
        residual adds with this one's LayerNorm (written as wide as its int4 layers' padded inputs), wqkv, the
        attention (``Block.attend_qkv``) into a fixed row as wide as wo's input, wo, w_in, GELU and w_out."""
        from localgpt.generation.fast import slot_triton

        s = self.shape
        x = F.embedding(token.view(-1), self.embed).view(1, -1)  # the residual [1, dim]
        att = self._att_row  # as wide as wo's input: zeros past the heads (an int4 wo's padding)
        if att is None or att.shape[1] != _in_width(self.blocks[0].wo):
            att = self._att_row = torch.zeros(1, _in_width(self.blocks[0].wo), dtype=self.dtype, device=self.device)
        a = m = None
        for block in self.blocks:
            x, h1 = slot_triton.add3_layer_norm(x, a, m, block.norm1, _in_width(block.wqkv))
            h2 = h1 if block.norm2 is None else slot_triton.add3_layer_norm(x, None, None, block.norm2,
                                                                            _in_width(block.w_in))[1]
            block.attend_qkv(block.wqkv(h1), self.cos, self.sin, input_pos, out=att[:, :s.n_heads * s.head_dim])
            a = block.wo(att)
            m = block.w_out(slot_triton.gelu(block.w_in(h2)))
        _, h = slot_triton.add3_layer_norm(x, a, m, self.norm)
        return self.lm_head(h).float()

    def _step_fused(self, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """``step`` with the decode attention over positions 0..input_pos only (not the whole cache under a mask):
        ``_step_prologues`` (the norms and silu·up in the GEMVs' prologues, or ``slot_triton``'s kernels); under
        torch.compile the norms and silu·up are PyTorch, which inductor fuses itself, and the attention an
        operator (``Block.attention_step_fused``)."""
        if not self._sequential_rms():  # Falcon: the plain step with the attention over positions 0..pos
            if FALCON_GRAPH and self._parallel_gelu() and not torch.compiler.is_compiling():
                if CHAIN and self._chain_ready():
                    return self._step_parallel_chain(token, input_pos)
                return self._step_parallel(token, input_pos)
            x = F.embedding(token, self.embed)
            for block in self.blocks:
                x = block.forward_with(x, lambda h, b=block: b.attention_step_fused(h, self.cos, self.sin, input_pos))
            return self.lm_head(self.norm(x))[:, -1].float()
        if not torch.compiler.is_compiling():
            if CHAIN and self._chain_ready():
                return self._step_chain(token, input_pos)
            return self._step_prologues(token, input_pos)
        x = F.embedding(token, self.embed)  # [1, 1, dim]
        h = self.blocks[0].norm1(x)
        for i, block in enumerate(self.blocks):
            x = x + block.attention_step_fused(h, self.cos, self.sin, input_pos)
            x = x + block.mlp(block.norm2(x))
            h = self.blocks[i + 1].norm1(x) if i + 1 < len(self.blocks) else self.norm(x)
        return self.lm_head(h)[:, -1].float()

    def _step_prologues(self, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """``_step_fused`` without torch.compile: each residual add + RMSNorm and each silu·up folded into the
        prologue of the GEMV that reads it where the layer runs on ``gemv_cuda`` (int4 / int8 "cuda" layouts;
        ``quantize.prologue_gemv``), else the same arithmetic in ``slot_triton``'s kernels. A Llama layer is
        then four GEMVs and the attention's three kernels (was ten launches)."""
        from localgpt.generation.fast.quantize import prologue_gemv

        x = F.embedding(token, self.embed).view(1, -1)  # the residual [1, dim]
        pending = None
        for block in self.blocks:
            qkv, x = prologue_gemv(block.wqkv, x, "rms", pending, block.norm1)
            o = block.wo(block.attend_qkv(qkv, self.cos, self.sin, input_pos))
            h, x = prologue_gemv(block.w_in, x, "rms", o, block.norm2)
            pending, _ = prologue_gemv(block.w_out, h, "swiglu")
        logits, _ = prologue_gemv(self.lm_head, x, "rms", pending, self.norm)
        return logits.view(1, -1).float()

    # --- the batch-1 step with each layer's GEMVs in one persistent launch (gemv_chain) ---------------------------

    _att_row = None  # _step_parallel's attention row (made at its first step)
    _chain = None  # None: not tried yet; False: the network cannot take it; else the step's chains and buffers
    chain_note = ""  # why the chained step is not used (logged; bench/gpu.py prints it)
    chain_kernel = ""  # the chain's kernel when it is: "bulk-copy" (Hopper) or "ring", ", fp16" (operands)

    def _chain_ready(self) -> bool:
        """Whether ``_step_chain`` runs this network's step: every GEMV of the blocks (and the LM head, or it runs
        on its own) on ``gemv_chain``'s words, bf16, and the first layer's chain equal to the separate GEMVs
        (``_chain_check``). Built at the first step outside a CUDA graph capture (the engine's warm-up)."""
        return chain_ready(self)

    def _build_chain(self):
        from types import SimpleNamespace

        from localgpt.generation.fast import gemv_chain

        blocks = list(self.blocks)
        if self.dtype != torch.bfloat16:
            self.chain_note = f"activations in {self.dtype}"
            return None
        parallel = not self._sequential_rms()
        if parallel and not (self._parallel_gelu() and all(b.norm2 is None for b in blocks)):
            self.chain_note = "a parallel block with two LayerNorms (Falcon-40B style)"
            return None
        b0, dev = blocks[0], self.device
        fits = functools.partial(gemv_chain.layer_fits, padded=True) if parallel else gemv_chain.layer_fits
        unfit = [type(m).__name__ for b in blocks for m in (b.wqkv, b.wo, b.w_in, b.w_out) if not fits(m)]
        if unfit:
            self.chain_note = f"{len(unfit)} layers do not fit it (e.g. {unfit[0]})"
            return None
        int8 = type(b0.wo).__name__ == "Int8Linear"
        if int8 and not CHAIN_INT8:
            self.chain_note = "int8 layers (chained unless LOCALGPT_GEMV_CHAIN=0)"
            return None
        # int8: measured faster than the launches with the bulk-copy kernel only (Hopper); the ring one's int8 was
        # level with them on the H200 (round 12) and is not measured elsewhere
        if int8 and not gemv_chain.bulk_copy(dev):
            self.chain_note = "int8 layers chain with the bulk-copy kernel only (Hopper)"
            return None

        def buf(n):
            return torch.zeros(n, dtype=torch.bfloat16, device=dev)

        dim = self.embed.shape[1]
        c = SimpleNamespace(ra=buf(dim), rb=buf(dim), qkv=buf(b0.wqkv.out_features), att=buf(b0.wo.in_features),
                            o=buf(dim), gu=buf(b0.w_in.out_features), d=buf(dim))
        # else (a bf16 head, say) a launch of its own
        c.head_in_chain = fits(self.lm_head)
        if parallel:
            return self._build_parallel_chain(c)
        s = b0.shape
        c.attn = (self._attention_in_chain(int8) and s.head_dim in (64, 128) and s.n_heads % s.n_kv_heads == 0
                  and getattr(b0, "k_cache", None) is not None and b0.k_cache.dtype == torch.bfloat16
                  and self.cos.dtype == torch.bfloat16)
        if c.attn:  # the step's position, read by the launches, and the attention's chunk parts
            c.pos = torch.zeros(1, dtype=torch.long, device=dev)
            c.ws = torch.zeros(s.n_heads * 8 * (s.head_dim + 4), dtype=torch.float32, device=dev)
        c.logits = buf(self.lm_head.out_features) if c.head_in_chain else None

        def head(tma, f16):
            return gemv_chain.Chain([dict(layer=b0.wqkv, x=c.ra, out=c.qkv, xmode="rms", norm=b0.norm1)], dev,
                                    tma=tma, f16=f16)

        def layer_chain(i, b, tma, f16):
            phases = [dict(layer=b.wo, x=c.att, out=c.o)]
            if c.attn:  # the attention first, its output row c.att the input of wo
                phases.insert(0, dict(xmode="attn", x=c.qkv, out=c.att, k_cache=b.k_cache, v_cache=b.v_cache,
                                      cos=self.cos, sin=self.sin, pos=c.pos, heads=s.n_heads, kv=s.n_kv_heads,
                                      hd=s.head_dim, ws=c.ws))
            phases += [dict(layer=b.w_in, x=c.ra, y=c.o, norm=b.norm2, xsum=c.rb, out=c.gu, xmode="rms"),
                       dict(layer=b.w_out, x=c.gu, out=c.d, xmode="swiglu")]
            if i + 1 < len(blocks):
                nxt = blocks[i + 1]
                phases.append(dict(layer=nxt.wqkv, x=c.rb, y=c.d, norm=nxt.norm1, xsum=c.ra, out=c.qkv, xmode="rms"))
            elif c.head_in_chain:
                phases.append(dict(layer=self.lm_head, x=c.rb, y=c.d, norm=self.norm, out=c.logits, xmode="rms"))
            return gemv_chain.Chain(phases, dev, tma=tma, f16=f16)

        return self._chain_kernels(c, self._chain_tries(int8=int8), head, layer_chain, self._chain_check)

    @staticmethod
    def _attention_in_chain(int8: bool) -> bool:
        """Whether a Llama-type chain takes the step's attention as its first phase (CHAIN_ATTN): "auto" for int8
        chains (their consumers outrun the copy engine, so the ring banks the phase's wait; round 16), "1" always,
        "0" never."""
        return CHAIN_ATTN == "1" or (CHAIN_ATTN == "auto" and int8)

    @staticmethod
    def _chain_tries(f16: bool = True, int8: bool = False) -> list[tuple[bool | None, bool | None]]:
        """The chain kernels to try, as (bulk-copy, fp16 operands), None for the default: the bulk-copy kernel where
        the GPU has it (Hopper; int8 with fp16 operands), else or if it fails its check the ring one; fp16 operands
        (gemv_chain.F16) unless ``f16`` is False, and where a kernel fails with them, bf16 ones. int8: the bulk-copy
        kernel with fp16 operands only (the ring one's int8 was only level with the launches, round 12)."""
        from localgpt.generation.fast import gemv_chain

        if int8:
            return [(True, True)]
        if not f16:
            return [(None, False), (False, False)]
        return ([(None, None)] + ([(None, False)] if gemv_chain.F16 else []) + [(False, None)]
                + ([(False, False)] if gemv_chain.F16 else []))

    def _chain_kernels(self, c, tries, head, layer_chain, check):
        """``c`` with ``c.head`` (``head(tma, f16)``) and a chain a layer (``layer_chain(i, block, tma, f16)``)
        built with the first (bulk-copy, fp16 operands) choice of ``tries`` that builds and passes ``check(c)``
        (``chain_kernels``). Returns ``c``, or None (``chain_note`` says why)."""

        def first(tma, f16):
            c.head = head(tma, f16)
            return c.head

        def rest(tma, f16):
            c.chains = [layer_chain(i, b, tma, f16) for i, b in enumerate(self.blocks)]

        return c if chain_kernels(self, tries, first, rest, lambda: check(c)) else None

    def _build_parallel_chain(self, c):
        """``_build_chain`` for a parallel block with one LayerNorm and a GELU MLP (Falcon-7B): a launch is wo and
        w_out (independent: no barrier between them, their blocks shared out together), then the residual's adds
        with the next LayerNorm and the next layer's wqkv and w_in on that one staged input (or the LM head); the
        attention's kernels between launches. ``c.gu`` holds GELU of w_in's output (applied as its rows are
        written), ``c.att`` the attention's row as wide as wo's (padded) input. Returns the buffers and chains,
        or None (``chain_note`` says why)."""
        from localgpt.generation.fast import gemv_chain

        blocks, dev = list(self.blocks), self.device
        b0 = blocks[0]
        c.attn = False
        c.logits = (torch.zeros(self.lm_head.out_features, dtype=torch.bfloat16, device=dev)
                    if c.head_in_chain else None)
        c.last_residual = c.ra if len(blocks) % 2 == 1 else c.rb  # the last launch's r_in

        def head(tma, f16):
            return gemv_chain.Chain([dict(layer=b0.wqkv, x=c.ra, out=c.qkv, xmode="ln", norm=b0.norm1),
                                     dict(layer=b0.w_in, out=c.gu, same=True, gelu_out=True)], dev, tma=tma, f16=f16)

        def layer_chain(i, b, tma, f16):
            r_in, r_out = (c.ra, c.rb) if i % 2 == 0 else (c.rb, c.ra)
            phases = [dict(layer=b.wo, x=c.att, out=c.o), dict(layer=b.w_out, x=c.gu, out=c.d, nobar=True)]
            if i + 1 < len(blocks):
                nxt = blocks[i + 1]
                phases += [dict(layer=nxt.wqkv, x=r_in, y=c.o, y2=c.d, xsum=r_out, norm=nxt.norm1, out=c.qkv,
                                xmode="ln"),
                           dict(layer=nxt.w_in, out=c.gu, same=True, gelu_out=True)]
            elif c.head_in_chain:
                phases.append(dict(layer=self.lm_head, x=r_in, y=c.o, y2=c.d, norm=self.norm, out=c.logits,
                                   xmode="ln"))
            return gemv_chain.Chain(phases, dev, tma=tma, f16=f16)

        # int4: bf16 operands (Falcon-7B's chain with fp16 ones was 5.6 % slower, 516.6 against 547.4 tok/s, round
        # 15: its LayerNorm staging spills with them); int8: the bulk-copy kernel with fp16 ones
        int8 = type(b0.wo).__name__ == "Int8Linear"
        return self._chain_kernels(c, self._chain_tries(f16=int8, int8=int8), head, layer_chain,
                                   self._parallel_chain_check)

    def _parallel_chain_check(self, c) -> str:
        """The head launch and the first layer's chain against ``_step_parallel``'s kernels (``add3_layer_norm``,
        the layers' own GEMVs, ``gelu``) on random inputs: every output within bf16 rounding. Returns "" or what
        differs."""
        from localgpt.generation.fast import slot_triton

        b0, b1 = self.blocks[0], self.blocks[1] if len(self.blocks) > 1 else None
        gen = torch.Generator(device=self.device).manual_seed(0)
        s = self.shape
        width = s.n_heads * s.head_dim

        def rand(n, scale=1.0):
            return (scale * torch.randn(n, generator=gen, device=self.device)).to(torch.bfloat16)

        with torch.inference_mode():
            x, att, up = rand(c.ra.numel()), rand(width), rand(c.gu.numel())
            c.ra.copy_(x)
            c.head()
            _, h = slot_triton.add3_layer_norm(x.view(1, -1), None, None, b0.norm1, _in_width(b0.wqkv))
            want = [("head wqkv", c.qkv.clone(), b0.wqkv(h)),
                    ("head w_in", c.gu.clone(), slot_triton.gelu(b0.w_in(h)))]
            c.att.zero_()
            c.att[:width].copy_(att)
            c.gu.copy_(up)
            c.chains[0]()
            a = b0.wo(c.att.view(1, -1))
            m = b0.w_out(up.view(1, -1))
            want += [("wo", c.o, a), ("w_out", c.d, m)]
            if b1 is not None:
                x1, h1 = slot_triton.add3_layer_norm(x.view(1, -1), a, m, b1.norm1, _in_width(b1.wqkv))
                want += [("residual", c.rb, x1), ("wqkv", c.qkv, b1.wqkv(h1)),
                         ("w_in", c.gu, slot_triton.gelu(b1.w_in(h1)))]
            elif c.head_in_chain:
                _, hf = slot_triton.add3_layer_norm(x.view(1, -1), a, m, self.norm, _in_width(self.lm_head))
                want.append(("lm_head", c.logits, self.lm_head(hf)))
        return _chain_mismatch(want)

    def _step_parallel_chain(self, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """``_step_parallel`` with a layer's GEMVs in persistent launches (``_build_parallel_chain``): the head
        launch (the first LayerNorm, wqkv, w_in), then a layer is its attention's kernels and one launch."""
        c = self._chain
        torch.index_select(self.embed, 0, token.view(-1), out=c.ra.view(1, -1))
        c.head()
        s = self.shape
        att = c.att.view(1, -1)[:, :s.n_heads * s.head_dim]
        for block, chain in zip(self.blocks, c.chains):
            block.attend_qkv(c.qkv.view(1, -1), self.cos, self.sin, input_pos, out=att)
            chain()
        if c.head_in_chain:
            return c.logits.view(1, -1).float()
        from localgpt.generation.fast import slot_triton

        _, h = slot_triton.add3_layer_norm(c.last_residual.view(1, -1), c.o.view(1, -1), c.d.view(1, -1), self.norm,
                                           _in_width(self.lm_head))
        return self.lm_head(h).view(1, -1).float()

    def _chain_attention_run(self, c, gen) -> str:
        """The first layer's chain run with its attention at a position inside the cache, against
        ``Block.attend_qkv`` (slot_triton's rotary + cache write and split attention) on a random qkv row: the
        attention's output and the cache rows it writes within bf16 rounding. The rows at that position are put
        back after (the cache may hold a prompt's). Returns "" or what differs."""
        b0 = self.blocks[0]
        pos = min(5, b0.k_cache.shape[2] - 1)
        where = torch.tensor([pos], device=self.device)
        saved = (b0.k_cache[:, :, pos].clone(), b0.v_cache[:, :, pos].clone())
        try:
            qkv = torch.randn(c.qkv.shape, generator=gen, device=self.device).to(torch.bfloat16)
            ref = b0.attend_qkv(qkv.view(1, -1), self.cos, self.sin, where).view(-1).float()
            ref_rows = (b0.k_cache[:, :, pos].float(), b0.v_cache[:, :, pos].float())
            b0.k_cache[:, :, pos] = saved[0]
            b0.v_cache[:, :, pos] = saved[1]
            c.qkv.copy_(qkv)
            c.pos.fill_(pos)
            c.chains[0]()
            got_rows = (b0.k_cache[:, :, pos].float(), b0.v_cache[:, :, pos].float())
            for name, got, want in (("attention", c.att.float(), ref), ("k row", got_rows[0], ref_rows[0]),
                                    ("v row", got_rows[1], ref_rows[1])):
                rel = float((got - want).norm() / want.norm().clamp(min=1e-12))
                if not bool(torch.isfinite(got).all()) or rel > 1e-2:
                    return f"the check failed at {name} (relative error {rel:.2e})"
            return ""
        finally:
            b0.k_cache[:, :, pos] = saved[0]
            b0.v_cache[:, :, pos] = saved[1]

    def _chain_check(self, c) -> str:
        """The first layer's chain against ``quantize.prologue_gemv``'s launches (or the separate kernels) on
        random inputs: every output within bf16 rounding (the parts of a row meet in another order). Returns ""
        or what differs."""
        from localgpt.generation.fast.quantize import prologue_gemv

        b0, b1 = self.blocks[0], self.blocks[1] if len(self.blocks) > 1 else None
        gen = torch.Generator(device=self.device).manual_seed(0)
        with torch.inference_mode():
            x = torch.randn(c.ra.shape, generator=gen, device=self.device).to(torch.bfloat16)
            att = torch.randn(c.att.shape, generator=gen, device=self.device).to(torch.bfloat16)
            c.ra.copy_(x)
            c.att.copy_(att)
            if c.attn:
                note = self._chain_attention_run(c, gen)
                if note:
                    return note
                att = c.att.clone()  # what the chain's wo took
            else:
                c.chains[0]()
            o = b0.wo(att.view(1, -1))
            h, x1 = prologue_gemv(b0.w_in, x.view(1, -1), "rms", o, b0.norm2)
            d, _ = prologue_gemv(b0.w_out, h, "swiglu")
            want = [("wo", c.o, o), ("residual", c.rb, x1), ("w_in", c.gu, h), ("w_out", c.d, d)]
            if b1 is not None:
                q, x2 = prologue_gemv(b1.wqkv, x1, "rms", d, b1.norm1)
                want += [("wqkv", c.qkv, q), ("residual 2", c.ra, x2)]
            elif c.head_in_chain:
                logits, _ = prologue_gemv(self.lm_head, x1, "rms", d, self.norm)
                want.append(("lm_head", c.logits, logits))
        return _chain_mismatch(want)

    def _step_chain(self, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """``_step_prologues`` with the GEMVs from one attention to the next in one persistent launch
        (``gemv_chain``: wo, w_in with the residual add + RMSNorm, w_out with silu·up, then the next layer's wqkv
        or the LM head), over fixed buffers: a Llama layer is four launches (was seven)."""
        c = self._chain
        torch.index_select(self.embed, 0, token.view(-1), out=c.ra.view(1, -1))
        if c.attn:  # the chains read the position from their fixed buffer
            c.pos.copy_(input_pos.view(-1))
        c.head()
        for block, chain in zip(self.blocks, c.chains):
            if not c.attn:
                block.attend_qkv(c.qkv.view(1, -1), self.cos, self.sin, input_pos, out=c.att.view(1, -1))
            chain()
        if c.head_in_chain:
            return c.logits.view(1, -1).float()
        from localgpt.generation.fast.quantize import prologue_gemv

        logits, _ = prologue_gemv(self.lm_head, c.rb.view(1, -1), "rms", c.d.view(1, -1), self.norm)
        return logits.view(1, -1).float()

    # --- slots (continuous batching): see batch.BatchEngine ---------------------------------------------------

    def setup_slots(self, slots: int, max_seq: int, kernels: str | None = None) -> None:
        """A KV cache of ``max_seq`` positions for each of ``slots`` streams (plus one scratch position).
        ``kernels``: how a decode step runs, "fused" (the Triton kernels of ``slot_triton``; the CUDA default)
        or "eager" (plain PyTorch: the CPU path and the reference)."""
        self.slots, self.slot_seq = slots, max_seq
        if kernels is None:
            kernels = "fused" if self.device.type == "cuda" and _has_triton() else "eager"
        self.slot_kernels = kernels
        for block in self.blocks:
            block.setup_slots(slots, max_seq, self.dtype, self.device)
        positions = torch.arange(max_seq + 1, device=self.device)[None]
        cos, sin = self.rope(torch.empty(0, dtype=self.dtype, device=self.device), positions)
        self.slot_cos, self.slot_sin = cos[0].to(self.dtype), sin[0].to(self.dtype)  # [max_seq + 1, head_dim]

    def step_slots(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [B, vocab]: slot i's token ``tokens[i]`` at ``positions[i]`` (B = len(tokens) first slots)."""
        b = tokens.shape[0]
        x = F.embedding(tokens[:, None], self.embed)  # [B, 1, dim]
        if self.slot_kernels == "fused":
            if self._sequential_rms():
                return self._step_slots_llama(x, positions)
            for block in self.blocks:
                x = block.forward_slots_fused(x, self.slot_cos, self.slot_sin, positions)
            return self.lm_head(self.norm(x))[:, -1].float()
        cos, sin = self.slot_cos[positions][:, None, None], self.slot_sin[positions][:, None, None]
        length = self.blocks[0].k_slots.shape[2]
        visible = (torch.arange(length, device=tokens.device)[None, :] <= positions[:, None])
        visible = visible.view(b, 1, 1, -1)
        for block in self.blocks:
            x = block.forward_with(x, lambda h, blk=block: blk.attention_slots(h, cos, sin, positions, visible))
        return self.lm_head(self.norm(x))[:, -1].float()

    def _sequential_rms(self) -> bool:
        s = self.shape
        return (s.norm == "rms" and not s.parallel and s.mlp == "swiglu" and isinstance(self.norm, RMSNorm)
                and all(isinstance(b.norm1, RMSNorm) and isinstance(b.norm2, RMSNorm) for b in self.blocks))

    def _step_slots_llama(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The fused decode step of a Llama-style network (RMSNorm, sequential blocks, SwiGLU): each residual add
        runs in one kernel with the norm after it (``slot_triton.add_rms_norm``), the MLP's add with the next
        block's first norm; otherwise the arithmetic of ``Block.forward_slots_fused``, one launch fewer for each
        add (64 for Llama-2-7B)."""
        from localgpt.generation.fast import slot_triton

        pending = None
        for block in self.blocks:
            n1, n2 = block.norm1, block.norm2
            if pending is None:
                h = slot_triton.rms_norm(x, n1.weight, n1.eps)
            else:
                x, h = slot_triton.add_rms_norm(x, pending, n1.weight, n1.eps)
            x, h = slot_triton.add_rms_norm(x, block.attention_slots_fused(h, self.slot_cos, self.slot_sin, positions),
                                            n2.weight, n2.eps)
            pending = block.w_out(slot_triton.silu_mul(block.w_in(h)))
        _, h = slot_triton.add_rms_norm(x, pending, self.norm.weight, self.norm.eps)
        return self.lm_head(h)[:, -1].float()

    def prefill_slot(self, slot: int, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Logits [1, vocab] after a chunk ``ids`` [1, t] of slot ``slot``'s prompt, at positions start.."""
        return self.prefill_slots([(slot, ids[0], start)])

    def prefill_slots(self, parts: list[tuple[int, torch.Tensor, int]]) -> torch.Tensor:
        """Logits [n, vocab] after each of n prompt chunks (slot, ids [t], start), run as one pass (``attention_chunks``)."""
        ids = torch.cat([p[1] for p in parts])[None]
        cos = torch.cat([self.slot_cos[start:start + len(chunk)] for _, chunk, start in parts])
        sin = torch.cat([self.slot_sin[start:start + len(chunk)] for _, chunk, start in parts])
        spans = [(slot, start, len(chunk)) for slot, chunk, start in parts]
        fused = self.slot_kernels == "fused"
        x = F.embedding(ids, self.embed)
        for block in self.blocks:
            x = block.forward_with(x, lambda h, blk=block: blk.attention_chunks(h, spans, cos, sin), fused=fused)
        ends = [sum(t for *_, t in spans[:i + 1]) for i in range(len(spans))]
        # slices, not an index tensor: copying one from the host would wait for the GPU work queued before it
        last = x[:, ends[0] - 1:ends[0]] if len(ends) == 1 else torch.cat([x[:, e - 1:e] for e in ends], dim=1)
        return self.lm_head(self.norm(last))[0].float()


    def prefill_fixed(self, ids: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        """Logits [1, vocab] after one slot's prompt chunk, at a fixed row count P = len(ids): meta = [slot,
        start, t] (device), ids [P] of which the first t are the chunk's tokens at positions start.. (the rest
        padding, any id). Every shape is P's and every index is read on the device: ``batch.BatchEngine``
        captures it once per P as a CUDA graph. A valid row's arithmetic depends on P, its own slot's cache,
        start and t only, so a request padded the same way computes the same alone and under load."""
        p = ids.shape[0]
        rows = torch.arange(p, device=ids.device)
        positions = torch.where(rows < meta[2], meta[1] + rows, self.slot_seq)
        fused = self.slot_kernels == "fused"
        x = F.embedding(ids[None], self.embed)
        for block in self.blocks:
            x = block.forward_with(x, lambda h, blk=block: blk.attention_fixed(h, self.slot_cos, self.slot_sin,
                                                                                positions, meta, fused), fused=fused)
        last = x[0].index_select(0, meta[2:3] - 1)  # the last valid row [1, dim]
        return self.lm_head(self.norm(last[None]))[0].float()


def chain_ready(net: nn.Module, enabled: bool = True) -> bool:
    """Whether ``net`` (a Transformer or a Mamba) has its gemv_chain launches: built by ``net._build_chain()`` (its
    buffers and chains, or None with ``net.chain_note`` saying why) once, at the first call outside a CUDA graph
    capture (the engine's warm-up) on CUDA while ``enabled``; a kernel that does not build or fit leaves the step as
    it was."""
    if net._chain is None:
        if not enabled or net.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
            return False
        try:
            net._chain = net._build_chain() or False
        except Exception as exc:  # noqa: BLE001 - a kernel that does not build or fit: the step as before
            net.chain_note = f"{type(exc).__name__}: {exc}"
            net._chain = False
        if not net._chain:
            import logging

            logging.getLogger(__name__).info("gemv_chain not used (%s): %s", type(net).__name__, net.chain_note)
    return bool(net._chain)


def chain_kernels(net: nn.Module, tries: list, first, rest, check) -> bool:
    """Build a network's chains with the first (bulk-copy, fp16 operands) choice of ``tries`` that builds and
    passes ``check()`` ("" or what differs, into ``net.chain_note``): ``first(tma, f16)`` builds one chain and
    returns it (a choice whose kernel is one tried before is skipped: no bulk-copy kernel here, say), ``rest(tma,
    f16)`` the others. A choice that fails to build is logged and the next tried; the last one's error is raised.
    Sets ``net.chain_kernel`` and returns True, or False."""
    tried = set()
    for n, (tma, f16) in enumerate(tries):
        last = n == len(tries) - 1
        chain = None
        try:
            chain = first(tma, f16)
            if (chain.tma, chain.f16) in tried:  # what the try before built
                continue
            tried.add((chain.tma, chain.f16))
            rest(tma, f16)
            net.chain_note = check()
        except Exception as exc:  # noqa: BLE001 - the bulk-copy (or fp16) kernel failing to build: the next
            if last:
                raise
            net.chain_note = f"{type(exc).__name__}: {exc}"
        if not net.chain_note:
            net.chain_kernel = ("bulk-copy" if chain.tma else "ring") + (", fp16" if chain.f16 else "")
            return True
        if last:
            break
        import logging

        logging.getLogger(__name__).warning("gemv_chain kernel (bulk-copy %s, fp16 %s) not used: %s",
                                            getattr(chain, "tma", tma), getattr(chain, "f16", f16), net.chain_note)
    return False


def _chain_mismatch(want: list) -> str:
    """"" if every (name, got, reference) agrees within bf16 rounding (relative error 1e-2, finite), else which
    one does not: a chain's check at build against the separate kernels."""
    for name, got, ref in want:
        ref, got = ref.float().reshape(-1), got.float().reshape(-1)
        rel = float((got - ref).norm() / ref.norm().clamp(min=1e-12))
        if not bool(torch.isfinite(got.float()).all()) or rel > 1e-2:
            return f"the check failed at {name} (relative error {rel:.2e})"
    return ""


def _in_width(layer: nn.Module) -> int:
    """A linear layer's input width: its words' (an int4 layer padded to whole blocks: wider than its input)."""
    width = getattr(layer, "in_features", None)
    return int(width) if width else int(layer.weight.shape[1])


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# --- building from a transformers model ------------------------------------------------------------


def _linear(module: nn.Module) -> nn.Module:
    if type(module).__name__ in ("Linear", "FalconLinear") and module.weight.dtype.is_floating_point:
        return Linear(module.weight.data, None if module.bias is None else module.bias.data)
    return module  # a bitsandbytes (or other) layer: used as it is


def _fuse(modules: list[nn.Module]) -> nn.Module:
    parts = [_linear(m) for m in modules]
    if all(isinstance(p, Linear) for p in parts):
        biases = [p.bias for p in parts]
        bias = None if all(b is None for b in biases) else torch.cat([
            b.data if b is not None else torch.zeros(p.weight.shape[0], dtype=p.weight.dtype, device=p.weight.device)
            for p, b in zip(parts, biases)])
        return Linear(torch.cat([p.weight.data for p in parts]), bias)
    return Fused(parts)


def _reorder_rows(layer: nn.Module, order: torch.Tensor) -> nn.Module:
    if not isinstance(layer, Linear):
        raise ConfigError("this Falcon layout needs its fused query_key_value weights reordered, "
                          "which is not possible for a quantized checkpoint; load it in bf16")
    return Linear(layer.weight.data[order], None if layer.bias is None else layer.bias.data[order])


def from_llama(hf: nn.Module) -> Transformer:
    cfg, body = hf.config, hf.model
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    shape = TransformerShape(cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
                             cfg.num_key_value_heads or cfg.num_attention_heads, head_dim, cfg.vocab_size, "rms",
                             cfg.rms_norm_eps, parallel=False, two_norms=False, mlp="swiglu")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ConfigError(f"the fast engine supports Llama models with silu, not {cfg.hidden_act!r}")
    blocks = []
    for layer in body.layers:
        a, m = layer.self_attn, layer.mlp
        blocks.append(Block(shape, wqkv=_fuse([a.q_proj, a.k_proj, a.v_proj]), wo=_linear(a.o_proj),
                            w_in=_fuse([m.gate_proj, m.up_proj]), w_out=_linear(m.down_proj),
                            norm1=RMSNorm(layer.input_layernorm.weight.data, shape.norm_eps),
                            norm2=RMSNorm(layer.post_attention_layernorm.weight.data, shape.norm_eps)))
    return Transformer(shape, body.embed_tokens.weight.data, blocks, RMSNorm(body.norm.weight.data, shape.norm_eps),
                       _linear(hf.lm_head), body.rotary_emb)


def from_falcon(hf: nn.Module) -> Transformer:
    cfg, body = hf.config, hf.transformer
    if cfg.alibi:
        raise ConfigError("the fast engine supports rotary Falcon models (7B, 40B, 180B), not ALiBi ones")
    n_heads = cfg.num_attention_heads
    head_dim = cfg.hidden_size // n_heads
    if cfg.new_decoder_architecture:
        n_kv, layout = cfg.num_kv_heads, "grouped"
    elif cfg.multi_query:
        n_kv, layout = 1, "contiguous"
    else:
        n_kv, layout = n_heads, "per-head"
    two_norms = bool(cfg.new_decoder_architecture and cfg.parallel_attn and (cfg.num_ln_in_parallel_attn or 2) == 2)
    shape = TransformerShape(cfg.num_hidden_layers, cfg.hidden_size, n_heads, n_kv, head_dim, cfg.vocab_size, "layer",
                             cfg.layer_norm_epsilon, parallel=bool(cfg.parallel_attn or cfg.new_decoder_architecture),
                             two_norms=two_norms, mlp="gelu")
    if getattr(cfg, "activation", "gelu") != "gelu":
        raise ConfigError(f"the fast engine supports Falcon models with gelu, not {cfg.activation!r}")

    # Our blocks expect query_key_value rows as [all q heads | all k heads | all v heads].
    order = None
    if layout != "contiguous":
        rows = torch.arange(head_dim)
        if layout == "grouped":  # per kv group: rep query heads, then its k, then its v
            rep = n_heads // n_kv
            slot = lambda g, j: (g * (rep + 2) + j) * head_dim + rows  # noqa: E731
            q = [slot(g, j) for g in range(n_kv) for j in range(rep)]
            k = [slot(g, rep) for g in range(n_kv)]
            v = [slot(g, rep + 1) for g in range(n_kv)]
        else:  # per head: q, k, v
            slot = lambda h, j: (h * 3 + j) * head_dim + rows  # noqa: E731
            q, k, v = ([slot(h, j) for h in range(n_heads)] for j in range(3))
        order = torch.cat(q + k + v)

    blocks = []
    for layer in body.h:
        a, m = layer.self_attention, layer.mlp
        wqkv = _linear(a.query_key_value)
        if order is not None:
            wqkv = _reorder_rows(wqkv, order.to(a.query_key_value.weight.device))
        if shape.parallel:
            norm1 = _layer_norm(layer.ln_attn if two_norms else layer.input_layernorm)
            norm2 = _layer_norm(layer.ln_mlp) if two_norms else None
        else:
            norm1, norm2 = _layer_norm(layer.input_layernorm), _layer_norm(layer.post_attention_layernorm)
        blocks.append(Block(shape, wqkv=wqkv, wo=_linear(a.dense), w_in=_linear(m.dense_h_to_4h),
                            w_out=_linear(m.dense_4h_to_h), norm1=norm1, norm2=norm2))
    return Transformer(shape, body.word_embeddings.weight.data, blocks, _layer_norm(body.ln_f), _linear(hf.lm_head),
                       body.rotary_emb)
