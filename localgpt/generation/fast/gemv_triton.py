"""Batch-1 decode GEMV kernels (one token: y = W x) for bf16, int8 and int4 weights.

One decode step reads every weight once and does two flops per weight, so it should run at the rate the
weights leave memory. For quantised weights the integer-to-float conversion is the cost: these kernels use
the "magic number" trick (OR a field of bits into the mantissa of 2^23; one FMA then gives the integer as
an exact fp32, scaled and offset) instead of the integer-to-float converter, and the weights are stored in a
"planar" layout chosen for that (``quantize.pack_int4_planar`` / ``pack_int8_planar``): in each block of
``P`` int32 words of a row, bit field j of word i holds column ``block * F * P + j * P + i`` (F = 8 nibbles
or 4 bytes a word). So one wide load brings P words of a row, field j of all of them multiplies one
contiguous slice of x, and no unpacking shuffle is needed.

Each program owns ``BN`` rows and walks the whole K (``SPLIT`` = 1), or one of ``SPLIT`` parts of K
(for short, wide layers, so that enough programs stream at once); the parts then meet in a small fp32
workspace and the program that finishes a row block last adds them in a fixed order and writes the
bf16 result (deterministic, one launch, no memset: the arrival counter is reset by that program).

Also here: the planar int4 layer written out in bf16 for a prompt (cuBLAS then multiplies), and a
plain bf16 GEMV. Imported on CUDA only (or under ``TRITON_INTERPRET=1`` in tests).

Measured on an H200 (bench/gpu_notes.md, "Round 2"): the bf16 GEMV streams 3.6-4.1 TB/s at Llama-2-7B's
shapes (the engine's default for bf16 layers); int8 1.7-3.0 TB/s (the default for int8); int4 1.1-1.5 TB/s,
slower than tinygemm, so int4 decode stays on tinygemm. Both quantised kernels are bound by instructions per
weight (~7), not bytes: the next step is unpacking two weights per instruction (bf16x2).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAGIC = tl.constexpr(8388608.0)  # 2^23: an fp32 whose mantissa bits are the integer OR-ed into them


@triton.jit
def _finish(acc, rows, live, out_ptr, ws_ptr, lock_ptr, N, SPLIT: tl.constexpr):
    """Row sums of ``acc`` [BN, W] to ``out`` (bf16); with SPLIT > 1, via the workspace and the counter."""
    part = tl.sum(acc, axis=1)
    if SPLIT == 1:
        tl.store(out_ptr + rows, part.to(out_ptr.dtype.element_ty), mask=live)
    else:
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        tl.store(ws_ptr + pid_k * N + rows, part, mask=live)
        tl.debug_barrier()  # every thread's partial is written before the counter moves
        arrived = tl.atomic_add(lock_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT - 1:  # the last of the row block's programs adds the parts in order
            total = tl.zeros_like(part)
            for k in tl.static_range(SPLIT):
                total += tl.load(ws_ptr + k * N + rows, mask=live, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + rows, total.to(out_ptr.dtype.element_ty), mask=live)
            tl.atomic_xchg(lock_ptr + pid_n, 0)  # ready for the next call (a CUDA graph replays it)


@triton.jit
def _int4_gemv_kernel(x_ptr, w_ptr, sz_ptr, out_ptr, ws_ptr, lock_ptr, N, K, stride,
                      GROUP: tl.constexpr, P: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr):
    # w: int32 [N, K/8] planar (nibble j of word i of a block = column block*8P + j*P + i, value q in 0..15);
    # sz: int32 [K/GROUP, N], each the bf16 pair (scale low half, zero high half): w = (q - 8) * scale + zero.
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    live = rows < N
    cols = tl.arange(0, P)
    n_blocks = K // (8 * P)
    per_split = (n_blocks + SPLIT - 1) // SPLIT
    first = tl.program_id(1) * per_split
    last = tl.minimum(first + per_split, n_blocks)
    w_row = w_ptr + rows[:, None] * stride + cols[None, :]
    acc = tl.zeros((BN, P), dtype=tl.float32)
    for blk in range(first, last):
        words = tl.load(w_row + blk * P, mask=live[:, None], other=0)
        high = words >> 16
        for gi in tl.static_range(8 * P // GROUP):
            pair = tl.load(sz_ptr + (blk * (8 * P // GROUP) + gi) * N + rows, mask=live, other=0)
            scale = (pair << 16).to(tl.float32, bitcast=True)[:, None]
            zero = (pair & -65536).to(tl.float32, bitcast=True)[:, None]
            for jj in tl.static_range(GROUP // P):
                j = gi * (GROUP // P) + jj
                # x loaded in the weights' own layout (each thread its columns, from L1): a 1-D load would be
                # redistributed through shared memory with a barrier per plane.
                x = tl.load(tl.broadcast_to(x_ptr + blk * (8 * P) + j * P + cols[None, :], (BN, P))).to(tl.float32)
                if j < 4:
                    src = words
                else:
                    src = high
                sh = 4 * (j % 4)
                bits = (src & (15 << sh)) | 0x4B000000
                # 2^23 + q * 16^sh as fp32; times 16^-sh minus (2^(23-4sh) + 8) is q - 8, exactly, in one FMA.
                q = bits.to(tl.float32, bitcast=True) * (1.0 / (1 << sh)) - (MAGIC / (1 << sh) + 8.0)
                acc += (q * scale + zero) * x
    _finish(acc, rows, live, out_ptr, ws_ptr, lock_ptr, N, SPLIT)


@triton.jit
def _int8_gemv_kernel(x_ptr, w_ptr, out_ptr, ws_ptr, lock_ptr, N, K, stride,
                      P: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr):
    # w: int32 [N, K/4] planar (byte b of word i of a block = column block*4P + b*P + i, two's complement);
    # the per-row scale is applied to the row sums (``Int8Linear`` multiplies after the op).
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    live = rows < N
    cols = tl.arange(0, P)
    n_blocks = K // (4 * P)
    per_split = (n_blocks + SPLIT - 1) // SPLIT
    first = tl.program_id(1) * per_split
    last = tl.minimum(first + per_split, n_blocks)
    w_row = w_ptr + rows[:, None] * stride + cols[None, :]
    acc = tl.zeros((BN, P), dtype=tl.float32)
    for blk in range(first, last):
        words = tl.load(w_row + blk * P, mask=live[:, None], other=0) ^ -2139062144  # 0x80808080: u = v + 128
        high = words >> 16
        for b in tl.static_range(4):
            x = tl.load(tl.broadcast_to(x_ptr + blk * (4 * P) + b * P + cols[None, :], (BN, P))).to(tl.float32)
            if b < 2:
                src = words
            else:
                src = high
            sh = 8 * (b % 2)
            bits = (src & (255 << sh)) | 0x4B000000
            v = bits.to(tl.float32, bitcast=True) * (1.0 / (1 << sh)) - (MAGIC / (1 << sh) + 128.0)
            acc += v * x
    _finish(acc, rows, live, out_ptr, ws_ptr, lock_ptr, N, SPLIT)


@triton.jit
def _finish_row(part, rows, live, out_ptr, ws_ptr, lock_ptr, N, SPLIT: tl.constexpr):
    """``_finish`` for a ready row-sum vector ``part`` [BN]."""
    if SPLIT == 1:
        tl.store(out_ptr + rows, part.to(out_ptr.dtype.element_ty), mask=live)
    else:
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        tl.store(ws_ptr + pid_k * N + rows, part, mask=live)
        tl.debug_barrier()
        arrived = tl.atomic_add(lock_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT - 1:
            total = tl.zeros_like(part)
            for k in tl.static_range(SPLIT):
                total += tl.load(ws_ptr + k * N + rows, mask=live, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + rows, total.to(out_ptr.dtype.element_ty), mask=live)
            tl.atomic_xchg(lock_ptr + pid_n, 0)


@triton.jit
def _dot(xa, w, acc, DOT_BF16: tl.constexpr):
    """acc + xa @ w^T. Both operands hold exact bf16 values (x is bf16; small integers): on the GPU a bf16 MMA
    with fp32 accumulation; ``DOT_BF16=False`` is for Triton's CPU interpreter, whose bf16 dot is wrong."""
    if DOT_BF16:
        return tl.dot(xa.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)), acc)
    else:
        return tl.dot(xa, tl.trans(w), acc, input_precision="ieee")


