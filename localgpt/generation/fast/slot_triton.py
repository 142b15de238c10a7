"""Fused kernels of the batched decode step (``transformer.Transformer.step_slots`` on CUDA).

One decode step of B slots runs, per layer, four matrix products and a handful of small operations on [B, dim]
tensors; in eager PyTorch each small operation is its own kernel (RMSNorm alone is seven), and inside a CUDA graph
each still costs a few microseconds. These fuse them: ``rms_norm`` (one kernel), ``rope_store`` (rotary
embedding of q and k, and k / v written into each slot's cache at its own position), ``decode_attention``
(flash-decoding: each slot reads its cache only up to its own position, in splits that meet in a second small
kernel) and ``silu_mul``. Imported on CUDA only (or under ``TRITON_INTERPRET=1`` in tests); never allocates
inside a captured step except its outputs, which the CUDA graph's pool owns.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# decode_attention's shape: cache positions one program reads (the splits meet in _attention_combine_kernel),
# positions a loop iteration loads, warps a program, and whether a program takes a kv head's query heads together
# through tensor-core dots (the Triton interpreter runs those in fp32: its bf16 dot is wrong). bench/gpu.py
# --concurrency --profile sweeps them; (64, 64, 4, dot) was the best on an H200 at Llama-2-7B's heads (x16 51.9 us
# a layer at 384 positions against 65.6 for (128, 64, 4, no dot), x1 11.4 against 14.8; bench/RESULTS.md round 6).
ATTENTION = {"split": 64, "block_n": 64, "warps": 4, "dot": True}


@triton.jit
def _gdc_enter(GDC: tl.constexpr):
    # A programmatic dependent launch (launch_pdl, ``gdc``): wait for the kernels before this one in the stream
    # (their writes seen), then let the next one be scheduled where this one leaves room
    if GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


# The one-token step's other kernels (the norms, gelu, silu·up and the bf16 GEMV, ``step_gdc``) as dependent launches
# too: each asks for its constants (weights, norm weights) before it waits, and the graph's launch gaps close.
# LOCALGPT_STEP_PDL=0: plain launches. Mamba's fused bf16 step (no chains) only with LOCALGPT_MAMBA_STEP_PDL=1
# (STEP_PDL_MAMBA, opt-in, not yet measured): its norms, conv and SSM kernels and its bf16 GEMVs all dependent
# launches (with the GEMVs alone dependent and the rest plain, FalconMamba-7B lost 228-229 -> 225-226 tok/s).
STEP_PDL = os.environ.get("LOCALGPT_STEP_PDL", "1") != "0"
STEP_PDL_MAMBA = os.environ.get("LOCALGPT_MAMBA_STEP_PDL", "0") != "0"


def step_gdc(device: torch.device, mamba: bool = False) -> bool:
    """Whether the step's norm, activation and bf16 GEMV kernels launch as programmatic dependent launches
    (``mamba``: in a Mamba network's fused step)."""
    return STEP_PDL and (STEP_PDL_MAMBA or not mamba) and gdc(device)


def gdc(device: torch.device) -> bool:
    """Whether this step's attention kernels launch as programmatic dependent launches (PDL; sm_90+, not under the
    Triton interpreter): each may start while the kernel before it ends, as ``gemv_chain``'s launch does."""
    from localgpt.generation.fast import gemv_chain  # its PDL switch is the step's (LOCALGPT_GEMV_CHAIN_PDL)

    if not gemv_chain.PDL or os.environ.get("TRITON_INTERPRET") == "1" or device.type != "cuda":
        return False
    return _hopper(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def _hopper(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, D, eps, BLOCK: tl.constexpr, GDC: tl.constexpr = False):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    live = cols < D
    w = tl.load(w_ptr + cols, mask=live, other=0.0).to(tl.float32)  # before the reduction: one trip to memory
    _gdc_enter(GDC)  # the weight asked for before the wait
    x = tl.load(x_ptr + row * D + cols, mask=live, other=0.0).to(tl.float32)
    h = x * tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    # As LlamaRMSNorm: statistics in fp32, cast back to the activations' dtype, then scaled by the weight.
    h = h.to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * D + cols, (w * h).to(out_ptr.dtype.element_ty), mask=live)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    d = x.shape[-1]
    flat = x.reshape(-1, d).contiguous()
    out = torch.empty_like(flat)
    pdl = step_gdc(x.device)
    _rms_norm_kernel[(flat.shape[0],)](flat, weight, out, d, eps, BLOCK=triton.next_power_of_2(d), GDC=pdl,
                                       num_warps=4, launch_pdl=pdl)
    return out.view(x.shape)


@triton.jit
def _add_rms_norm_kernel(x_ptr, y_ptr, w_ptr, sum_ptr, out_ptr, D, eps, BLOCK: tl.constexpr,
                         GDC: tl.constexpr = False):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    live = cols < D
    w = tl.load(w_ptr + cols, mask=live, other=0.0).to(tl.float32)  # before the reduction: one trip to memory
    _gdc_enter(GDC)
    x = tl.load(x_ptr + row * D + cols, mask=live, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row * D + cols, mask=live, other=0.0).to(tl.float32)
    total = (x + y).to(sum_ptr.dtype.element_ty)  # rounded as the eager residual add is
    tl.store(sum_ptr + row * D + cols, total, mask=live)
    h = total.to(tl.float32)
    h = h * tl.rsqrt(tl.sum(h * h, axis=0) / D + eps)
    h = h.to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * D + cols, (w * h).to(out_ptr.dtype.element_ty), mask=live)


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float):
    """(x + y, rms_norm(x + y)) in one kernel: the residual add and the norm after it, the same arithmetic as
    the two apart (the sum rounded to the activations' dtype before the norm reads it)."""
    d = x.shape[-1]
    xf, yf = x.reshape(-1, d).contiguous(), y.reshape(-1, d).contiguous()
    total, out = torch.empty_like(xf), torch.empty_like(xf)
    pdl = step_gdc(x.device)
    _add_rms_norm_kernel[(xf.shape[0],)](xf, yf, weight, total, out, d, eps, BLOCK=triton.next_power_of_2(d),
                                         GDC=pdl, num_warps=4, launch_pdl=pdl)
    return total.view(x.shape), out.view(x.shape)


