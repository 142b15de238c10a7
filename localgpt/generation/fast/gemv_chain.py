"""The GEMVs between two attentions of a batch-1 decode step in one persistent launch (CUDA C, NVRTC).

Why: ``gemv_cuda``'s kernels stream a step's packed weights at 1.9 TB/s against a copy rate of 4.2 (H200,
bench/gpu_notes.md rounds 8-9): every launch pays a ramp-up, a tail and the drain and launch before the next.
Here one launch runs the phases ``wo -> w_in -> w_out -> the next layer's wqkv`` (or ``lm_head``):

- Weights do not depend on the activations, so their words stream into shared memory ahead of the multiply, into
  the next phases while this one finishes and while the CTA waits at a barrier or stages an input. Two kernels:
  the bulk-copy one (Hopper; ``TMA_SOURCE``): one producer thread copies each phase's run of the CTA's tiles in
  stages of ``WARPS * BPI`` blocks onto mbarriers, ``DEPTH`` stages deep, and the consumer warps release each stage
  when its words are in registers. int4: one contiguous span of words in the tiled layout and one of (scale, zero)
  rows in a tile-major copy made for the chain, by ``cp.async.bulk``; int8 (fp16 operands): one 2-D box of a
  tensor map a block (16 rows of 128 bytes of the planar words, 128-byte swizzle). The ring one (any GPU from
  sm_80; ``RING_SOURCE``): each warp streams its own share through a ring of ``DEPTH`` items (``cp.async``; an
  item is ``BPI`` blocks of 128 columns of a 16-row tile, 1 KiB a block for int4, 2 KiB for int8).
- A phase's tiles are cut into equal runs, one a CTA (one CTA a multiprocessor, all resident); the warps' parts of
  a tile meet in the CTA's shared memory and are added in warp order (deterministic, no global split-K workspace).
- Between phases a grid barrier, then every CTA stages the whole next input in shared memory with the phase's
  prologue (``XMODES``: RMSNorm(x + y) writing the residual sum, or silu(gate) * up), the arithmetic and rounding
  of ``gemv_cuda``'s prologues.
- The decode attention may be the launch's first phase (``Transformer``'s LOCALGPT_GEMV_CHAIN_ATTN: by default in
  int8 chains): rotary and cache write, the attention over positions 0..pos in chunks across the CTAs, the last
  chunk of a head merging them (``attention``; compiled only into the kernels that run it, ``ATTN``). In the
  bulk-copy kernel the cache rows come through the words' ring, copied by the producer first (``attn_copies``,
  ``RingRows``); the ring kernel's warps load them themselves (``GlobalRows``).
- The bulk-copy kernel is a programmatic dependent launch (``PDL``, as are the step's attention kernels,
  ``slot_triton.gdc``): it lets the stream's next kernel onto each multiprocessor it leaves, its producer streams
  the words before the kernel before it has ended, and its consumers ``griddepcontrol.wait`` for that kernel
  before they touch the step's buffers.

The multiply of a block: with fp16 operands (``F16``, the default for int4 and int8, see ``put_cols``) a nibble or
byte pair made fp16 by one ``lop3`` is an A fragment of ``mma.sync.m16n8k16`` (int4: the odd nibbles need no shift;
int8: half the mma and a third of the instructions of the bf16 way), x the B fragments, staged by sub-step then
thread (``XREAD``: no bank conflicts); with bf16 operands (Falcon's int4 chain, the ring kernel's int4, the
fallback) ``gemv_cuda``'s (the same ``HELPERS``). One token (the batch-1 step; batches take ``gemv_cuda``). Checked
against the separate launches when the step is built (``Transformer._chain_check``) and in the GPU tests; the step
that uses it is ``Transformer._step_chain``.

Measured on an H200 (bench/gemv_cuda.py --chain, Llama-2-7B's 32 layers; bench/gpu_notes.md rounds 10-12): int4
bulk-copy 1,524-1,636 us a step of GEMVs against the ring's 1,669-1,745 and ``gemv_cuda``'s 1,721-1,736 with
prologues; engine 500-532 tok/s against 486-490 (ring) and 471 (a launch a GEMV). int8 bulk-copy with fp16 operands
2,336-2,363 us against 2,713 (ring, fp16), 2,892-2,947 (ring, bf16) and 2,721-2,760 with prologues, its multiplies
at the copy rate; the engine's int8 step the same either way (357.9 against 355.8 tok/s for Triton's X2 and the
separate prologues) until round 15's swizzle (366.8 against 359.8: int8 chained by default since). Round 15: int4
with fp16 operands and one block a warp a stage, 1,446-1,466 us, engine 544.7-546.9 tok/s (0.50). What bounds int4
(Nsight Compute, ``DIAG``, ``trace``; round 11): the warps' own work. Without any word loads (DIAG 32) a layer's
launch takes as long as with them (bulk-copy) or 82 % of it (ring): ~136-176 SASS instructions a 1 KiB block (56 of
them the nibbles' lop3 / shifts), 16 warps a multiprocessor at 128 registers, issue slots 43-49 % busy; and ~2.5 us
a phase of staging and ~2 us of barrier, which the warps, not the memory, wait out (round 12: fp16 operands cut
int4's loop 272 -> 244 instructions a two-block stage and were 2 % slower; tiles taken from a counter as the phase
goes, 5 % slower). The attention as a phase: 2,067 against 2,021 us a step with slot_triton's three kernels (pos
512), its slowest CTA 11 us. Round 15 (``bench/chain_ncu_source.sh``, stall samples an instruction): half the warps'
time in the multiply loop, a fifth in the staging, a tenth each at the grid barrier and the phase's end; the new
default's multiply alone (no loads, staging or barriers) is 1,036 us against 917 of streaming, its staging 253 and
barriers 107. Round 16: int8's multiply alone is 1,092 us against ~1,540 of streaming its words (int4's 1,017 against
917), so int8's consumers outrun the copy engine and a deeper ring banks more of each phase's wait: 6 stages 2,171
against 2,292 us, and with the attention as the first phase the engine's int8 step went 367.3 -> 394.4 tok/s (0.68).
Round 17: int4 two blocks a warp a stage, 1,420-1,424 us against 1,452-1,460 (one); the dependent launches, int4's
engine 549.7 -> 577.3 tok/s (580.8-581.4 with both), int8's 394.8 -> 399.3; the attention phase's cache rows by
bulk copy through the ring, int8's engine 398.8 -> 404.8.
"""

from __future__ import annotations

import ctypes
import os

import torch

from localgpt.generation.fast import gemv_cuda

