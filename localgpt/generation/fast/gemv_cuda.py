"""Batch-1 decode GEMV for the planar int4 / int8 layouts on the tensor cores (CUDA C, compiled at run time).

Why not Triton: the Triton kernels of ``gemv_triton`` spend ~3.5 (int4) / ~4.7 (int8) SASS instructions a weight
and ran at 1.7-2.1 / 2.0-3.4 TB/s on an H200, latency-bound at 25-48 % occupancy (bench/gpu_notes.md, rounds
3-4). Here the dequantised weights never leave registers: a ``lop3`` puts two nibbles under 128's bf16 exponent
(a bf16 pair 128 + q), one ``fma.rn.bf16x2`` makes it (q - 8) exactly, and that register *is* an operand
fragment of ``mma.sync.m16n8k16`` (Marlin's trick), so the multiply-add of 256 weights is one instruction for the
warp: ~1.5 instructions a weight for int4, ~2.9 for int8. Triton cannot express a warp-collective ``mma`` inside
elementwise inline assembly, hence CUDA C, compiled by NVRTC (shipped with PyTorch's CUDA wheels: no CUDA
toolkit, no compiler on the user's machine) into a cubin for the GPU at hand, cached on disk.

How a warp covers a 16-row tile (``mma`` fragment layout, PTX ISA "Matrix Fragments for mma.m16n8k16"): lane
= 4 g + t. The thread loads 16 bytes (words 4t .. 4t+3 of a 16-word chunk) of rows g and g + 8; in sub-step s
it uses word i = 4t + s of both rows. The bf16 pair of nibbles (p, p + 4) of that word is A[g][2t, 2t+1] (or
[g + 8]) of the mma, and the same pair of x columns, staged once per CTA in shared memory in exactly that
order, is B[2t, 2t+1][n] for every n: the 8 output columns are 8 copies of W x, column 2t of row g in c[0],
row g + 8 in c[2]. Since A and B of each thread cover the same columns, the k order inside an mma is free.

int4 (planar, P = 16, one group a block): w x = s * sum((q - 8) x) + z * sum(x) per group; the mma sums a
group, the group's scale and zero are applied in fp32. int8 (planar, P = 32): each byte u = v + 128 is split
into nibbles, v = 16 (hi - 8) + lo (the two's complement byte's high nibble XOR 8 comes from the same
``lop3``), and the hi nibbles meet 16 x in B (exact): one fp32 chain over the whole row, unscaled (the
layer multiplies by its per-row scale, as with the Triton kernel).

int4 words are stored tiled ([N/16, blocks, 16 rows, P words], ``tile_words``): a warp's block of a 16-row tile
is one contiguous 1 KiB span. Up to 8 tokens a launch cost little more than one: token j is column j of the
mma's B (a column past the batch is never written), so a batch of decoding streams reads the weights once.

Prologues (``XMODES``): the kernels that only reshape a GEMV's input run inside it, each CTA for its own columns
as it stages x: "rms" is RMSNorm(x + y) (every CTA reads the whole row for the norm; CTA (0, 0) writes the sum,
the next residual), "swiglu" is silu(gate) * up, both with the separate kernels' rounding steps. With them a
Llama layer's batch-1 step is four GEMVs and the attention's three kernels instead of ten launches
(``quantize.prologue_gemv``). int8's per-row scales can be applied in the epilogue (``scales``), rounded as the
layer's own multiply after the kernel was.

Split-K: the Triton kernels' workspace (deterministic: the last CTA of a row block adds the parts in order and
resets its counter, so a CUDA graph can replay it), or on Hopper a thread block cluster whose CTAs add their
parts through distributed shared memory. GPU only; every layer is checked at load
(``quantize.check_decode_kernel``) and falls back to the Triton kernels if this one is wrong or does not build.

Measured on an H200 (bench/RESULTS.md, "GPU engine round 8"; ``bench/gemv_cuda.py``): int4 1.4-3.1 TB/s at
Llama-2-7B's shapes, 1507-1604 us of GEMV a decode step against tinygemm's 2105 (engine 434 against 378 tok/s),
8 tokens 1.3-2.5x faster than tinygemm's; int8 one token 0.82-1.03x the Triton X2 kernel (so int8's one token
stays there), 8 tokens 3.8-5.3x faster than multiplying the bytes as bf16. What bounds it: a kernel that only
loads the tiled words reaches 2.6-3.5 TB/s on these layer sizes (copy rate 4.2): fixed costs a launch. Round 9:
the prologues took the engine to 464 tok/s; programmatic dependent launch, an L2 bulk prefetch of each CTA's
words and deeper register rings all lost (bench/gpu_notes.md).
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import threading
from pathlib import Path

import torch

# The device helpers (also the persistent chain kernel's, ``gemv_chain``) and the GEMV kernel.
HELPERS = r"""
typedef unsigned int u32;
typedef unsigned short u16;

