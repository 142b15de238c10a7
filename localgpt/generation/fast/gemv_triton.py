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

Measured on an H200 (bench/gpu_notes.md, "Round 2" and "Round 3"): the bf16 GEMV streams 3.6-4.1 TB/s at
Llama-2-7B's shapes (the engine's default for bf16 layers). The first quantised kernels (FMA: ~7 SASS
instructions a weight) ran int8 at 1.7-3.1 TB/s and int4 at 0.8-1.5. The bf16x2 kernels (X2: two nibbles
unpacked by one ``lop3`` into a bf16 pair, the group's scale applied to the block's sum; one ``prmt`` a byte
for int8; 3.1-3.6 / 4.4 instructions a weight, ``bench/gemv_sass.py``) run int8 at 2.0-3.4 TB/s (the default
for int8) and int4 at 1.2-2.1, level with tinygemm summed over a Llama step, so int4 decode stays on tinygemm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from localgpt.generation.fast.slot_triton import step_gdc

MAGIC = tl.constexpr(8388608.0)  # 2^23: an fp32 whose mantissa bits are the integer OR-ed into them


@triton.jit
def _out_value(total, rows, live, out_ptr, sc_ptr, SCALED: tl.constexpr):
    """A row's result as stored: rounded, and with SCALED times the row's scale (bf16), rounded again: the
    arithmetic of the layer's own ``out * scales`` after the kernel."""
    value = total.to(out_ptr.dtype.element_ty)
    if SCALED:
        value = (value.to(tl.float32) * tl.load(sc_ptr + rows, mask=live, other=0.0).to(tl.float32))
        value = value.to(out_ptr.dtype.element_ty)
    return value