COMMON_SOURCE = r"""
#define MAXPH 8
// the staged input's item (a word's x values: int4 8, int8 4 with fp16 operands, else 8 with the hi nibbles' 16 x)
// and block sums (F16: (sum x, offset sum, f, 0); bf16 int4: sum x; int8: none)
#ifndef XIDX
#define XIDX(ch, t, s) ((ch) * 16 + 4 * (t) + (s))  // the word of a row's block thread t multiplies in sub-step s
#endif
#if F16
#define XS_T float4
#define XSB(xs, i) xs[i]
#if BITS == 8
#define XITEM uint2
#else
#define XITEM uint4
#endif
#else
#define XS_T float
#define XITEM uint4
#define XSB(xs, i) (BITS == 4 ? xs[i] : 0.f)
#endif
// Where the staged input's items sit (XSWZ): by sub-step, then thread (XREAD), so the four threads t of a sub-step
// read four adjacent items. In XIDX's order (by thread, then sub-step) they were 64 bytes apart and t = 0 and 2 (1
// and 3) hit the same banks: every load of x took two shared-memory wavefronts a quarter warp instead of one.
// XPHYS(w): where the staging puts item w (XIDX's index) of a block. fp16 operands only (bf16 ones take gemv_cuda's
// mul_block and the plain order: with two blocks a warp a stage it was no faster, round 15).
#if XSWZ
#define XREAD(ch, t, s) ((ch) * 16 + 4 * (s) + (t))
#ifndef XPHYS  // XIDX = 16 ch + 4 t + s
#define XPHYS(w) (((w) & ~15) | (((w) & 3) << 2) | (((w) >> 2) & 3))
#endif
#else
#define XREAD(ch, t, s) XIDX(ch, t, s)
#undef XPHYS
#define XPHYS(w) (w)
#endif

struct Phase {
    const uint4* w; const u32* sz; const u16* x; const u16* y; const u16* nw; u16* xsum; u16* out; const u16* rs;
    int N, K, xmode, D;  // D: an "ln" phase's real width (its input padded with zeros to K)
    float eps;
    int flags, pad2, pad3;  // flags: NOBAR (no grid barrier before the phase), SAME (the previous phase's input)
    // the attention (xmode 3: x the qkv row, out its output row; ws its chunks' parts, cnt a count a head)
    u16* kc; u16* vc; const u16* cos; const u16* sin; const long long* pos; float* ws; unsigned* cnt;
    int heads, kv, hd, len, chunks, pad4;
    float scale, pad5;
    const void* tmap;  // the bulk-copy kernel's int8 words: a tensor map of [N, K] bytes, boxes of one block
    const u16* y2; const u16* nb;  // "ln": the residual's second branch (x + (y2 + y)); the LayerNorm's bias
    const int* cut;  // the CTAs' tile runs [grid][2] (t0, t1) where the launcher balanced them, or null: equal runs
};
#define NOBAR 1     // no grid barrier before the phase (its input is not written in this launch)
#define SAME 2      // the previous phase's staged input
#define GELU_OUT 4  // the output rows through GELU (exact) as they are written (a parallel block's w_in)
#define RES32 8     // each output row added to an fp32 residual (ws) as it is written, its bf16 copy to xsum (Mamba)
// (Mamba's in_proj) each output row below `heads` (the conv's channels) also through the depthwise causal conv
// of the decode step as it is written: the attention's unused fields hold the conv's state (kc, [heads, kv - 1]
// bf16, shifted by the row), its output (vc, [heads]), weight (cos, [heads, kv]) and bias (sin, [heads] or null)
#define CONV 16
// (Mamba's in_proj, a CONV phase that is the chain's last) x_proj folded in: each CTA's part of x_proj's row over its
// conv channels (xfold_part), the launch's last CTA adding them up (xfold_sum); y2 x_proj's bf16 weight transposed
// [heads, hd], hd its outputs R (a multiple of 8), ws the CTAs' parts [grid, hd] fp32, nb x_proj's row (bf16 [hd])
#define XFOLD 32

__device__ __forceinline__ u32 saddr(const void* p) { return (u32)__cvta_generic_to_shared(p); }
// A phase's tiles are cut into equal contiguous runs, one a CTA (whole tiles: a tile's parts meet in its shared
// memory, not in global memory), and a CTA's items (tile, BPI blocks) into equal contiguous runs, one a warp.
__device__ __forceinline__ void cta_tiles(const Phase& ph, int& t0, int& t1) {
#if (EXTRA & 1) || (EXTRA & 16)
    // phases without a barrier between them share out their blocks together, an XFOLD phase its tiles weighted
    // (Chain)
    if (ph.cut != nullptr) {
        t0 = __ldg(ph.cut + 2 * blockIdx.x);
        t1 = __ldg(ph.cut + 2 * blockIdx.x + 1);
        return;
    }
#endif
    const long T = ph.N / 16;
    t0 = (int)(blockIdx.x * T / gridDim.x);
    t1 = (int)((blockIdx.x + 1) * T / gridDim.x);
}

// DIAG & 16: thread 0 of each CTA notes %globaltimer (ns) at points of each phase: trace[cta][phase][point]
// (0 the barrier passed, 1 the input staged, 2 the tiles multiplied, 3 the producer's last copy issued)
__device__ __forceinline__ void note(long long* trace, int p, int point) {
#if DIAG & 16
    long long t;
    asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
    trace[((long)blockIdx.x * MAXPH + p) * 4 + point] = t;
#endif
}

__device__ __forceinline__ u32 ld_acquire(const unsigned* p) {
    u32 v; asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory"); return v;
}

// Every CTA's writes before it visible to every CTA after it. Thread 0's release add covers the CTA's writes
// (they happen before it through the barrier) and its acquire load what the CTA reads after the next barrier (as
// gemv_cuda's split-K finish; 26 us a step less than cooperative groups' fence.sc on each side, round 10). All
// CTAs are resident (one a multiprocessor the context may use, ``_usable_sms``); a wait past 2^35 cycles (~17 s,
// far past any preemption by another context) traps instead of hanging.
__device__ __forceinline__ void grid_sync(unsigned* bar, unsigned target) {
    CSYNC();
    if (threadIdx.x == 0) {
        asm volatile("red.release.gpu.global.add.u32 [%0], 1;" :: "l"(bar) : "memory");
        const long long t0 = clock64();
        while (ld_acquire(bar) < target)
            if (clock64() - t0 > (1LL << 35)) __trap();
    }
    CSYNC();
}

__device__ __forceinline__ u32 silu_mul_pair(u32 gate, u32 up) {  // slot_triton.silu_mul's rounding, two columns
    u32 r = 0;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const float gv = bf2f((gate >> (16 * h)) & 0xFFFFu), uv = bf2f((up >> (16 * h)) & 0xFFFFu);
        r |= (u32)f2bf(bf2f(f2bf(gv / (1.f + __expf(-gv)))) * uv) << (16 * h);
    }
    return r;
}
__device__ __forceinline__ u32 norm_pair(u32 v, u32 w, float inv) {  // add_rms_norm's: (v * inv) rounded, times w
    return (u32)f2bf(bf2f(w & 0xFFFFu) * bf2f(f2bf(bf2f(v & 0xFFFFu) * inv)))
         | ((u32)f2bf(bf2f(w >> 16) * bf2f(f2bf(bf2f(v >> 16) * inv))) << 16);
}

// slot_triton.gelu's (exact, erf)
__device__ __forceinline__ float gelu1(float x) { return 0.5f * x * (1.f + erff(x * 0.7071067811865476f)); }

// An output row of a GEMV phase, as either kernel writes it: through GELU (GELU_OUT), and added to the fp32 residual
// with its bf16 copy (RES32: as Mamba's add_norm) where the phase asks
__device__ __forceinline__ void put_row(const Phase& ph, int row, u16 v) {
#if EXTRA & 1
    if (ph.flags & GELU_OUT) v = f2bf(gelu1(bf2f(v)));
#endif
    ph.out[row] = v;
#if EXTRA & 2
    if (ph.flags & RES32) {
        const float res = ph.ws[row] + bf2f(v);
        ph.ws[row] = res;
        ph.xsum[row] = f2bf(res);
    }
#endif
#if EXTRA & 4
    // mamba_triton.conv_step's arithmetic: each product of the window (the state's kv - 1 inputs, this row's
    // value last) and the weight rounded to bf16, their sum rounded, the bias added and rounded, silu rounded;
    // then the state shifted by one (the row is this thread's alone)
    if ((ph.flags & CONV) && row < ph.heads) {
        const int nc = ph.kv;
        u16* st = ph.kc + (long)row * (nc - 1);
        const u16* cw = ph.cos + (long)row * nc;
        float acc = 0.f;
        for (int j = 0; j < nc; ++j) acc += bf2f(f2bf(bf2f(j < nc - 1 ? st[j] : v) * bf2f(cw[j])));
        const float c = bf2f(f2bf(bf2f(f2bf(acc)) + (ph.sin != nullptr ? bf2f(ph.sin[row]) : 0.f)));
        ph.vc[row] = f2bf(c / (1.f + __expf(-c)));
        for (int j = 0; j + 2 < nc; ++j) st[j] = st[j + 1];
        st[nc - 2] = v;
    }
#endif
}


// The phase's input after its prologue, staged whole in every CTA straight into xp (each word's x pairs in
// gemv_cuda's order) and, int4, its block sums xs. A thread takes 8 consecutive columns (one 16-byte load of x,
// of y or up, of the norm weight), SV of them a round, every load of a round issued before any is used: one L2
// round trip a round ("rms": one round, the values kept in registers while the row's sum of squares is reduced).
// x and y may have been written by this launch: read through L2. Also clears the tiles' parts.
#define SV 4
#if F16
// fp16 operands (F16): a word's nibbles (int4) or bytes (int8) become fp16 with one lop3 for two of them and no
// shift for the odd nibbles: (w & 0x000F000F) | 0x64006400 is the pair (1024 + q) of fields 0 and 4, (w &
// 0x00F000F0) | 0x64006400 the pair (1024 + 16 q) of fields 1 and 5 (fp16's 10-bit mantissa holds both; bf16's 7
// bits only the first), the same on w >> 8 for fields 2, 6 and 3, 7; an int8 byte is (w & 0x00FF00FF) ^
// 0x64806480, the pair (1152 + v) of bytes 0 and 2. The odd nibbles' x is staged divided by 16, so every product is
// 1024 b + q x (exact, accumulated in fp32), and the block's 1024 sum(b) (int8: 1152 sum(b)) is taken out after the
// mma. A block's x is staged divided by f, a power of two that brings its largest |x| under 2^15 (fp16's range; 1
// unless a value is that large), and the block's mma sum multiplied back by it: the bf16 values, scaled by powers
// of two, are exact in fp16 down to 2^-14 (smaller ones lose low bits, far below the output's rounding).
// xs[block] = (sum x, offset sum, f, 0).
__device__ __forceinline__ u16 f2h(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ void put_cols(XITEM* xp, float4* xs, int i, bool in, const u32 (&f)[8]) {
    const int c = 8 * i, blk = c / COLS, cc = c % COLS, field = cc / P, item0 = blk * P + cc % P;
    u16* x16 = (u16*)xp;
    float v[8], m = 0.f, part = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        v[k] = in ? bf2f(f[k]) : 0.f;
        m = fmaxf(m, fabsf(v[k]));
        part += v[k];
    }
    // f for the warp's two blocks (one instruction: |x|'s bits order as its values)
    const int e = (int)(__reduce_max_sync(0xffffffffu, __float_as_uint(m)) >> 23) - 127 - 14;  // |x| < 2^15: e < 1
    const float fs = e > 0 ? __uint_as_float((u32)(127 + e) << 23) : 1.f;
    float mul = e > 0 ? __uint_as_float((u32)(127 - e) << 23) : 1.f;
#if BITS == 4
    if (field & 1) mul *= 0.0625f;
    const int pos = field < 4 ? 2 * field : 2 * (field - 4) + 1;
#else
    const int pos = (field & 1) * 2 + (field >> 1);  // (x_f0, x_f2, x_f1, x_f3): B's two registers
#endif
    if (in) {
#pragma unroll
        for (int k = 0; k < 8; ++k) x16[XPHYS(item0 + k) * (BITS == 4 ? 8 : 4) + pos] = f2h(v[k] * mul);
    }
    // a block's 128 columns are 16 consecutive threads, two a field: the sums over the threads of the field's
    // parity (bit 1 of the thread) first, then the other parity's in one more shuffle
    part += __shfl_xor_sync(0xffffffffu, part, 1);
    part += __shfl_xor_sync(0xffffffffu, part, 4);
    part += __shfl_xor_sync(0xffffffffu, part, 8);
    const float other = __shfl_xor_sync(0xffffffffu, part, 2);
#if BITS == 4
    // the offset f sum(b), b = x / f (even fields) or x / 16 f (odd ones): fp16's rounding of b left out (it moves
    // only values under 2^-14, by less than their own rounding)
    const float off = field & 1 ? 64.f * part + 1024.f * other : 1024.f * part + 64.f * other;
#else
    const float off = 1152.f * (part + other);
#endif
    if (in && (threadIdx.x & 15) == 0) xs[blk] = make_float4(part + other, off, fs, 0.f);
}
#else
__device__ __forceinline__ void put_cols(XITEM* xp, float* xs, int i, bool in, const u32 (&f)[8]) {
    // columns 8i .. 8i + 7: one field of 8 consecutive items (int4: field (c % 128) / 16 of items c / 16 * 16
    // + c % 16 ..; int8: field (c % 128) / 32 of items c / 32 * 32 + c % 32 ..)
    const int c = 8 * i, blk = c / COLS, cc = c % COLS, field = cc / P, item0 = blk * P + cc % P;
    u16* x16 = (u16*)xp;
    float part = 0.f;
    if (in) {
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            part += bf2f(f[k]);
#if BITS == 4
            x16[XPHYS(item0 + k) * 8 + (field < 4 ? 2 * field : 2 * (field - 4) + 1)] = (u16)f[k];
#else
            // (f0 | f2 << 16, 16 f0 | 16 f2 << 16, f1 | f3 << 16, 16 f1 | 16 f3 << 16)
            const int pos = (field & 1) * 4 + (field >> 1);
            x16[(item0 + k) * 8 + pos] = (u16)f[k];
            x16[(item0 + k) * 8 + pos + 2] = f2bf(16.f * bf2f(f[k]));
#endif
        }
    }
#if BITS == 4
    // a block's 128 columns are 16 consecutive threads
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
    if (in && (threadIdx.x & 15) == 0) xs[blk] = part;
#endif
}
#endif


#if ATTN
// --- the attention of one decode step as a phase (xmode 3; kernels with ATTN only) ---
// Work item (head h, chunk c) of heads x chunks, one CTA at a time: query head h (rotated, rounded to bf16, as
// slot_triton.rope_store) against cache positions [c cs, (c + 1) cs) of 0..pos of its kv head, the position pos
// itself from the qkv row (its k rotated and rounded; the item of the kv group's first head and the last chunk
// writes k and v into the caches). Each warp keeps a running (max, sum, out) over its positions, the CTA merges
// its warps' into ws[h][c] = (m, l, o[hd]) in fp32, and the last of a head's chunks to finish merges them (as
// slot_triton's combine) into the head's bf16 row of the phase's output, the next phase's plain input. A lane
// holds hd / 32 consecutive dims (hd 64 or 128).
#define ADL 4  // most dims a lane
#define NEG_INF __int_as_float(0xff800000)

// a lane's dims of a cache row, packed (4 bf16 for hd 128, 2 for 64): unpacked where used (dims past dl read 0);
// SHARED: a row the bulk-copy ring holds (RingRows), else one in global memory (past the L1: other CTAs write rows)
template <bool SHARED = false>
__device__ __forceinline__ uint2 load_row(const u16* p, int dl) {
    if (SHARED) return dl == 4 ? *(const uint2*)p : make_uint2(*(const u32*)p, 0u);
    if (dl == 4) return __ldcg((const uint2*)p);
    return make_uint2(__ldcg((const u32*)p), 0u);
}
__device__ __forceinline__ void unpack_row(uint2 u, float (&v)[ADL]) {
    v[0] = bf2f(u.x & 0xFFFFu); v[1] = bf2f(u.x >> 16); v[2] = bf2f(u.y & 0xFFFFu); v[3] = bf2f(u.y >> 16);
}

// a lane's dims of a q or k row rotated (slot_triton.rope_store's rotate-half, rounded to bf16); one load each of
// the row's, the cos and the sin dims
__device__ __forceinline__ void rope_lane(const u16* row, const u16* cs, const u16* sn, int lane, int dl, int half,
                                          float (&out)[ADL]) {
    float x[ADL], c[ADL], s[ADL];
    unpack_row(load_row(row + lane * dl, dl), x);
    unpack_row(load_row(cs + lane * dl, dl), c);
    unpack_row(load_row(sn + lane * dl, dl), s);
#pragma unroll
    for (int e = 0; e < ADL; ++e) {
        const float other = __shfl_xor_sync(0xffffffffu, x[e], 16);  // dim d + half (d < half) or d - half
        const float r = lane * dl < half ? x[e] * c[e] - other * s[e] : x[e] * c[e] + other * s[e];
        out[e] = e < dl ? bf2f(f2bf(r)) : 0.f;
    }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// a score s and value row v into a warp's running (m, l, o)
__device__ __forceinline__ void online(float sc, const float (&v)[ADL], float& m, float& l, float (&o)[ADL]) {
    const float mn = fmaxf(m, sc);
    const float alpha = __expf(m - mn), p = __expf(sc - mn);  // m = -inf at first: alpha 0
    l = l * alpha + p;
#pragma unroll
    for (int e = 0; e < ADL; ++e) o[e] = o[e] * alpha + p * v[e];
    m = mn;
}

#define AU 8  // positions a warp has in flight a round (two rounds: the next one's loads during this one's math)

// a warp's round of cache rows: positions base, base + WARPS, ... (AU of them, those before end); SHARED: of a
// ring stage (RingRows)
template <bool SHARED = false>
__device__ __forceinline__ void load_round(const u16* kb, const u16* vb, int base, int end, int HD, int dl,
                                           uint2 (&kr)[AU], uint2 (&vr)[AU]) {
#pragma unroll
    for (int u = 0; u < AU; ++u) {
        const int i = base + u * WARPS;
        kr[u] = vr[u] = make_uint2(0u, 0u);
        if (i < end) {
            const long at = SHARED ? i * HD : (long)i * HD;  // a stage's offsets fit an int
            kr[u] = load_row<SHARED>(kb + at, dl);
            vr[u] = load_row<SHARED>(vb + at, dl);
        }
    }
}

// a round's rows into the warp's running (m, l, o): every score first (their shuffle reductions independent of each
// other), then one rescale by the round's new max and the rows' exp-weighted values (base < end: one row at least)
__device__ __forceinline__ void consume_round(const uint2 (&kr)[AU], const uint2 (&vr)[AU], int base, int end,
                                              const float (&q)[ADL], float& m, float& l, float (&o)[ADL]) {
    float sc[AU], mx = m;
#pragma unroll
    for (int u = 0; u < AU; ++u) {
        float kv[ADL], d = 0.f;
        unpack_row(kr[u], kv);
#pragma unroll
        for (int e = 0; e < ADL; ++e) d += q[e] * kv[e];
        sc[u] = warp_sum(d);
        if (base + u * WARPS < end) mx = fmaxf(mx, sc[u]);
    }
    const float alpha = __expf(m - mx);  // m = -inf at first: 0
    l *= alpha;
#pragma unroll
    for (int e = 0; e < ADL; ++e) o[e] *= alpha;
#pragma unroll
    for (int u = 0; u < AU; ++u) {
        if (base + u * WARPS < end) {
            float vv[ADL];
            unpack_row(vr[u], vv);
            const float p = __expf(sc[u] - mx);
            l += p;
#pragma unroll
            for (int e = 0; e < ADL; ++e) o[e] += p * vv[e];
        }
    }
    m = mx;
}

// A warp's cache rows of an item read straight from global memory (the ring kernel's): rounds of AU positions
// (base, base + WARPS, ...), the first asked for before the query's rotary (their latencies overlap: ``begin``),
// each round's math with the next round's rows in flight
struct GlobalRows {
    uint2 ka[AU], va[AU];
    __device__ __forceinline__ void begin(const u16* kb, const u16* vb, int lo, int end, int HD, int dl, int warp) {
        load_round(kb, vb, lo + warp, end, HD, dl, ka, va);
    }
    __device__ __forceinline__ void run(const u16* kb, const u16* vb, int lo, int end, int HD, int dl, int warp,
                                        int lane, const float (&q)[ADL], float& m, float& l, float (&o)[ADL]) {
        uint2 kb2[AU], vb2[AU];
        for (int base = lo + warp; base < end; base += 2 * WARPS * AU) {
            load_round(kb, vb, base + WARPS * AU, end, HD, dl, kb2, vb2);
            consume_round(ka, va, base, end, q, m, l, o);
            if (base + WARPS * AU >= end) break;
            load_round(kb, vb, base + 2 * WARPS * AU, end, HD, dl, ka, va);
            consume_round(kb2, vb2, base + WARPS * AU, end, q, m, l, o);
        }
    }
};

// Rows: GlobalRows, or the bulk-copy kernel's RingRows (the producer's copies of them through the ring)
template <class Rows>
__device__ __forceinline__ void attention(const Phase& ph, float* scr, Rows& rows) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int H = ph.heads, KV = ph.kv, HD = ph.hd, C = ph.chunks, dl = HD / 32, half = HD / 2, rep = H / KV;
    const int pos = (int)__ldcg(ph.pos), L = pos + 1, cs = (L + C - 1) / C, WS = HD + 4;
    const u16* cosr = ph.cos + (long)pos * HD;
    const u16* sinr = ph.sin + (long)pos * HD;
    __shared__ int last;
    __shared__ float wf[WARPS + 1];  // the warps' weights exp(m_w - M) in the CTA's merge, then M
    for (int item = blockIdx.x; item < H * C; item += gridDim.x) {
        const int h = item / C, c = item % C, kh = h / rep;
        const int lo = c * cs, hi = min(L, lo + cs);
        const u16* kb = ph.kc + (long)kh * ph.len * HD + lane * dl;
        const u16* vb = ph.vc + (long)kh * ph.len * HD + lane * dl;
        const int end = min(hi, pos);  // the cached positions of the chunk; pos itself below
        rows.begin(kb, vb, lo, end, HD, dl, warp);
        float q[ADL];
        rope_lane(ph.x + (long)h * HD, cosr, sinr, lane, dl, half, q);
#pragma unroll
        for (int e = 0; e < ADL; ++e) q[e] *= ph.scale;
        float m = NEG_INF, l = 0.f, o[ADL] = {0.f, 0.f, 0.f, 0.f};
        rows.run(kb, vb, lo, end, HD, dl, warp, lane, q, m, l, o);
        if (pos >= lo && pos < hi && warp == 0) {  // the new position, from the qkv row
            float kn[ADL], vn[ADL];
            rope_lane(ph.x + (long)(H + kh) * HD, cosr, sinr, lane, dl, half, kn);
            unpack_row(load_row(ph.x + (long)(H + KV + kh) * HD + lane * dl, dl), vn);
            if (h % rep == 0) {
#pragma unroll
                for (int e = 0; e < ADL; ++e) {
                    if (e < dl) {
                        ph.kc[((long)kh * ph.len + pos) * HD + lane * dl + e] = f2bf(kn[e]);
                        ph.vc[((long)kh * ph.len + pos) * HD + lane * dl + e] = f2bf(vn[e]);
                    }
                }
            }
            float d = 0.f;
#pragma unroll
            for (int e = 0; e < ADL; ++e) d += q[e] * kn[e];
            online(warp_sum(d), vn, m, l, o);
        }
        // the warps' (m, l, o) into the CTA's, then ws[h][c] = (m, l, -, -, o[hd]): each warp's weight exp(m_w - M)
        // once (warp 0), then every value's weighted sum over the warps
        float* mine = scr + warp * (HD + 2);
        if (lane == 0) { mine[0] = m; mine[1] = l; }
#pragma unroll
        for (int e = 0; e < ADL; ++e) if (e < dl) mine[2 + lane * dl + e] = o[e];
        CSYNC();
        if (warp == 0) {
            const float mw = lane < WARPS ? scr[lane * (HD + 2)] : NEG_INF;
            float M = mw;
#pragma unroll
            for (int s = 16; s > 0; s >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, s));
            if (lane < WARPS) wf[lane] = mw == NEG_INF ? 0.f : __expf(mw - M);
            if (lane == 0) wf[WARPS] = M;
        }
        CSYNC();
        float* dst = ph.ws + (long)(h * C + c) * WS;
        for (int d = tid; d < HD + 2; d += WARPS * 32) {
            float tot = 0.f;
            for (int w = 0; w < WARPS; ++w) tot += wf[w] * scr[w * (HD + 2) + d];
            dst[d < 2 ? d : d + 2] = d == 0 ? wf[WARPS] : tot;  // an empty chunk: (-inf, 0, 0)
        }
        // the last of a head's chunks merges them (slot_triton's combine: each chunk's sums weighted by
        // exp(m - M), over the weighted l) into the head's bf16 row of ``out``, and resets the head's count; a
        // thread's 4 dims of every chunk loaded at once (one L2 round trip)
        CSYNC();
        if (tid == 0) {
            __threadfence();
            last = atomicAdd(ph.cnt + h, 1u) == (unsigned)(C - 1);
            if (last) { __threadfence(); ph.cnt[h] = 0u; }
        }
        CSYNC();
        if (last && tid < HD / 4) {
            const float* hb = ph.ws + (long)h * C * WS;
            float mk[8], lk[8];
            float4 ok[8];
#pragma unroll
            for (int k = 0; k < 8; ++k) {  // C <= 8 (attention_chunks)
                mk[k] = NEG_INF;
                lk[k] = 0.f;
                ok[k] = make_float4(0.f, 0.f, 0.f, 0.f);
                if (k < C) {
                    mk[k] = __ldcg(hb + k * WS);
                    lk[k] = __ldcg(hb + k * WS + 1);
                    ok[k] = __ldcg((const float4*)(hb + k * WS + 4) + tid);
                }
            }
            float M = NEG_INF;
#pragma unroll
            for (int k = 0; k < 8; ++k) M = fmaxf(M, mk[k]);
            float tl = 0.f, acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                const float wgt = mk[k] == NEG_INF ? 0.f : __expf(mk[k] - M);
                tl += wgt * lk[k];
                acc[0] += wgt * ok[k].x; acc[1] += wgt * ok[k].y; acc[2] += wgt * ok[k].z; acc[3] += wgt * ok[k].w;
            }
            ((uint2*)(ph.out + (long)h * HD))[tid] = make_uint2(f2bf(acc[0] / tl) | (u32)f2bf(acc[1] / tl) << 16,
                                                                f2bf(acc[2] / tl) | (u32)f2bf(acc[3] / tl) << 16);
        }
        CSYNC();  // ``last`` and the scratch are the next item's
    }
}

#endif  // ATTN

#if EXTRA & 16
#define XF_LOADS 12  // the loads a thread issues before it uses any (one trip to the L2 for up to 12 of each)
// XFOLD: the CTA's part of x_proj's row over its conv channels [16 t0, min(16 t1, heads)): part[r] = sum over them
// of xc[ch] xw[ch, r] in fp32 (mamba_triton.conv_xproj_step's products), into ws[blockIdx.x]; a CTA whose run
// starts at or past heads writes none (xfold_sum leaves it out), an empty run zeros. Thread (k, j) takes columns
// 8j..8j+7 (one 16-byte load a channel) of channels k, k + G, ..., XF_LOADS of them loaded at once; the G parts
// meet in scr (G R <= 8 WARPS 32 floats: the ring, idle after the chain's last phase) and are added in order.
__device__ __noinline__ void xfold_part(const Phase& ph, int t0, int t1, float* scr) {
    const int tid = threadIdx.x, R = ph.hd, R8 = R >> 3, G = WARPS * 32 / R8;
    if (t0 * 16 >= ph.heads) return;
    const int a = t0 * 16, b = min(t1 * 16, ph.heads), j = tid % R8, k = tid / R8;
    if (k < G) {
        float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        for (int c0 = a + k; c0 < b; c0 += XF_LOADS * G) {
            uint4 w[XF_LOADS];
            float x[XF_LOADS];
#pragma unroll
            for (int i = 0; i < XF_LOADS; ++i) {
                const int ch = c0 + i * G;
                // xc: written by this CTA's rows (put_row) before the barrier
                x[i] = ch < b ? bf2f(__ldcg(ph.vc + ch)) : 0.f;
                w[i] = ch < b ? __ldg((const uint4*)(ph.y2 + (long)ch * R) + j) : make_uint4(0u, 0u, 0u, 0u);
            }
#pragma unroll
            for (int i = 0; i < XF_LOADS; ++i) {
                const u32 wv[4] = {w[i].x, w[i].y, w[i].z, w[i].w};
#pragma unroll
                for (int h = 0; h < 4; ++h) {
                    acc[2 * h] += bf2f(wv[h] & 0xFFFFu) * x[i];
                    acc[2 * h + 1] += bf2f(wv[h] >> 16) * x[i];
                }
            }
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) scr[k * R + 8 * j + i] = acc[i];
    }
    CSYNC();
    float* part = ph.ws + (long)blockIdx.x * R;
    for (int r = tid; r < R; r += WARPS * 32) {
        float v = 0.f;
        for (int q = 0; q < G; ++q) v += scr[q * R + r];
        part[r] = v;
    }
}

// XFOLD, the launch's last CTA (every other CTA's part written and fenced): x_proj's row, the parts of the CTAs
// whose runs start below heads (runs in CTA order: the first n, n = chunks, counted by Chain) added in CTA order,
// rounded to bf16 into nb. Thread (g, q) adds four columns 4q.. of parts g, g + G, ... (XF_LOADS 16-byte loads at
// once); the G sums meet in scr and are added in order.
__device__ __noinline__ void xfold_sum(const Phase& ph, float* scr) {
    const int tid = threadIdx.x, R = ph.hd, R4 = R >> 2, G = WARPS * 32 / R4, q = tid % R4, g = tid / R4;
    const int n = ph.chunks;
    if (g < G) {
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int c0 = g; c0 < n; c0 += XF_LOADS * G) {
            float4 v[XF_LOADS];
#pragma unroll
            for (int i = 0; i < XF_LOADS; ++i) {
                const int c = c0 + i * G;
                v[i] = c < n ? __ldcg((const float4*)(ph.ws + (long)c * R) + q) : make_float4(0.f, 0.f, 0.f, 0.f);
            }
#pragma unroll
            for (int i = 0; i < XF_LOADS; ++i) {
                acc.x += v[i].x; acc.y += v[i].y; acc.z += v[i].z; acc.w += v[i].w;
            }
        }
        ((float4*)(scr + g * R))[q] = acc;
    }
    CSYNC();
    for (int r = tid; r < R; r += WARPS * 32) {
        float v = 0.f;
        for (int i = 0; i < G; ++i) v += scr[i * R + r];
        ((u16*)ph.nb)[r] = f2bf(v);
    }
}
#endif

__device__ __forceinline__ void stage(const Phase& ph, XITEM* xp, XS_T* xs, float* red, float* parts, int nparts,
                                      bool cta0) {
    const int K = ph.K, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const uint4* x4 = (const uint4*)ph.x;
    const uint4* y4 = (const uint4*)(ph.xmode == 1 ? ph.x + K : ph.y);
    const bool two = ph.xmode == 1 || (ph.xmode == 2 && ph.y != nullptr);
    for (int i = tid; i < nparts; i += WARPS * 32) parts[i] = 0.f;
    for (int base = 0; base < K / 8; base += SV * WARPS * 32) {
        uint4 a[SV], b[SV], w[SV];
#pragma unroll
        for (int j = 0; j < SV; ++j) {
            const int i = base + j * WARPS * 32 + tid;
            if (i < K / 8) {
#if DIAG & 64
                // timing only: the phase's new rows loaded alone (an rms phase's y, not its residual or norm
                // weight; a swiglu phase's gate, not its up), the others as if in shared memory already
                if (ph.xmode == 2 && two) {
                    a[j] = make_uint4(0u, 0u, 0u, 0u);
                    b[j] = __ldcg(y4 + i);
                    w[j] = make_uint4(0x3F803F80u, 0x3F803F80u, 0x3F803F80u, 0x3F803F80u);
                } else {
                    a[j] = __ldcg(x4 + i);
                    if (two) b[j] = a[j];
                    if (ph.xmode == 2) w[j] = make_uint4(0x3F803F80u, 0x3F803F80u, 0x3F803F80u, 0x3F803F80u);
                }
#else
                a[j] = __ldcg(x4 + i);
                if (two) b[j] = __ldcg(y4 + i);
                if (ph.xmode == 2) w[j] = __ldg((const uint4*)ph.nw + i);
#endif
            }
        }
        float inv = 0.f;
        if (ph.xmode == 2) {  // K <= 8 SV threads (the launcher checks): this is the only round
            float ss = 0.f;
#pragma unroll
            for (int j = 0; j < SV; ++j) {
                const int i = base + j * WARPS * 32 + tid;
                if (i >= K / 8) continue;
                if (two) {
                    a[j] = make_uint4(add_pair(a[j].x, b[j].x), add_pair(a[j].y, b[j].y), add_pair(a[j].z, b[j].z),
                                      add_pair(a[j].w, b[j].w));
                    if (cta0 && ph.xsum) ((uint4*)ph.xsum)[i] = a[j];
                }
                ss += sq_pair(a[j].x) + sq_pair(a[j].y) + sq_pair(a[j].z) + sq_pair(a[j].w);
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
            if (lane == 0) red[warp] = ss;
            CSYNC();
            float total = 0.f;
            for (int k = 0; k < WARPS; ++k) total += red[k];  // every thread, in the same order
            inv = rsqrtf(total / K + ph.eps);
        }
#pragma unroll
        for (int j = 0; j < SV; ++j) {
            if (base + j * WARPS * 32 + warp * 32 >= K / 8) break;  // the warp's columns are all staged
            const int i = base + j * WARPS * 32 + tid;
            const bool in = i < K / 8;
            u32 f[8];
            const u32 av[4] = {a[j].x, a[j].y, a[j].z, a[j].w};
            const u32 bv[4] = {b[j].x, b[j].y, b[j].z, b[j].w};
            const u32 wv[4] = {w[j].x, w[j].y, w[j].z, w[j].w};
#pragma unroll
            for (int h = 0; h < 4; ++h) {
                u32 r = av[h];
                if (ph.xmode == 1) r = silu_mul_pair(av[h], bv[h]);
                else if (ph.xmode == 2) r = norm_pair(av[h], wv[h], inv);
                f[2 * h] = r & 0xFFFFu;
                f[2 * h + 1] = r >> 16;
            }
            put_cols(xp, xs, i, in, f);
        }
    }
    CSYNC();
}

// the sum of every thread's v, in every thread (the same order everywhere); red: WARPS floats of its own
__device__ __forceinline__ float cta_sum(float v, float* red) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    CSYNC();
    float total = 0.f;
    for (int k = 0; k < WARPS; ++k) total += red[k];
    return total;
}

// xmode 4 ("ln", a parallel block's step, slot_triton.add3_layer_norm's arithmetic): the residual x + (y2 + y)
// (each add rounded to bf16; CTA 0 writes it to xsum; without y, x itself) and its LayerNorm (weight nw, bias nb)
// over its D columns, staged K wide (zeros past D: an int4 layer's padded input). K <= 8 SV threads (one round).
__device__ __forceinline__ void stage_ln(const Phase& ph, XITEM* xp, XS_T* xs, float* red, float* parts, int nparts,
                                         bool cta0) {
    const int K = ph.K, D8 = ph.D / 8, tid = threadIdx.x, warp = tid >> 5;
    for (int i = tid; i < nparts; i += WARPS * 32) parts[i] = 0.f;
    uint4 a[SV], b[SV], c[SV];
#pragma unroll
    for (int j = 0; j < SV; ++j) {
        const int i = j * WARPS * 32 + tid;
        a[j] = b[j] = c[j] = make_uint4(0u, 0u, 0u, 0u);
        if (i < D8) {
            a[j] = __ldcg((const uint4*)ph.x + i);
            if (ph.y != nullptr) {
                b[j] = __ldcg((const uint4*)ph.y + i);
                c[j] = __ldcg((const uint4*)ph.y2 + i);
            }
        }
    }
    float part = 0.f;
#pragma unroll
    for (int j = 0; j < SV; ++j) {
        const int i = j * WARPS * 32 + tid;
        if (i >= D8) continue;
        if (ph.y != nullptr) {
            a[j] = make_uint4(add_pair(a[j].x, add_pair(c[j].x, b[j].x)), add_pair(a[j].y, add_pair(c[j].y, b[j].y)),
                              add_pair(a[j].z, add_pair(c[j].z, b[j].z)), add_pair(a[j].w, add_pair(c[j].w, b[j].w)));
            if (cta0 && ph.xsum) ((uint4*)ph.xsum)[i] = a[j];
        }
        const u32 av[4] = {a[j].x, a[j].y, a[j].z, a[j].w};
#pragma unroll
        for (int h = 0; h < 4; ++h) part += bf2f(av[h] & 0xFFFFu) + bf2f(av[h] >> 16);
    }
    const float mean = cta_sum(part, red) / ph.D;
    float sq = 0.f;
#pragma unroll
    for (int j = 0; j < SV; ++j) {
        const int i = j * WARPS * 32 + tid;
        if (i >= D8) continue;
        const u32 av[4] = {a[j].x, a[j].y, a[j].z, a[j].w};
#pragma unroll
        for (int h = 0; h < 4; ++h) {
            const float d0 = bf2f(av[h] & 0xFFFFu) - mean, d1 = bf2f(av[h] >> 16) - mean;
            sq += d0 * d0 + d1 * d1;
        }
    }
    const float inv = rsqrtf(cta_sum(sq, red + WARPS) / ph.D + ph.eps);
#pragma unroll
    for (int j = 0; j < SV; ++j) {
        if (j * WARPS * 32 + warp * 32 >= K / 8) break;  // the warp's columns are all staged
        const int i = j * WARPS * 32 + tid;
        u32 f[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) f[k] = 0u;
        if (i < D8) {
            const uint4 w4 = __ldg((const uint4*)ph.nw + i), b4 = __ldg((const uint4*)ph.nb + i);
            const u32 av[4] = {a[j].x, a[j].y, a[j].z, a[j].w};
            const u32 wv[4] = {w4.x, w4.y, w4.z, w4.w}, bv[4] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
            for (int h = 0; h < 4; ++h) {
                f[2 * h] = f2bf(fmaf((bf2f(av[h] & 0xFFFFu) - mean) * inv, bf2f(wv[h] & 0xFFFFu), bf2f(bv[h] & 0xFFFFu)));
                f[2 * h + 1] = f2bf(fmaf((bf2f(av[h] >> 16) - mean) * inv, bf2f(wv[h] >> 16), bf2f(bv[h] >> 16)));
            }
        }
        put_cols(xp, xs, i, i < K / 8, f);
    }
    CSYNC();
}

// A phase's start in either kernel: the grid barrier (none before the first, nor before a NOBAR phase, whose
// input no other CTA of this launch writes), then its input staged (a SAME phase's is the one staged before).
__device__ __forceinline__ void begin_phase(const Phase& ph, int p, unsigned* bar, int& nbar, long long* trace,
                                            XITEM* xp, XS_T* xs, float* red, float* parts, int nparts) {
#if DIAG & 4
    CSYNC();
#else
    if (p > 0 && !(ph.flags & NOBAR)) grid_sync(bar, (unsigned)++nbar * gridDim.x);
    else CSYNC();  // the CTA's threads are done with the staged input and the parts
#endif
    if (threadIdx.x == 0) note(trace, p, 0);
#if !(DIAG & 2)
    if (ph.flags & SAME) {
        for (int i = threadIdx.x; i < nparts; i += WARPS * 32) parts[i] = 0.f;
        CSYNC();
#if EXTRA & 1
    } else if (ph.xmode == 4) {
        stage_ln(ph, xp, xs, red, parts, nparts, blockIdx.x == 0);
#endif
    } else {
        stage(ph, xp, xs, red, parts, nparts, blockIdx.x == 0);
    }
#endif
    if (threadIdx.x == 0) note(trace, p, 1);
}

// One block of an item: gemv_cuda's mul_block for one tile and one token (TILES = NT = 1). acc[0] / acc[2] (lanes
// t = 0) gather rows g / g + 8 of the token; the other columns of the mma repeat it.
#if F16
__device__ __forceinline__ void mma16816h(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"
                 " {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
template <u32 MASK, u32 MAGIC, int LUT>
__device__ __forceinline__ u32 to_half2(u32 w) {
    u32 d; asm("lop3.b32 %0, %1, %2, %3, %4;" : "=r"(d) : "r"(w), "n"(MASK), "n"(MAGIC), "n"(LUT)); return d;
}
#define LO4(w) to_half2<0x000F000Fu, 0x64006400u, 0xEA>(w)   // (1024 + q) of fields 0, 4
#define HI4(w) to_half2<0x00F000F0u, 0x64006400u, 0xEA>(w)   // (1024 + 16 q) of fields 1, 5
#define BYTE8(w) to_half2<0x00FF00FFu, 0x64806480u, 0x6A>(w)  // (1152 + v) of bytes 0, 2
// an int4 block's mma sums c into acc: w = s (q - 8) + z, so s (f c - offset) + (z - 8 s) sum(x)
__device__ __forceinline__ void block_scale(const float (&c)[4], uint2 sc, float4 xsb, float (&acc)[4]) {
    const float s0 = bf2f(sc.x), s1 = bf2f(sc.y);
    const float z0 = __uint_as_float(sc.x & 0xFFFF0000u) - 8.f * s0;
    const float z1 = __uint_as_float(sc.y & 0xFFFF0000u) - 8.f * s1;
    acc[0] += s0 * (xsb.z * c[0] - xsb.y) + z0 * xsb.x;
    acc[2] += s1 * (xsb.z * c[2] - xsb.y) + z1 * xsb.x;
}
__device__ __forceinline__ void mul_item(const uint4 (&v)[CHUNKS][2], uint2 sc, const XITEM* xb, float4 xsb, int t,
                                         float (&acc)[4]) {
    float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int ch = 0; ch < CHUNKS; ++ch) {
        const u32 w0v[4] = {v[ch][0].x, v[ch][0].y, v[ch][0].z, v[ch][0].w};
        const u32 w1v[4] = {v[ch][1].x, v[ch][1].y, v[ch][1].z, v[ch][1].w};
#pragma unroll
        for (int s = 0; s < 4; ++s) {
            const XITEM xq = xb[XREAD(ch, t, s)];
            const u32 w0 = w0v[s], w1 = w1v[s], w08 = w0 >> 8, w18 = w1 >> 8;
#if BITS == 4
            mma16816h(c, LO4(w0), LO4(w1), HI4(w0), HI4(w1), xq.x, xq.y);
            mma16816h(c, LO4(w08), LO4(w18), HI4(w08), HI4(w18), xq.z, xq.w);
#else
            mma16816h(c, BYTE8(w0), BYTE8(w1), BYTE8(w08), BYTE8(w18), xq.x, xq.y);
#endif
        }
    }
#if BITS == 4
    block_scale(c, sc, xsb, acc);
#else
    acc[0] += xsb.z * c[0] - xsb.y;  // int8: unscaled (the row's scale comes last)
    acc[2] += xsb.z * c[2] - xsb.y;
#endif
}
#else
__device__ __forceinline__ void mul_item(const uint4 (&v)[CHUNKS][2], uint2 sc, const uint4* xb, float xsb, int t,
                                         float (&acc)[4]) {
    const u32 s2[1][2] = {{sc.x, sc.y}};
    const uint4* const xbs[1] = {xb};
    const float xs[1] = {xsb};
    mul_block(reinterpret_cast<const uint4 (&)[1][CHUNKS][2]>(v), s2, xbs, xs, xs, t,
              reinterpret_cast<float (&)[1][1][4]>(acc));
}
#endif

// A warp's part of a tile into the CTA's slot for (tile, warp): lanes t = 0 hold rows g and g + 8.
__device__ __forceinline__ void flush(float* parts, int tl, const float (&acc)[4], int warp, int g, int t) {
    if (t == 0) {
        parts[(tl * WARPS + warp) * 16 + g] = acc[0];
        parts[(tl * WARPS + warp) * 16 + g + 8] = acc[2];
    }
}

"""