__device__ __forceinline__ u32 nib_pair(u32 w) {          // ((w & 0x000F000F) | 0x43004300): bf16 (128 + a, 128 + b)
    u32 d; asm("lop3.b32 %0, %1, 0x000F000F, 0x43004300, 0xEA;" : "=r"(d) : "r"(w)); return d;
}
__device__ __forceinline__ u32 nib_pair_flip(u32 w) {     // ((w & 0x000F000F) ^ 0x43084308): nibbles XOR 8 as well
    u32 d; asm("lop3.b32 %0, %1, 0x000F000F, 0x43084308, 0x6A;" : "=r"(d) : "r"(w)); return d;
}
__device__ __forceinline__ u32 bf2_add(u32 a, u32 c) {   // a * 1 + c on bf16 pairs (exact here)
    u32 d; asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(0x3F803F80u), "r"(c)); return d;
}
__device__ __forceinline__ void mma16816(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ uint4 ld_weights(const uint4* p) {
#if PREF
    // read-only, not kept in L1, and the L2 fetches the 256-byte span around it
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
#else
    return __ldg(p);
#endif
}
__device__ __forceinline__ float bf2f(u32 h) { return __uint_as_float(h << 16); }
__device__ __forceinline__ u16 f2bf(float f) { u16 h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }

// Token m's input at column col, as the launch's prologue makes it (XMODE): 0 x itself; 1 SwiGLU of x = [gate | up]
// ([M, 2K]: silu(gate) rounded, times up, rounded: slot_triton.silu_mul's arithmetic); 2 RMSNorm of x (+ y): the
// sum rounded, times the row's 1 / rms (``inv``) rounded, times the norm's weight rounded (add_rms_norm's).
__device__ __forceinline__ u32 x_at(const u16* __restrict__ x, const u16* __restrict__ y, const u16* __restrict__ nw,
                                    int m, int col, int K, float inv) {
#if XMODE == 1
    const u16* h = x + (long)m * 2 * K;
    const float gate = bf2f(h[col]);
    return f2bf(bf2f(f2bf(gate / (1.f + __expf(-gate)))) * bf2f(h[K + col]));
#elif XMODE == 2
    u32 v = x[(long)m * K + col];
    if (y) v = f2bf(bf2f(v) + bf2f(y[(long)m * K + col]));
    return f2bf(bf2f(nw[col]) * bf2f(f2bf(bf2f(v) * inv)));
#else
    return x[(long)m * K + col];
#endif
}
__device__ __forceinline__ u32 add_pair(u32 a, u32 b) {  // two bf16 sums, each rounded from fp32 (as the eager add)
    return (u32)f2bf(bf2f(a & 0xFFFFu) + bf2f(b & 0xFFFFu)) | ((u32)f2bf(bf2f(a >> 16) + bf2f(b >> 16)) << 16);
}
__device__ __forceinline__ float sq_pair(u32 a) { const float l = bf2f(a & 0xFFFFu), h = bf2f(a >> 16); return l * l + h * h; }
// An output: rounded, and for int8 times the row's scale (``rs``, bf16), rounded again: the layer's ``out * scales``.
__device__ __forceinline__ u16 out_val(float total, const u16* __restrict__ rs, int r) {
    const u16 o = f2bf(total);
    return rs ? f2bf(bf2f(o) * bf2f(rs[r])) : o;
}

#define CHUNKS (P / 16)                 // 16-word chunks a block (a row's P words)
#define COLS (P * FIELDS)               // columns a block

// One block of every tile. For each 8-token tile j: c[j][0..3] = (row g, token 8j + 2t), (row g, 8j + 2t + 1),
// (row g + 8, 8j + 2t), (row g + 8, 8j + 2t + 1). The dequantised A fragments serve every token tile.
__device__ __forceinline__ void mul_block(const uint4 (&v)[TILES][CHUNKS][2], const u32 (&sc)[TILES][2],
                                          const uint4* const (&xb)[NT], const float (&xs0)[NT],
                                          const float (&xs1)[NT], int t, float (&acc)[TILES][NT][4]) {
#pragma unroll
    for (int tt = 0; tt < TILES; ++tt) {
#if BITS == 4
        float c[NT][4];
#pragma unroll
        for (int j = 0; j < NT; ++j) c[j][0] = c[j][1] = c[j][2] = c[j][3] = 0.f;
#else
        float (&c)[NT][4] = acc[tt];  // int8: one chain over the whole row, unscaled
#endif
#pragma unroll
        for (int ch = 0; ch < CHUNKS; ++ch) {
            const u32 w0v[4] = {v[tt][ch][0].x, v[tt][ch][0].y, v[tt][ch][0].z, v[tt][ch][0].w};
            const u32 w1v[4] = {v[tt][ch][1].x, v[tt][ch][1].y, v[tt][ch][1].z, v[tt][ch][1].w};
#pragma unroll
            for (int s = 0; s < 4; ++s) {
                uint4 xq[NT];
#pragma unroll
                for (int j = 0; j < NT; ++j) xq[j] = xb[j][ch * 16 + 4 * t + s];
                const u32 w0 = w0v[s], w1 = w1v[s];
#if BITS == 4
#if OFFSET
                // (128 + q) as it is: the 136 * sum(x) it adds is taken out with the group's scale below
                u32 a00 = nib_pair(w0), a10 = nib_pair(w1), a01 = nib_pair(w0 >> 4), a11 = nib_pair(w1 >> 4);
                u32 a02 = nib_pair(w0 >> 8), a12 = nib_pair(w1 >> 8), a03 = nib_pair(w0 >> 12), a13 = nib_pair(w1 >> 12);
#else
                const u32 m = 0xC308C308u;  // bf16 -136: (128 + q) - 136 = q - 8
                u32 a00 = bf2_add(nib_pair(w0), m), a10 = bf2_add(nib_pair(w1), m);
                u32 a01 = bf2_add(nib_pair(w0 >> 4), m), a11 = bf2_add(nib_pair(w1 >> 4), m);
                u32 a02 = bf2_add(nib_pair(w0 >> 8), m), a12 = bf2_add(nib_pair(w1 >> 8), m);
                u32 a03 = bf2_add(nib_pair(w0 >> 12), m), a13 = bf2_add(nib_pair(w1 >> 12), m);
#endif
#pragma unroll
                for (int j = 0; j < NT; ++j) {
                    mma16816(c[j], a00, a10, a01, a11, xq[j].x, xq[j].y);
                    mma16816(c[j], a02, a12, a03, a13, xq[j].z, xq[j].w);
                }
#else
                const u32 lo = 0xC300C300u, hi = 0xC308C308u;  // -128 (lo nibble), -136 (hi nibble XOR 8)
                u32 l00 = bf2_add(nib_pair(w0), lo), l10 = bf2_add(nib_pair(w1), lo);            // bytes 0, 2: lo
                u32 h00 = bf2_add(nib_pair_flip(w0 >> 4), hi), h10 = bf2_add(nib_pair_flip(w1 >> 4), hi);
                u32 l01 = bf2_add(nib_pair(w0 >> 8), lo), l11 = bf2_add(nib_pair(w1 >> 8), lo);  // bytes 1, 3: lo
                u32 h01 = bf2_add(nib_pair_flip(w0 >> 12), hi), h11 = bf2_add(nib_pair_flip(w1 >> 12), hi);
#pragma unroll
                for (int j = 0; j < NT; ++j) {
                    mma16816(c[j], l00, l10, h00, h10, xq[j].x, xq[j].y);
                    mma16816(c[j], l01, l11, h01, h11, xq[j].z, xq[j].w);
                }
#endif
            }
        }
#if BITS == 4
        const float s0 = bf2f(sc[tt][0]), s1 = bf2f(sc[tt][1]);
        float z0 = __uint_as_float(sc[tt][0] & 0xFFFF0000u), z1 = __uint_as_float(sc[tt][1] & 0xFFFF0000u);
#if OFFSET
        z0 -= 136.f * s0;
        z1 -= 136.f * s1;
#endif
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            acc[tt][j][0] += s0 * c[j][0] + z0 * xs0[j];
            acc[tt][j][1] += s0 * c[j][1] + z0 * xs1[j];
            acc[tt][j][2] += s1 * c[j][2] + z1 * xs0[j];
            acc[tt][j][3] += s1 * c[j][3] + z1 * xs1[j];
        }
#endif
    }
}