@triton.jit
def _finish(acc, rows, live, out_ptr, ws_ptr, lock_ptr, N, SPLIT: tl.constexpr, sc_ptr=None,
            SCALED: tl.constexpr = False):
    """Row sums of ``acc`` [BN, W] to ``out`` (bf16); with SPLIT > 1, via the workspace and the counter."""
    part = tl.sum(acc, axis=1)
    if SPLIT == 1:
        tl.store(out_ptr + rows, _out_value(part, rows, live, out_ptr, sc_ptr, SCALED), mask=live)
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
            tl.store(out_ptr + rows, _out_value(total, rows, live, out_ptr, sc_ptr, SCALED), mask=live)
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
def _bf16_pairs(words, k: tl.constexpr, ASM: tl.constexpr):
    """bf16x2 (128 + field k, 128 + field k + 4) of each int32 of 4-bit fields: the two nibbles put under 128's
    exponent (0x4300) in one ``lop3`` (after a shift). ``ASM=False``: the same bits from plain Triton ops (for
    the CPU interpreter, which cannot run PTX; the compiler then emits two logic ops)."""
    if not ASM:
        return ((words >> (4 * k)) & 0x000F000F) | 0x43004300
    elif k == 0:
        return tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x000F000F, 0x43004300, 0xEA;", "=r,r", [words],
                                         dtype=tl.int32, is_pure=True, pack=1)
    elif k == 1:
        return tl.inline_asm_elementwise("{.reg .b32 t; shr.b32 t, $1, 4; lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xEA;}",
                                         "=r,r", [words], dtype=tl.int32, is_pure=True, pack=1)
    elif k == 2:
        return tl.inline_asm_elementwise("{.reg .b32 t; shr.b32 t, $1, 8; lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xEA;}",
                                         "=r,r", [words], dtype=tl.int32, is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise("{.reg .b32 t; shr.b32 t, $1, 12; lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xEA;}",
                                         "=r,r", [words], dtype=tl.int32, is_pure=True, pack=1)


# The high bf16 of a pair read as an fp32 without masking the low half off: 128 + q_hi + (0x4300 + q_lo) / 2^16.
# The constant part is taken out with the group's x sum; q_lo / 2^16 (< 2.3e-4 of a quantisation step) is left.
HI_FLOOR = tl.constexpr(0x4300 / 65536.0)


@triton.jit
def _load_rows(w_ptrs, sz_ptrs, live, more, FULL: tl.constexpr):
    """A block's words [BN, P] and its rows' (scale, zero) pairs [BN]; zeros where ``more`` is False. With
    ``FULL`` (N a multiple of BN) no row masks: they cost a predicate and a zeroing move a load."""
    if FULL:
        return (tl.load(w_ptrs, mask=more, other=0), tl.load(sz_ptrs, mask=more, other=0))
    else:
        return (tl.load(w_ptrs, mask=live[:, None] & more, other=0), tl.load(sz_ptrs, mask=live & more, other=0))


@triton.jit
def _load_words(w_ptrs, live, more, FULL: tl.constexpr):
    if FULL:
        return tl.load(w_ptrs, mask=more, other=0)
    else:
        return tl.load(w_ptrs, mask=live[:, None] & more, other=0)


@triton.jit
def _int4_x2_kernel(x_ptr, w_ptr, sz_ptr, out_ptr, ws_ptr, lock_ptr, N, K, stride,
                    GROUP: tl.constexpr, P: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr,
                    ASM: tl.constexpr = True, EXACT: tl.constexpr = False, FULL: tl.constexpr = False,
                    AHEAD: tl.constexpr = False):
    # The planar int4 layout with one group a block (8P == GROUP): nibbles k and k + 4 of a word are unpacked
    # together into a bf16 pair (128 + q), widened to fp32 by a shift (low) and a mask or nothing (high,
    # ``EXACT``), multiplied by x and summed over the block; the group's scale and zero are applied to that sum
    # (w x = (128 + q) s x + (z - 136 s) x), so a weight costs ~1.4 integer ops and one FMA.
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    live = rows < N
    cols = tl.arange(0, P)
    n_blocks = K // (8 * P)
    per_split = (n_blocks + SPLIT - 1) // SPLIT
    first = tl.program_id(1) * per_split
    last = tl.minimum(first + per_split, n_blocks)
    w_row = w_ptr + rows[:, None] * stride + cols[None, :]
    acc = tl.zeros((BN, P), dtype=tl.float32)
    rest = tl.zeros((BN,), dtype=tl.float32)  # the zero points' and offsets' part, a row at a time
    if AHEAD:  # the next block's words are loaded before this block's arithmetic: twice the bytes in flight
        words_next = _load_rows(w_row + first * P, sz_ptr + first * N + rows, live, first < last, FULL)
    for blk in range(first, last):
        if AHEAD:
            words, pair = words_next
            words_next = _load_rows(w_row + (blk + 1) * P, sz_ptr + (blk + 1) * N + rows, live, blk + 1 < last,
                                    FULL)
        else:
            words, pair = _load_rows(w_row + blk * P, sz_ptr + blk * N + rows, live, True, FULL)
        scale = (pair << 16).to(tl.float32, bitcast=True)
        zero = (pair & -65536).to(tl.float32, bitcast=True)
        part = tl.zeros((BN, P), dtype=tl.float32)
        x_lo = tl.zeros((P,), dtype=tl.float32)
        x_hi = tl.zeros((P,), dtype=tl.float32)
        for k in tl.static_range(4):
            t = _bf16_pairs(words, k, ASM)
            xl = tl.load(x_ptr + blk * (8 * P) + k * P + cols).to(tl.float32)
            xh = tl.load(x_ptr + blk * (8 * P) + (k + 4) * P + cols).to(tl.float32)
            if EXACT:
                hi = (t & -65536).to(tl.float32, bitcast=True)
            else:
                hi = t.to(tl.float32, bitcast=True)
            part += (t << 16).to(tl.float32, bitcast=True) * xl[None, :]  # two separate FMAs into the sum
            part += hi * xh[None, :]
            x_lo += xl
            x_hi += xh
        x_all = tl.sum(x_lo + x_hi, axis=0)
        if EXACT:
            offset = 136.0 * x_all
        else:
            offset = 136.0 * x_all + HI_FLOOR * tl.sum(x_hi, axis=0)
        acc += scale[:, None] * part
        rest += zero * x_all - scale * offset
    _finish_row(tl.sum(acc, axis=1) + rest, rows, live, out_ptr, ws_ptr, lock_ptr, N, SPLIT)


@triton.jit
def _int8_fields(words, b: tl.constexpr, ASM: tl.constexpr):
    """2^23 + byte b of each int32 as an fp32 (``prmt``: the byte under 2^23's exponent, in one instruction)."""
    magic = tl.full(words.shape, 0x4B000000, tl.int32)
    if not ASM:
        return (((words >> (8 * b)) & 255) | 0x4B000000).to(tl.float32, bitcast=True)
    elif b == 0:
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7440;", "=r,r,r", [words, magic],
                                         dtype=tl.int32, is_pure=True, pack=1).to(tl.float32, bitcast=True)
    elif b == 1:
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7441;", "=r,r,r", [words, magic],
                                         dtype=tl.int32, is_pure=True, pack=1).to(tl.float32, bitcast=True)
    elif b == 2:
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7442;", "=r,r,r", [words, magic],
                                         dtype=tl.int32, is_pure=True, pack=1).to(tl.float32, bitcast=True)
    else:
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7443;", "=r,r,r", [words, magic],
                                         dtype=tl.int32, is_pure=True, pack=1).to(tl.float32, bitcast=True)