# The ring kernel: every warp loads its own items with cp.async (any GPU from sm_80).
RING_SOURCE = r"""
#define BLK_U4 (2 * CHUNKS)              // a thread's 16-byte words of a block (rows g and g + 8)
#define RING (DEPTH + 1)                 // ring slots of a warp: DEPTH items in flight, the one being multiplied
// a slot (an item: BPI blocks of a tile): words [BPI][BLK_U4][32 lanes], then int4's (scale, zero) [BPI][32][2]
#define SLOT_U4 (BPI * 32 * BLK_U4 + (BITS == 4 ? BPI * 16 : 0))

__device__ __forceinline__ void cp16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(saddr(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp4(void* dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" :: "r"(saddr(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(DEPTH - 1) : "memory"); }

// The next item a warp loads: phase p, local item it of its run [it, end) there = (tile, block blk), per items
// a tile (no division a step).
struct Cursor { int p, it, end, tile, blk, per; };
__device__ __forceinline__ void cursor_seek(Cursor& c, const Phase* sp, int n, int warp) {
    for (; c.p < n; ++c.p) {
        int t0, t1;
        cta_tiles(sp[c.p], t0, t1);
        c.per = sp[c.p].K / (COLS * BPI);
        const int items = (t1 - t0) * c.per;
        c.it = warp * items / WARPS;
        c.end = (warp + 1) * items / WARPS;
        c.tile = t0 + c.it / c.per;
        c.blk = (c.it % c.per) * BPI;
        if (c.it < c.end) return;
    }
}

// Item (tile, block) of a phase into a ring slot: the thread's words of rows g and g + 8 and, int4, their groups'
// (scale, zero) pairs. Each thread later reads only what it copied itself (no barrier between lanes).
__device__ __forceinline__ void issue(uint4* slot, const Phase& ph, int tile, int blk, int lane, int g, int t) {
    const int stride4 = ph.K / FIELDS / 4;
#if TILED
    const uint4* p0 = ph.w + (long)tile * 16 * stride4 + blk * (4 * P) + g * (P / 4) + t;
    const long next8 = 8 * (P / 4);
#else
    const uint4* p0 = ph.w + (long)(tile * 16 + g) * stride4 + blk * (P / 4) + t;
    const long next8 = 8 * (long)stride4;
#endif
#pragma unroll
    for (int b = 0; b < BPI; ++b) {
#pragma unroll
        for (int ch = 0; ch < CHUNKS; ++ch) {
#if TILED
            const uint4* pb = p0 + b * (4 * P) + ch * 4;
#else
            const uint4* pb = p0 + b * (P / 4) + ch * 4;
#endif
            cp16(slot + ((b * CHUNKS + ch) * 2) * 32 + lane, pb);
            cp16(slot + ((b * CHUNKS + ch) * 2 + 1) * 32 + lane, pb + next8);
        }
#if BITS == 4
        u32* s = (u32*)(slot + BPI * BLK_U4 * 32 + b * 16) + 2 * lane;
        const u32* zs = ph.sz + (long)(blk + b) * ph.N + tile * 16 + g;
        cp4(s, zs);
        cp4(s + 1, zs + 8);
#endif
    }
}

__device__ __forceinline__ void advance(Cursor& c, const Phase* sp, int n, int warp) {
    c.blk += BPI;
    if (c.blk == c.per * BPI) { c.blk = 0; ++c.tile; }
    if (++c.it == c.end) { ++c.p; cursor_seek(c, sp, n, warp); }
}

extern "C" __global__ void __launch_bounds__(WARPS * 32, 1)
KERNEL_NAME(const Phase* __restrict__ phases, int n_phases, unsigned* bar, int maxt, int kmax,
            long long* trace) {
    extern __shared__ uint4 smem[];
    __shared__ Phase sp[MAXPH];
    __shared__ float red[2 * WARPS];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    for (int i = tid; i < n_phases * (int)(sizeof(Phase) / 4); i += WARPS * 32)
        ((int*)sp)[i] = ((const int*)phases)[i];
    __syncthreads();
    uint4* ring = smem + warp * RING * SLOT_U4;
    uint4* xp16 = smem + WARPS * RING * SLOT_U4;
    XITEM* xp = (XITEM*)xp16;                            // [kmax / FIELDS]
    XS_T* xs = (XS_T*)(xp + kmax / FIELDS);              // [kmax / COLS]
    float* parts = (float*)(xs + kmax / COLS);           // [maxt][WARPS][16]

    // DEPTH items in flight from the start, through every phase's words
    Cursor cur = {0, 0, 0, 0, 0, 1};
    cursor_seek(cur, sp, n_phases, warp);
#pragma unroll 1
    for (int d = 0; d < DEPTH; ++d) {
        if (cur.p < n_phases) {
            issue(ring + d * SLOT_U4, sp[cur.p], cur.tile, cur.blk, lane, g, t);
            advance(cur, sp, n_phases, warp);
        }
        cp_commit();
    }
    int take = 0, put = DEPTH;  // the ring slot multiplied next, and the one loaded next (the one multiplied last)
    // the attention (phase 0 only: out of the loop, whose registers it would crowd) while the ring fills
#if ATTN
    const int first = sp[0].xmode == 3 ? 1 : 0;
    if (first) {
        if (tid == 0) note(trace, 0, 0);
        GlobalRows rows;
        attention(sp[0], parts + maxt * WARPS * 16, rows);
        if (tid == 0) { note(trace, 0, 1); note(trace, 0, 2); }
    }
#else
    const int first = 0;  // a kernel without the attention phase (ATTN 0)
#endif
    int nbar = 0;  // grid barriers passed
#pragma unroll 1
    for (int p = first; p < n_phases; ++p) {
        const Phase& ph = sp[p];
        begin_phase(ph, p, bar, nbar, trace, xp, xs, red, parts, maxt * WARPS * 16);
        int t0, t1;
        cta_tiles(ph, t0, t1);
        const int per = ph.K / (COLS * BPI), items = (t1 - t0) * per;
        const int first = warp * items / WARPS, last = (warp + 1) * items / WARPS;
        int tile = -1, tl = first / per, blk = first % per * BPI;
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 1
        for (int it = first; it < last; ++it) {
            cp_wait();
            const uint4* slot = ring + take * SLOT_U4;
            uint4 v[BPI][CHUNKS][2];
            uint2 sc[BPI];
#pragma unroll
            for (int b = 0; b < BPI; ++b) {
#pragma unroll
                for (int ch = 0; ch < CHUNKS; ++ch) {
                    v[b][ch][0] = slot[((b * CHUNKS + ch) * 2) * 32 + lane];
                    v[b][ch][1] = slot[((b * CHUNKS + ch) * 2 + 1) * 32 + lane];
                }
#if BITS == 4
                sc[b] = ((const uint2*)(slot + BPI * BLK_U4 * 32 + b * 16))[lane];
#else
                sc[b] = make_uint2(0u, 0u);
#endif
            }
            // the slot multiplied one item ago is free (its words are in registers long since): the next load
            if (cur.p < n_phases) {
#if !(DIAG & 32)
                issue(ring + put * SLOT_U4, sp[cur.p], cur.tile, cur.blk, lane, g, t);
#endif
                advance(cur, sp, n_phases, warp);
            }
            cp_commit();
            take = take == RING - 1 ? 0 : take + 1;
            put = put == RING - 1 ? 0 : put + 1;
            if (tl != tile) {
                if (tile >= 0) flush(parts, tile, acc, warp, g, t);
                tile = tl;
                acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
            }
#pragma unroll
            for (int b = 0; b < BPI; ++b) {
#if DIAG & 1
                acc[0] += __uint_as_float(v[b][0][0].x & v[b][0][1].y & sc[b].x & 0x3FFFFF);  // the loads, no multiply
#else
                mul_item(v[b], sc[b], xp + (blk + b) * P, XSB(xs, blk + b), t, acc);
#endif
            }
            blk += BPI;
            if (blk == per * BPI) { blk = 0; ++tl; }
        }
        if (tile >= 0) flush(parts, tile, acc, warp, g, t);
        // the CTA's rows: each the sum of its warps' parts in warp order (a warp with no part of it added 0)
        __syncthreads();
        if (tid == 0) note(trace, p, 2);
#if !(DIAG & 8)
        for (int r = tid; r < (t1 - t0) * 16; r += WARPS * 32) {
            const float* pr = parts + (r >> 4) * WARPS * 16 + (r & 15);
            float total = 0.f;
#pragma unroll
            for (int w = 0; w < WARPS; ++w) total += pr[w * 16];
            const int row = t0 * 16 + r;
            put_row(ph, row, out_val(total, ph.rs, row));
        }
#endif
    }
    // the last CTA out resets the barrier for the next launch (every CTA is past its last wait)
    __syncthreads();
    if (tid == 0) {
        __threadfence();
        if (atomicAdd(bar + 1, 1u) == gridDim.x - 1) { atomicExch(bar, 0u); atomicExch(bar + 1, 0u); }
    }
}
"""