"""

SOURCE = HELPERS + r"""#define ROWS (WARPS * 16 * TILES)       // rows a CTA
#define MAXM (8 * NT)                   // tokens: NT tiles of the mma's 8 columns

// Rows of a tile are all in or all out (N % 16 == 0); a tile past N reads row g and writes nothing.
__device__ __forceinline__ void load_block(uint4 (&v)[TILES][CHUNKS][2], u32 (&s)[TILES][2], const uint4* __restrict__ w,
                                           const u32* __restrict__ sz, const int (&row0)[TILES], int blk, int N,
                                           int stride4, int g, int t) {
#pragma unroll
    for (int tt = 0; tt < TILES; ++tt) {
        const int r = row0[tt] < N ? row0[tt] : g;
#if TILED
        // [N / 16, blocks, 16 rows, P words]: a warp's block of a 16-row tile is one contiguous span
        const uint4* p0 = w + (long)(r >> 4) * 16 * stride4 + blk * (4 * P) + (r & 15) * (P / 4) + t;
        const long next8 = 8 * (P / 4);
#else
        const uint4* p0 = w + (long)r * stride4 + blk * (P / 4) + t;
        const long next8 = 8 * (long)stride4;
#endif
#pragma unroll
        for (int ch = 0; ch < CHUNKS; ++ch) {
            v[tt][ch][0] = ld_weights(p0 + ch * 4);
            v[tt][ch][1] = ld_weights(p0 + next8 + ch * 4);
        }
#if BITS == 4
        s[tt][0] = __ldg(sz + (long)blk * N + r);
        s[tt][1] = __ldg(sz + (long)blk * N + r + 8);
#endif
    }
}