@triton.jit
def _add3_layer_norm_kernel(x_ptr, a_ptr, m_ptr, sum_ptr, w_ptr, b_ptr, out_ptr, D, OUT_D, eps, ADD: tl.constexpr,
                            BLOCK: tl.constexpr, GDC: tl.constexpr = False):
    # A parallel block's residual (x + (m + a), rounded as the eager step rounds each add) and the next LayerNorm of
    # it, written OUT_D wide (zeros past D: the input of int4 layers padded to whole blocks)
    cols = tl.arange(0, BLOCK)
    live = cols < D
    w = tl.load(w_ptr + cols, mask=live, other=0.0).to(tl.float32)  # before the reductions: one trip to memory
    b = tl.load(b_ptr + cols, mask=live, other=0.0).to(tl.float32)
    _gdc_enter(GDC)
    x = tl.load(x_ptr + cols, mask=live, other=0.0).to(tl.float32)
    if ADD:
        a = tl.load(a_ptr + cols, mask=live, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + cols, mask=live, other=0.0).to(tl.float32)
        branch = (m + a).to(sum_ptr.dtype.element_ty).to(tl.float32)
        x = (x + branch).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + cols, x, mask=live)
        x = x.to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    dev = tl.where(live, x - mean, 0.0)
    h = dev * tl.rsqrt(tl.sum(dev * dev, axis=0) / D + eps)
    tl.store(out_ptr + cols, tl.where(live, h * w + b, 0.0).to(out_ptr.dtype.element_ty), mask=cols < OUT_D)


def add3_layer_norm(x: torch.Tensor, a: torch.Tensor | None, m: torch.Tensor | None, norm: torch.nn.LayerNorm,
                    out_width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + (m + a), LayerNorm of it) for one token (x, a, m [1, D]; without a / m: x and its LayerNorm), the norm
    written ``out_width`` wide with zeros past D (default D)."""
    d = x.shape[-1]
    width = out_width or d
    out = torch.empty(1, width, dtype=x.dtype, device=x.device)
    total = torch.empty_like(x) if a is not None else x
    pdl = step_gdc(x.device)
    _add3_layer_norm_kernel[(1,)](x, a if a is not None else x, m if m is not None else x, total, norm.weight,
                                  norm.bias, out, d, width, norm.eps, ADD=a is not None,
                                  BLOCK=triton.next_power_of_2(width), GDC=pdl, num_warps=8, launch_pdl=pdl)
    return total, out


@triton.jit
def _gelu_kernel(x_ptr, out_ptr, N, BLOCK: tl.constexpr, GDC: tl.constexpr = False):
    _gdc_enter(GDC)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = i < N
    x = tl.load(x_ptr + i, mask=live, other=0.0).to(tl.float32)
    tl.store(out_ptr + i, (0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))).to(out_ptr.dtype.element_ty),
             mask=live)


def gelu(x: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """F.gelu (exact, erf) of a contiguous tensor, one kernel."""
    out = torch.empty_like(x)
    pdl = step_gdc(x.device)
    _gelu_kernel[(triton.cdiv(x.numel(), block),)](x, out, x.numel(), BLOCK=block, GDC=pdl, num_warps=4,
                                                   launch_pdl=pdl)
    return out


@triton.jit
def _silu_mul_kernel(h_ptr, out_ptr, INNER, BLOCK: tl.constexpr, GDC: tl.constexpr = False):
    _gdc_enter(GDC)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = cols < INNER
    gate = tl.load(h_ptr + row * 2 * INNER + cols, mask=live, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + row * 2 * INNER + INNER + cols, mask=live, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)  # silu rounded, as eager
    tl.store(out_ptr + row * INNER + cols, (act * up).to(out_ptr.dtype.element_ty), mask=live)


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of h = [gate | up] along the last axis (SwiGLU)."""
    inner = h.shape[-1] // 2
    flat = h.reshape(-1, 2 * inner).contiguous()
    out = torch.empty(flat.shape[0], inner, dtype=h.dtype, device=h.device)
    block = 1024
    pdl = step_gdc(h.device)
    _silu_mul_kernel[(flat.shape[0], triton.cdiv(inner, block))](flat, out, inner, BLOCK=block, GDC=pdl,
                                                                 num_warps=4, launch_pdl=pdl)
    return out.view(*h.shape[:-1], inner)


@triton.jit
def _rotated(row_ptr, cos, sin, d, partner, sign, mask):
    # a head's row (pointer at its first dim, per row of a block) rotated by the position's cos / sin: fp32
    x = tl.load(row_ptr + d, mask=mask, other=0.0).to(tl.float32)
    other = tl.load(row_ptr + partner, mask=mask, other=0.0).to(tl.float32)
    return x * cos + sign * other * sin


@triton.jit
def _rope_store_head(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, r, slot, pos, j, H, KV, L,
                     HD: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr):
    # Head j of qkv row r [q heads | k heads | v heads] at position pos: q and k rotated, q to q_ptr [rows, H, HD],
    # k and v to the slot caches [slots, KV, L, HD] of ``slot`` at ``pos``.
    d = tl.arange(0, BLOCK)
    live = d < HD
    row = qkv_ptr + r * (H + 2 * KV) * HD + j * HD
    if j < H + KV:
        partner = tl.where(d < HALF, d + HALF, d - HALF)
        sign = tl.where(d < HALF, -1.0, 1.0)
        cos = tl.load(cos_ptr + pos * HD + d, mask=live, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + pos * HD + d, mask=live, other=0.0).to(tl.float32)
        x = _rotated(row, cos, sin, d, partner, sign, live)
        if j < H:
            tl.store(q_ptr + (r * H + j) * HD + d, x.to(q_ptr.dtype.element_ty), mask=live)
        else:
            tl.store(k_ptr + ((slot * KV + j - H) * L + pos) * HD + d, x.to(k_ptr.dtype.element_ty), mask=live)
    else:
        x = tl.load(row + d, mask=live, other=0.0).to(tl.float32)
        tl.store(v_ptr + ((slot * KV + j - H - KV) * L + pos) * HD + d, x.to(v_ptr.dtype.element_ty), mask=live)