# The bulk-copy kernel (sm_90, int4 tiled words): one producer thread streams the CTA's words through a ring of
# DEPTH stages with the copy engine, and never waits for a grid barrier or a staging, only for a free stage.
TMA_SOURCE = r"""
#define SBLK (WARPS * BPI)                // blocks a stage: BPI a consumer warp
#if BITS == 4
#define BLKB 1024                         // a block's bytes: 16 rows of P words
#define SBLK_U4 (SBLK * 64)               // a stage's words, then its blocks' (scale, zero) rows
#define STAGE_U4 (SBLK_U4 + SBLK * 4)     // (16 rows x 4 bytes a block)
#else
#define BLKB 2048                         // int8 (P = 32): a block is a tensor-map box of 16 rows of 128 bytes, the
#define SBLK_U4 (SBLK * 128)              // 16-byte chunks of a row swizzled (chunk ^ row % 8: no bank conflicts)
#define STAGE_U4 SBLK_U4
#endif
typedef unsigned long long u64;

// mbarriers by their shared-memory address (computed once: converting a generic pointer each time costs)
__device__ __forceinline__ void mb_init(u32 b, u32 n) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(b), "r"(n) : "memory");
}
__device__ __forceinline__ bool mb_test(u32 b, u32 parity) {
    u32 ok;
    asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}"
                 : "=r"(ok) : "r"(b), "r"(parity) : "memory");
    return ok != 0;
}
__device__ __forceinline__ void mb_wait(u32 b, u32 parity) { while (!mb_test(b, parity)) {} }
__device__ __forceinline__ void mb_arrive(u32 b) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(b) : "memory");
}
__device__ __forceinline__ void mb_expect(u32 b, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(b), "r"(bytes) : "memory");
}
__device__ __forceinline__ void box(u32 dst, const void* map, int x, int y, u32 b, u64 policy) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.L2::cache_hint"
                 " [%0], [%1, {%2, %3}], [%4], %5;"
                 :: "r"(dst), "l"(map), "r"(x), "r"(y), "r"(b), "l"(policy) : "memory");
}
// src and bytes multiples of 16 (XFOLD's rows: R a multiple of 8; CONV's: runs of 16 channels)
__device__ __forceinline__ void prefetch_l2(const void* src, int bytes) {
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(src), "r"((u32)bytes) : "memory");
}
__device__ __forceinline__ void bulk(u32 dst, const void* src, u32 bytes, u32 b, u64 policy) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;"
                 :: "r"(dst), "l"(src), "r"(bytes), "r"(b), "l"(policy) : "memory");
}


#if ATTN
// The attention phase's cache rows through the bulk-copy ring (round 17): a stage holds ``attn_rows`` positions of
// an item's k rows, then as many v rows, copied by the producer before the words (attn_copies: one piece a stage,
// the item's positions lo..end in order) and taken by the consumer warps as the words are (RingRows: a warp's
// positions warp, warp + WARPS, ... of the stage, released once in registers). The producer reads the position
// and the cache before griddepcontrol.wait: neither is written by the kernels of a step that run before a chain
// (the position's add is a plain launch, so no dependent launch starts before it ends; the rows before pos were
// written by an earlier step), and the row at pos, which this phase writes, is never copied.
__device__ __forceinline__ int attn_rows(int HD) { return min(WARPS * AU, STAGE_U4 * 16 / (4 * HD)); }

__device__ __forceinline__ void attn_copies(const Phase& a, u32 ring0, u32 full0, u32 empty0, int& s, u32& r,
                                            u64 policy) {
    const int H = a.heads, HD = a.hd, C = a.chunks, rep = H / a.kv, aps = attn_rows(HD);
    const int pos = (int)__ldcg(a.pos), L = pos + 1, cs = (L + C - 1) / C;
    for (int item = blockIdx.x; item < H * C; item += gridDim.x) {
        // attention()'s item, span and pieces exactly (the consumers wait for each piece this copies)
        const int kh = item / C / rep, lo = item % C * cs, end = min(min(L, lo + cs), pos);
        for (int p0 = lo; p0 < end; p0 += aps) {
            const int n = min(aps, end - p0);
            mb_wait(empty0 + 8 * s, r ^ 1);
            const u32 st = ring0 + s * STAGE_U4 * 16;
            const long off = ((long)kh * a.len + p0) * HD;
            mb_expect(full0 + 8 * s, 4 * n * HD);
            bulk(st, a.kc + off, 2 * n * HD, full0 + 8 * s, policy);
            bulk(st + 2 * aps * HD, a.vc + off, 2 * n * HD, full0 + 8 * s, policy);
            if (++s == DEPTH) { s = 0; r ^= 1; }
        }
    }
}

struct RingRows {
    const uint4* ring;
    u32 full0, empty0;
    int& s;
    u32& r;
    __device__ __forceinline__ void begin(const u16*, const u16*, int, int, int, int, int) {}
    __device__ __forceinline__ void run(const u16*, const u16*, int lo, int end, int HD, int dl, int warp, int lane,
                                        const float (&q)[ADL], float& m, float& l, float (&o)[ADL]) {
        const int aps = attn_rows(HD);
        for (int p0 = lo; p0 < end; p0 += aps) {
            const int n = min(aps, end - p0);
            mb_wait(full0 + 8 * s, r);
            const u16* ks = (const u16*)(ring + s * STAGE_U4) + lane * dl;
            const u16* vs = ks + aps * HD;
            uint2 kr[AU], vr[AU];
            load_round<true>(ks, vs, warp, n, HD, dl, kr, vr);
            __syncwarp();
            if (lane == 0) mb_arrive(empty0 + 8 * s);  // its rows are in registers: the producer may refill it
            if (++s == DEPTH) { s = 0; r ^= 1; }
            if (warp < n) consume_round(kr, vr, warp, n, q, m, l, o);
        }
    }
};
#endif

extern "C" __global__ void __launch_bounds__((WARPS + 1) * 32, 1)
KERNEL_NAME(const Phase* __restrict__ phases, int n_phases, unsigned* bar, int maxt, int kmax,
            long long* trace) {
    extern __shared__ uint4 smem[];
    __shared__ Phase sp[MAXPH];
    __shared__ float red[2 * WARPS];
    __shared__ u64 full[DEPTH], empty[DEPTH], go;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    for (int i = tid; i < n_phases * (int)(sizeof(Phase) / 4); i += (WARPS + 1) * 32)
        ((int*)sp)[i] = ((const int*)phases)[i];
    if (tid == 0) {
        mb_init(saddr(&go), WARPS);
        for (int s = 0; s < DEPTH; ++s) { mb_init(saddr(&full[s]), 1); mb_init(saddr(&empty[s]), WARPS); }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    // Programmatic dependent launch (Chain(pdl=True)): the next kernel of the stream may be scheduled on each
    // multiprocessor this launch leaves (it waits for this one to finish before it reads what this one writes)
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    // [DEPTH][STAGE_U4] from a 1 KiB boundary (the swizzle of int8's boxes is of the shared address)
    uint4* ring = smem + ((1024 - (saddr(smem) & 1023)) & 1023) / 16;
    uint4* xp16 = ring + DEPTH * STAGE_U4;
    XITEM* xp = (XITEM*)xp16;                            // [kmax / FIELDS]
    XS_T* xs = (XS_T*)(xp + kmax / FIELDS);              // [kmax / COLS]
    float* parts = (float*)(xs + kmax / COLS);           // [maxt][WARPS][16]
    const u32 full0 = saddr(full), empty0 = saddr(empty), ring0 = saddr(ring);

    if (warp == WARPS) {
        // The producer: each phase's run of tiles is one contiguous span of words (tiled layout) and one of
        // (scale, zero) rows (the chain's tile-major copy), cut into stages of SBLK blocks.
        if (lane == 0) {
            u64 policy;  // the words are read once a step: first out of the L2 (1-8 % faster than evict-normal)
            asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
            int s = 0;
            u32 r = 0;
#if ATTN
            if (sp[0].xmode == 3) {
                // the attention's cache rows first, through the same ring (before the kernel before this one has
                // ended: attn_copies); it is on the critical path, so the words stream after it (streaming during
                // it, or from each warp's first round of cache rows on, was slower: rounds 11 and 16)
                attn_copies(sp[0], ring0, full0, empty0, s, r, policy);
                mb_wait(saddr(&go), 0);
            }
#endif
            for (int p = 0; p < n_phases; ++p) {
                const Phase& ph = sp[p];
                int t0, t1;
                cta_tiles(ph, t0, t1);
                const int per = ph.K / COLS, nb = (t1 - t0) * per;
                const char* ws = (const char*)ph.w + (long)t0 * per * 1024;
                const char* ss = (const char*)ph.sz + (long)t0 * per * 64;
                int tt = t0, bb = 0;
                for (int c = 0; c < nb; c += SBLK) {
                    const int n = min(SBLK, nb - c);
                    mb_wait(empty0 + 8 * s, r ^ 1);  // the consumers are done with its last fill (a new one: at once)
                    const u32 st = ring0 + s * STAGE_U4 * 16;
#if DIAG & 32
                    mb_arrive(full0 + 8 * s);  // no words: the consumers' own cost
#elif BITS == 4
                    mb_expect(full0 + 8 * s, n * 1088);
                    bulk(st, ws + (long)c * 1024, n * 1024, full0 + 8 * s, policy);
                    bulk(st + SBLK_U4 * 16, ss + (long)c * 64, n * 64, full0 + 8 * s, policy);
#else
                    mb_expect(full0 + 8 * s, n * BLKB);
                    for (int k = 0; k < n; ++k) {  // block (tile tt, bb) of the run: rows 16 tt, bytes 128 bb
                        box(st + k * BLKB, ph.tmap, bb * 128, tt * 16, full0 + 8 * s, policy);
                        if (++bb == per) { bb = 0; ++tt; }
                    }
#endif
                    if (++s == DEPTH) { s = 0; r ^= 1; }
                }
                note(trace, p, 3);
#if EXTRA & 16
                if (ph.flags & XFOLD) {  // the CTA's rows of x_proj's copy into the L2 for xfold_part, after its words
                    const int a = t0 * 16, b = min(t1 * 16, ph.heads);
                    if (a < b) prefetch_l2(ph.y2 + (long)a * ph.hd, (b - a) * ph.hd * 2);
                }
#endif
#if EXTRA & 32
                if (ph.flags & CONV) {  // the CTA's conv state, weight and bias rows into the L2 for put_row
                    const int a = t0 * 16, b = min(t1 * 16, ph.heads), w = ph.kv;
                    if (a < b) {
                        prefetch_l2(ph.kc + (long)a * (w - 1), (b - a) * (w - 1) * 2);
                        prefetch_l2(ph.cos + (long)a * w, (b - a) * w * 2);
                        if (ph.sin != nullptr) prefetch_l2(ph.sin + a, (b - a) * 2);
                    }
                }
#endif
            }
        }
        return;
    }

    // the kernels before this one in the stream done and their writes seen (a no-op unless launched with PDL;
    // the producer's words are the model's, which no kernel of a step writes, so it streams from the start)
    asm volatile("griddepcontrol.wait;" ::: "memory");
    int s = 0;
    u32 r = 0;
    // the attention (phase 0 only: out of the loop, whose registers it would crowd) while the ring fills
#if ATTN
    const int first = sp[0].xmode == 3 ? 1 : 0;
    if (first) {
        if (tid == 0) note(trace, 0, 0);
        RingRows rows{ring, full0, empty0, s, r};
        attention(sp[0], parts + maxt * WARPS * 16, rows);
        if (tid == 0) { note(trace, 0, 1); note(trace, 0, 2); }
        if (lane == 0) mb_arrive(saddr(&go));  // the producer may start
    }
#else
    const int first = 0;  // a kernel without the attention phase (ATTN 0)
#endif
    int nbar = 0;  // grid barriers passed
#pragma unroll 1
    for (int p = first; p < n_phases; ++p) {
        const Phase& ph = sp[p];
        begin_phase(ph, p, bar, nbar, trace, xp, xs, red, parts, maxt * WARPS * 16);
        int t0, t1;
        cta_tiles(ph, t0, t1);
        const int per = ph.K / COLS, nb = (t1 - t0) * per;
        // block j = warp BPI + b of each stage: local tile tl[b], block blk[b] of it, advanced SBLK a stage
        int tl[BPI], blk[BPI];
#pragma unroll
        for (int b = 0; b < BPI; ++b) { tl[b] = (warp * BPI + b) / per; blk[b] = (warp * BPI + b) % per; }
        int tile = -1;
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 1
        for (int c = 0; c < nb; c += SBLK) {
            mb_wait(full0 + 8 * s, r);
            const uint4* st = ring + s * STAGE_U4;
            uint4 v[BPI][CHUNKS][2];
            uint2 sc[BPI];
#pragma unroll
            for (int b = 0; b < BPI; ++b) {
                const int j = warp * BPI + b;
                if (c + j < nb) {
#if BITS == 4
                    v[b][0][0] = st[j * 64 + lane];
                    v[b][0][1] = st[j * 64 + 32 + lane];
                    const u32* z = (const u32*)(st + SBLK_U4) + j * 16;
                    sc[b] = make_uint2(z[g], z[g + 8]);
#else
                    // thread t's words of a row: chunks 2t, 2t + 1 (XIDX), where the swizzle put them
#pragma unroll
                    for (int ch = 0; ch < CHUNKS; ++ch) {
                        v[b][ch][0] = st[j * 128 + g * 8 + ((2 * t + ch) ^ g)];
                        v[b][ch][1] = st[j * 128 + (g + 8) * 8 + ((2 * t + ch) ^ g)];
                    }
                    sc[b] = make_uint2(0u, 0u);
#endif
                }
            }
            __syncwarp();
            if (lane == 0) mb_arrive(empty0 + 8 * s);  // its words are in registers: the producer may refill it
            if (++s == DEPTH) { s = 0; r ^= 1; }
#pragma unroll
            for (int b = 0; b < BPI; ++b) {
                if (c + warp * BPI + b < nb) {
                    if (tl[b] != tile) {
                        if (tile >= 0) flush(parts, tile, acc, warp, g, t);
                        tile = tl[b];
                        acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
                    }
#if DIAG & 1
                    acc[0] += __uint_as_float(v[b][0][0].x & v[b][0][1].y & sc[b].x & 0x3FFFFF);
#else
                    mul_item(v[b], sc[b], xp + blk[b] * P, XSB(xs, blk[b]), t, acc);
#endif
                }
                blk[b] += SBLK;
                while (blk[b] >= per) { blk[b] -= per; ++tl[b]; }
            }
        }
        if (tile >= 0) flush(parts, tile, acc, warp, g, t);
        CSYNC();
        if (tid == 0) note(trace, p, 2);
#if !(DIAG & 8)
        for (int q = tid; q < (t1 - t0) * 16; q += WARPS * 32) {
            const float* pr = parts + (q >> 4) * WARPS * 16 + (q & 15);
            float total = 0.f;
#pragma unroll
            for (int w = 0; w < WARPS; ++w) total += pr[w * 16];
            const int row = t0 * 16 + q;
            put_row(ph, row, out_val(total, ph.rs, row));
        }
#endif
#if EXTRA & 16
        if (ph.flags & XFOLD) {  // the chain's last phase (Chain checks): its conv rows written, the ring idle
            CSYNC();
            xfold_part(ph, t0, t1, (float*)ring);
        }
#endif
    }
    CSYNC();
#if EXTRA & 16
    __shared__ int last;  // this CTA the launch's last to finish
    if (tid == 0) {
        __threadfence();
        last = atomicAdd(bar + 1, 1u) == gridDim.x - 1;
        if (last) { atomicExch(bar, 0u); atomicExch(bar + 1, 0u); __threadfence(); }
    }
    if (sp[n_phases - 1].flags & XFOLD) {
        CSYNC();
        if (last) xfold_sum(sp[n_phases - 1], (float*)ring);
    }
#else
    if (tid == 0) {
        __threadfence();
        if (atomicAdd(bar + 1, 1u) == gridDim.x - 1) { atomicExch(bar, 0u); atomicExch(bar + 1, 0u); }
    }
#endif
}
"""