__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
#if CLUSTER
__cluster_dims__(1, CLUSTER, 1)
#endif
KERNEL_NAME(const u16* __restrict__ x, const uint4* __restrict__ w, const u32* __restrict__ sz,
            u16* __restrict__ out, float* __restrict__ ws, int* __restrict__ lock, int N, int K, int stride4,
            int split, int M, const u16* __restrict__ y, const u16* __restrict__ nw, u16* __restrict__ xsum,
            const u16* __restrict__ rs, float eps) {
    // x [M, K] bf16 (M <= 8 NT tokens; XMODE 1: [M, 2K]), out [M, N] bf16; ws [split, M, N] fp32 and lock [row
    // blocks] for split-K. XMODE 2: y (or null) added to x first, the sum written to xsum by CTA (0, 0) (when
    // both are given), nw the norm's weight [K], eps its epsilon. rs: int8's per-row scales [N] (or null).
    extern __shared__ uint4 smem[];
    const int n_blocks = K / COLS;
    const int per = (n_blocks + split - 1) / split;
    const int first = blockIdx.y * per;
    const int last = min(first + per, n_blocks);
    const int nb = max(last - first, 0);
    uint4* xp = smem;                                   // [M, nb, P]: x pairs in each word's order
    float* xs = (float*)(smem + M * per * P);           // [M, nb]: sum of x over a block (int4's zero points)
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;

    float acc[TILES][NT][4];
    uint4 v[DEPTH][TILES][CHUNKS][2];
    u32 sc[DEPTH][TILES][2];
    int row0[TILES];
#pragma unroll
    for (int tt = 0; tt < TILES; ++tt) {
        row0[tt] = blockIdx.x * ROWS + (warp * TILES + tt) * 16 + g;
#pragma unroll
        for (int j = 0; j < NT; ++j) acc[tt][j][0] = acc[tt][j][1] = acc[tt][j][2] = acc[tt][j][3] = 0.f;
    }
    // A ring of DEPTH register buffers: block b's words are loaded DEPTH - 1 blocks before they are multiplied.
    // The first ones are in flight while x is staged.
#pragma unroll
    for (int d = 0; d < DEPTH - 1; ++d)
        if (first + d < last) load_block(v[d], sc[d], w, sz, row0, first + d, N, stride4, g, t);
#if XMODE == 2
    // Each token's 1 / rms over the whole row (every CTA: its split-K columns need the row's norm); CTA (0, 0)
    // stores the residual sum.
    __shared__ float inv_rms[MAXM];
    __shared__ float red[WARPS];
    const bool store_sum = y != nullptr && xsum != nullptr && blockIdx.x == 0 && blockIdx.y == 0;
    for (int m = 0; m < M; ++m) {
        const uint4* xr = (const uint4*)(x + (long)m * K);
        const uint4* yr = (const uint4*)(y + (long)m * K);
        float ss = 0.f;
        for (int i = tid; i < K / 8; i += WARPS * 32) {
            uint4 a = xr[i];
            if (y) {
                const uint4 b = yr[i];
                a = make_uint4(add_pair(a.x, b.x), add_pair(a.y, b.y), add_pair(a.z, b.z), add_pair(a.w, b.w));
                if (store_sum) ((uint4*)(xsum + (long)m * K))[i] = a;
            }
            ss += sq_pair(a.x) + sq_pair(a.y) + sq_pair(a.z) + sq_pair(a.w);
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        if (lane == 0) red[warp] = ss;
        __syncthreads();
        if (tid == 0) {
            float total = 0.f;
            for (int i = 0; i < WARPS; ++i) total += red[i];
            inv_rms[m] = rsqrtf(total / K + eps);
        }
        __syncthreads();
    }
#endif

    // Stage x for this CTA's columns: item (token m, block b, word i) -> 4 bf16 pairs (no division: P is a
    // power of two, the token an outer loop).
    for (int m = 0; m < M; ++m) {
#if XMODE == 2
        const float inv = inv_rms[m];
#else
        const float inv = 0.f;
#endif
        uint4* xpm = xp + m * nb * P;
        for (int base = 0; base < nb * P; base += WARPS * 32) {
            const int item = base + tid;
            float part = 0.f;
            if (item < nb * P) {
                const int col = (first + item / P) * COLS + (item % P);
                u32 f[FIELDS];
#pragma unroll
                for (int j = 0; j < FIELDS; ++j) { f[j] = x_at(x, y, nw, m, col + j * P, K, inv); part += bf2f(f[j]); }
#if BITS == 4
                // pair p = (field p, field p + 4): the nibbles lop3 puts in one register
                xpm[item] = make_uint4(f[0] | (f[4] << 16), f[1] | (f[5] << 16), f[2] | (f[6] << 16), f[3] | (f[7] << 16));
#else
                // bytes 0 / 2 then 1 / 3; the hi-nibble pairs meet 16 x (exact: a power of two)
                u32 s0 = f2bf(16.f * bf2f(f[0])), s1 = f2bf(16.f * bf2f(f[1]));
                u32 s2 = f2bf(16.f * bf2f(f[2])), s3 = f2bf(16.f * bf2f(f[3]));
                xpm[item] = make_uint4(f[0] | (f[2] << 16), s0 | (s2 << 16), f[1] | (f[3] << 16), s1 | (s3 << 16));
#endif
            }
#if BITS == 4
            // a block's P items are P consecutive lanes (P = 16 divides 32): reduce over them
#pragma unroll
            for (int o = P / 2; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
            if (item < nb * P && item % P == 0) xs[m * nb + item / P] = part;
#endif
        }
    }
    __syncthreads();

    // Column n of token tile j is token 8j + n; a column past M multiplies token 0 again and is never written
    // (the columns of an mma do not mix), so no thread needs a predicate.
    const uint4* xg[NT];
    int mt0[NT], mt1[NT], x0[NT], x1[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        xg[j] = xp + (8 * j + g < M ? 8 * j + g : 0) * nb * P;
        mt0[j] = 8 * j + 2 * t < M ? 8 * j + 2 * t : -1;
        mt1[j] = 8 * j + 2 * t + 1 < M ? 8 * j + 2 * t + 1 : -1;
        x0[j] = max(mt0[j], 0) * nb;
        x1[j] = max(mt1[j], 0) * nb;
    }
    for (int blk = first; blk < last; blk += DEPTH) {
#pragma unroll
        for (int d = 0; d < DEPTH; ++d) {
            if (blk + d + DEPTH - 1 < last)
                load_block(v[(d + DEPTH - 1) % DEPTH], sc[(d + DEPTH - 1) % DEPTH], w, sz, row0, blk + d + DEPTH - 1,
                           N, stride4, g, t);
            if (blk + d < last) {
                const int b = blk + d - first;
                const uint4* xb[NT];
                float xs0[NT], xs1[NT];
#pragma unroll
                for (int j = 0; j < NT; ++j) { xb[j] = xg[j] + b * P; xs0[j] = xs[x0[j] + b]; xs1[j] = xs[x1[j] + b]; }
                mul_block(v[d], sc[d], xb, xs0, xs1, t, acc);
            }
        }
    }
#if CLUSTER
    // Split-K inside a thread block cluster (Hopper): the parts meet in CTA rank 0's view of the others'
    // shared memory, added in rank order (deterministic); no global workspace, no counter.
    __shared__ float part_rows[MAXM * ROWS];
#pragma unroll
    for (int tt = 0; tt < TILES; ++tt) {
        const int lr = (warp * TILES + tt) * 16 + g;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            const int m0 = mt0[j], m1 = mt1[j];
            if (m0 >= 0) { part_rows[m0 * ROWS + lr] = acc[tt][j][0]; part_rows[m0 * ROWS + lr + 8] = acc[tt][j][2]; }
            if (m1 >= 0) { part_rows[m1 * ROWS + lr] = acc[tt][j][1]; part_rows[m1 * ROWS + lr + 8] = acc[tt][j][3]; }
        }
    }
    cluster_sync();
    u32 rank;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
    if (rank == 0) {
        u32 local;
        asm("{.reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a;}" : "=r"(local) : "l"(part_rows));
        for (int idx = tid; idx < M * ROWS; idx += WARPS * 32) {
            float total = 0.f;
#pragma unroll
            for (int k = 0; k < CLUSTER; ++k) {
                u32 remote;
                float pv;
                asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local + 4 * idx), "r"(k));
                asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(pv) : "r"(remote));
                total += pv;
            }
            const int r = blockIdx.x * ROWS + idx % ROWS;
            if (r < N) out[(long)(idx / ROWS) * N + r] = out_val(total, rs, r);
        }
    }
    cluster_sync();  // the others' shared memory stays until rank 0 has read it
    return;