@triton.jit
def _int4_dot_kernel(x_ptr, w_ptr, sz_ptr, out_ptr, ws_ptr, lock_ptr, N, K, stride,
                     GROUP: tl.constexpr, P: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr,
                     DOT_BF16: tl.constexpr):
    # Same layout and result as _int4_gemv_kernel, but the multiply-add over k runs on the tensor cores: x is
    # row 0 of a 16-row A operand, (q - 8) (exact in bf16) the B operand, fp32 accumulation; per group the
    # row sums are scaled and the zero point times the group's sum of x added. That leaves the ALUs only the
    # unpacking (one logic op and one FMA per weight, and the bf16 pack).
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    live = rows < N
    cols = tl.arange(0, P)
    first_row = (tl.arange(0, 16) == 0)[:, None]
    n_blocks = K // (8 * P)
    per_split = (n_blocks + SPLIT - 1) // SPLIT
    first = tl.program_id(1) * per_split
    last = tl.minimum(first + per_split, n_blocks)
    w_row = w_ptr + rows[:, None] * stride + cols[None, :]
    acc = tl.zeros((16, BN), dtype=tl.float32)
    for blk in range(first, last):
        words = tl.load(w_row + blk * P, mask=live[:, None], other=0)
        high = words >> 16
        for gi in tl.static_range(8 * P // GROUP):
            pair = tl.load(sz_ptr + (blk * (8 * P // GROUP) + gi) * N + rows, mask=live, other=0)
            scale = (pair << 16).to(tl.float32, bitcast=True)[None, :]
            zero = (pair & -65536).to(tl.float32, bitcast=True)[None, :]
            part = tl.zeros((16, BN), dtype=tl.float32)
            xsum = tl.zeros((16, 1), dtype=tl.float32)
            for jj in tl.static_range(GROUP // P):
                j = gi * (GROUP // P) + jj
                x = tl.load(x_ptr + blk * (8 * P) + j * P + cols)
                xa = tl.where(first_row, x.to(tl.float32)[None, :], 0.0)  # [16, P], row 0 = x
                xsum += tl.sum(xa, axis=1, keep_dims=True)
                if j < 4:
                    src = words
                else:
                    src = high
                sh = 4 * (j % 4)
                bits = (src & (15 << sh)) | 0x4B000000
                q = bits.to(tl.float32, bitcast=True) * (1.0 / (1 << sh)) - (MAGIC / (1 << sh) + 8.0)
                part = _dot(xa, q, part, DOT_BF16)
            acc += part * scale + xsum * zero
    _finish_row(tl.sum(acc, axis=0), rows, live, out_ptr, ws_ptr, lock_ptr, N, SPLIT)


@triton.jit
def _int8_dot_kernel(x_ptr, w_ptr, out_ptr, ws_ptr, lock_ptr, N, K, stride,
                     P: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr, DOT_BF16: tl.constexpr):
    # _int8_gemv_kernel on the tensor cores: (v) exact in bf16 as the B operand, x row 0 of A.
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    live = rows < N
    cols = tl.arange(0, P)
    first_row = (tl.arange(0, 16) == 0)[:, None]
    n_blocks = K // (4 * P)
    per_split = (n_blocks + SPLIT - 1) // SPLIT
    first = tl.program_id(1) * per_split
    last = tl.minimum(first + per_split, n_blocks)
    w_row = w_ptr + rows[:, None] * stride + cols[None, :]
    acc = tl.zeros((16, BN), dtype=tl.float32)
    for blk in range(first, last):
        words = tl.load(w_row + blk * P, mask=live[:, None], other=0) ^ -2139062144
        high = words >> 16
        for b in tl.static_range(4):
            x = tl.load(x_ptr + blk * (4 * P) + b * P + cols)
            xa = tl.where(first_row, x.to(tl.float32)[None, :], 0.0)
            if b < 2:
                src = words
            else:
                src = high
            sh = 8 * (b % 2)
            bits = (src & (255 << sh)) | 0x4B000000
            v = bits.to(tl.float32, bitcast=True) * (1.0 / (1 << sh)) - (MAGIC / (1 << sh) + 128.0)
            acc = _dot(xa, v, acc, DOT_BF16)
    _finish_row(tl.sum(acc, axis=0), rows, live, out_ptr, ws_ptr, lock_ptr, N, SPLIT)


@triton.jit
def _bf16_gemv_kernel(x_ptr, w_ptr, out_ptr, ws_ptr, lock_ptr, N, K, stride,
                      BK: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    live = rows < N
    cols = tl.arange(0, BK)
    n_blocks = K // BK
    per_split = (n_blocks + SPLIT - 1) // SPLIT
    first = tl.program_id(1) * per_split
    last = tl.minimum(first + per_split, n_blocks)
    w_row = w_ptr + rows[:, None] * stride + cols[None, :]
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for blk in range(first, last):
        w = tl.load(w_row + blk * BK, mask=live[:, None], other=0.0).to(tl.float32)
        x = tl.load(x_ptr + blk * BK + cols).to(tl.float32)[None, :]
        acc += w * x
    _finish(acc, rows, live, out_ptr, ws_ptr, lock_ptr, N, SPLIT)


@triton.jit
def _int4_planar_dequant_kernel(w_ptr, sz_ptr, out_ptr, N, K, stride, GROUP: tl.constexpr, P: tl.constexpr,
                                BN: tl.constexpr):
    # One program: BN rows x one block (P words = 8P columns), written out in bf16 [N, K].
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    live = rows < N
    blk = tl.program_id(1)
    cols = tl.arange(0, P)
    words = tl.load(w_ptr + rows[:, None] * stride + blk * P + cols[None, :], mask=live[:, None], other=0)
    for j in tl.static_range(8):
        pair = tl.load(sz_ptr + ((blk * 8 * P + j * P) // GROUP) * N + rows, mask=live, other=0)
        scale = (pair << 16).to(tl.float32, bitcast=True)[:, None]
        zero = (pair & -65536).to(tl.float32, bitcast=True)[:, None]
        q = ((words >> (4 * j)) & 15).to(tl.float32)
        w = (q - 8.0) * scale + zero
        tl.store(out_ptr + rows[:, None] * K + blk * (8 * P) + j * P + cols[None, :],
                 w.to(out_ptr.dtype.element_ty), mask=live[:, None])


# --- launchers ---------------------------------------------------------------------------------------------

# (rows a program, programs along K, warps, pipeline stages) by layer shape; tuned on the H200 (bench/gpu.py
# --gemv-sweep); shapes not listed take the rule in ``_config``.
TUNED: dict[tuple[str, int, int], tuple[int, int, int, int]] = {
    # H200, 2026-11-30 (bench/gpu.py --gemv-sweep): 3.8-4.1 TB/s on the large shapes, cuBLAS 3.5-3.8.
    ("bf16", 12288, 4096): (16, 1, 4, 1), ("bf16", 4096, 4096): (32, 4, 4, 1), ("bf16", 22016, 4096): (16, 1, 4, 1),
    ("bf16", 4096, 11008): (16, 4, 2, 1), ("bf16", 32000, 4096): (32, 1, 4, 1),
    # int8 / int4 planar (fma variant; the tensor-core variant ran ~2x slower at every shape).
    ("int8", 12288, 4096): (32, 4, 2, 1), ("int8", 4096, 4096): (16, 4, 4, 1), ("int8", 22016, 4096): (32, 4, 2, 1),
    ("int8", 4096, 11008): (16, 4, 4, 1), ("int8", 32000, 4096): (32, 4, 2, 1),
    ("int4", 12288, 4096): (32, 4, 2, 1), ("int4", 4096, 4096): (16, 4, 4, 1), ("int4", 22016, 4096): (32, 4, 2, 1),
    ("int4", 4096, 11008): (16, 4, 4, 1), ("int4", 32000, 4096): (32, 4, 2, 1),
}


def _config(kind: str, n: int, k: int, sms: int) -> tuple[int, int, int, int, bool]:
    """(rows a program, programs along K, warps, stages, tensor-core variant) for a layer."""
    tuned = TUNED.get((kind, n, k))
    if tuned:
        return tuple(tuned) + (False,) * (5 - len(tuned))
    bn = 32 if kind != "bf16" else 16
    programs = triton.cdiv(n, bn)
    split = 4 if programs < 3 * sms and k >= 2048 else 1
    return bn, split, 4, 1, False


class Workspace:
    """The fp32 partial sums and arrival counters a split-K launch needs, kept per layer (graph-safe)."""

    def __init__(self):
        self.ws = None
        self.lock = None

    def get(self, n: int, split: int, blocks: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if split == 1:
            if self.ws is None or self.ws.device != device:
                self.ws = torch.empty(1, dtype=torch.float32, device=device)
                self.lock = torch.zeros(1, dtype=torch.int32, device=device)
            return self.ws, self.lock
        if self.ws is None or self.ws.numel() < split * n or self.lock.numel() < blocks or self.ws.device != device:
            self.ws = torch.empty(split * n, dtype=torch.float32, device=device)
            self.lock = torch.zeros(blocks, dtype=torch.int32, device=device)
        return self.ws, self.lock


_SMS: dict = {}


def _sms(device) -> int:
    if device.type != "cuda":
        return 4
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]


def int4_gemv(x: torch.Tensor, words: torch.Tensor, sz: torch.Tensor, group: int, planes: int, out: torch.Tensor,
              ws: Workspace, config: tuple | None = None, dot: bool = False) -> torch.Tensor:
    """out [N] (bf16) = W x for one token x [K] (bf16); W planar int4 ``words`` [N, K/8], ``sz`` int32 [K/group, N]."""
    n, kw = words.shape
    k = kw * 8
    bn, split, warps, stages = (config or _config("int4", n, k, _sms(x.device)))[:4]
    blocks = triton.cdiv(n, bn)
    buf, lock = ws.get(n, split, blocks, x.device)
    extra = {"DOT_BF16": x.is_cuda} if dot else {}
    (_int4_dot_kernel if dot else _int4_gemv_kernel)[(blocks, split)](
        x, words, sz, out, buf, lock, n, k, words.stride(0), GROUP=group, P=planes, BN=bn, SPLIT=split,
        num_warps=warps, num_stages=stages, **extra)
    return out


def int8_gemv(x: torch.Tensor, words: torch.Tensor, planes: int, out: torch.Tensor, ws: Workspace,
              config: tuple | None = None, dot: bool = False) -> torch.Tensor:
    """out [N] (bf16) = Q x for one token (unscaled row sums); Q planar int8 ``words`` [N, K/4]."""
    n, kw = words.shape
    k = kw * 4
    bn, split, warps, stages = (config or _config("int8", n, k, _sms(x.device)))[:4]
    blocks = triton.cdiv(n, bn)
    buf, lock = ws.get(n, split, blocks, x.device)
    extra = {"DOT_BF16": x.is_cuda} if dot else {}
    (_int8_dot_kernel if dot else _int8_gemv_kernel)[(blocks, split)](
        x, words, out, buf, lock, n, k, words.stride(0), P=planes, BN=bn, SPLIT=split, num_warps=warps,
        num_stages=stages, **extra)
    return out


def bf16_gemv(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, ws: Workspace,
              config: tuple | None = None, bk: int = 256) -> torch.Tensor:
    n, k = w.shape
    assert k % bk == 0
    bn, split, warps, stages = (config or _config("bf16", n, k, _sms(x.device)))[:4]
    blocks = triton.cdiv(n, bn)
    buf, lock = ws.get(n, split, blocks, x.device)
    _bf16_gemv_kernel[(blocks, split)](x, w, out, buf, lock, n, k, w.stride(0), BK=bk, BN=bn, SPLIT=split,
                                       num_warps=warps, num_stages=stages)
    return out


def int4_planar_dequant(words: torch.Tensor, sz: torch.Tensor, group: int, planes: int,
                        out: torch.Tensor) -> torch.Tensor:
    """The bf16 weight [N, K] of a planar int4 layer, written into ``out`` (for cuBLAS on a prompt)."""
    n, kw = words.shape
    k = kw * 8
    bn = 32
    _int4_planar_dequant_kernel[(triton.cdiv(n, bn), k // (8 * planes))](words, sz, out, n, k, words.stride(0), GROUP=group,
                                                                          P=planes, BN=bn, num_warps=4)
    return out


# --- as PyTorch operators: opaque to torch.compile, captured in its CUDA graph -------------------------------
# ``ws`` / ``lock`` are the layer's split-K scratch: the kernel leaves ``lock`` at zero again and ``ws`` holds
# nothing anyone reads later, so neither counts as mutated.


@torch.library.custom_op("localgpt::int4_gemv", mutates_args=())
def int4_gemv_op(x: torch.Tensor, words: torch.Tensor, sz: torch.Tensor, ws: torch.Tensor, lock: torch.Tensor,
                 group: int, planes: int, bn: int, split: int, warps: int, dot: bool) -> torch.Tensor:
    n, kw = words.shape
    out = torch.empty(n, dtype=torch.bfloat16, device=x.device)
    extra = {"DOT_BF16": x.is_cuda} if dot else {}
    (_int4_dot_kernel if dot else _int4_gemv_kernel)[(triton.cdiv(n, bn), split)](
        x, words, sz, out, ws, lock, n, kw * 8, words.stride(0), GROUP=group, P=planes, BN=bn, SPLIT=split,
        num_warps=warps, **extra)
    return out


@int4_gemv_op.register_fake
def _(x, words, sz, ws, lock, group, planes, bn, split, warps, dot):
    return x.new_empty(words.shape[0], dtype=torch.bfloat16)


@torch.library.custom_op("localgpt::int8_gemv", mutates_args=())
def int8_gemv_op(x: torch.Tensor, words: torch.Tensor, ws: torch.Tensor, lock: torch.Tensor,
                 planes: int, bn: int, split: int, warps: int, dot: bool) -> torch.Tensor:
    n, kw = words.shape
    out = torch.empty(n, dtype=torch.bfloat16, device=x.device)
    extra = {"DOT_BF16": x.is_cuda} if dot else {}
    (_int8_dot_kernel if dot else _int8_gemv_kernel)[(triton.cdiv(n, bn), split)](
        x, words, out, ws, lock, n, kw * 4, words.stride(0), P=planes, BN=bn, SPLIT=split, num_warps=warps,
        **extra)
    return out


@int8_gemv_op.register_fake
def _(x, words, ws, lock, planes, bn, split, warps, dot):
    return x.new_empty(words.shape[0], dtype=torch.bfloat16)


@torch.library.custom_op("localgpt::bf16_gemv", mutates_args=())
def bf16_gemv_op(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, lock: torch.Tensor,
                 bk: int, bn: int, split: int, warps: int) -> torch.Tensor:
    n, k = w.shape
    out = torch.empty(n, dtype=torch.bfloat16, device=x.device)
    _bf16_gemv_kernel[(triton.cdiv(n, bn), split)](x, w, out, ws, lock, n, k, w.stride(0), BK=bk, BN=bn,
                                                   SPLIT=split, num_warps=warps)
    return out


@bf16_gemv_op.register_fake
def _(x, w, ws, lock, bk, bn, split, warps):
    return x.new_empty(w.shape[0], dtype=torch.bfloat16)


def scratch(kind: str, n: int, k: int, device) -> tuple[tuple, torch.Tensor, torch.Tensor]:
    """(bn, split, warps, tensor-core variant) for a layer and its split-K workspace and arrival counters."""
    bn, split, warps, _, dot = _config(kind, n, k, _sms(torch.device(device)))
    blocks = triton.cdiv(n, bn)
    ws = torch.empty(max(split, 1) * n if split > 1 else 1, dtype=torch.float32, device=device)
    lock = torch.zeros(blocks if split > 1 else 1, dtype=torch.int32, device=device)
    return (bn, split, warps, dot), ws, lock