class _Phase(ctypes.Structure):
    """The kernel's ``struct Phase`` (216 bytes)."""

    _fields_ = [(n, ctypes.c_void_p) for n in ("w", "sz", "x", "y", "nw", "xsum", "out", "rs")] + [
        ("N", ctypes.c_int), ("K", ctypes.c_int), ("xmode", ctypes.c_int), ("D", ctypes.c_int),
        ("eps", ctypes.c_float), ("flags", ctypes.c_int), ("pad2", ctypes.c_int), ("pad3", ctypes.c_int)] + [
        (n, ctypes.c_void_p) for n in ("kc", "vc", "cos", "sin", "pos", "ws", "cnt")] + [
        (n, ctypes.c_int) for n in ("heads", "kv", "hd", "len", "chunks", "pad4")] + [
        ("scale", ctypes.c_float), ("pad5", ctypes.c_float), ("tmap", ctypes.c_void_p), ("y2", ctypes.c_void_p),
        ("nb", ctypes.c_void_p), ("cut", ctypes.c_void_p)]


# the chain's phases past gemv_cuda's XMODES (plain 0, swiglu 1, rms 2): the attention of a decode step (phase 0
# only; its output row the next GEMV's plain input) and a parallel block's residual adds + LayerNorm (Falcon;
# staged as wide as the layer's padded input)
CHAIN_XMODES = {**gemv_cuda.XMODES, "attn": 3, "ln": 4}
# a phase's flags (the kernel's): no grid barrier before it; the previous phase's staged input; GELU on its output
NOBAR, SAME, GELU_OUT, RES32, CONV, XFOLD = 1, 2, 4, 8, 16, 32