@triton.jit
def _int8_x2_kernel(x_ptr, w_ptr, out_ptr, ws_ptr, lock_ptr, N, K, stride,
                    P: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr, ASM: tl.constexpr = True,
                    FULL: tl.constexpr = False, AHEAD: tl.constexpr = False, sc_ptr=None,
                    SCALED: tl.constexpr = False):
    # _int8_gemv_kernel with each byte made an fp32 by one ``prmt`` (2^23 + u, u = v + 128), one add removing
    # 2^23 + 128 exactly, and the FMA: three instructions a weight. SCALED: the rows' scales applied to the
    # result (``_out_value``).
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    live = rows < N
    cols = tl.arange(0, P)
    n_blocks = K // (4 * P)
    per_split = (n_blocks + SPLIT - 1) // SPLIT
    first = tl.program_id(1) * per_split
    last = tl.minimum(first + per_split, n_blocks)
    w_row = w_ptr + rows[:, None] * stride + cols[None, :]
    acc = tl.zeros((BN, P), dtype=tl.float32)
    if AHEAD:
        words_next = _load_words(w_row + first * P, live, first < last, FULL)
    for blk in range(first, last):
        if AHEAD:
            words = words_next ^ -2139062144  # 0x80808080: u = v + 128
            words_next = _load_words(w_row + (blk + 1) * P, live, blk + 1 < last, FULL)
        else:
            words = _load_words(w_row + blk * P, live, True, FULL) ^ -2139062144
        for b in tl.static_range(4):
            x = tl.load(x_ptr + blk * (4 * P) + b * P + cols).to(tl.float32)[None, :]
            acc += (_int8_fields(words, b, ASM) - (MAGIC + 128.0)) * x
    _finish(acc, rows, live, out_ptr, ws_ptr, lock_ptr, N, SPLIT, sc_ptr, SCALED)


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
                      BK: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr, EVEN: tl.constexpr = True,
                      GDC: tl.constexpr = False, PRE: tl.constexpr = False):
    # EVEN: BK divides K; else the last block's columns past K are masked (Falcon-7B's 4,544 = 17.75 x 256).
    # GDC (a programmatic dependent launch, slot_triton.step_gdc): the next kernel may be scheduled at once; PRE:
    # the program's first block of weights asked for before it waits for the kernels before it (x is theirs), held
    # in bf16 meanwhile (``_pre_block``: only at a few weights a thread, as measured).
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    live = rows < N
    cols = tl.arange(0, BK)
    n_blocks = tl.cdiv(K, BK)
    per_split = (n_blocks + SPLIT - 1) // SPLIT
    first = tl.program_id(1) * per_split
    last = tl.minimum(first + per_split, n_blocks)
    w_row = w_ptr + rows[:, None] * stride + cols[None, :]
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    start = first
    if GDC:
        tl.extra.cuda.gdc_launch_dependents()
        if PRE:
            inside0 = (first * BK + cols < K) & (first < last)
            w0 = tl.load(w_row + first * BK, mask=live[:, None] & inside0[None, :], other=0.0)
            tl.extra.cuda.gdc_wait()
            x0 = tl.load(x_ptr + first * BK + cols, mask=inside0, other=0.0).to(tl.float32)[None, :]
            acc += w0.to(tl.float32) * x0
            start = first + 1
        else:
            tl.extra.cuda.gdc_wait()
    for blk in range(start, last):
        if EVEN:
            w = tl.load(w_row + blk * BK, mask=live[:, None], other=0.0).to(tl.float32)
            x = tl.load(x_ptr + blk * BK + cols).to(tl.float32)[None, :]
        else:
            inside = blk * BK + cols < K
            w = tl.load(w_row + blk * BK, mask=live[:, None] & inside[None, :], other=0.0).to(tl.float32)
            x = tl.load(x_ptr + blk * BK + cols, mask=inside, other=0.0).to(tl.float32)[None, :]
        acc += w * x
    _finish(acc, rows, live, out_ptr, ws_ptr, lock_ptr, N, SPLIT)