#endif
    if (split == 1) {
#pragma unroll
        for (int tt = 0; tt < TILES; ++tt) {
            const int r = row0[tt];
            if (r >= N) continue;
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const int m0 = mt0[j], m1 = mt1[j];
                if (m0 >= 0) { out[(long)m0 * N + r] = out_val(acc[tt][j][0], rs, r); out[(long)m0 * N + r + 8] = out_val(acc[tt][j][2], rs, r + 8); }
                if (m1 >= 0) { out[(long)m1 * N + r] = out_val(acc[tt][j][1], rs, r); out[(long)m1 * N + r + 8] = out_val(acc[tt][j][3], rs, r + 8); }
            }
        }
        return;
    }
    float* mine = ws + (long)blockIdx.y * M * N;
#pragma unroll
    for (int tt = 0; tt < TILES; ++tt) {
        const int r = row0[tt];
        if (r >= N) continue;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            const int m0 = mt0[j], m1 = mt1[j];
            if (m0 >= 0) { mine[(long)m0 * N + r] = acc[tt][j][0]; mine[(long)m0 * N + r + 8] = acc[tt][j][2]; }
            if (m1 >= 0) { mine[(long)m1 * N + r] = acc[tt][j][1]; mine[(long)m1 * N + r + 8] = acc[tt][j][3]; }
        }
    }
    __shared__ int is_last;
#if ACQREL
    // The CTA's parts written, a barrier, then one thread's acq_rel atomic at GPU scope: its release covers the
    // others' writes (they happen before it through the barrier), the last CTA's acquire covers what it reads
    // after the next barrier. (As CUTLASS's semaphore and the Triton kernels' _finish do; one MEMBAR.ALL.GPU
    // for thread 0 instead of two MEMBAR.SC.GPU for every thread.)
    __syncthreads();
    if (tid == 0) {
        int prev;
        asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;" : "=r"(prev) : "l"(lock + blockIdx.x) : "memory");
        is_last = prev == split - 1;
    }
    __syncthreads();
    if (!is_last) return;
#else
    __threadfence();
    __syncthreads();
    if (tid == 0) is_last = atomicAdd(lock + blockIdx.x, 1) == split - 1;
    __syncthreads();
    if (!is_last) return;
    __threadfence();
#endif
    const int rows_here = min(ROWS, N - (int)blockIdx.x * ROWS);
    for (int idx = tid; idx < M * rows_here; idx += WARPS * 32) {
        const int r = blockIdx.x * ROWS + idx % rows_here;
        const long o = (long)(idx / rows_here) * N + r;
        float total = 0.f;
        for (int k = 0; k < split; ++k) total += __ldcg(ws + (long)k * M * N + o);
        out[o] = out_val(total, rs, r);
    }
    if (tid == 0) atomicExch(lock + blockIdx.x, 0);
}
"""


# A kernel's configuration: (warps a CTA, 16-row tiles a warp, split-K, offset, depth, L2 prefetch, cluster, tiled).
#  - offset (int4): multiply (128 + q) and take 136 * sum(x) out per group instead of making each pair q - 8 (one
#    bf16x2 op a pair less); depth: blocks of words in registers (loaded depth - 1 blocks ahead); L2 prefetch:
#    weight loads ask the L2 for 256 bytes; cluster (sm_90+): the split-K parts meet in a thread block cluster's
#    shared memory instead of a global workspace; tiled: the words in the order ``tile_words`` writes.
Config = tuple


def source(bits: int, planes: int, warps: int, tiles: int, offset: bool = False, depth: int = 2,
           pref: bool = False, cluster: int = 0, tiled: bool = False, nt: int = 1, xmode: int = 0,
           acqrel: bool = False) -> tuple[str, str]:
    """(name, CUDA source) of one kernel configuration (``cluster``: the split-K parts, 0 for none; ``nt``: tiles
    of 8 tokens a launch takes, each A fragment multiplying all of them; ``xmode``: the input's prologue, one of
    ``XMODES``; ``acqrel``: the split-K parts meet through one acq_rel atomic instead of two fences a thread)."""
    name = (f"gemv_int{bits}_p{planes}_w{warps}_t{tiles}_d{depth}" + ("_o" if offset else "") + ("_l" if pref else "")
            + (f"_c{cluster}" if cluster else "") + ("_tl" if tiled else "") + (f"_m{8 * nt}" if nt > 1 else "")
            + (f"_x{xmode}" if xmode else "") + ("_ar" if acqrel else ""))
    head = (f"#define BITS {bits}\n#define P {planes}\n#define FIELDS {32 // bits}\n#define WARPS {warps}\n"
            f"#define TILES {tiles}\n#define OFFSET {int(offset)}\n#define DEPTH {depth}\n#define PREF {int(pref)}\n"
            f"#define CLUSTER {cluster}\n#define TILED {int(tiled)}\n#define NT {nt}\n#define XMODE {xmode}\n"
            f"#define ACQREL {int(acqrel)}\n#define KERNEL_NAME {name}\n")
    return name, head + SOURCE


def _nvrtc() -> ctypes.CDLL:
    try:
        from torch.cuda._utils import _get_gpu_rtc_library

        return _get_gpu_rtc_library()
    except Exception:  # noqa: BLE001 - another torch: find the wheel's library ourselves
        pass
    roots = [os.path.dirname(torch.__file__) + "/../nvidia", os.path.dirname(torch.__file__) + "/lib"]
    for root in roots:
        for lib in sorted(glob.glob(f"{root}/**/libnvrtc.so*", recursive=True), reverse=True):
            if "builtins" not in lib:
                return ctypes.CDLL(lib)
    for name in ("libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise RuntimeError("NVRTC (libnvrtc) not found: the CUDA GEMV cannot be built here")


def compile_cubin(src: str, name: str, arch: str, nvrtc: ctypes.CDLL | None = None) -> bytes:
    """NVRTC: CUDA source -> cubin for ``arch`` ("90"); raises with the compiler's log on an error."""
    lib = nvrtc or _nvrtc()
    prog = ctypes.c_void_p()

    def check(code: int, what: str) -> None:
        if code != 0:
            lib.nvrtcGetErrorString.restype = ctypes.c_char_p
            raise RuntimeError(f"NVRTC {what}: {lib.nvrtcGetErrorString(code).decode()}")

    check(lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), f"{name}.cu".encode(), 0, None, None), "create")
    opts = [f"--gpu-architecture=sm_{arch}".encode(), b"-std=c++17", b"--use_fast_math"]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    code = lib.nvrtcCompileProgram(prog, len(opts), arr)
    if code != 0:
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        raise RuntimeError(f"NVRTC could not build {name} for sm_{arch}:\n{log.value.decode(errors='replace')}")
    size = ctypes.c_size_t()
    check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "cubin size")
    buf = ctypes.create_string_buffer(size.value)
    check(lib.nvrtcGetCUBIN(prog, buf), "cubin")
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return buf.raw