def balanced_cuts(tiles: list[int], blocks: list[int], grid: int) -> list[list[tuple[int, int]]]:
    """Each CTA's run of tiles (t0, t1) in each of a group of phases with no grid barrier between them (``tiles``
    of ``blocks`` blocks each), so that the CTAs' total blocks are even: the largest tiles first, each to the CTA
    with the fewest blocks so far (longest-processing-time first). Equal runs a phase leave a CTA with an extra
    tile of each phase behind the others (Falcon-7B's wo and w_out: 284 tiles each on 132 CTAs, the slowest CTA
    39 % over the mean; balanced, 11 %)."""
    import heapq

    counts = [[0] * grid for _ in tiles]
    load = [(0, i) for i in range(grid)]
    for p in sorted(range(len(tiles)), key=lambda q: -blocks[q]):
        for _ in range(tiles[p]):
            total, i = heapq.heappop(load)
            counts[p][i] += 1
            heapq.heappush(load, (total + blocks[p], i))
    cuts = []
    for p in range(len(tiles)):
        runs, t = [], 0
        for i in range(grid):
            runs.append((t, t + counts[p][i]))
            t += counts[p][i]
        cuts.append(runs)
    return cuts


def equal_runs(tiles: int, grid: int) -> list[tuple[int, int]]:
    """Each CTA's run of tiles (t0, t1) where a phase has no cut: the kernel's own equal runs (``cta_tiles``)."""
    return [(c * tiles // grid, (c + 1) * tiles // grid) for c in range(grid)]


def weighted_runs(weights: list[float], grid: int) -> list[tuple[int, int]]:
    """Each CTA's run of tiles (t0, t1), contiguous and in CTA order, so that the runs' weights are even: CTA c's
    run ends at the first tile whose midpoint passes (c + 1) / grid of the total weight (the last CTA's at the
    end)."""
    total, runs, t, acc = sum(weights), [], 0, 0.0
    for c in range(grid):
        start = t
        while t < len(weights) and (c == grid - 1 or acc + weights[t] / 2 <= total * (c + 1) / grid):
            acc += weights[t]
            t += 1
        runs.append((start, t))
    return runs


def attention_chunks(heads: int, grid: int) -> int:
    """Chunks of positions a head's attention is cut into: about one work item a CTA (1 to 8)."""
    return max(1, min(8, grid // heads))


MAXPH = 8
STAGE_WORDS = 4  # SV: 16-byte words of the input a thread stages a round
# Warps a CTA, items in flight a warp (ring depth) and blocks an item (2: the per-item bookkeeping over twice the
# words): int4 blocks are 1 KiB, int8 2 KiB; ~100 KiB of words in flight a multiprocessor, the rest of its shared
# memory for the staged input.
DEFAULTS = {4: (16, 2, 2), 8: (16, 2, 1)}
# The bulk-copy kernel's (consumer warps, stages, blocks a warp a stage): 15 warps and the producer's are 512
# threads, so 128 registers a thread (16 + 1 warps get 96, and spilled with 2 blocks); 4 stages of 30 KiB
# (bench/gemv_cuda.py --chain: 1,537 us a step against 1,587 for (16, 4, 1), 1,596 with 5 stages, 1,693 for the
# ring kernel). LOCALGPT_GEMV_CHAIN_TMA=0 takes the ring kernel on Hopper too.
# int4 with fp16 operands: two blocks a warp a stage (30 KiB stages; round 17: 1,420-1,424 us a step against
# 1,452-1,460 with one, the engine 557.8-569.5 against 549.6-549.7 tok/s). Round 15 had one ahead (1,455-1,466
# against 1,524), before round 16 left the attention's code out of these kernels and their registers moved. int8:
# a block is 2 KiB, so one a warp makes the same 30 KiB stage.
# int8: 6 stages (180 KiB; as many as fit): its consumers outrun the copy engine (a step's multiply alone 1,092 us
# against ~1,540 of streaming), so a deeper ring banks more of each phase's wait: 2,171 against 2,292 us (round 16).
# int4's do not (1,017 against 917): 6 stages 1,461 against 1,451.
TMA_DEFAULTS = {4: (15, 4, 2), 8: (15, 6, 1)}
TMA_DEFAULTS_BF16 = {4: (15, 4, 2), 8: (15, 4, 1)}
MAX_STAGES = 32
TMA = os.environ.get("LOCALGPT_GEMV_CHAIN_TMA", "1") != "0"
# fp16 mma operands (F16 in the source, see put_cols) for these weight formats. int8: a block's instructions 412
# -> 270, the chain of a step 6 % faster (round 12). int4: with two blocks a warp a stage 2 % slower (round 12), with
# one and the swizzled input 5-6 % faster than bf16's best (1,455 against 1,539 us, round 15) in the bulk-copy
# kernel; the ring kernel's int4 keeps bf16 unless "all" (fp16 there not measured against it).
# LOCALGPT_GEMV_CHAIN_F16: "auto" (default), "all" (or "1"), "int8" or "0".
F16_MODE = os.environ.get("LOCALGPT_GEMV_CHAIN_F16", "auto")
F16_BITS = {"0": (), "int8": (8,)}.get(F16_MODE, (4, 8))
F16 = bool(F16_BITS)  # some format takes them (the engine's fallback to bf16 operands tries it)
F16_INT4_RING = F16_MODE in ("all", "1")
# A CONV phase's conv state, weight and bias rows (Mamba's in_proj) asked into the L2 by the bulk-copy kernel's
# producer after the CTA's words, so put_row's conv reads them from there at the phase's end (``EXTRA`` & 32).
# H200, FalconMamba-7B, one call (round 21): int8 (x_proj folded in) 340.7 against 335.8 tok/s.
# LOCALGPT_GEMV_CHAIN_CONVPF=0: not.
CONV_PREFETCH = os.environ.get("LOCALGPT_GEMV_CHAIN_CONVPF", "1") != "0"
# An XFOLD phase's runs of tiles weighted: a tile of conv channels 1 + this, the others 1 (its CTAs do the conv and
# their part of x_proj after the multiply). LOCALGPT_GEMV_CHAIN_XFOLD_WEIGHT, default 0: equal runs. H200,
# FalconMamba-7B int4 with CONV_CHAIN "fold", one call (round 21): 0.3 gave 448.8 tok/s against 448.2 for the
# default (the fold in the conv kernel); 445.0 unweighted, the call before. int8 not measured with it.
XFOLD_WEIGHT = float(os.environ.get("LOCALGPT_GEMV_CHAIN_XFOLD_WEIGHT", "0"))


# bench/gemv_cuda.py --chain-diag: bits leaving out 1 the multiply, 2 the staging of the input, 4 the grid barrier,
# 8 the adding of a tile's parts, 32 the loads of the words after the first ring (the multiply of whatever is in
# shared memory: the consumers' own rate), 64 the staging's loads but the phase's new rows (an rms phase's y, a
# swiglu phase's gate: the residual, the norm weight and up as if in shared memory) (wrong results: timing only);
# 16 adds per-CTA timestamps (``trace``)
DIAG = 0
# The staged input's items by sub-step, then thread, for fp16 operands (XREAD / XPHYS in the source: x loads without
# bank conflicts); LOCALGPT_GEMV_CHAIN_SWIZZLE=0 keeps the plain order
SWIZZLE = os.environ.get("LOCALGPT_GEMV_CHAIN_SWIZZLE", "1") != "0"
# The bulk-copy kernel launched as a programmatic dependent launch (cuLaunchKernelEx, sm_90), and the step's
# attention kernels too (slot_triton.gdc): each kernel's CTAs start on the multiprocessors the one before it leaves
# (the chain's producer streams the words meanwhile), and wait (griddepcontrol.wait) before they touch anything a
# step writes. Llama-2-7B int4 549.7 -> 577.3 tok/s, int8 394.8 -> 399.3; Falcon-7B level (round 17).
# LOCALGPT_GEMV_CHAIN_PDL=0: plain launches.
PDL = os.environ.get("LOCALGPT_GEMV_CHAIN_PDL", "1") != "0"


def bulk_copy(device: torch.device) -> bool:
    """Whether chains on ``device`` take the bulk-copy kernel (TMA, and Hopper or newer)."""
    return TMA and torch.cuda.get_device_capability(device)[0] >= 9


def source(bits: int, planes: int, warps: int, depth: int, tiled: bool, bpi: int = 2,
           tma: bool = False, f16: bool = False, extra: int = 0, attn: bool = False) -> tuple[str, str]:
    """(name, CUDA source) of the chain kernel for one weight format, CTA size (consumer warps), ring depth (items
    a warp, or stages of the bulk-copy ring) and blocks an item (a consumer warp's blocks a stage); ``extra``:
    1 for the parts Llama's kernels leave out: the "ln" prologue, GELU_OUT and balanced runs of tiles (Falcon's
    chain), 2 for RES32's epilogue (Mamba's fp32 residual), 4 for CONV's (Mamba's conv step), 16 for XFOLD's (x_proj
    folded into it; the bulk-copy kernel's), 32 for CONV_PREFETCH (the bulk-copy kernel's), a bit set;
    ``attn``: the kernel with the attention phase (``ATTN``; the others leave its code out)."""
    swz = SWIZZLE and f16
    name = (f"gemv_chain_int{bits}_p{planes}_w{warps}_d{depth}_b{bpi}" + ("_tl" if tiled else "")
            + ("_s" if swz else "")
            + ("_tma" if tma else "") + ("_h" if f16 else "") + (f"_x{extra}" if extra else "")
            + ("_a" if attn else "")
            + (f"_diag{DIAG}" if DIAG else ""))
    head = (f"#define BITS {bits}\n#define P {planes}\n#define FIELDS {32 // bits}\n#define WARPS {warps}\n"
            f"#define DEPTH {depth}\n#define BPI {bpi}\n#define TILES 1\n#define NT 1\n#define OFFSET 1\n#define TILED {int(tiled)}\n#define XMODE 0\n"
            f"#define PREF 0\n#define DIAG {DIAG}\n#define F16 {int(f16)}\n#define EXTRA {int(extra)}\n"
            f"#define XSWZ {int(swz)}\n#define ATTN {int(attn)}\n"
            f"#define KERNEL_NAME {name}\n")
    if tma and bits == 8:  # thread t's words of a block row: chunks 2t and 2t + 1 (see TMA_SOURCE's loads)
        head += ("#define XIDX(ch, t, s) (8 * (t) + 4 * (ch) + (s))\n"  # and where XSWZ puts w = XIDX(ch, t, s)
                 "#define XPHYS(w) (((w) & ~31) | ((((w) >> 2) & 1) << 4) | (((w) & 3) << 2) | (((w) >> 3) & 3))\n")
    body = TMA_SOURCE if tma else RING_SOURCE
    # a barrier of the CTA's threads that multiply (the bulk-copy kernel's producer warp stays out of it)
    head += ('#define CSYNC() asm volatile("bar.sync 1, %0;" :: "n"(WARPS * 32) : "memory")\n' if tma
             else "#define CSYNC() __syncthreads()\n")
    return name, head + gemv_cuda.HELPERS + COMMON_SOURCE + body


_KERNELS: dict = {}


def kernel(bits: int, planes: int, device: torch.device, warps: int, depth: int, tiled: bool, bpi: int,
           tma: bool = False, f16: bool = False, extra: int = 0, attn: bool = False):
    key = (bits, planes, warps, depth, tiled, bpi, tma, f16, extra, attn, device.index, DIAG, SWIZZLE)
    if key not in _KERNELS:
        if torch.cuda.get_device_capability(device)[0] < (9 if tma else 8):
            raise RuntimeError("the chain kernel needs bf16 mma and cp.async (compute capability 8.0 or newer; "
                               "9.0 for the bulk-copy one)")
        name, src = source(bits, planes, warps, depth, tiled, bpi, tma, f16, extra, attn)
        _KERNELS[key] = gemv_cuda.build(name, src, device, (warps + int(tma)) * 32)
    return _KERNELS[key]


def stage_bytes(bits: int, planes: int, warps: int, bpi: int) -> int:
    """A bulk-copy stage: BPI blocks a consumer warp (16 rows of ``planes`` words), int4's (scale, zero) rows."""
    return warps * bpi * (planes * 4 * 16 + (64 if bits == 4 else 0))


def smem_bytes(bits: int, planes: int, warps: int, depth: int, bpi: int, kmax: int, maxt: int,
               tma: bool = False, f16: bool = False) -> int:
    """Dynamic shared memory: the warps' rings (or the bulk-copy ring's stages), the staged input (pairs and block
    sums) and the parts of the CTA's tiles (``maxt`` tiles, one part a warp)."""
    fields = 32 // bits
    if tma:  # from a 1 KiB boundary (up to 1 KiB skipped)
        ring = 1024 + depth * stage_bytes(bits, planes, warps, bpi)
    else:
        ring = warps * (depth + 1) * bpi * (32 * 2 * (planes // 16) + (16 if bits == 4 else 0)) * 16
    item, sums = (8 if bits == 8 else 16, 16) if f16 else (16, 4)
    return ring + kmax // fields * item + kmax // (planes * fields) * sums + maxt * warps * 64


def layer_fits(layer, padded: bool = False) -> bool:
    """Whether a layer's words can go through the chain: ``gemv_cuda``'s int4 (tiled) or int8 (planar) words,
    no bias, blocks of 128 columns, rows in 16s, inputs in 8s. ``padded``: also a layer whose input is padded with
    zero columns to whole blocks (``int4_state(pad_to=)``, ``Int8Linear.quantize(pad_to=)``; its chain input is as
    wide as its words: an "ln" phase stages the zeros, a plain one reads a row that holds them)."""
    from localgpt.generation.fast.quantize import Int4Linear, Int8Linear

    words = getattr(layer, "words", None)
    if words is None or not words.is_cuda or getattr(layer, "bias", None) is not None:
        return False
    if getattr(layer, "x_features", layer.in_features) != layer.in_features and not padded:
        return False
    n, k = layer.out_features, layer.in_features
    if isinstance(layer, Int4Linear):
        ok = layer.tiled and layer.planes == 16
    elif isinstance(layer, Int8Linear):
        ok = layer.layout in ("planar", "cuda") and layer.planes is not None and layer.planes % 16 == 0
    else:
        return False
    fields = 8 if isinstance(layer, Int4Linear) else 4
    return ok and n % 16 == 0 and k % (layer.planes * fields) == 0 and k % 8 == 0


def _tensor_map(words: torch.Tensor, n: int, k: int) -> bytes:
    """A CUtensorMap (128 bytes) of int8 words as [n rows, k bytes], boxes of 16 rows x 128 bytes (a block), the 16-byte
    chunks of a box's rows swizzled (128-byte swizzle: chunk ^ row % 8), L2 fetches of 256 bytes."""
    raw = ctypes.create_string_buffer(128 + 64)  # the host's object 64-byte aligned, as CUtensorMap is
    at = -ctypes.addressof(raw) % 64
    dims, strides = (ctypes.c_uint64 * 2)(k, n), (ctypes.c_uint64 * 1)(k)
    box, steps = (ctypes.c_uint32 * 2)(128, 16), (ctypes.c_uint32 * 2)(1, 1)
    # data type UINT8 (0), rank 2, no interleave (0), 128-byte swizzle (3), L2 promotion 256 bytes (3), no fill (0)
    code = ctypes.CDLL("libcuda.so.1").cuTensorMapEncodeTiled(
        ctypes.c_void_p(ctypes.addressof(raw) + at), 0, 2, ctypes.c_void_p(words.data_ptr()), dims, strides, box,
        steps, 0, 3, 3, 0)
    if code != 0:
        raise RuntimeError(f"CUDA driver error {code} (cuTensorMapEncodeTiled)")
    return raw.raw[at:at + 128]


class _ExecAffinity(ctypes.Structure):
    """CUexecAffinityParam with its SM-count member (CU_EXEC_AFFINITY_TYPE_SM_COUNT = 0)."""

    _fields_ = [("type", ctypes.c_int), ("sm_count", ctypes.c_uint)]


def _usable_sms(device: torch.device) -> int:
    """Multiprocessors this CUDA context may run on: the device's, or fewer where MPS gives the process a share
    (``cuCtxGetExecAffinity``); a grid larger than that would wait at its first barrier for CTAs that never run."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    affinity = _ExecAffinity()
    try:
        with torch.cuda.device(device):
            if (ctypes.CDLL("libcuda.so.1").cuCtxGetExecAffinity(ctypes.byref(affinity), 0) == 0
                    and 0 < affinity.sm_count < sms):
                return int(affinity.sm_count)
    except AttributeError:  # a driver before CUDA 11.4
        pass
    return sms


class Chain:
    """One launch of several GEMVs of one token, each reading the one before (see the module's note).

    ``phases``: dicts with ``layer`` (``layer_fits``, padded inputs allowed), ``x`` (its input, bf16; [2K] for
    "swiglu"), ``out`` ([N] bf16), ``xmode`` ("plain", "swiglu", "rms" or "ln"), for "rms" ``norm`` (an
    RMSNorm), ``y`` (added to x first, or None) and ``xsum`` (where x + y goes, or None), for "ln" ``norm`` (a
    LayerNorm of D columns, x [D], K >= D: zeros staged past D), ``y`` and ``y2`` (x + (y2 + y) first, or both None)
    and ``xsum``; ``nobar``: no grid barrier before the phase (its input is not written in this launch), ``same``:
    its input is the previous phase's, already staged (``x`` and ``xmode`` not given); ``gelu_out``: GELU of each
    output row as it is written. A chain with any of these runs the kernel variant that has them (``EXTRA``).
    ``res32`` (a plain phase's, float32 [N]): each output row is also added to it, in fp32, as it is written, and
    the sum's bf16 rounding written to ``xsum`` ([N] bf16): Mamba's fp32 residual and the next norm's input (the
    kernel variant with that epilogue, ``EXTRA`` & 2). ``conv_state`` (bf16 [C, W - 1]) with ``conv_w`` ([C, W]),
    ``conv_b`` ([C] or None) and ``xc`` ([C], C <= N): output rows below C also go through the depthwise causal
    conv of one decode step as they are written (``mamba_triton.conv_step``'s arithmetic: silu(conv) into xc, the
    state shifted by the row): Mamba's in_proj, whose next phase can be x_proj on xc (``EXTRA`` & 4). Or, in the
    bulk-copy kernel and as the chain's last phase, x_proj folded in: ``xw`` (x_proj's weight transposed, bf16 [C, R],
    R a multiple of 8) and ``dbl`` ([R] bf16, x_proj's row): each CTA adds up its conv rows times their rows of xw,
    and the launch's last CTA adds the CTAs' parts in order (``EXTRA`` & 16: no x_proj phase, no barrier).
    Every tensor is fixed: the launch keeps their addresses (a decode step's static buffers), so calling it
    replays the same GEMVs on whatever they hold."""

    def __init__(self, phases: list[dict], device: torch.device, warps: int | None = None,
                 depth: int | None = None, bpi: int | None = None, tma: bool | None = None,
                 f16: bool | None = None):
        from localgpt.generation.fast.quantize import Int4Linear

        if not 1 <= len(phases) <= MAXPH:
            raise ValueError(f"a chain has 1 to {MAXPH} phases")
        attn = phases[0] if phases[0].get("xmode") == "attn" else None
        if any(ph.get("xmode") == "attn" for ph in phases[1:]):
            raise ValueError("the attention is a chain's first phase or none")
        layers = [ph["layer"] for ph in phases if ph.get("xmode") != "attn"]
        if not all(layer_fits(layer, padded=True) for layer in layers):
            raise ValueError("a layer's words do not fit the chain kernel")
        bits = 4 if isinstance(layers[0], Int4Linear) else 8
        planes = layers[0].planes
        if any((4 if isinstance(layer, Int4Linear) else 8) != bits or layer.planes != planes for layer in layers):
            raise ValueError("one weight format a chain")
        self.device = device
        fields = 32 // bits
        if f16 is None:  # int4's fp16 operands in the ring kernel only with F16_INT4_RING
            f16 = F16 and bits in F16_BITS and (bits == 8 or (tma is not False and bulk_copy(device))
                                                or F16_INT4_RING)
        self.f16 = f16
        if tma is None:
            tma = bulk_copy(device) and (bits == 4 or (f16 and planes == 32))
        elif tma and bits == 8 and not (f16 and planes == 32):
            raise ValueError("the bulk-copy chain takes int8 words with fp16 operands, 32 words a block")
        self.tma = tma
        self.pdl = PDL and tma
        defaults = (TMA_DEFAULTS if f16 else TMA_DEFAULTS_BF16)[bits] if tma else DEFAULTS[bits]
        warps, bpi = warps or defaults[0], bpi or defaults[2]
        if any(layer.in_features // (planes * fields) % bpi for layer in layers) and not tma:
            bpi = 1
        # every CTA resident at once (the grid barrier waits for all of them): one a multiprocessor this context
        # may use (all of them, or an MPS client's share)
        self.grid = _usable_sms(device)
        kmax = max(layer.in_features for layer in layers)
        # phases with no grid barrier between them share out their blocks together (balanced_cuts); the others
        # (and every phase of a Llama chain) in equal runs of tiles
        groups: list[list[int]] = []
        for i, ph in enumerate(phases):
            if ph.get("xmode") == "attn":
                continue
            if (ph.get("nobar") or ph.get("same")) and groups:
                groups[-1].append(i)
            else:
                groups.append([i])
        cuts: dict[int, list[tuple[int, int]]] = {}
        for group in (g for g in groups if len(g) > 1):
            runs = balanced_cuts([phases[i]["layer"].out_features // 16 for i in group],
                                 [phases[i]["layer"].in_features // (planes * fields) for i in group], self.grid)
            cuts.update(zip(group, runs))
        if XFOLD_WEIGHT and phases[-1].get("xw") is not None and len(phases) - 1 not in cuts:
            # XFOLD: a tile of conv channels weighs 1 + XFOLD_WEIGHT (its conv and its part of x_proj), others 1
            c = phases[-1]["xc"].numel()
            cuts[len(phases) - 1] = weighted_runs([1.0 + XFOLD_WEIGHT * (16 * t < c) for t in range(
                phases[-1]["layer"].out_features // 16)], self.grid)
        self.cut = (torch.tensor([cuts.get(i, [(0, 0)] * self.grid) for i in range(len(phases))], dtype=torch.int32,
                                 device=device) if cuts else None)
        maxt = max(max(t1 - t0 for t0, t1 in cuts[i]) if i in cuts else
                   -(-ph["layer"].out_features // 16 // self.grid)
                   for i, ph in enumerate(phases) if ph.get("xmode") != "attn")
        optin = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
        # the attention's scratch after the tiles' parts: one (m, l, out[hd]) a warp
        ascr = warps * (attn["hd"] + 2) * 4 if attn is not None else 0
        self.cnt = torch.zeros(attn["heads"] if attn is not None else 1, dtype=torch.int32, device=device)
        if tma and depth is None:  # as many stages as the shared memory holds, up to TMA_DEFAULTS' depth
            rest = smem_bytes(bits, planes, warps, 0, bpi, kmax, maxt, True, f16) + ascr + 2048 + 16 * MAX_STAGES
            depth = max(2, min(defaults[1], (optin - rest) // stage_bytes(bits, planes, warps, bpi)))
        depth = depth or defaults[1]
        # the kernel with a parallel block's parts (EXTRA): "ln", GELU_OUT and the balanced runs of a barrier-free
        # group (left out of Llama's kernels: their registers)
        convs = [(ph["conv_state"], ph["conv_w"], ph.get("conv_b")) for ph in phases
                 if ph.get("conv_state") is not None]
        extra = (int(any(ph.get("xmode") == "ln" or ph.get("gelu_out") or ph.get("nobar") or ph.get("same")
                         for ph in phases))
                 | (2 if any(ph.get("res32") is not None for ph in phases) else 0)  # RES32's epilogue
                 | (4 if convs else 0)  # CONV's
                 | (16 if any(ph.get("xw") is not None for ph in phases) else 0)  # XFOLD's
                 # CONV_PREFETCH: whole tiles of channels, 16-byte aligned rows
                 | (32 if tma and CONV_PREFETCH and convs and all(
                     t[0].shape[0] % 16 == 0 and all(u.data_ptr() % 16 == 0 for u in t if u is not None)
                     for t in convs) else 0))
        self.fn = kernel(bits, planes, device, warps, depth, bits == 4, bpi, tma, f16, extra, attn is not None)
        self.smem = smem_bytes(bits, planes, warps, depth, bpi, kmax, maxt, tma, f16) + ascr
        if self.smem + 2048 + (16 * depth if tma else 0) > optin:
            raise ValueError(f"the chain needs {self.smem} bytes of shared memory; this GPU gives {optin}")
        self.fn.allow_smem(self.smem)
        blocks = ctypes.c_int()
        self.fn._check(self.fn.cuda.cuOccupancyMaxActiveBlocksPerMultiprocessor(
            ctypes.byref(blocks), self.fn.func, (warps + int(tma)) * 32, ctypes.c_size_t(self.smem)), "occupancy")
        if blocks.value < 1:
            raise ValueError("the chain kernel does not fit a multiprocessor")
        self.shape = (warps, depth, bpi)
        table = (_Phase * len(phases))()
        self.keep = []
        # int8 words by the copy engine: a tensor map a phase, in device memory (128 bytes, 64-byte aligned)
        self.maps = torch.zeros(len(phases), 128, dtype=torch.uint8, device=device) if tma and bits == 8 else None

        def ptr(t):
            return t.data_ptr() if t is not None else 0

        resolved: list[dict] = []  # the phases with a SAME phase's input filled in from the one before
        for i, ph in enumerate(phases):
            if ph.get("xmode") == "attn":
                table[i] = self._attention_phase(ph)
                resolved.append(ph)
                continue
            layer = ph["layer"]
            n, k = layer.out_features, layer.in_features
            same = bool(ph.get("same"))
            res32, conv, xw = ph.get("res32"), ph.get("conv_state"), ph.get("xw")
            flags = ((NOBAR if ph.get("nobar") or same else 0) | (SAME if same else 0)
                     | (GELU_OUT if ph.get("gelu_out") else 0) | (RES32 if res32 is not None else 0)
                     | (CONV if conv is not None else 0) | (XFOLD if xw is not None else 0))
            if flags & (NOBAR | SAME) and i == 0:
                raise ValueError("a chain's first phase stages its input after no barrier: no nobar / same")
            if same:  # the previous phase's staged input: as wide, nothing to read
                if phases[i - 1].get("xmode") == "attn" or phases[i - 1]["layer"].in_features != k:
                    raise ValueError(f"phase {i}: same input as a GEMV phase of {k} columns before it")
                ph = {**resolved[i - 1], "layer": layer, "out": ph["out"], "xsum": None}
            resolved.append(ph)
            mode = CHAIN_XMODES[ph.get("xmode", "plain")]
            x, out, y, y2, xsum = ph.get("x"), ph["out"], ph.get("y"), ph.get("y2"), ph.get("xsum")
            norm = ph.get("norm")
            nw = norm.weight if mode in (2, 4) else None
            nb = norm.bias if mode == 4 else None
            width = x.numel() if mode == 4 else k
            for tensor in (x, out, y, y2, xsum, nw, nb):
                if tensor is not None and (tensor.dtype != torch.bfloat16 or not tensor.is_contiguous()
                                           or tensor.data_ptr() % 16):
                    raise ValueError("chain buffers are contiguous, 16-byte aligned bf16")
            if x.numel() != (2 * k if mode == 1 else width) or out.numel() != n:
                raise ValueError(f"phase {i}: x has {x.numel()} values, out {out.numel()}, for a {n}x{k} layer")
            if mode in (2, 4) and norm is None:
                raise ValueError(f"phase {i}: {ph['xmode']} needs the norm")
            if mode in (2, 4) and k > 8 * STAGE_WORDS * warps * 32:
                raise ValueError(f"phase {i}: a norm over {k} columns is more than one staging round")
            if mode == 4 and (width % 8 or width > k or nb is None or nw.numel() != width or nb.numel() != width
                              or (y is None) != (y2 is None) or any(t is not None and t.numel() != width
                                                                    for t in (y, y2, xsum))):
                raise ValueError(f"phase {i}: ln takes x, y, y2, xsum and the norm's weight and bias of one width "
                                 f"(a multiple of 8, at most the layer's {k}; y and y2 both or neither)")
            if res32 is not None and (res32.dtype != torch.float32 or not res32.is_contiguous()
                                      or res32.numel() != n or xsum is None or xsum.numel() != n
                                      or mode != 0 or ph.get("gelu_out")):
                raise ValueError(f"phase {i}: res32 is a plain phase's fp32 residual of its {n} rows, with xsum "
                                 "(its bf16 copy) as wide")
            sz = layer.pairs() if bits == 4 else None
            if tma and bits == 4:  # (scale, zero) rows tile-major, [N / 16, blocks, 16]: a CTA's tiles one span
                sz = sz.view(k // (planes * fields), n // 16, 16).transpose(0, 1).contiguous()
            rs = None if bits == 4 else layer.scales
            self.keep += [layer.words, sz, rs, nw, nb, x, out, y, y2, xsum]
            table[i] = _Phase(ptr(layer.words), ptr(sz), ptr(x), ptr(y), ptr(nw), ptr(xsum), ptr(out), ptr(rs),
                              n, k, mode, width, float(norm.eps) if mode in (2, 4) else 0.0, flags, 0, 0)
            table[i].y2, table[i].nb = ptr(y2), ptr(nb)
            if res32 is not None:  # the residual in the attention's ws field (unused by a GEMV phase)
                self.keep.append(res32)
                table[i].ws = res32.data_ptr()
            if conv is not None:  # the conv's tensors in the attention's fields (CONV)
                self._conv_fields(table[i], i, n, conv, ph["conv_w"], ph.get("conv_b"), ph["xc"])
            if xw is not None:
                if conv is None or res32 is not None or i != len(phases) - 1 or not tma:
                    raise ValueError(f"phase {i}: x_proj folds into a CONV phase that is the chain's last, in the "
                                     "bulk-copy kernel")
                self._xfold_fields(table[i], i, xw, ph["dbl"], ph["xc"].numel(), depth * stage_bytes(
                    bits, planes, warps, bpi))
                # the CTAs with conv channels, the first ones (runs in CTA order): xfold_sum adds their parts
                runs = cuts[i] if i in cuts else equal_runs(n // 16, self.grid)
                table[i].chunks = sum(16 * t0 < ph["xc"].numel() for t0, _ in runs)
            table[i].cut = self.cut[i].data_ptr() if i in cuts else 0
            if self.maps is not None:
                self.maps[i].copy_(torch.frombuffer(bytearray(_tensor_map(layer.words, n, k)), dtype=torch.uint8))
                table[i].tmap = self.maps[i].data_ptr()
        self.n_phases, self.maxt, self.kmax = len(phases), maxt, kmax
        self.table = torch.frombuffer(bytearray(bytes(table)), dtype=torch.uint8).to(device)
        self.bar = torch.zeros(2, dtype=torch.int32, device=device)
        # DIAG & 16 (bench/gemv_cuda.py --chain-trace): ns stamps [CTA, phase, point] of the last launch
        self.trace = torch.zeros(self.grid, MAXPH, 4, dtype=torch.int64, device=device) if DIAG & 16 else None

    def _conv_fields(self, entry: _Phase, i: int, n: int, state: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None, xc: torch.Tensor) -> None:
        """A CONV phase's conv state, weight, bias and output in its table entry's attention fields."""
        c, w = weight.shape if weight.dim() == 2 else (0, 0)
        if (not 0 < c <= n or w < 2 or state.shape != (c, w - 1) or xc.numel() != c
                or (bias is not None and bias.numel() != c)
                or any(t.dtype != torch.bfloat16 or not t.is_contiguous()
                       for t in (state, weight, xc) + ((bias,) if bias is not None else ()))):
            raise ValueError(f"phase {i}: the conv takes a bf16 state [C, W - 1], weight [C, W], bias [C] and "
                             f"output [C], C at most the layer's {n} rows")
        self.keep += [state, weight, bias, xc]
        entry.kc, entry.vc, entry.cos = state.data_ptr(), xc.data_ptr(), weight.data_ptr()
        entry.sin = bias.data_ptr() if bias is not None else 0
        entry.heads, entry.kv = c, w

    def _xfold_fields(self, entry: _Phase, i: int, xw: torch.Tensor, dbl: torch.Tensor, c: int, ring: int) -> None:
        """An XFOLD phase's x_proj copy ``xw`` [C, R], its row ``dbl`` [R] and the CTAs' parts (``self.xparts``, fp32
        [grid, R]) in its table entry's unused fields (y2, nb, ws; R in hd)."""
        r, warps = dbl.numel(), self.shape[0]
        if (xw.shape != (c, r) or c % 16 or not 0 < r <= 8 * 32 * warps or r % 8 or any(
                t.dtype != torch.bfloat16 or not t.is_contiguous() or t.data_ptr() % 16 for t in (xw, dbl))):
            raise ValueError(f"phase {i}: the fold takes x_proj's weight transposed, bf16 [C, R], C a multiple of 16, "
                             f"and its row, bf16 [R], R a multiple of 8 up to {8 * 32 * warps}")
        if (warps * 32 // (r // 8)) * r * 4 > ring:
            raise ValueError(f"phase {i}: the fold's sums do not fit the ring")
        self.xparts = torch.zeros(self.grid, r, dtype=torch.float32, device=xw.device)
        self.keep += [xw, dbl, self.xparts]
        entry.y2, entry.nb, entry.ws, entry.hd = xw.data_ptr(), dbl.data_ptr(), self.xparts.data_ptr(), r

    def _attention_phase(self, ph: dict) -> _Phase:
        """The table entry of an attention phase: ``x`` the qkv row ([(heads + 2 kv) hd] bf16), ``out`` the
        attention's row ([heads hd] bf16, the next phase's input), ``k_cache`` / ``v_cache`` ([1, kv, len, hd] bf16,
        written at ``pos``), ``cos`` / ``sin`` ([len, hd] bf16 tables), ``pos`` (an int64 [1] on the device: the
        step's position, read by the launch), ``heads``, ``kv``, ``hd`` (64 or 128) and ``ws`` (float32
        [heads, chunks, hd + 4], chunks = ``attention_chunks``)."""
        x, out, kc, vc, cos, sin, pos, ws = (ph[k] for k in ("x", "out", "k_cache", "v_cache", "cos", "sin", "pos",
                                                              "ws"))
        heads, kv, hd = ph["heads"], ph["kv"], ph["hd"]
        chunks = attention_chunks(heads, self.grid)
        length = kc.shape[2]
        if hd not in (64, 128) or heads % kv:
            raise ValueError(f"the chain's attention takes head dims 64 or 128 and whole kv groups (hd {hd})")
        if kc.shape != (1, kv, length, hd) or vc.shape != kc.shape or cos.shape != (length, hd) or sin.shape != cos.shape:
            raise ValueError("the chain's attention: caches [1, kv, len, hd] and cos / sin tables [len, hd]")
        for t in (x, out, kc, vc, cos, sin):
            if t.dtype != torch.bfloat16 or not t.is_contiguous() or t.data_ptr() % 16:
                raise ValueError("the chain's attention: contiguous, 16-byte aligned bf16 rows, caches and tables")
        if x.numel() != (heads + 2 * kv) * hd or out.numel() != heads * hd or pos.dtype != torch.int64 \
                or ws.dtype != torch.float32 or ws.numel() < heads * chunks * (hd + 4) or ws.data_ptr() % 16:
            raise ValueError("the chain's attention: qkv of (heads + 2 kv) hd, out of heads hd, an int64 position, "
                             "float32 ws")
        self.keep += [x, out, kc, vc, cos, sin, pos, ws]
        entry = _Phase()
        entry.x, entry.out, entry.kc, entry.vc, entry.cos, entry.sin, entry.pos, entry.ws, entry.cnt = (
            t.data_ptr() for t in (x, out, kc, vc, cos, sin, pos, ws, self.cnt))
        entry.xmode, entry.heads, entry.kv, entry.hd, entry.len, entry.chunks = 3, heads, kv, hd, length, chunks
        entry.scale = hd ** -0.5
        return entry

    def __call__(self) -> None:
        """Launch on the current stream (graph-capturable)."""
        def p(t):
            return ctypes.c_void_p(t.data_ptr())

        self.fn((self.grid, 1), self.smem, [p(self.table), ctypes.c_int(self.n_phases), p(self.bar),
                                            ctypes.c_int(self.maxt), ctypes.c_int(self.kmax),
                                            ctypes.c_void_p(self.trace.data_ptr() if self.trace is not None else 0)],
                self.device, self.pdl)