@triton.jit
def _rope_store_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_ptr, v_ptr, H, KV, L,
                       HD: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr, GDC: tl.constexpr = False):
    _gdc_enter(GDC)
    # Program (b, j): head j of slot b's qkv row, at the slot's position.
    b = tl.program_id(0)
    _rope_store_head(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, b, b, tl.load(pos_ptr + b), tl.program_id(1),
                     H, KV, L, HD, HALF, BLOCK)


def rope_store(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
               k_slots: torch.Tensor, v_slots: torch.Tensor, n_heads: int) -> torch.Tensor:
    """qkv [B, (H + 2 KV) * hd] of B slots' tokens at ``positions`` [B]; cos / sin [positions, hd] tables.
    Writes rotated k and v into slot b's caches at positions[b]; returns rotated q [B, H, hd]."""
    b = qkv.shape[0]
    kv, length, hd = k_slots.shape[1], k_slots.shape[2], k_slots.shape[3]
    qkv = qkv.reshape(b, -1).contiguous()
    q = torch.empty(b, n_heads, hd, dtype=qkv.dtype, device=qkv.device)
    pdl = gdc(qkv.device)
    _rope_store_kernel[(b, n_heads + 2 * kv)](qkv, cos, sin, positions, q, k_slots, v_slots, n_heads, kv, length,
                                              HD=hd, HALF=hd // 2, BLOCK=triton.next_power_of_2(hd), GDC=pdl,
                                              num_warps=1, launch_pdl=pdl)
    return q


