"""The batch-1 Mamba / FalconMamba decode step in three Triton kernels a layer around its GEMVs (``Mamba._step_fused``).

Under torch.compile a FalconMamba-7B step on the H200 was its four GEMVs a layer (2,235 us of a 3,486 us step, the
low-rank dt_proj alone ~3 us a layer) and ~950 us of inductor's kernels between them (the residual add and norm,
the conv window's update, three weightless norms of dt / B / C, the softplus and the state update: ~8 launches a
layer; bench/RESULTS.md round 13), after 81 s of compiling. Here a layer is:

- ``add_norm``: the residual add (fp32 for FalconMamba) and the block's RMSNorm, as ``MambaLayer.forward``'s;
- in_proj (the layer's own GEMV);
- ``conv_step``: the depthwise causal conv over the state's last conv - 1 inputs and this one, silu, the state
  shifted;
- x_proj (its GEMV);
- ``ssm_step``: the weightless norms of dt / B / C (FalconMamba), dt_proj for the program's channels (from a bf16
  copy of its weight: ``Mamba.use_fused_decode``), the softplus, the selective-state update, y = h C + D x and the
  gate silu(z);
- out_proj (its GEMV),

so a plain CUDA graph of the step needs no compiler. The arithmetic and roundings are the eager step's (products
rounded to bf16 where eager PyTorch rounds them). Imported on CUDA (or under ``TRITON_INTERPRET=1``, for tests).

``pdl``: the kernel is a programmatic dependent launch (``slot_triton.gdc``: sm_90+, as the chain's GEMVs are): it
may start while the kernel before it ends. It loads what no kernel of a step writes before it waits for that
kernel (``_gdc_enter``): the weights, and the conv / SSM state rows, which only this layer's own kernel writes,
a step earlier, long finished (a dependent starts only once every kernel but the one before it has ended).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from localgpt.generation.fast.slot_triton import _gdc_enter


@triton.jit
def _add_norm_kernel(hid_ptr, y_ptr, res_ptr, w_ptr, out_ptr, D, eps, ADD: tl.constexpr, CAST_IN: tl.constexpr,
                     BLOCK: tl.constexpr, GDC: tl.constexpr = False):
    # res = hid + y (rounded to res's dtype), out = RMSNorm(res) as transformer.RMSNorm computes it on res cast
    # to bf16 first (CAST_IN: a layer's norm) or on res itself (the final norm, fp32 statistics and product)
    cols = tl.arange(0, BLOCK)
    live = cols < D
    w = tl.load(w_ptr + cols, mask=live, other=0.0).to(tl.float32)  # before the reduction: one trip to memory
    _gdc_enter(GDC)
    x = tl.load(hid_ptr + cols, mask=live, other=0.0).to(tl.float32)
    if ADD:
        x = x + tl.load(y_ptr + cols, mask=live, other=0.0).to(tl.float32)
        x = x.to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + cols, x, mask=live)
        x = x.to(tl.float32)
    if CAST_IN:
        x = x.to(out_ptr.dtype.element_ty).to(tl.float32)
    h = x * tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    if CAST_IN:
        h = h.to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + cols, (w * h).to(out_ptr.dtype.element_ty), mask=live)


def add_norm(hidden: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor, eps: float, *, cast_in: bool,
             res: torch.Tensor | None = None, out: torch.Tensor | None = None,
             pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual, normed): residual = hidden + y in ``res``'s dtype (written into ``res``; without y, hidden
    itself), normed = RMSNorm(residual) [1, D] in the weight's dtype (``cast_in``: of the residual cast to it, as a
    layer's norm of ``hidden.to(bf16)``; else of the residual, the final norm), written into ``out`` if given."""
    d = hidden.shape[-1]
    out = torch.empty(1, d, dtype=weight.dtype, device=hidden.device) if out is None else out.view(1, d)
    if y is None:
        res = hidden
    elif res is None:
        res = torch.empty_like(hidden)
    _add_norm_kernel[(1,)](hidden, y if y is not None else hidden, res, weight, out, d, eps, ADD=y is not None,
                           CAST_IN=cast_in, BLOCK=triton.next_power_of_2(d), GDC=pdl, num_warps=8, launch_pdl=pdl)
    return res, out