def _cache_dir() -> Path:
    root = os.environ.get("LOCALGPT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "localgpt")
    return Path(root) / "fast" / "cuda"


class _Kernel:
    """A loaded kernel and a launcher that passes pointers and ints straight to ``cuLaunchKernel``."""

    def __init__(self, cubin: bytes, name: str, threads: int):
        self.cuda = ctypes.CDLL("libcuda.so.1")
        torch.cuda.init()
        torch.cuda.current_stream()  # a context is current
        self.module = ctypes.c_void_p()
        self._check(self.cuda.cuModuleLoadData(ctypes.byref(self.module), cubin), "load module")
        self.func = ctypes.c_void_p()
        self._check(self.cuda.cuModuleGetFunction(ctypes.byref(self.func), self.module, name.encode()), "get function")
        self.threads = threads
        static = ctypes.c_int()
        self._check(self.cuda.cuFuncGetAttribute(ctypes.byref(static), 1, self.func), "shared size")  # static bytes
        self.smem_allowed = 48 * 1024 - static.value  # dynamic bytes a launch may ask for without opting in

    def allow_smem(self, nbytes: int) -> None:
        """Opt in to more than 48 KiB of dynamic shared memory (many tokens, few split-K parts)."""
        if nbytes > self.smem_allowed:
            self._check(self.cuda.cuFuncSetAttribute(self.func, 8, ctypes.c_int(nbytes)), "shared memory size")
            self.smem_allowed = nbytes

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            raise RuntimeError(f"CUDA driver error {code} ({what})")

    def __call__(self, grid: tuple[int, int], smem: int, vals: list, device, pdl: bool = False) -> None:
        """Launch on the current stream of ``device``; ``vals``: the kernel's parameters as ctypes values.
        ``pdl``: a programmatic dependent launch (sm_90+; the kernel must ``griddepcontrol.wait`` before it
        touches what the kernels before it write): it may start while the one before it ends."""
        args = (ctypes.c_void_p * len(vals))(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in vals])
        if device.index is not None and device.index != torch.cuda.current_device():
            with torch.cuda.device(device):  # the module lives in that GPU's context: make it current
                return self(grid, smem, vals, device, pdl)
        stream = ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)
        if pdl:
            attr = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
            attr.value[0] = 1  # programmaticStreamSerializationAllowed
            config = _LaunchConfig(grid[0], grid[1], 1, self.threads, 1, 1, smem, stream, ctypes.pointer(attr), 1)
            self._check(self.cuda.cuLaunchKernelEx(ctypes.byref(config), self.func, args, None), "launch (PDL)")
            return None
        self._check(self.cuda.cuLaunchKernel(self.func, grid[0], grid[1], 1, self.threads, 1, 1, smem, stream,
                                             args, None), "launch")


# cuLaunchKernelEx's CUlaunchAttribute (id, padding, a 64-byte value union) and CUlaunchConfig (cuda.h)
_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


class _LaunchAttribute(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttribute)), ("numAttrs", ctypes.c_uint)]


_KERNELS: dict = {}
_LOCK = threading.Lock()
# Tokens a launch: two tiles of the mma's 8 columns (16 streams of a batch in one launch; measured in the engine,
# 16 int4 streams 6.22 ms a step against 6.69 in two launches of 8, H200). More rows run in several launches.
MAXM = 16


# The input's prologue (``XMODE`` in the source): the kernels before a GEMV that only reshape its input, done by
# every CTA for its own columns instead of by a launch of their own (bench/gemv_cuda.py --chain measures the step).
XMODES = {"plain": 0, "swiglu": 1, "rms": 2}


# How a split-K launch's parts meet in the workspace: one acq_rel atomic of thread 0 (the default) or two
# __threadfence()s a thread (LOCALGPT_GEMV_SPLITK=sc). Same bits; the step's GEMVs 1,762 -> 1,728 us (int4) and
# 2,813 -> 2,782 (int8) with the atomic (H200, bench/gemv_cuda.py --chain, round 10).
SPLITK_ACQREL = os.environ.get("LOCALGPT_GEMV_SPLITK", "acqrel") == "acqrel"


def kernel(bits: int, planes: int, device: torch.device, config: Config, nt: int = 1, xmode: int = 0) -> _Kernel:
    """The compiled kernel for this configuration, token tiles, prologue and device (built once; cubins cached
    on disk)."""
    warps, tiles, split, offset, depth, pref, cluster, tiled = config
    major, minor = torch.cuda.get_device_capability(device)
    arch = f"{major}{minor}"
    cluster = split if cluster and split > 1 else 0
    key = (bits, planes, warps, tiles, bool(offset) and bits == 4, depth, bool(pref), cluster, bool(tiled), nt, arch,
           device.index, xmode, SPLITK_ACQREL)
    with _LOCK:
        if key not in _KERNELS:
            if major < 8 or (cluster and major < 9):
                raise RuntimeError("the CUDA GEMV needs bf16 mma (compute capability 8.0 or newer; 9.0 for "
                                   "thread block clusters)")
            name, src = source(bits, planes, warps, tiles, key[4], depth, bool(pref), cluster, bool(tiled), nt,
                               xmode, SPLITK_ACQREL)
            _KERNELS[key] = build(name, src, device, warps * 32)
        return _KERNELS[key]