@triton.jit
def _attention_split_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, acc_ptr, ml_ptr, H, KV, L, SCRATCH, scale,
                            REP: tl.constexpr, HD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                            SPLIT: tl.constexpr, GDC: tl.constexpr = False):
    _gdc_enter(GDC)
    # Program (b, h, s): query head h of slot b over cache positions [s * SPLIT, (s + 1) * SPLIT) that it may see
    # (0..pos; a slot at the scratch position, idle, sees only that one). Partial softmax sums go to the workspace.
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    pos = tl.load(pos_ptr + b)
    first = tl.where(pos == SCRATCH, pos, 0)
    lo = tl.maximum(s * SPLIT, first)
    hi = tl.minimum((s + 1) * SPLIT, pos + 1)
    d = tl.arange(0, BLOCK_D)
    dlive = d < HD
    q = tl.load(q_ptr + (b * H + h) * HD + d, mask=dlive, other=0.0).to(tl.float32) * scale
    base = (b * KV + h // REP) * L * HD
    m = tl.full((), float("-inf"), tl.float32)
    l = tl.zeros((), tl.float32)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for i in range(0, SPLIT, BLOCK_N):  # masked loads past the slot's position read no memory
        n = s * SPLIT + i + tl.arange(0, BLOCK_N)
        nlive = (n >= lo) & (n < hi)
        offs = base + n[:, None] * HD + d[None, :]
        both = nlive[:, None] & dlive[None, :]
        k = tl.load(k_ptr + offs, mask=both, other=0.0).to(tl.float32)
        scores = tl.where(nlive, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: keep exp() away from -inf - -inf
        alpha = tl.exp(m - m_safe)
        p = tl.exp(scores - m_safe)
        v = tl.load(v_ptr + offs, mask=both, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l = l * alpha + tl.sum(p, axis=0)
        m = m_new
    nsplit = tl.num_programs(2)
    slot = (b * H + h) * nsplit + s
    tl.store(acc_ptr + slot * HD + d, acc, mask=dlive)
    tl.store(ml_ptr + slot * 2, m)
    tl.store(ml_ptr + slot * 2 + 1, l)


@triton.jit
def _attention_split_dot_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, acc_ptr, ml_ptr, H, KV, L, SCRATCH, scale,
                                REP: tl.constexpr, REP_P: tl.constexpr, HD: tl.constexpr, BLOCK_D: tl.constexpr,
                                BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, FP32_DOT: tl.constexpr,
                                GDC: tl.constexpr = False):
    _gdc_enter(GDC)
    # As _attention_split_kernel, but a program (b, g, s) takes the REP query heads of kv head g together (rows of
    # a tensor-core tile, padded to REP_P >= 16), so each kv position is read once for all of them.
    b = tl.program_id(0)
    g = tl.program_id(1)
    s = tl.program_id(2)
    pos = tl.load(pos_ptr + b)
    first = tl.where(pos == SCRATCH, pos, 0)
    lo = tl.maximum(s * SPLIT, first)
    hi = tl.minimum((s + 1) * SPLIT, pos + 1)
    r = tl.arange(0, REP_P)
    rlive = r < REP
    d = tl.arange(0, BLOCK_D)
    dlive = d < HD
    heads = g * REP + r
    q = tl.load(q_ptr + (b * H + heads)[:, None] * HD + d[None, :], mask=rlive[:, None] & dlive[None, :], other=0.0)
    q = q.to(tl.float32) if FP32_DOT else q
    base = (b * KV + g) * L * HD
    m = tl.full((REP_P,), float("-inf"), tl.float32)
    l = tl.zeros((REP_P,), tl.float32)
    acc = tl.zeros((REP_P, BLOCK_D), tl.float32)
    for i in range(0, SPLIT, BLOCK_N):
        n = s * SPLIT + i + tl.arange(0, BLOCK_N)
        nlive = (n >= lo) & (n < hi)
        offs = base + n[:, None] * HD + d[None, :]
        both = nlive[:, None] & dlive[None, :]
        k = tl.load(k_ptr + offs, mask=both, other=0.0)
        k = k.to(tl.float32) if FP32_DOT else k
        scores = tl.dot(q, tl.trans(k)) * scale  # [REP_P, BLOCK_N]
        scores = tl.where(nlive[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(scores - m_safe[:, None])
        v = tl.load(v_ptr + offs, mask=both, other=0.0)
        pv = p if FP32_DOT else p.to(v.dtype)
        v = v.to(tl.float32) if FP32_DOT else v
        acc = acc * alpha[:, None] + tl.dot(pv, v)
        l = l * alpha + tl.sum(p, axis=1)
        m = m_new
    nsplit = tl.num_programs(2)
    slot = (b * H + heads) * nsplit + s
    tl.store(acc_ptr + slot[:, None] * HD + d[None, :], acc, mask=rlive[:, None] & dlive[None, :])
    tl.store(ml_ptr + slot * 2, m, mask=rlive)
    tl.store(ml_ptr + slot * 2 + 1, l, mask=rlive)


@triton.jit
def _attention_combine_kernel(acc_ptr, ml_ptr, out_ptr, NSPLIT: tl.constexpr, HD: tl.constexpr, BLOCK_D: tl.constexpr,
                              GDC: tl.constexpr = False):
    _gdc_enter(GDC)
    row = tl.program_id(0)  # b * H + h
    d = tl.arange(0, BLOCK_D)
    dlive = d < HD
    m = tl.full((), float("-inf"), tl.float32)
    for s in tl.static_range(NSPLIT):
        m = tl.maximum(m, tl.load(ml_ptr + (row * NSPLIT + s) * 2))
    total = tl.zeros((BLOCK_D,), tl.float32)
    l = tl.zeros((), tl.float32)
    for s in tl.static_range(NSPLIT):
        ms = tl.load(ml_ptr + (row * NSPLIT + s) * 2)
        w = tl.where(ms == float("-inf"), 0.0, tl.exp(ms - m))  # a split past the slot's position saw nothing
        l += w * tl.load(ml_ptr + (row * NSPLIT + s) * 2 + 1)
        total += w * tl.load(acc_ptr + (row * NSPLIT + s) * HD + d, mask=dlive, other=0.0)
    tl.store(out_ptr + row * HD + d, (total / l).to(out_ptr.dtype.element_ty), mask=dlive)


def decode_attention(q: torch.Tensor, k_slots: torch.Tensor, v_slots: torch.Tensor, positions: torch.Tensor,
                     scratch: int, config: tuple | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """One query a slot: q [B, H, hd] against slot b's cache positions 0..positions[b] (a slot at ``scratch``,
    idle, against that position alone). k_slots / v_slots [slots >= B, KV, L, hd]. Returns [B, H * hd] (in
    ``out`` when given: contiguous, the query's dtype)."""
    b, n_heads, hd = q.shape
    q = q.contiguous()
    kv, length = k_slots.shape[1], k_slots.shape[2]
    split, block_n, warps, dot = config or (ATTENTION["split"], ATTENTION["block_n"], ATTENTION["warps"],
                                            ATTENTION["dot"])
    nsplit = triton.cdiv(length, split)
    acc = torch.empty(b * n_heads * nsplit, hd, dtype=torch.float32, device=q.device)
    ml = torch.empty(b * n_heads * nsplit, 2, dtype=torch.float32, device=q.device)
    block_d = triton.next_power_of_2(hd)
    rep = n_heads // kv
    pdl = gdc(q.device)
    if dot:
        _attention_split_dot_kernel[(b, kv, nsplit)](
            q, k_slots, v_slots, positions, acc, ml, n_heads, kv, length, scratch, hd ** -0.5, REP=rep,
            REP_P=max(16, triton.next_power_of_2(rep)), HD=hd, BLOCK_D=max(16, block_d), BLOCK_N=min(block_n, split),
            SPLIT=split, FP32_DOT=os.environ.get("TRITON_INTERPRET") == "1", GDC=pdl, num_warps=warps,
            launch_pdl=pdl)
    else:
        _attention_split_kernel[(b, n_heads, nsplit)](
            q, k_slots, v_slots, positions, acc, ml, n_heads, kv, length, scratch, hd ** -0.5, REP=rep, HD=hd,
            BLOCK_D=block_d, BLOCK_N=min(block_n, split), SPLIT=split, GDC=pdl, num_warps=warps, launch_pdl=pdl)
    if out is None:
        out = torch.empty(b, n_heads * hd, dtype=q.dtype, device=q.device)
    _attention_combine_kernel[(b * n_heads,)](acc, ml, out, NSPLIT=nsplit, HD=hd, BLOCK_D=block_d, GDC=pdl,
                                              num_warps=1, launch_pdl=pdl)
    return out


# --- a decode step's attention in one kernel whose grid does not grow with the cache (``step_attention``) -------
# The batch-1 step's (``Block.attend_qkv``: with its rotary and cache write) and, with SLOT_STEP, the slots'.
# A program takes ROWS query heads (one, or with DOT a kv head's group through tensor-core dots) and every SPLITS-th
# tile of BLOCK_N positions of 0..pos: the grid is the same at every position and a long cache costs nothing until
# it is used (decode_attention's grid grows with the cache: 64 splits a head at 4,096 positions, most of them
# empty). With ROPE the query, k and v of the step come straight from the qkv row: q and k rotated and rounded to
# bf16 as ``rope_store`` does, k and v written into the cache at pos by the program whose tiles hold pos, after its
# loads (no other program reads that position; that program takes the new row from registers), so rope_store's
# launch and its q round trip are gone. The programs' parts meet in _attention_combine_kernel.
# bench/attention_step.py sweeps (splits, block_n, warps, dot, stages).
# Measured on an H200 (bench/RESULTS.md, round 13; µs a layer, 32 layers a graph): Llama-2-7B's heads at position
# 512 of a 4,096-position cache 9.2 against 19.2 for rope_store + decode_attention, at 4,000 23.7 against 26.2;
# Falcon-7B's (71 heads, one kv head) 6.1-6.2 against 6.8-9.3. One kv head a query head and a short cache is the
# exception: at 704 positions decode_attention's 11 single-tile programs a head were 0.7 us faster (8.5 against
# 9.2), so ``use_step_attention`` keeps it for caches up to STEP_ATTENTION_MIN_CACHE positions there.
STEP_ATTENTION = {"splits": 16, "block_n": 64, "warps": 4, "dot": True, "stages": 1}
STEP_ATTENTION_MIN_CACHE = 1024
# step_attention's shape for the batch-1 step with its parts merged in the kernel (transformer.STEP_MERGE). H200,
# Llama-2-7B int4 after 512 tokens (640-position caches), engine tok/s in one call: (8, 32, 4) 590.8, (8, 64, 4)
# 578.3, (16, 32, 2) 568.8, (16, 64, 4) 558.4 (STEP_ATTENTION's); alone, 32 layers a graph (bench/attention_step.py
# --merge): 7.48 µs a layer against 9.83 for rope_store + decode_attention.
STEP_MERGE_ATTENTION = {"splits": 8, "block_n": 32, "warps": 4, "dot": True, "stages": 1}


# The slots' (continuous batching) decode step: step_attention for caches longer than STEP_ATTENTION_MIN_CACHE
# (``slot_attention``; LOCALGPT_SLOT_STEP_ATTENTION=0: decode_attention always). decode_attention's grid there is
# slots x heads x cache / 64 programs, most of them empty at the server's context-window caches. Round 14 (H200,
# Llama-2-7B bf16, 4,096-position slot caches, one call): 16 streams 2,473 against 1,402 tok/s aggregate, one
# stream 221 against 102.
SLOT_STEP = os.environ.get("LOCALGPT_SLOT_STEP_ATTENTION", "1") != "0"


def slot_attention(q: torch.Tensor, k_slots: torch.Tensor, v_slots: torch.Tensor, positions: torch.Tensor,
                   scratch: int) -> torch.Tensor:
    """The slots' decode attention (``decode_attention``'s contract): ``step_attention`` where SLOT_STEP and the
    cache is long, else ``decode_attention``. The runs a head do not depend on how many slots step together, so a
    stream's arithmetic (and greedy answer) is the same alone as in a batch."""
    b, n_heads, _ = q.shape
    if SLOT_STEP and k_slots.shape[2] > STEP_ATTENTION_MIN_CACHE:
        cfg = (STEP_ATTENTION["splits"], STEP_ATTENTION["block_n"], STEP_ATTENTION["warps"], STEP_ATTENTION["dot"],
               STEP_ATTENTION["stages"])
        return step_attention(q, k_slots, v_slots, positions, n_heads, config=cfg, scratch=scratch)
    return decode_attention(q, k_slots, v_slots, positions, scratch)


def use_step_attention(k_cache: torch.Tensor, n_heads: int) -> bool:
    """Whether the batch-1 step's attention over this cache ([1, KV, L, hd]) is ``step_attention``'s (else
    ``rope_store`` + ``decode_attention``)."""
    return k_cache.shape[1] != n_heads or k_cache.shape[2] > STEP_ATTENTION_MIN_CACHE


@triton.jit
def _cached_rows(k_ptr, v_ptr, base, n, first, pos, d, dlive, HD: tl.constexpr, ROPE: tl.constexpr):
    # the cache rows of positions n a program reads (first..pos; with ROPE not pos itself, the step's own row)
    cached = (n >= first) & (n < pos) if ROPE else (n >= first) & (n <= pos)
    mask = cached[:, None] & dlive[None, :]
    k = tl.load(k_ptr + base + n[:, None] * HD + d[None, :], mask=mask, other=0.0)
    v = tl.load(v_ptr + base + n[:, None] * HD + d[None, :], mask=mask, other=0.0)
    return k, v


@triton.jit
def _attend_tile(q, qf, k, v, n, first, pos, k_new, v_new, m, l, acc, ROPE: tl.constexpr, DOT: tl.constexpr,
                 FP32_DOT: tl.constexpr, scale):
    # One tile of BLOCK_N positions n (k / v its cache rows, the step's row at pos not among them with ROPE) into
    # the online softmax (m, l, acc) of the program's query rows.
    nlive = (n >= first) & (n <= pos)
    if ROPE:
        k = tl.where((n == pos)[:, None], k_new[None, :], k)
        v = tl.where((n == pos)[:, None], v_new[None, :], v)
    if DOT:
        if FP32_DOT:
            scores = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee") * scale
        else:
            scores = tl.dot(q, tl.trans(k)) * scale  # [ROWS, BLOCK_N]
    else:
        scores = tl.sum(qf[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
    scores = tl.where(nlive[None, :], scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: keep exp() away from -inf - -inf
    alpha = tl.exp(m - m_safe)
    p = tl.exp(scores - m_safe[:, None])
    if DOT:
        if FP32_DOT:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
    else:
        pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
    return m_new, l * alpha + tl.sum(p, axis=1), acc * alpha[:, None] + pv


@triton.jit
def _step_attention_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, k_ptr, v_ptr, acc_ptr, ml_ptr, out_ptr, count_ptr, H,
                           KV, L, SCRATCH, scale, ROPE: tl.constexpr, REP: tl.constexpr, ROWS: tl.constexpr,
                           DOT: tl.constexpr, HD: tl.constexpr, HALF: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr, STATIC: tl.constexpr, STAGES: tl.constexpr,
                           GDC: tl.constexpr = False, EARLY: tl.constexpr = 0, MERGE: tl.constexpr = False,
                           SPLITS: tl.constexpr = 1):
    # Program (j, s, b): query heads j * G .. (G = REP with DOT, else 1) of kv head (j G) / REP of slot b, over the
    # tiles s, s + S, s + 2 S, .. (S programs a head, BLOCK_N positions a tile) of its positions 0..pos (a slot at
    # SCRATCH, idle, sees that position alone). qkv_ptr: with ROPE the step's qkv rows [B, (H + 2 KV) HD], else
    # its rotated q [B, H, HD] (the cache written). The step's row written last (no load waits for that store).
    # EARLY > 0 (a dependent launch whose earlier kernels write neither the positions nor the cache rows before
    # them): the first EARLY (1 or 2) tiles' cache rows are asked for before griddepcontrol.wait, so their latency
    # hides under the end of the kernel before; EARLY tiles stay in flight past the one being used.
    # MERGE: the program that finishes a head's group last (an arrival count a group in count_ptr, put back to 0)
    # combines the S (= SPLITS) parts into out_ptr [B, H HD], as _attention_combine_kernel does, in the same order.
    if GDC:
        if EARLY > 0:
            tl.extra.cuda.gdc_launch_dependents()
        else:
            _gdc_enter(GDC)
    j = tl.program_id(0)
    s = tl.program_id(1)
    b = tl.program_id(2)
    nsplit = tl.num_programs(1)
    pos = tl.load(pos_ptr + b).to(tl.int32)
    first = tl.where(pos == SCRATCH, pos, 0)
    G: tl.constexpr = REP if DOT else 1
    g = (j * G) // REP
    r = tl.arange(0, ROWS)
    rlive = r < G
    heads = j * G + r
    d = tl.arange(0, BLOCK_D)
    dlive = d < HD
    qmask = rlive[:, None] & dlive[None, :]
    base = (b * KV + g) * L * HD
    qkv_ptr += b * ((H + 2 * KV) * HD if ROPE else H * HD)
    # this program's first tile: the first of s's residue class at or after the tile of ``first``
    t0 = first // BLOCK_N
    t0 = t0 + (s - t0 % nsplit + nsplit) % nsplit
    if EARLY > 0:  # the first EARLY tiles' cached rows (before pos: written by earlier steps)
        n = t0 * BLOCK_N + tl.arange(0, BLOCK_N)
        k, v = _cached_rows(k_ptr, v_ptr, base, n, first, pos, d, dlive, HD, ROPE)
        n1 = n + nsplit * BLOCK_N
        if EARLY > 1:
            k1, v1 = _cached_rows(k_ptr, v_ptr, base, n1, first, pos, d, dlive, HD, ROPE)
        else:
            k1, v1 = k, v  # not used
        if GDC:
            tl.extra.cuda.gdc_wait()
    if ROPE:
        partner = tl.where(d < HALF, d + HALF, d - HALF)
        sign = tl.where(d < HALF, -1.0, 1.0)
        cs = tl.load(cos_ptr + pos * HD + d, mask=dlive, other=0.0).to(tl.float32)
        sn = tl.load(sin_ptr + pos * HD + d, mask=dlive, other=0.0).to(tl.float32)
        q = _rotated(qkv_ptr + heads[:, None] * HD, cs[None, :], sn[None, :], d[None, :], partner[None, :],
                     sign[None, :], qmask).to(k_ptr.dtype.element_ty)
        k_new = _rotated(qkv_ptr + (H + g) * HD, cs, sn, d, partner, sign, dlive).to(k_ptr.dtype.element_ty)
        v_new = tl.load(qkv_ptr + (H + KV + g) * HD + d, mask=dlive, other=0.0).to(v_ptr.dtype.element_ty)
    else:
        q = tl.load(qkv_ptr + heads[:, None] * HD + d[None, :], mask=qmask, other=0.0)
        k_new = q  # unused
        v_new = q
    m = tl.full((ROWS,), float("-inf"), tl.float32)
    l = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, BLOCK_D), tl.float32)
    qf = q.to(tl.float32) * scale
    # Triton's interpreter cannot loop to a loaded bound: there, over the whole cache (STATIC), masked past pos
    if EARLY > 0:
        for i in range(0, tl.cdiv(STATIC, BLOCK_N) if STATIC > 0 else tl.cdiv(tl.cdiv(pos + 1, BLOCK_N) - t0,
                                                                               nsplit)):
            nc, kc, vc = n, k, v
            if EARLY > 1:  # tiles i + 1 (asked for already) and i + 2 in flight while tile i is used
                n, k, v = n1, k1, v1
                n1 = n1 + nsplit * BLOCK_N
                k1, v1 = _cached_rows(k_ptr, v_ptr, base, n1, first, pos, d, dlive, HD, ROPE)
            else:  # tile i + 1 in flight
                n = n1
                n1 = n1 + nsplit * BLOCK_N
                k, v = _cached_rows(k_ptr, v_ptr, base, n, first, pos, d, dlive, HD, ROPE)
            m, l, acc = _attend_tile(q, qf, kc, vc, nc, first, pos, k_new, v_new, m, l, acc, ROPE, DOT, FP32_DOT,
                                     scale)
    else:
        for i in tl.range(0, tl.cdiv(STATIC, BLOCK_N) if STATIC > 0 else tl.cdiv(tl.cdiv(pos + 1, BLOCK_N) - t0,
                                                                                  nsplit), num_stages=STAGES):
            n = (t0 + i * nsplit) * BLOCK_N + tl.arange(0, BLOCK_N)
            k, v = _cached_rows(k_ptr, v_ptr, base, n, first, pos, d, dlive, HD, ROPE)
            m, l, acc = _attend_tile(q, qf, k, v, n, first, pos, k_new, v_new, m, l, acc, ROPE, DOT, FP32_DOT, scale)
    rows = b * H + heads
    slot = rows * nsplit + s
    tl.store(acc_ptr + slot[:, None] * HD + d[None, :], acc, mask=qmask)
    tl.store(ml_ptr + slot * 2, m, mask=rlive)
    tl.store(ml_ptr + slot * 2 + 1, l, mask=rlive)
    if ROPE:
        if ((j * G) % REP == 0) & ((pos // BLOCK_N) % nsplit == s):  # the program whose tiles hold pos, once a kv head
            tl.store(k_ptr + base + pos * HD + d, k_new, mask=dlive)
            tl.store(v_ptr + base + pos * HD + d, v_new, mask=dlive)
    if MERGE:
        tl.debug_barrier()  # every thread's part stored before the arrival (released by it, gpu scope)
        arrived = tl.atomic_add(count_ptr + b * tl.num_programs(0) + j, 1, sem="acq_rel", scope="gpu")
        if arrived == nsplit - 1:  # the group's last program: its parts all seen (acquired), combine them
            mx = tl.full((ROWS,), float("-inf"), tl.float32)
            for t in tl.static_range(SPLITS):  # SPLITS = nsplit
                mx = tl.maximum(mx, tl.load(ml_ptr + (rows * nsplit + t) * 2, mask=rlive, other=0.0,
                                            cache_modifier=".cg"))
            total = tl.zeros((ROWS, BLOCK_D), tl.float32)
            lt = tl.zeros((ROWS,), tl.float32)
            for t in tl.static_range(SPLITS):
                ms = tl.load(ml_ptr + (rows * nsplit + t) * 2, mask=rlive, other=0.0, cache_modifier=".cg")
                w = tl.where(ms == float("-inf"), 0.0, tl.exp(ms - mx))  # a run past the slot's position saw nothing
                lt += w * tl.load(ml_ptr + (rows * nsplit + t) * 2 + 1, mask=rlive, other=0.0, cache_modifier=".cg")
                total += w[:, None] * tl.load(acc_ptr + (rows * nsplit + t)[:, None] * HD + d[None, :], mask=qmask,
                                              other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + rows[:, None] * HD + d[None, :], (total / lt[:, None]).to(out_ptr.dtype.element_ty),
                     mask=qmask)
            tl.atomic_xchg(count_ptr + b * tl.num_programs(0) + j, 0, sem="relaxed", scope="gpu")


def step_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                   n_heads: int, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                   config: tuple | None = None, out: torch.Tensor | None = None, scratch: int = -1,
                   counts: torch.Tensor | None = None, early: int = 0) -> torch.Tensor:
    """One decode step's attention of B streams at ``positions`` [B] over cache positions 0..pos of each (k_cache /
    v_cache [slots >= B, KV, L, hd]: slot b the stream b's; one at ``scratch``, idle, sees that position alone).
    With ``cos`` / ``sin`` ([L, hd] tables): ``qkv`` is the step's projections [B, (H + 2 KV) hd], rotated here, its
    k / v written into the caches at pos (``rope_store`` + ``decode_attention`` in two launches); without: ``qkv`` is
    the rotated q [B, H, hd] and the caches already hold pos. Returns [B, H hd] (in ``out`` when given). config:
    (splits, block_n, warps, dot, stages), default ``STEP_ATTENTION``. ``counts``: int32 zeros, at least B x the
    grid's head groups (``step_counts``), that the kernel leaves as it found them: the parts are combined by each
    group's last program (one launch), not by a second kernel; the same arithmetic in the same order. ``early``
    (1 or 2; 0: no): the caller's promise that no kernel of the stream before this one writes ``positions`` or
    the cache rows before them (the batch-1 step's): with a dependent launch, a program's first ``early`` tiles'
    rows are asked for before it waits for the kernel before, and that many stay in flight after."""
    kv, length, hd = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    b = positions.shape[0]
    splits, block_n, warps, dot, stages = config or tuple(STEP_ATTENTION[k] for k in ("splits", "block_n", "warps",
                                                                                      "dot", "stages"))
    rope = cos is not None
    rep = n_heads // kv
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    pdl = gdc(qkv.device)
    acc = torch.empty(b * n_heads * splits, hd, dtype=torch.float32, device=qkv.device)
    ml = torch.empty(b * n_heads * splits, 2, dtype=torch.float32, device=qkv.device)
    block_d = max(16, triton.next_power_of_2(hd))
    rows = max(16, triton.next_power_of_2(rep)) if dot else 1
    groups = kv if dot else n_heads
    if out is None:
        out = torch.empty(b, n_heads * hd, dtype=k_cache.dtype, device=qkv.device)
    merge = counts is not None
    if merge and (counts.dtype != torch.int32 or counts.numel() < b * groups):
        raise ValueError(f"step_attention: counts needs {b * groups} int32 zeros, got {tuple(counts.shape)} "
                         f"{counts.dtype}")
    _step_attention_kernel[(groups, splits, b)](
        qkv.contiguous(), cos if rope else qkv, sin if rope else qkv, positions, k_cache, v_cache, acc, ml, out,
        counts if merge else ml, n_heads, kv, length, scratch, hd ** -0.5, ROPE=rope, REP=rep, ROWS=rows, DOT=dot,
        HD=hd, HALF=hd // 2, BLOCK_D=block_d, BLOCK_N=block_n, FP32_DOT=interpret, STATIC=length if interpret else 0,
        STAGES=stages, GDC=pdl, EARLY=int(early), MERGE=merge, SPLITS=splits if merge else 1, num_warps=warps,
        launch_pdl=pdl)
    if not merge:
        _attention_combine_kernel[(b * n_heads,)](acc, ml, out, NSPLIT=splits, HD=hd,
                                                  BLOCK_D=triton.next_power_of_2(hd), GDC=pdl, num_warps=1,
                                                  launch_pdl=pdl)
    return out


def step_counts(n_heads: int, device: torch.device, streams: int = 1) -> torch.Tensor:
    """The arrival counts ``step_attention(counts=...)`` takes for ``streams`` streams of ``n_heads`` query heads
    (enough for every configuration: a group is at least a head). The kernels put them back to zero, so one
    buffer serves every layer of a step and every step, on one stream at a time."""
    return torch.zeros(streams * n_heads, dtype=torch.int32, device=device)


# As a PyTorch operator for the compiled batch-1 step (``Block.attention_step_fused`` under torch.compile): opaque to
# it, captured in its CUDA graph. Called directly otherwise (a ``custom_op`` call outside a compile imports
# torch._dynamo: gemv_triton's note).


def decode_attention_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                          scratch: int) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return torch.ops.localgpt.decode_attention(q, k, v, positions, scratch)
    return decode_attention(q, k, v, positions, scratch)


@torch.library.custom_op("localgpt::decode_attention", mutates_args=())
def decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                        scratch: int) -> torch.Tensor:
    return decode_attention(q, k, v, positions, scratch)


@decode_attention_op.register_fake
def _(q, k, v, positions, scratch):
    return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])


def step_attention_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The attention of a rotated q [1, H, hd] over caches that hold the step's row (the compiled step's):
    ``step_attention`` or, where ``use_step_attention`` says, ``decode_attention``."""
    if not use_step_attention(k, q.shape[1]):
        return decode_attention_call(q, k, v, positions, -1)
    if torch.compiler.is_compiling():
        return torch.ops.localgpt.step_attention(q, k, v, positions)
    return step_attention(q, k, v, positions, q.shape[1])


@torch.library.custom_op("localgpt::step_attention", mutates_args=())
def step_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return step_attention(q, k, v, positions, q.shape[1])


@step_attention_op.register_fake
def _(q, k, v, positions):
    return q.new_empty(1, q.shape[1] * q.shape[2])


# --- one request's prompt chunk at a fixed row count (BatchEngine's captured prompt pass) ---------------------
# The chunk's slot, first position and valid row count t live in a device tensor ``meta`` = [slot, start, t], so
# one CUDA graph per row count serves every request and chunk. Rows past t are padding: they write their k / v to
# the slot's scratch position (``positions`` holds it for them) and attend as the last valid row does; nothing
# reads what they produce. A valid row's arithmetic depends only on its own request's cache, start and t.

# chunk_attention's shape: query rows and cache positions a program takes per step, warps.
CHUNK_ATTENTION = {"block_m": 64, "block_n": 64, "warps": 4}


@triton.jit
def _rope_store_rows_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, meta_ptr, q_ptr, k_ptr, v_ptr, H, KV, L,
                            HD: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr):
    # Program (r, j): head j of row r of one slot's chunk; as _rope_store_kernel, the slot read from meta.
    r = tl.program_id(0)
    _rope_store_head(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, r, tl.load(meta_ptr), tl.load(pos_ptr + r),
                     tl.program_id(1), H, KV, L, HD, HALF, BLOCK)


def rope_store_rows(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                    meta: torch.Tensor, k_slots: torch.Tensor, v_slots: torch.Tensor, n_heads: int) -> torch.Tensor:
    """qkv [P, (H + 2 KV) * hd]: P rows of one slot's chunk (slot = meta[0]) at ``positions`` [P] (the scratch
    position for padding rows); cos / sin [positions, hd] tables. Writes rotated k and v into the slot's caches;
    returns rotated q [P, H, hd]."""
    p = qkv.shape[0]
    kv, length, hd = k_slots.shape[1], k_slots.shape[2], k_slots.shape[3]
    qkv = qkv.reshape(p, -1).contiguous()
    q = torch.empty(p, n_heads, hd, dtype=qkv.dtype, device=qkv.device)
    _rope_store_rows_kernel[(p, n_heads + 2 * kv)](qkv, cos, sin, positions, meta, q, k_slots, v_slots, n_heads, kv,
                                                   length, HD=hd, HALF=hd // 2, BLOCK=triton.next_power_of_2(hd),
                                                   num_warps=1)
    return q


@triton.jit
def _chunk_attention_kernel(q_ptr, k_ptr, v_ptr, meta_ptr, out_ptr, P, H, KV, L, scale,
                            REP: tl.constexpr, HD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, FP32: tl.constexpr, STATIC: tl.constexpr):
    # Program (m, h): query head h of rows [m * BLOCK_M, (m + 1) * BLOCK_M) of the chunk; row i (< t) at position
    # start + i sees the slot's cache positions 0..start + i (causal; earlier chunks included). Flash attention:
    # running max / sum over BLOCK_N positions a step, fp32 accumulators.
    mb = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(meta_ptr)
    start = tl.load(meta_ptr + 1)
    t = tl.load(meta_ptr + 2)
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    rlive = rows < P
    d = tl.arange(0, BLOCK_D)
    dlive = d < HD
    q = tl.load(q_ptr + (rows[:, None] * H + h) * HD + d[None, :], mask=rlive[:, None] & dlive[None, :], other=0.0)
    qpos = start + tl.minimum(rows, t - 1)  # padding rows attend as the last valid row
    first = mb * BLOCK_M
    hi = tl.where(first < t, start + tl.minimum(first + BLOCK_M, t), 0)  # positions < hi; none for all-padding
    base = (slot * KV + h // REP) * L * HD
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    # Triton's interpreter cannot loop to a loaded bound: there, to L (= STATIC), the steps past hi fully masked.
    for n0 in range(0, STATIC if STATIC > 0 else hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nlive = n < hi
        offs = base + n[:, None] * HD + d[None, :]
        both = nlive[:, None] & dlive[None, :]
        k = tl.load(k_ptr + offs, mask=both, other=0.0)
        v = tl.load(v_ptr + offs, mask=both, other=0.0)
        if FP32:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(n[None, :] <= qpos[:, None], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # position 0 is in every row's first step: finite from there
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if FP32:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + (rows[:, None] * H + h) * HD + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=rlive[:, None] & dlive[None, :])


def chunk_attention(q: torch.Tensor, k_slots: torch.Tensor, v_slots: torch.Tensor, meta: torch.Tensor,
                    config: tuple | None = None) -> torch.Tensor:
    """q [P, H, hd]: rows of one slot's chunk (meta = [slot, start, t] on the device) against that slot's cache,
    causal. Returns [P, H * hd] (padding rows: the last valid row's view, or zeros for a block of padding)."""
    p, n_heads, hd = q.shape
    kv, length = k_slots.shape[1], k_slots.shape[2]
    block_m, block_n, warps = config or (CHUNK_ATTENTION["block_m"], CHUNK_ATTENTION["block_n"],
                                         CHUNK_ATTENTION["warps"])
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    out = torch.empty(p, n_heads * hd, dtype=q.dtype, device=q.device)
    _chunk_attention_kernel[(triton.cdiv(p, block_m), n_heads)](
        q, k_slots, v_slots, meta, out, p, n_heads, kv, length, hd ** -0.5, REP=n_heads // kv, HD=hd,
        BLOCK_D=max(16, triton.next_power_of_2(hd)), BLOCK_M=block_m, BLOCK_N=block_n,
        FP32=interpret or q.dtype == torch.float32, STATIC=length if interpret else 0, num_warps=warps)
    return out