@triton.jit
def _conv_step_kernel(xz_ptr, state_ptr, w_ptr, b_ptr, out_ptr, xw_ptr, part_ptr, INNER, CONV: tl.constexpr,
                      CP: tl.constexpr, BLOCK: tl.constexpr, GDC: tl.constexpr = False, FOLD: tl.constexpr = False,
                      R: tl.constexpr = 0, RB: tl.constexpr = 32, cnt_ptr=None, dbl_ptr=None,
                      SUM: tl.constexpr = False, NP: tl.constexpr = 1):
    # channels [pid BLOCK, +BLOCK): window = (state[:, 0..CONV-2], x) with x the first half of in_proj's row;
    # out = silu(sum(window * w) + b) with eager bf16's roundings (each product, the sum, the bias add); the
    # state becomes window[:, 1..]. FOLD: x_proj folded in, this program's part of it over its channels,
    # part[pid, r] = sum_ch out[ch] xw[ch, r] (xw: x_proj's weight [INNER, R], bf16) for the RB values r of its
    # second grid axis, summed by the SSM step; every program of the axis makes the channels' outputs (only the
    # first stores them), and none writes the state (the SSM step shifts it: another program of the axis could
    # still be reading it). SUM: the last program of each value block r (cnt_ptr, a count a block, left at 0) adds
    # the parts up in program order into x_proj's row (dbl_ptr [R], rounded to the activations' dtype as x_proj's
    # output is), so the SSM step reads the row, not the parts
    ch = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = ch < INNER
    k = tl.arange(0, CP)
    old = tl.load(state_ptr + ch[:, None] * (CONV - 1) + k[None, :], mask=live[:, None] & (k[None, :] < CONV - 1),
                  other=0.0)
    w = tl.load(w_ptr + ch[:, None] * CONV + k[None, :], mask=live[:, None] & (k[None, :] < CONV), other=0.0)
    b = tl.load(b_ptr + ch, mask=live, other=0.0).to(tl.float32)
    if FOLD:
        rr = tl.program_id(1) * RB + tl.arange(0, RB)
        wv = tl.load(xw_ptr + ch[:, None] * R + rr[None, :], mask=live[:, None] & (rr[None, :] < R), other=0.0)
    else:
        nxt = tl.load(state_ptr + ch[:, None] * (CONV - 1) + k[None, :] + 1,
                      mask=live[:, None] & (k[None, :] + 1 < CONV - 1), other=0.0)
    _gdc_enter(GDC)  # in_proj's row: the kernel before
    x = tl.load(xz_ptr + ch, mask=live, other=0.0)
    window = tl.where(k[None, :] == CONV - 1, x[:, None], old)
    prod = (window.to(tl.float32) * w.to(tl.float32)).to(out_ptr.dtype.element_ty).to(tl.float32)
    acc = tl.sum(tl.where(k[None, :] < CONV, prod, 0.0), axis=1).to(out_ptr.dtype.element_ty).to(tl.float32)
    v = (acc + b).to(out_ptr.dtype.element_ty).to(tl.float32)
    xo = (v / (1.0 + tl.exp(-v))).to(out_ptr.dtype.element_ty)
    if FOLD:
        tl.store(out_ptr + ch, xo, mask=live & (tl.program_id(1) == 0))
        xf = tl.where(live, xo.to(tl.float32), 0.0)
        tl.store(part_ptr + tl.program_id(0) * R + rr, tl.sum(wv.to(tl.float32) * xf[:, None], axis=0), mask=rr < R)
        if SUM:
            tl.debug_barrier()  # every thread's part stored before the arrival (released by it, gpu scope)
            arrived = tl.atomic_add(cnt_ptr + tl.program_id(1), 1, sem="acq_rel", scope="gpu")
            if arrived == tl.num_programs(0) - 1:  # the block's last program: every part seen (acquired)
                p = tl.arange(0, NP)
                parts = tl.load(part_ptr + p[:, None] * R + rr[None, :], mask=(p[:, None] < tl.num_programs(0))
                                & (rr[None, :] < R), other=0.0, cache_modifier=".cg")
                tl.store(dbl_ptr + rr, tl.sum(parts, axis=0).to(dbl_ptr.dtype.element_ty), mask=rr < R)
                tl.atomic_xchg(cnt_ptr + tl.program_id(1), 0, sem="relaxed", scope="gpu")
    else:
        tl.store(out_ptr + ch, xo, mask=live)
        # the state shifted by one: new[:, j] = window[:, j + 1]
        new = tl.where(k[None, :] + 1 == CONV - 1, x[:, None], nxt)
        tl.debug_barrier()  # every thread has read the old state before any writes the new one
        tl.store(state_ptr + ch[:, None] * (CONV - 1) + k[None, :], new,
                 mask=live[:, None] & (k[None, :] < CONV - 1))