def build(name: str, src: str, device: torch.device, threads: int) -> _Kernel:
    """NVRTC's cubin of ``src`` for this GPU (cached on disk by source, architecture and NVRTC version), loaded."""
    major, minor = torch.cuda.get_device_capability(device)
    arch = f"{major}{minor}"
    lib = _nvrtc()
    ver = (ctypes.c_int(), ctypes.c_int())
    lib.nvrtcVersion(ctypes.byref(ver[0]), ctypes.byref(ver[1]))
    digest = hashlib.sha256(f"{src}|{arch}|{ver[0].value}.{ver[1].value}".encode()).hexdigest()[:20]
    path = _cache_dir() / f"{name}-sm{arch}-{digest}.cubin"
    cubin = path.read_bytes() if path.is_file() else None
    if cubin is None:
        cubin = compile_cubin(src, name, arch, lib)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(cubin)
            tmp.replace(path)
        except OSError:
            pass  # a read-only home: compile again next time
    with torch.cuda.device(device):
        return _Kernel(cubin, name, threads)


def smem_bytes(k: int, planes: int, bits: int, split: int, m: int) -> int:
    """Dynamic shared memory of a launch: x pairs and block sums for ``m`` tokens over a CTA's columns."""
    cols = planes * (32 // bits)
    per = -(-(k // cols) // split)
    return m * per * (planes * 16 + 4)


def gemv(bits: int, x: torch.Tensor, words: torch.Tensor, sz: torch.Tensor | None, out: torch.Tensor,
         ws: torch.Tensor, lock: torch.Tensor, planes: int, config: Config, *, xmode: int = 0,
         y: torch.Tensor | None = None, norm: torch.Tensor | None = None, eps: float = 0.0,
         xsum: torch.Tensor | None = None, scales: torch.Tensor | None = None) -> torch.Tensor:
    """out [M, N] (bf16) = x W^T for M <= 16 tokens x [M, K] (bf16, contiguous; or one token [K] -> [N]); int4:
    scaled (``sz``: [K/128, N] (scale, zero) bf16 pairs as int32), int8: unscaled row sums, or times ``scales``
    [N] (bf16) when given. ``ws`` fp32 [split * M * N] and ``lock`` int32 [row blocks] (zeros) for split-K
    without a cluster. ``xmode`` (``XMODES``) 1: x is [M, 2K] = [gate | up] and the GEMV multiplies
    silu(gate) * up; 2: it multiplies RMSNorm(x + y) (``norm`` the weight [K], ``eps``; y may be None) and writes
    x + y to ``xsum`` [M, K]. Inputs are 16-byte aligned rows (``fused_inputs_ok``)."""
    n, kw = words.shape
    k = kw * (32 // bits)
    m = x.numel() // (2 * k if xmode == 1 else k)
    assert n % 16 == 0 and kw % 4 == 0 and planes % 16 == 0 and words.is_contiguous() and 1 <= m <= MAXM
    warps, tiles, split = config[:3]
    rows = warps * 16 * tiles
    fn = kernel(bits, planes, x.device, config, 1 if m <= 8 else 2, xmode)
    smem = smem_bytes(k, planes, bits, split, m)
    fn.allow_smem(smem)
    def ptr(t):
        return ctypes.c_void_p(t.data_ptr() if t is not None else 0)

    fn(((n + rows - 1) // rows, split), smem,
       [ptr(x), ptr(words), ptr(sz if sz is not None else words), ptr(out), ptr(ws), ptr(lock)]
       + [ctypes.c_int(i) for i in (n, k, kw // 4, split, m)]
       + [ptr(y), ptr(norm), ptr(xsum), ptr(scales), ctypes.c_float(eps)], x.device)
    return out


def tile_words(words: torch.Tensor, planes: int) -> torch.Tensor:
    """Planar words [N, K/F] in the order the ``tiled`` kernels read: [N/16, blocks, 16 rows, P words], a warp's
    block of 16 rows one contiguous span (shape [N, K/F] kept: ``words.shape`` still gives the layer's size)."""
    n, kw = words.shape
    return words.reshape(n // 16, 16, kw // planes, planes).permute(0, 2, 1, 3).contiguous().view(n, kw)


def untile_words(words: torch.Tensor, planes: int) -> torch.Tensor:
    """``tile_words`` undone: the planar words [N, K/F]."""
    n, kw = words.shape
    return words.reshape(n // 16, kw // planes, 16, planes).permute(0, 2, 1, 3).contiguous().view(n, kw)


# Tuned on the H200 (bench/gemv_cuda.py, one token; µs in bench/RESULTS.md "GPU engine round 8").
TUNED: dict[tuple[str, int, int], Config] = {
    ("int4", 12288, 4096): (8, 1, 4, True, 2, True, False, True),
    ("int4", 4096, 4096): (4, 1, 8, True, 2, True, True, True),
    ("int4", 22016, 4096): (8, 1, 2, True, 2, True, False, True),
    ("int4", 4096, 11008): (4, 1, 16, True, 2, True, False, True),
    ("int4", 32000, 4096): (8, 1, 2, True, 2, True, False, True),
    # Falcon-7B's layers (inputs padded to 4,608; round 13, bench/gemv_cuda.py --shapes falcon): 51.3 us a layer's
    # four against the rule's 60.2 (4 warps where the rule takes 8)
    ("int4", 4672, 4608): (4, 1, 8, True, 2, True, True, True),
    ("int4", 4544, 4608): (4, 1, 8, True, 2, True, True, True),
    ("int4", 18176, 4608): (4, 1, 4, True, 2, True, False, True),
    ("int4", 4544, 18176): (4, 1, 16, True, 2, True, False, True),
    ("int4", 65024, 4608): (8, 1, 2, True, 2, True, True, True),
}


def config(kind: str, n: int, k: int, sms: int, clusters: bool = True) -> Config:
    """The tuned configuration of a layer shape, or the rule: 8 warps of one tile (128 rows a CTA), split-K
    until there are ~2 CTAs an SM (at most 16 parts, each at least 4 blocks), tiled, L2 prefetch, no cluster.
    ``clusters=False`` (a GPU before Hopper): split-K parts meet in the workspace instead."""
    depth = int(os.environ.get("LOCALGPT_GEMV_DEPTH", "0"))  # a bench's register depth for every layer
    cfg = _config(kind, n, k, sms, clusters)
    return cfg[:4] + (depth,) + cfg[5:] if depth else cfg


def _config(kind: str, n: int, k: int, sms: int, clusters: bool) -> Config:
    if (kind, n, k) in TUNED:
        tuned = TUNED[(kind, n, k)]
        return tuned if clusters else tuned[:6] + (False,) + tuned[7:]
    row_blocks = -(-n // 128)
    blocks = k // 128
    split = 1
    while split < 16 and row_blocks * split < 2 * sms and blocks // (split * 2) >= 4:
        split *= 2
    return (8, 1, split, kind == "int4", 2, True, False, True)


def scratch(n: int, config: Config, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The split-K workspace (MAXM tokens) and arrival counters a layer's configuration needs (none when its
    parts meet in a cluster's shared memory, or there is one part)."""
    warps, tiles, split, cluster = config[0], config[1], config[2], config[6]
    if split <= 1 or cluster:
        return (torch.empty(1, dtype=torch.float32, device=device), torch.zeros(1, dtype=torch.int32, device=device))
    blocks = -(-n // (warps * 16 * tiles))
    return (torch.empty(split * MAXM * n, dtype=torch.float32, device=device),
            torch.zeros(blocks, dtype=torch.int32, device=device))


_AVAILABLE: dict = {}


def available(device) -> bool:
    """Whether this GPU can run these kernels (bf16 mma: compute capability 8.0+) and NVRTC loads here."""
    if device not in _AVAILABLE:
        try:
            _AVAILABLE[device] = torch.cuda.get_device_capability(device)[0] >= 8 and _nvrtc() is not None
        except Exception:  # noqa: BLE001 - no CUDA, no NVRTC: the Triton kernels / tinygemm instead
            _AVAILABLE[device] = False
    return _AVAILABLE[device]


def device_traits(device) -> tuple[int, bool]:
    """(streaming multiprocessors, thread block clusters available) of a GPU, for ``config``."""
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, props.major >= 9


_OPTIN: dict = {}


def tokens_a_launch(k: int, planes: int, bits: int, config: Config, device) -> int:
    """The most tokens (<= MAXM) whose staged x fits a CTA's shared memory on this GPU beside the kernel's static
    part (a cluster kernel's per-row partial sums for MAXM tokens, else a flag)."""
    if device not in _OPTIN:
        _OPTIN[device] = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    warps, tiles, split, cluster = config[0], config[1], config[2], config[6]
    # (+ 1280: the prologue's per-token 1 / rms and per-warp sums, the split-K flag, and the 1 KiB sm_90 keeps)
    static = (MAXM * warps * 16 * tiles * 4 if cluster and split > 1 else 0) + 1280
    room = _OPTIN[device] - static
    return max(1, min(MAXM, room // max(smem_bytes(k, planes, bits, split, 1), 1)))


def _eager(x: torch.Tensor, words: torch.Tensor, sz: torch.Tensor, ws: torch.Tensor, lock: torch.Tensor,
           bits: int, planes: int, config: list[int], scales: torch.Tensor | None = None) -> torch.Tensor:
    n = words.shape[0]
    k = words.shape[1] * (32 // bits)
    rows = x.reshape(-1, k)
    out = torch.empty(rows.shape[0], n, dtype=torch.bfloat16, device=x.device)
    step = tokens_a_launch(k, planes, bits, config, x.device)
    for start in range(0, rows.shape[0], step):
        gemv(bits, rows[start:start + step], words, sz if bits == 4 else None, out[start:start + step], ws, lock,
             planes, tuple(config), scales=scales)
    return out


def call(bits: int, x: torch.Tensor, words: torch.Tensor, sz: torch.Tensor | None, ws: torch.Tensor,
         lock: torch.Tensor, planes: int, config: Config, scales: torch.Tensor | None = None) -> torch.Tensor:
    """[M, N] bf16 = x W^T for x [M, K] bf16 (any M, launches of 16 tokens; int8: unscaled, or times its row
    ``scales``): the custom operator while torch.compile traces (the scales a multiply inductor fuses), a direct
    launch otherwise (the operator's eager wrapper would import torch._dynamo: gemv_triton's note)."""
    cfg = [int(c) for c in config]
    sz = sz if sz is not None else words[:0, 0]
    if torch.compiler.is_compiling():
        out = torch.ops.localgpt.gemv_cuda(x, words, sz, ws, lock, bits, planes, cfg)
        return out if scales is None else out * scales
    return _eager(x, words, sz, ws, lock, bits, planes, cfg, scales)


@torch.library.custom_op("localgpt::gemv_cuda", mutates_args=())
def gemv_cuda_op(x: torch.Tensor, words: torch.Tensor, sz: torch.Tensor, ws: torch.Tensor, lock: torch.Tensor,
                 bits: int, planes: int, config: list[int]) -> torch.Tensor:
    return _eager(x, words, sz, ws, lock, bits, planes, config)


@gemv_cuda_op.register_fake
def _(x, words, sz, ws, lock, bits, planes, config):
    return x.new_empty(x.numel() // (words.shape[1] * (32 // bits)), words.shape[0], dtype=torch.bfloat16)