@triton.jit
def _int4_planar_dequant_kernel(w_ptr, sz_ptr, out_ptr, N, K, stride, GROUP: tl.constexpr, P: tl.constexpr,
                                BN: tl.constexpr, TILED: tl.constexpr = False):
    # One program: BN rows x one block (P words = 8P columns), written out in bf16 [N, K]. ``TILED``: the words
    # in ``gemv_cuda.tile_words``' order ([N/16, blocks, 16 rows, P words]).
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    live = rows < N
    blk = tl.program_id(1)
    cols = tl.arange(0, P)
    if TILED:
        where = (rows // 16)[:, None] * (16 * stride) + blk * (16 * P) + (rows % 16)[:, None] * P + cols[None, :]
    else:
        where = rows[:, None] * stride + blk * P + cols[None, :]
    words = tl.load(w_ptr + where, mask=live[:, None], other=0)
    for j in tl.static_range(8):
        pair = tl.load(sz_ptr + ((blk * 8 * P + j * P) // GROUP) * N + rows, mask=live, other=0)
        scale = (pair << 16).to(tl.float32, bitcast=True)[:, None]
        zero = (pair & -65536).to(tl.float32, bitcast=True)[:, None]
        q = ((words >> (4 * j)) & 15).to(tl.float32)
        w = (q - 8.0) * scale + zero
        tl.store(out_ptr + rows[:, None] * K + blk * (8 * P) + j * P + cols[None, :],
                 w.to(out_ptr.dtype.element_ty), mask=live[:, None])


# --- launchers ---------------------------------------------------------------------------------------------

# The quantised kernels, by the code in a config's fifth place: the magic-number FMA kernel, its tensor-core
# variant, and the bf16x2-unpacking kernel (``_int4_x2_kernel`` / ``_int8_x2_kernel``: inline PTX, so GPU only;
# int4 needs one group a block, ``8 * planes == group``). ``DEFAULT_KERNEL``: the one for shapes not in TUNED.
FMA, DOT, X2, X2_AHEAD = 0, 1, 2, 3  # X2_AHEAD: X2 loading the next block before this one's arithmetic
DEFAULT_KERNEL = {"int4": FMA, "int8": FMA}

# (rows a program, programs along K, warps, pipeline stages, kernel) by layer shape; tuned on the H200 (bench/gpu.py
# --gemv-sweep); shapes not listed take the rule in ``_config`` (the FMA kernel for int8 / int4: the X2 kernels'
# best configs differ by shape, and their rule was not measured).
TUNED: dict[tuple[str, int, int], tuple] = {
    # H200, 2026-11-30 (bench/gpu.py --gemv-sweep): 3.8-4.1 TB/s on the large shapes, cuBLAS 3.5-3.8.
    # Llama-2-7B re-swept as dependent launches (slot_triton.STEP_PDL), H200 2026-12-02 at 1abcaf6, us against the
    # configs before and cuBLAS: 26.2 / 26.2 / 27.7, 10.9 / 10.9 / 12.9, 43.4 / 44.3 / 46.1, 24.4 / 24.4 / 26.9,
    # 63.2 / 63.8 / 66.0 (BF16_BK below)
    ("bf16", 12288, 4096): (16, 1, 4, 1), ("bf16", 4096, 4096): (8, 4, 4, 1), ("bf16", 22016, 4096): (32, 1, 4, 1),
    ("bf16", 4096, 11008): (16, 4, 2, 1), ("bf16", 32000, 4096): (16, 1, 2, 1),
    # Falcon-7B and FalconMamba-7B, H200 2026-12-02 (--gemv-shapes falcon,falcon-mamba at f06ec94, plain launches;
    # BF16_BK below),
    # us against the shape rule's config and cuBLAS: 14.7 / 17.1 / 15.8, 14.5 / 16.8 / 15.6, 44.1 / 55.0 / 46.5,
    # 45.1 / 48.9 / 48.4, 141.0 / 165.4 / 154.5; 35.8 / 39.8 / 35.8, 7.5 / 7.9 / 6.7, 3.1 / 3.1 / 3.8,
    # 20.5 / 23.4 / 21.0, 127.4 / 130.0 / 145.0
    ("bf16", 4672, 4544): (8, 2, 4, 1), ("bf16", 4544, 4544): (8, 2, 4, 1), ("bf16", 18176, 4544): (8, 1, 4, 1),
    ("bf16", 4544, 18176): (16, 4, 4, 1), ("bf16", 65024, 4544): (8, 1, 2, 1),
    ("bf16", 16384, 4096): (32, 1, 4, 1), ("bf16", 288, 8192): (8, 4, 4, 1), ("bf16", 8192, 256): (8, 1, 4, 1),
    ("bf16", 4096, 8192): (16, 4, 2, 1), ("bf16", 65024, 4096): (16, 1, 2, 1),
    # int8 / int4 planar: the bf16x2 kernels (X2; 3 = X2_AHEAD), H200 2026-11-30, bench/gpu.py --gemv-sweep at
    # b5bc763 (us: X2 / FMA kernel / tinygemm). int8: 17.4 / 19.1, 8.2 / 9.9, 28.5 / 33.5, 16.0 / 20.5, 38.4 / 42.0.
    # int4: 16.0 / 21.8 / 15.9, 7.4 / 10.7 / 6.8, 26.6 / 34.8 / 26.4, 14.1 / 21.9 / 15.2, 33.6 / 46.8 / 38.0.
    ("int8", 12288, 4096): (32, 4, 4, 1, X2_AHEAD), ("int8", 4096, 4096): (32, 16, 2, 1, X2),
    ("int8", 22016, 4096): (32, 2, 4, 1, X2_AHEAD), ("int8", 4096, 11008): (64, 16, 4, 1, X2),
    ("int8", 32000, 4096): (64, 2, 4, 1, X2),
    ("int4", 12288, 4096): (64, 4, 2, 1, X2), ("int4", 4096, 4096): (64, 16, 2, 1, X2),
    ("int4", 22016, 4096): (64, 8, 2, 1, X2), ("int4", 4096, 11008): (64, 16, 2, 1, X2),
    ("int4", 32000, 4096): (64, 2, 2, 1, X2),
}


# The FMA kernel's configs of round 2 (H200, gpu_notes.md), the baseline bench/gpu.py --gemv-sweep runs beside X2.
FMA_TUNED = {(kind, n, k): cfg for kind in ("int8", "int4") for (n, k), cfg in {
    (12288, 4096): (32, 4, 2, 1, FMA), (4096, 4096): (16, 4, 4, 1, FMA), (22016, 4096): (32, 4, 2, 1, FMA),
    (4096, 11008): (16, 4, 4, 1, FMA), (32000, 4096): (32, 4, 2, 1, FMA)}.items()}


def _config(kind: str, n: int, k: int, sms: int) -> tuple[int, int, int, int, int]:
    """(rows a program, programs along K, warps, stages, kernel: FMA / DOT / X2) for a layer."""
    tuned = TUNED.get((kind, n, k))
    if tuned:
        return tuple(tuned) + (DEFAULT_KERNEL.get(kind, FMA),) * (5 - len(tuned))
    kernel = DEFAULT_KERNEL.get(kind, FMA)
    bn = 16 if kind == "bf16" else 64 if kernel in (X2, X2_AHEAD) else 32
    programs = triton.cdiv(n, bn)
    split = 4 if programs < 3 * sms and k >= 2048 else 1
    return bn, split, 4 if kernel not in (X2, X2_AHEAD) else 2, 1, kernel


def _int4_launch(kernel: int, grid, x, words, sz, out, ws, lock, n, k, group, planes, bn, split, warps, stages=1):
    if int(kernel) in (X2, X2_AHEAD):
        assert 8 * planes == group, "the x2 int4 kernel reads one group a block"
        _int4_x2_kernel[grid](x, words, sz, out, ws, lock, n, k, words.stride(0), GROUP=group, P=planes, BN=bn,
                              SPLIT=split, ASM=x.is_cuda, FULL=n % bn == 0, AHEAD=int(kernel) == X2_AHEAD,
                              num_warps=warps, num_stages=stages)
    elif int(kernel) == DOT:
        _int4_dot_kernel[grid](x, words, sz, out, ws, lock, n, k, words.stride(0), GROUP=group, P=planes, BN=bn,
                               SPLIT=split, DOT_BF16=x.is_cuda, num_warps=warps, num_stages=stages)
    else:
        _int4_gemv_kernel[grid](x, words, sz, out, ws, lock, n, k, words.stride(0), GROUP=group, P=planes, BN=bn,
                                SPLIT=split, num_warps=warps, num_stages=stages)


def _int8_launch(kernel: int, grid, x, words, out, ws, lock, n, k, planes, bn, split, warps, stages=1, *,
                 scales=None):
    if int(kernel) in (X2, X2_AHEAD):
        _int8_x2_kernel[grid](x, words, out, ws, lock, n, k, words.stride(0), P=planes, BN=bn, SPLIT=split,
                              ASM=x.is_cuda, FULL=n % bn == 0, AHEAD=int(kernel) == X2_AHEAD,
                              sc_ptr=scales if scales is not None else x, SCALED=scales is not None,
                              num_warps=warps, num_stages=stages)
        return
    assert scales is None, "the row scales are the X2 kernel's"
    if int(kernel) == DOT:
        _int8_dot_kernel[grid](x, words, out, ws, lock, n, k, words.stride(0), P=planes, BN=bn, SPLIT=split,
                               DOT_BF16=x.is_cuda, num_warps=warps, num_stages=stages)
    else:
        _int8_gemv_kernel[grid](x, words, out, ws, lock, n, k, words.stride(0), P=planes, BN=bn, SPLIT=split,
                                num_warps=warps, num_stages=stages)


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
              ws: Workspace, config: tuple | None = None, dot: bool | int = False) -> torch.Tensor:
    """out [N] (bf16) = W x for one token x [K] (bf16); W planar int4 ``words`` [N, K/8], ``sz`` int32 [K/group, N].
    ``dot``: the kernel (FMA / DOT / X2; True is DOT)."""
    n, kw = words.shape
    k = kw * 8
    bn, split, warps, stages = (config or _config("int4", n, k, _sms(x.device)))[:4]
    blocks = triton.cdiv(n, bn)
    buf, lock = ws.get(n, split, blocks, x.device)
    _int4_launch(int(dot), (blocks, split), x, words, sz, out, buf, lock, n, k, group, planes, bn, split, warps, stages)
    return out


def int8_gemv(x: torch.Tensor, words: torch.Tensor, planes: int, out: torch.Tensor, ws: Workspace,
              config: tuple | None = None, dot: bool | int = False) -> torch.Tensor:
    """out [N] (bf16) = Q x for one token (unscaled row sums); Q planar int8 ``words`` [N, K/4]. ``dot``: the
    kernel (FMA / DOT / X2; True is DOT)."""
    n, kw = words.shape
    k = kw * 4
    bn, split, warps, stages = (config or _config("int8", n, k, _sms(x.device)))[:4]
    blocks = triton.cdiv(n, bn)
    buf, lock = ws.get(n, split, blocks, x.device)
    _int8_launch(int(dot), (blocks, split), x, words, out, buf, lock, n, k, planes, bn, split, warps, stages)
    return out


def bf16_gemv(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, ws: Workspace,
              config: tuple | None = None, bk: int | None = None) -> torch.Tensor:
    n, k = w.shape
    bk = bk or bf16_block(n, k)
    bn, split, warps, stages = (config or _config("bf16", n, k, _sms(x.device)))[:4]
    blocks = triton.cdiv(n, bn)
    buf, lock = ws.get(n, split, blocks, x.device)
    return _bf16_launch(x, w, out, buf, lock, bk, bn, split, warps, step_gdc(x.device), stages)


def _bf16_launch(x, w, out, ws, lock, bk: int, bn: int, split: int, warps: int, pdl: bool,
                 stages: int = 1) -> torch.Tensor:
    """One launch of the bf16 GEMV into ``out``: the masked tail where ``bk`` does not divide K, and as a dependent
    launch (``pdl``) with the early block where ``_pre_block`` allows it."""
    n, k = w.shape
    _bf16_gemv_kernel[(triton.cdiv(n, bn), split)](x, w, out, ws, lock, n, k, w.stride(0), BK=bk, BN=bn,
                                                   SPLIT=split, EVEN=k % bk == 0, GDC=pdl,
                                                   PRE=_pre_block(bn, bk, warps), num_warps=warps,
                                                   num_stages=stages, launch_pdl=pdl)
    return out


def _pre_block(bn: int, bk: int, warps: int) -> bool:
    """Whether a dependent bf16 GEMV asks for its first block before its wait: at most 32 weights a thread. H200,
    round 23: Falcon-7B's configs (16 a thread) gained as dependent launches (242.1 -> 253.3 tok/s); FalconMamba-7B's
    in_proj (32 rows, 256 columns, 4 warps: 64 a thread, then converted to fp32 before the wait) lost (227 -> 202,
    its GEMVs 3,999 against 3,509 us a step), 225 without the early block there. Not registers: ptxas gives that
    config 237 registers plain and 198 with the early block in bf16, no spills. Its neighbours were plain launches
    then (slot_triton.STEP_PDL_MAMBA), so the rule is a measured guard, not a derived one."""
    return bn * bk <= 32 * 32 * warps


# The bf16 kernel's columns a block (BK) by layer shape, tuned with TUNED's bf16 configs (bench/gpu.py --gemv-sweep
# --gemv-shapes); other shapes take the largest of 256 / 128 / 64 that divides K, else 128 with the tail masked.
BF16_BK: dict[tuple[int, int], int] = {(4672, 4544): 256, (4544, 4544): 256, (18176, 4544): 256, (4544, 18176): 128,
                                       (65024, 4544): 256, (4096, 4096): 128, (22016, 4096): 128}


def bf16_block(n: int, k: int) -> int:
    return BF16_BK.get((n, k)) or next((b for b in (256, 128, 64) if k % b == 0), 128)


def int4_planar_dequant(words: torch.Tensor, sz: torch.Tensor, group: int, planes: int,
                        out: torch.Tensor, tiled: bool = False) -> torch.Tensor:
    """The bf16 weight [N, K] of a planar int4 layer (``tiled``: in ``gemv_cuda.tile_words``' order), written
    into ``out`` (for cuBLAS on a prompt)."""
    n, kw = words.shape
    k = kw * 8
    bn = 32
    _int4_planar_dequant_kernel[(triton.cdiv(n, bn), k // (8 * planes))](words, sz, out, n, k, kw, GROUP=group,
                                                                          P=planes, BN=bn, TILED=tiled, num_warps=4)
    return out


# --- as PyTorch operators: opaque to torch.compile, captured in its CUDA graph -------------------------------
# ``ws`` / ``lock`` are the layer's split-K scratch: the kernel leaves ``lock`` at zero again and ``ws`` holds
# nothing anyone reads later, so neither counts as mutated.
# The layers call ``int4_gemv_call`` / ``int8_gemv_call`` / ``bf16_gemv_call``: the operator while torch.compile
# traces, the same launch directly otherwise. Calling a ``custom_op`` outside a compile imports torch._dynamo
# (torch._compile's disable wrapper around its body): 4.7 s of a start on the H200 image, for engines that never
# compile (mode "graph", the load checks).


def _int4_gemv_eager(x: torch.Tensor, words: torch.Tensor, sz: torch.Tensor, ws: torch.Tensor, lock: torch.Tensor,
                     group: int, planes: int, bn: int, split: int, warps: int, dot: int) -> torch.Tensor:
    n, kw = words.shape
    out = torch.empty(n, dtype=torch.bfloat16, device=x.device)
    _int4_launch(dot, (triton.cdiv(n, bn), split), x, words, sz, out, ws, lock, n, kw * 8, group, planes, bn, split,
                 warps)
    return out


def _int8_gemv_eager(x: torch.Tensor, words: torch.Tensor, ws: torch.Tensor, lock: torch.Tensor,
                     planes: int, bn: int, split: int, warps: int, dot: int,
                     scales: torch.Tensor | None = None) -> torch.Tensor:
    n, kw = words.shape
    out = torch.empty(n, dtype=torch.bfloat16, device=x.device)
    _int8_launch(dot, (triton.cdiv(n, bn), split), x, words, out, ws, lock, n, kw * 4, planes, bn, split, warps,
                 scales=scales)
    return out


def _bf16_gemv_eager(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, lock: torch.Tensor,
                     bk: int, bn: int, split: int, warps: int, pdl: int = 1) -> torch.Tensor:
    # pdl: 1 a transformer's step, 2 a Mamba network's (slot_triton.step_gdc says whether either launch is a
    # dependent one), 0 plain
    out = torch.empty(w.shape[0], dtype=torch.bfloat16, device=x.device)
    return _bf16_launch(x, w, out, ws, lock, bk, bn, split, warps, bool(pdl) and step_gdc(x.device, mamba=pdl == 2))


def int4_gemv_call(*args) -> torch.Tensor:
    return torch.ops.localgpt.int4_gemv(*args) if torch.compiler.is_compiling() else _int4_gemv_eager(*args)


def int8_gemv_call(*args, scales: torch.Tensor | None = None) -> torch.Tensor:
    """The int8 one-token GEMV (args: x, words, ws, lock, planes, bn, split, warps, kernel), times the rows'
    ``scales`` when given: the X2 kernel applies them itself (the multiply after it was a launch of its own:
    Llama-2-7B int8 331 -> 358 tok/s on the H200, graph mode); under torch.compile, and for the other kernels,
    a multiply after, with the same roundings. (Folding the norms and silu·up into the X2 kernel as
    ``gemv_cuda`` does cost more than it saved, 290 tok/s: each of its programs would redo them for its block
    of x.)"""
    if torch.compiler.is_compiling():
        out = torch.ops.localgpt.int8_gemv(*args)
    elif scales is not None and int(args[-1]) in (X2, X2_AHEAD):
        return _int8_gemv_eager(*args, scales=scales)
    else:
        out = _int8_gemv_eager(*args)
    return out if scales is None else out * scales


def bf16_gemv_call(*args) -> torch.Tensor:
    return torch.ops.localgpt.bf16_gemv(*args) if torch.compiler.is_compiling() else _bf16_gemv_eager(*args)


@torch.library.custom_op("localgpt::int4_gemv", mutates_args=())
def int4_gemv_op(x: torch.Tensor, words: torch.Tensor, sz: torch.Tensor, ws: torch.Tensor, lock: torch.Tensor,
                 group: int, planes: int, bn: int, split: int, warps: int, dot: int) -> torch.Tensor:
    return _int4_gemv_eager(x, words, sz, ws, lock, group, planes, bn, split, warps, dot)


@int4_gemv_op.register_fake
def _(x, words, sz, ws, lock, group, planes, bn, split, warps, dot):
    return x.new_empty(words.shape[0], dtype=torch.bfloat16)


@torch.library.custom_op("localgpt::int8_gemv", mutates_args=())
def int8_gemv_op(x: torch.Tensor, words: torch.Tensor, ws: torch.Tensor, lock: torch.Tensor,
                 planes: int, bn: int, split: int, warps: int, dot: int) -> torch.Tensor:
    return _int8_gemv_eager(x, words, ws, lock, planes, bn, split, warps, dot)


@int8_gemv_op.register_fake
def _(x, words, ws, lock, planes, bn, split, warps, dot):
    return x.new_empty(words.shape[0], dtype=torch.bfloat16)


@torch.library.custom_op("localgpt::bf16_gemv", mutates_args=())
def bf16_gemv_op(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, lock: torch.Tensor,
                 bk: int, bn: int, split: int, warps: int, pdl: int = 1) -> torch.Tensor:
    return _bf16_gemv_eager(x, w, ws, lock, bk, bn, split, warps, pdl)


@bf16_gemv_op.register_fake
def _(x, w, ws, lock, bk, bn, split, warps, pdl=1):
    return x.new_empty(w.shape[0], dtype=torch.bfloat16)


def scratch(kind: str, n: int, k: int, device, kernel: int | None = None) -> tuple[tuple, torch.Tensor, torch.Tensor]:
    """(bn, split, warps, kernel) for a layer and its split-K workspace and arrival counters. ``kernel``: force
    one (FMA / DOT / X2) with the shape rule's config, when the tuned one is not wanted (a failed load check)."""
    if kernel is None:
        bn, split, warps, _, dot = _config(kind, n, k, _sms(torch.device(device)))
    else:
        saved = DEFAULT_KERNEL.get(kind), TUNED.pop((kind, n, k), None)
        DEFAULT_KERNEL[kind] = kernel
        try:
            bn, split, warps, _, dot = _config(kind, n, k, _sms(torch.device(device)))
        finally:
            DEFAULT_KERNEL[kind] = saved[0]
            if saved[1] is not None:
                TUNED[(kind, n, k)] = saved[1]
    blocks = triton.cdiv(n, bn)
    ws = torch.empty(max(split, 1) * n if split > 1 else 1, dtype=torch.float32, device=device)
    lock = torch.zeros(blocks if split > 1 else 1, dtype=torch.int32, device=device)
    return (bn, split, warps, dot), ws, lock