def conv_step(xz: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
              block: int = 256, pdl: bool = False) -> torch.Tensor:
    """One position of the depthwise causal conv: xz [1, 2 inner] (in_proj's row, x its first half), state
    [inner, conv - 1] (updated), weight [inner, conv], bias [inner]. Returns silu(conv) [1, inner]."""
    inner, conv = weight.shape
    out = torch.empty(1, inner, dtype=xz.dtype, device=xz.device)
    _conv_step_kernel[(triton.cdiv(inner, block),)](xz, state, weight, bias, out, out, out, inner, CONV=conv,
                                                    CP=triton.next_power_of_2(conv), BLOCK=block, GDC=pdl,
                                                    num_warps=4, launch_pdl=pdl)
    return out


def conv_xproj_step(xz: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    xw: torch.Tensor, block: int = 256, r_block: int = 32, pdl: bool = False,
                    counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``conv_step`` with x_proj folded in: (silu(conv) [1, inner], parts [channel blocks, R] fp32), each channel
    block's part of x_proj's row (xw: x_proj's weight transposed, [inner, R] bf16; a program per ``block``
    channels and ``r_block`` outputs, one trip to memory), for ``ssm_step(parts=)`` to add up. The conv state is
    not shifted here: ``ssm_step(parts=, conv_state=)`` does it. Saves x_proj's own launch (a GEMV of 1.2 MB at
    FalconMamba-7B's shape, ~6 us of latency a layer) for ~4.7 MB of bf16 weight read by the conv's programs.
    ``counts``: int32 zeros, one for each ``r_block`` outputs (left at zero), and then the parts are added up here,
    by each block's last program: (silu(conv), x_proj's row [1, R] in xz's dtype) for ``ssm_step(dbl,
    conv_state=)``."""
    inner, conv = weight.shape
    r = xw.shape[1]
    n, nr = triton.cdiv(inner, block), triton.cdiv(r, r_block)
    out = torch.empty(1, inner, dtype=xz.dtype, device=xz.device)
    parts = torch.empty(n, r, dtype=torch.float32, device=xz.device)
    row = torch.empty(1, r, dtype=xz.dtype, device=xz.device) if counts is not None else parts
    if counts is not None and (counts.numel() < nr or counts.dtype != torch.int32):
        raise ValueError(f"conv_xproj_step(counts=): int32 zeros, {nr} of them at least")
    _conv_step_kernel[(n, nr)](xz, state, weight, bias, out, xw, parts, inner, CONV=conv,
                               CP=triton.next_power_of_2(conv), BLOCK=block, GDC=pdl, FOLD=True, R=r, RB=r_block,
                               cnt_ptr=counts if counts is not None else parts, dbl_ptr=row, SUM=counts is not None,
                               NP=triton.next_power_of_2(n), num_warps=4, launch_pdl=pdl)
    return out, (row if counts is not None else parts)


@triton.jit
def _weightless_rms(v, live, n, eps):
    return v * tl.rsqrt(tl.sum(tl.where(live, v * v, 0.0), axis=0) / n + eps)


@triton.jit
def _ssm_step_kernel(dbl_ptr, xz_ptr, xc_ptr, dtw_ptr, dtb_ptr, a_ptr, d_ptr, h_ptr, y_ptr, cs_ptr, INNER, eps,
                     RANK: tl.constexpr, RP: tl.constexpr, STATE: tl.constexpr, NORM: tl.constexpr,
                     BLOCK: tl.constexpr, GDC: tl.constexpr = False, NPARTS: tl.constexpr = 0,
                     NP: tl.constexpr = 1, CONV: tl.constexpr = 4, CP: tl.constexpr = 4, SHIFT: tl.constexpr = False):
    # channels [pid BLOCK, +BLOCK) of one decode step (MambaLayer.forward at t = 1): x_proj's row (dt_low | B | C),
    # each normed without weights (NORM: FalconMamba), dt = softplus(dt_proj(dt_low) + dt_b), the state
    # h = h exp(dt A) + dt x B, y = (bf16(h) C) + D x, gated by silu(z). NPARTS: x_proj's row is the sum of
    # conv_xproj_step's NPARTS parts (dbl_ptr [NPARTS, RANK + 2 STATE] fp32, NP its power of two), rounded as
    # x_proj's output is. SHIFT (with NPARTS, or x_proj's row summed by conv_xproj_step): the conv state (cs_ptr
    # [INNER, CONV - 1]) shifted here, as conv_step does
    # (values rounded to the activations' dtype ACT where the eager step holds them in it)
    # every load first, in one round trip: the norms' reductions below synchronise the program's threads, and a
    # load written after them would be issued only then (one dependent trip to memory more for each)
    ACT: tl.constexpr = y_ptr.dtype.element_ty
    ch = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = ch < INNER
    r = tl.arange(0, RP)
    rlive = r < RANK
    st = tl.arange(0, STATE)
    grid = ch[:, None] * STATE + st[None, :]
    w = tl.load(dtw_ptr + ch[:, None] * RANK + r[None, :], mask=live[:, None] & rlive[None, :], other=0.0)
    dtb = tl.load(dtb_ptr + ch, mask=live, other=0.0)
    A = tl.load(a_ptr + grid, mask=live[:, None], other=0.0)
    h = tl.load(h_ptr + grid, mask=live[:, None], other=0.0)
    Dv = tl.load(d_ptr + ch, mask=live, other=0.0).to(tl.float32)
    if SHIFT:
        k = tl.arange(0, CP)
        nxt = tl.load(cs_ptr + ch[:, None] * (CONV - 1) + k[None, :] + 1,
                      mask=live[:, None] & (k[None, :] + 1 < CONV - 1), other=0.0)
    _gdc_enter(GDC)  # x_proj's row, the conv's output and in_proj's z: written by the kernels before
    if NPARTS:
        R = RANK + 2 * STATE
        p = tl.arange(0, NP)
        pl = p < NPARTS
        low = tl.sum(tl.load(dbl_ptr + p[:, None] * R + r[None, :], mask=pl[:, None] & rlive[None, :], other=0.0),
                     axis=0).to(ACT).to(tl.float32)
        B = tl.sum(tl.load(dbl_ptr + p[:, None] * R + RANK + st[None, :], mask=pl[:, None], other=0.0),
                   axis=0).to(ACT).to(tl.float32)
        C = tl.sum(tl.load(dbl_ptr + p[:, None] * R + RANK + STATE + st[None, :], mask=pl[:, None], other=0.0),
                   axis=0).to(ACT).to(tl.float32)
    else:
        low = tl.load(dbl_ptr + r, mask=rlive, other=0.0).to(tl.float32)
        B = tl.load(dbl_ptr + RANK + st).to(tl.float32)
        C = tl.load(dbl_ptr + RANK + STATE + st).to(tl.float32)
    if SHIFT:
        xin = tl.load(xz_ptr + ch, mask=live, other=0.0)  # the conv's window: the state shifted, x last
        tl.store(cs_ptr + ch[:, None] * (CONV - 1) + k[None, :],
                 tl.where(k[None, :] + 1 == CONV - 1, xin[:, None], nxt), mask=live[:, None] & (k[None, :] < CONV - 1))
    x = tl.load(xc_ptr + ch, mask=live, other=0.0).to(tl.float32)
    z = tl.load(xz_ptr + INNER + ch, mask=live, other=0.0).to(tl.float32)
    if NORM:
        low = _weightless_rms(low, rlive, RANK, eps).to(ACT).to(tl.float32)
        B = _weightless_rms(B, st < STATE, STATE, eps).to(ACT).to(tl.float32)
        C = _weightless_rms(C, st < STATE, STATE, eps).to(ACT).to(tl.float32)
    dt = tl.sum(w.to(tl.float32) * low[None, :], axis=1)
    dt = dt.to(ACT).to(tl.float32) + dtb  # dt_proj's row, then the bias
    dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt)))  # F.softplus (threshold 20)
    h = h * tl.exp(dt[:, None] * A) + (dt * x)[:, None] * B[None, :]
    tl.store(h_ptr + grid, h, mask=live[:, None])
    hb = h.to(ACT).to(tl.float32)
    y = tl.sum(hb * C[None, :], axis=1).to(ACT).to(tl.float32)
    y = y + x * Dv
    y = y * (z / (1.0 + tl.exp(-z)))
    tl.store(y_ptr + ch, y.to(y_ptr.dtype.element_ty), mask=live)


def ssm_step(dbl: torch.Tensor, xz: torch.Tensor, xc: torch.Tensor, dt_w: torch.Tensor, dt_b: torch.Tensor,
             A: torch.Tensor, D: torch.Tensor, h: torch.Tensor, norm_eps: float | None,
             block: int = 64, out: torch.Tensor | None = None, pdl: bool = False,
             parts: torch.Tensor | None = None, conv_state: torch.Tensor | None = None) -> torch.Tensor:
    """dbl [1, rank + 2 state] (x_proj's row), xz [1, 2 inner] (z its second half), xc [1, inner] (the conv's
    output), dt_w [inner, rank] bf16, dt_b [inner] fp32, A [inner, state] fp32, D [inner], h [inner, state] fp32
    (updated); ``norm_eps``: FalconMamba's weightless norms of dt / B / C (None: Mamba). Returns y [1, inner]
    (written into ``out`` if given). ``parts``: x_proj's row as ``conv_xproj_step``'s parts (dbl not used), and
    ``conv_state`` [inner, conv - 1] shifted by one with this step's x (which conv_xproj_step leaves to it; also
    without ``parts``, after ``conv_xproj_step(counts=)``'s row)."""
    inner, rank = dt_w.shape
    state = A.shape[1]
    y = torch.empty(1, inner, dtype=xc.dtype, device=xc.device) if out is None else out.view(1, inner)
    nparts = parts.shape[0] if parts is not None else 0
    if nparts and conv_state is None:
        raise ValueError("ssm_step(parts=) shifts the conv state: give conv_state")
    shift = conv_state is not None
    conv = conv_state.shape[1] + 1 if shift else 4
    _ssm_step_kernel[(triton.cdiv(inner, block),)](
        parts if nparts else dbl, xz, xc, dt_w, dt_b, A, D, h, y, conv_state if shift else y, inner,
        norm_eps if norm_eps is not None else 0.0, RANK=rank, RP=triton.next_power_of_2(rank), STATE=state,
        NORM=norm_eps is not None, BLOCK=block, GDC=pdl, NPARTS=nparts, NP=triton.next_power_of_2(max(nparts, 1)),
        CONV=conv, CP=triton.next_power_of_2(conv), SHIFT=shift, num_warps=8 if nparts else 4, launch_pdl=pdl)
    return y
