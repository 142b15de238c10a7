"""The GEMVs between two attentions of a batch-1 decode step in one persistent launch (CUDA C, NVRTC).

Why: ``gemv_cuda``'s kernels stream a layer's packed weights at 1.9 TB/s over a whole step against a copy rate of
4.2 (H200, bench/gpu_notes.md rounds 8-9). A kernel that only loads the same words reaches 2.6-3.5 TB/s on these
9-45 MB layers: every launch pays a ramp-up (its first loads), a tail (the last CTAs alone) and the drain and
launch before the next, and nothing is in flight in between. Overlapping launches (programmatic dependent launch)
did not pay. Here one launch runs the phases ``wo -> w_in -> w_out -> the next layer's wqkv`` (or ``lm_head``):

- Weights do not depend on the activations, so each warp streams its share of *all* phases' words through a ring
  of ``DEPTH`` items in shared memory (``cp.async``; an item is a 16-row tile's block of 128 columns, 1 KiB for
  int4, 2 KiB for int8), running ahead into the next phase while this one finishes and while the grid waits at
  the barrier between them. The memory system is never idle between two GEMVs.
- A phase's items (tiles x blocks) are cut into equal contiguous ranges, one a warp of the grid (±1 item: no
  tail of idle SMs). A tile cut between warps has its parts added in warp order by the last one to finish
  (deterministic, as ``gemv_cuda``'s split-K: an acq_rel counter reset by that warp).
- Between phases a grid barrier (all CTAs are resident: one a streaming multiprocessor), then every CTA stages the
  whole next input in shared memory with the phase's prologue (``XMODES``: RMSNorm(x + y) writing the residual
  sum, or silu(gate) * up), the arithmetic and rounding of ``gemv_cuda``'s prologues.

The multiply of an item is ``gemv_cuda``'s (the same ``HELPERS``): nibble pairs made bf16 by one ``lop3`` are the
A fragments of ``mma.sync.m16n8k16``, x the B fragments. One token (the batch-1 step; batches take
``gemv_cuda``). Checked against the separate launches at load (``check``) and in the GPU tests; the step that uses
it is ``Transformer._step_chain``.
"""

from __future__ import annotations

import ctypes

import torch

from localgpt.generation.fast import gemv_cuda

CHAIN_SOURCE = r"""
#define CHUNKS (P / 16)                  // 16-word chunks a block
#define COLS (P * FIELDS)                // columns a block
#define BLK_U4 (2 * CHUNKS)              // a thread's 16-byte words of a block (rows g and g + 8)
#define RING (DEPTH + 1)                 // ring slots of a warp: DEPTH items in flight, the one being multiplied
// a slot (an item: BPI blocks of a tile): words [BPI][BLK_U4][32 lanes], then int4's (scale, zero) [BPI][32][2]
#define SLOT_U4 (BPI * 32 * BLK_U4 + (BITS == 4 ? BPI * 16 : 0))
#define MAXPH 8

struct Phase {
    const uint4* w; const u32* sz; const u16* x; const u16* y; const u16* nw; u16* xsum; u16* out; const u16* rs;
    int N, K, xmode, pad0;
    float eps;
    int pad1, pad2, pad3;
};

__device__ __forceinline__ u32 saddr(const void* p) { return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void cp16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(saddr(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp4(void* dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" :: "r"(saddr(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(DEPTH - 1) : "memory"); }

__device__ __forceinline__ int items_of(const Phase& ph) { return (ph.N / 16) * (ph.K / (COLS * BPI)); }
// The warp whose range [w I / W, (w + 1) I / W) holds item u (every range is non-empty: I >= W).
__device__ __forceinline__ int owner(long u, long I, int W) { return (int)(((u + 1) * W - 1) / I); }

// The next item a warp loads: phase p, item it = (tile, its blk-th block) of its range [it, end) there (no
// division a step).
struct Cursor { int p, it, end, tile, blk, nb; };
__device__ __forceinline__ void cursor_seek(Cursor& c, const Phase* sp, int n, int W, int gw) {
    for (; c.p < n; ++c.p) {
        const long I = items_of(sp[c.p]);
        c.it = (int)(gw * I / W);
        c.end = (int)((gw + 1) * I / W);
        c.nb = sp[c.p].K / COLS;
        const int per = c.nb / BPI;
        c.tile = c.it / per;
        c.blk = (c.it % per) * BPI;
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

__device__ __forceinline__ void advance(Cursor& c, const Phase* sp, int n, int W, int gw) {
    c.blk += BPI;
    if (c.blk == c.nb) { c.blk = 0; ++c.tile; }
    if (++c.it == c.end) { ++c.p; cursor_seek(c, sp, n, W, gw); }
}

__device__ __forceinline__ u32 ld_acquire(const unsigned* p) {
    u32 v; asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory"); return v;
}

// Every CTA's writes before it visible to every CTA after it (cooperative groups' grid sync). All CTAs are
// resident (one a multiprocessor, checked by the launcher); a wait past ~2 s traps instead of hanging.
__device__ __forceinline__ void grid_sync(unsigned* bar, unsigned target) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(bar, 1u);
        const long long t0 = clock64();
        while (ld_acquire(bar) < target)
            if (clock64() - t0 > (1LL << 32)) __trap();
        __threadfence();
    }
    __syncthreads();
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

// The phase's input after its prologue, staged whole in every CTA: xr [K] bf16, then xp (each word's x pairs in
// gemv_cuda's order) and int4's block sums xs. x and y may have been written by this launch: read through L2.
__device__ void stage(const Phase& ph, u16* xr, uint4* xp, float* xs, float* red, float* inv_s, bool cta0) {
    const int K = ph.K, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const uint4* x4 = (const uint4*)ph.x;
    uint4* xr4 = (uint4*)xr;
    float ss = 0.f;
    for (int i = tid; i < K / 8; i += WARPS * 32) {
        uint4 a = __ldcg(x4 + i);
        if (ph.xmode == 1) {
            const uint4 u = __ldcg(x4 + K / 8 + i);
            a = make_uint4(silu_mul_pair(a.x, u.x), silu_mul_pair(a.y, u.y), silu_mul_pair(a.z, u.z),
                           silu_mul_pair(a.w, u.w));
        } else if (ph.xmode == 2) {
            if (ph.y) {
                const uint4 b = __ldcg((const uint4*)ph.y + i);
                a = make_uint4(add_pair(a.x, b.x), add_pair(a.y, b.y), add_pair(a.z, b.z), add_pair(a.w, b.w));
                if (cta0 && ph.xsum) ((uint4*)ph.xsum)[i] = a;
            }
            ss += sq_pair(a.x) + sq_pair(a.y) + sq_pair(a.z) + sq_pair(a.w);
        }
        xr4[i] = a;
    }
    if (ph.xmode == 2) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        if (lane == 0) red[warp] = ss;
        __syncthreads();
        if (tid == 0) {
            float total = 0.f;
            for (int i = 0; i < WARPS; ++i) total += red[i];
            *inv_s = rsqrtf(total / K + ph.eps);
        }
        __syncthreads();
        const float inv = *inv_s;
        const uint4* nw4 = (const uint4*)ph.nw;
        for (int i = tid; i < K / 8; i += WARPS * 32) {
            const uint4 a = xr4[i], w = __ldg(nw4 + i);
            xr4[i] = make_uint4(norm_pair(a.x, w.x, inv), norm_pair(a.y, w.y, inv), norm_pair(a.z, w.z, inv),
                                norm_pair(a.w, w.w, inv));
        }
    }
    __syncthreads();
    for (int base = 0; base < K / FIELDS; base += WARPS * 32) {
        const int item = base + tid;
        float part = 0.f;
        if (item < K / FIELDS) {
            const int col = (item / P) * COLS + (item % P);
            u32 f[FIELDS];
#pragma unroll
            for (int j = 0; j < FIELDS; ++j) { f[j] = xr[col + j * P]; part += bf2f(f[j]); }
#if BITS == 4
            xp[item] = make_uint4(f[0] | (f[4] << 16), f[1] | (f[5] << 16), f[2] | (f[6] << 16), f[3] | (f[7] << 16));
#else
            u32 s0 = f2bf(16.f * bf2f(f[0])), s1 = f2bf(16.f * bf2f(f[1]));
            u32 s2 = f2bf(16.f * bf2f(f[2])), s3 = f2bf(16.f * bf2f(f[3]));
            xp[item] = make_uint4(f[0] | (f[2] << 16), s0 | (s2 << 16), f[1] | (f[3] << 16), s1 | (s3 << 16));
#endif
        }
#if BITS == 4
#pragma unroll
        for (int o = P / 2; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
        if (item < K / FIELDS && item % P == 0) xs[item / P] = part;
#endif
    }
    __syncthreads();
}

// One item: acc[0] / acc[2] (lanes t = 0) gather rows g / g + 8 of the token (column 0 of the mma; the other
// columns repeat it). int4: each block's sum scaled by its group; int8: one unscaled chain.
__device__ __forceinline__ void mul_item(const uint4 (&v)[CHUNKS][2], u32 sc0, u32 sc1, const uint4* __restrict__ xb,
                                         float xsb, int t, float (&acc)[4]) {
#if BITS == 4
    float c[4] = {0.f, 0.f, 0.f, 0.f};
#else
    float (&c)[4] = acc;
#endif
#pragma unroll
    for (int ch = 0; ch < CHUNKS; ++ch) {
        const u32 w0v[4] = {v[ch][0].x, v[ch][0].y, v[ch][0].z, v[ch][0].w};
        const u32 w1v[4] = {v[ch][1].x, v[ch][1].y, v[ch][1].z, v[ch][1].w};
#pragma unroll
        for (int s = 0; s < 4; ++s) {
            const uint4 xq = xb[ch * 16 + 4 * t + s];
            const u32 w0 = w0v[s], w1 = w1v[s];
#if BITS == 4
            // (128 + q) as it is; the 136 * sum(x) it adds is taken out with the group's scale below
            const u32 a00 = nib_pair(w0), a10 = nib_pair(w1), a01 = nib_pair(w0 >> 4), a11 = nib_pair(w1 >> 4);
            const u32 a02 = nib_pair(w0 >> 8), a12 = nib_pair(w1 >> 8), a03 = nib_pair(w0 >> 12), a13 = nib_pair(w1 >> 12);
            mma16816(c, a00, a10, a01, a11, xq.x, xq.y);
            mma16816(c, a02, a12, a03, a13, xq.z, xq.w);
#else
            const u32 lo = 0xC300C300u, hi = 0xC308C308u;
            const u32 l00 = bf2_add(nib_pair(w0), lo), l10 = bf2_add(nib_pair(w1), lo);
            const u32 h00 = bf2_add(nib_pair_flip(w0 >> 4), hi), h10 = bf2_add(nib_pair_flip(w1 >> 4), hi);
            const u32 l01 = bf2_add(nib_pair(w0 >> 8), lo), l11 = bf2_add(nib_pair(w1 >> 8), lo);
            const u32 h01 = bf2_add(nib_pair_flip(w0 >> 12), hi), h11 = bf2_add(nib_pair_flip(w1 >> 12), hi);
            mma16816(c, l00, l10, h00, h10, xq.x, xq.y);
            mma16816(c, l01, l11, h01, h11, xq.z, xq.w);
#endif
        }
    }
#if BITS == 4
    const float s0 = bf2f(sc0), s1 = bf2f(sc1);
    const float z0 = __uint_as_float(sc0 & 0xFFFF0000u) - 136.f * s0, z1 = __uint_as_float(sc1 & 0xFFFF0000u) - 136.f * s1;
    acc[0] += s0 * c[0] + z0 * xsb;
    acc[2] += s1 * c[2] + z1 * xsb;
#endif
}

// A warp's part of a tile done: the whole tile -> its rows; else the part into the tile's slot, and the last
// part to arrive adds them in slot (warp) order and resets the tile's counter.
__device__ __forceinline__ void flush(const Phase& ph, int tile, const float (&acc)[4], long I, int W, int gw, int per,
                                      float* ws, int* cnt, int slots, int lane, int g, int t) {
    const long u0 = (long)tile * per;  // per: items a tile
    const int o0 = owner(u0, I, W), o1 = owner(u0 + per - 1, I, W);
    if (o0 == o1) {
        const int r = tile * 16 + g;
        if (t == 0) { ph.out[r] = out_val(acc[0], ph.rs, r); ph.out[r + 8] = out_val(acc[2], ph.rs, r + 8); }
        return;
    }
    float* part = ws + ((long)tile * slots + (gw - o0)) * 16;
    if (t == 0) { __stcg(part + g, acc[0]); __stcg(part + g + 8, acc[2]); }
    __syncwarp();
    int last = 0;
    if (lane == 0) {
        int prev;
        asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;" : "=r"(prev) : "l"(cnt + tile) : "memory");
        last = prev == o1 - o0;
    }
    last = __shfl_sync(0xffffffffu, last, 0);
    __syncwarp();
    if (last) {
        if (lane < 16) {
            float total = 0.f;
            for (int k = 0; k <= o1 - o0; ++k) total += __ldcg(ws + ((long)tile * slots + k) * 16 + lane);
            ph.out[tile * 16 + lane] = out_val(total, ph.rs, tile * 16 + lane);
        }
        if (lane == 0) atomicExch(cnt + tile, 0);
    }
}

extern "C" __global__ void __launch_bounds__(WARPS * 32, 1)
KERNEL_NAME(const Phase* __restrict__ phases, int n_phases, float* ws, int* cnt, unsigned* bar, int slots, int kmax) {
    extern __shared__ uint4 smem[];
    __shared__ Phase sp[MAXPH];
    __shared__ float red[WARPS];
    __shared__ float inv_s;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const int W = gridDim.x * WARPS, gw = blockIdx.x * WARPS + warp;
    for (int i = tid; i < n_phases * (int)(sizeof(Phase) / 4); i += WARPS * 32)
        ((int*)sp)[i] = ((const int*)phases)[i];
    __syncthreads();
    uint4* ring = smem + warp * RING * SLOT_U4;
    uint4* xp = smem + WARPS * RING * SLOT_U4;           // [kmax / FIELDS]
    u16* xr = (u16*)(xp + kmax / FIELDS);                // [kmax]
    float* xs = (float*)(xr + kmax);                     // [kmax / COLS]

    // DEPTH items in flight from the start, through every phase's words
    Cursor cur = {0, 0, 0, 0, 0, 1};
    cursor_seek(cur, sp, n_phases, W, gw);
#pragma unroll 1
    for (int d = 0; d < DEPTH; ++d) {
        if (cur.p < n_phases) {
            issue(ring + d * SLOT_U4, sp[cur.p], cur.tile, cur.blk, lane, g, t);
            advance(cur, sp, n_phases, W, gw);
        }
        cp_commit();
    }
    int take = 0, put = DEPTH;  // the ring slot multiplied next, and the one loaded next (the one multiplied last)
#pragma unroll 1
    for (int p = 0; p < n_phases; ++p) {
        const Phase& ph = sp[p];
        if (p > 0) grid_sync(bar, (unsigned)p * gridDim.x);
        stage(ph, xr, xp, xs, red, &inv_s, blockIdx.x == 0);
        const long I = items_of(ph);
        const int first = (int)(gw * I / W), last = (int)((gw + 1) * I / W);
        const int nb = ph.K / COLS;
        int tile = -1, tl = first / (nb / BPI), blk = first % (nb / BPI) * BPI;
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
                issue(ring + put * SLOT_U4, sp[cur.p], cur.tile, cur.blk, lane, g, t);
                advance(cur, sp, n_phases, W, gw);
            }
            cp_commit();
            take = take == RING - 1 ? 0 : take + 1;
            put = put == RING - 1 ? 0 : put + 1;
            if (tl != tile) {
                if (tile >= 0) flush(ph, tile, acc, I, W, gw, nb / BPI, ws, cnt, slots, lane, g, t);
                tile = tl;
                acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
            }
#pragma unroll
            for (int b = 0; b < BPI; ++b)
                mul_item(v[b], sc[b].x, sc[b].y, xp + (blk + b) * P, BITS == 4 ? xs[blk + b] : 0.f, t, acc);
            blk += BPI;
            if (blk == nb) { blk = 0; ++tl; }
        }
        if (tile >= 0) flush(ph, tile, acc, I, W, gw, nb / BPI, ws, cnt, slots, lane, g, t);
    }
    // the last CTA out resets the barrier for the next launch (every CTA is past its last wait)
    __syncthreads();
    if (tid == 0) {
        __threadfence();
        if (atomicAdd(bar + 1, 1u) == gridDim.x - 1) { atomicExch(bar, 0u); atomicExch(bar + 1, 0u); }
    }
}
"""


class _Phase(ctypes.Structure):
    """The kernel's ``struct Phase`` (96 bytes)."""

    _fields_ = [(n, ctypes.c_void_p) for n in ("w", "sz", "x", "y", "nw", "xsum", "out", "rs")] + [
        ("N", ctypes.c_int), ("K", ctypes.c_int), ("xmode", ctypes.c_int), ("pad0", ctypes.c_int),
        ("eps", ctypes.c_float), ("pad1", ctypes.c_int), ("pad2", ctypes.c_int), ("pad3", ctypes.c_int)]


MAXPH = 8
# Warps a CTA, items in flight a warp (ring depth) and blocks an item (2: the per-item bookkeeping over twice the
# words): int4 blocks are 1 KiB, int8 2 KiB; ~100 KiB of words in flight a multiprocessor, the rest of its shared
# memory for the staged input.
DEFAULTS = {4: (8, 6, 2), 8: (8, 3, 2)}


def source(bits: int, planes: int, warps: int, depth: int, tiled: bool, bpi: int = 2) -> tuple[str, str]:
    """(name, CUDA source) of the chain kernel for one weight format, CTA size, ring depth and blocks an item."""
    name = f"gemv_chain_int{bits}_p{planes}_w{warps}_d{depth}_b{bpi}" + ("_tl" if tiled else "")
    head = (f"#define BITS {bits}\n#define P {planes}\n#define FIELDS {32 // bits}\n#define WARPS {warps}\n"
            f"#define DEPTH {depth}\n#define BPI {bpi}\n#define TILED {int(tiled)}\n#define XMODE 0\n"
            f"#define PREF 0\n#define KERNEL_NAME {name}\n")
    return name, head + gemv_cuda.HELPERS + CHAIN_SOURCE


_KERNELS: dict = {}


def kernel(bits: int, planes: int, device: torch.device, warps: int, depth: int, tiled: bool, bpi: int):
    key = (bits, planes, warps, depth, tiled, bpi, device.index)
    if key not in _KERNELS:
        if torch.cuda.get_device_capability(device)[0] < 8:
            raise RuntimeError("the chain kernel needs bf16 mma and cp.async (compute capability 8.0 or newer)")
        name, src = source(bits, planes, warps, depth, tiled, bpi)
        _KERNELS[key] = gemv_cuda.build(name, src, device, warps * 32)
    return _KERNELS[key]


def smem_bytes(bits: int, planes: int, warps: int, depth: int, bpi: int, kmax: int) -> int:
    """Dynamic shared memory: the warps' rings, then the staged input (pairs, bf16 row, block sums)."""
    slot = bpi * (32 * 2 * (planes // 16) + (16 if bits == 4 else 0))
    fields = 32 // bits
    return warps * (depth + 1) * slot * 16 + kmax // fields * 16 + kmax * 2 + kmax // (planes * fields) * 4


def layer_fits(layer) -> bool:
    """Whether a layer's words can go through the chain: ``gemv_cuda``'s int4 (tiled) or int8 (planar) words,
    no bias, blocks of 128 columns, rows in 16s, inputs in 8s."""
    from localgpt.generation.fast.quantize import Int4Linear, Int8Linear

    words = getattr(layer, "words", None)
    if words is None or not words.is_cuda or getattr(layer, "bias", None) is not None:
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


class Chain:
    """One launch of several GEMVs of one token, each reading the one before (see the module's note).

    ``phases``: dicts with ``layer`` (``layer_fits``), ``x`` (its input, bf16; [2K] for "swiglu"), ``out`` ([N]
    bf16), ``xmode`` ("plain", "swiglu" or "rms"), and for "rms" ``norm`` (an RMSNorm), ``y`` (added to x first, or
    None) and ``xsum`` (where x + y goes, or None). Every tensor is fixed: the launch keeps their addresses (a
    decode step's static buffers), so calling it replays the same GEMVs on whatever they hold."""

    def __init__(self, phases: list[dict], device: torch.device, warps: int | None = None,
                 depth: int | None = None, bpi: int | None = None):
        from localgpt.generation.fast.quantize import Int4Linear

        if not 1 <= len(phases) <= MAXPH:
            raise ValueError(f"a chain has 1 to {MAXPH} phases")
        layers = [ph["layer"] for ph in phases]
        if not all(layer_fits(layer) for layer in layers):
            raise ValueError("a layer's words do not fit the chain kernel")
        bits = 4 if isinstance(layers[0], Int4Linear) else 8
        planes = layers[0].planes
        if any((4 if isinstance(layer, Int4Linear) else 8) != bits or layer.planes != planes for layer in layers):
            raise ValueError("one weight format a chain")
        self.device = device
        fields = 32 // bits
        warps, depth, bpi = warps or DEFAULTS[bits][0], depth or DEFAULTS[bits][1], bpi or DEFAULTS[bits][2]
        if any(layer.in_features // (planes * fields) % bpi for layer in layers):
            bpi = 1
        self.fn = kernel(bits, planes, device, warps, depth, bits == 4, bpi)
        kmax = max(layer.in_features for layer in layers)
        self.smem = smem_bytes(bits, planes, warps, depth, bpi, kmax)
        optin = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
        if self.smem + 2048 > optin:
            raise ValueError(f"the chain needs {self.smem} bytes of shared memory; this GPU gives {optin}")
        self.fn.allow_smem(self.smem)
        blocks = ctypes.c_int()
        self.fn._check(self.fn.cuda.cuOccupancyMaxActiveBlocksPerMultiprocessor(
            ctypes.byref(blocks), self.fn.func, warps * 32, ctypes.c_size_t(self.smem)), "occupancy")
        if blocks.value < 1:
            raise ValueError("the chain kernel does not fit a multiprocessor")
        # every CTA resident at once (the grid barrier waits for all of them): one a multiprocessor
        self.grid = torch.cuda.get_device_properties(device).multi_processor_count
        big_w = self.grid * warps
        table = (_Phase * len(phases))()
        slots, tiles = 1, 1
        self.keep = []

        def ptr(t):
            return t.data_ptr() if t is not None else 0

        for i, ph in enumerate(phases):
            layer = ph["layer"]
            n, k = layer.out_features, layer.in_features
            nb = k // (planes * fields) // bpi  # items a tile
            items = n // 16 * nb
            if items < big_w:
                raise ValueError(f"a {n}x{k} layer has {items} items, fewer than the grid's {big_w} warps")
            u0 = torch.arange(n // 16, dtype=torch.int64) * nb
            o0 = ((u0 + 1) * big_w - 1) // items
            o1 = ((u0 + nb) * big_w - 1) // items
            slots = max(slots, int((o1 - o0 + 1).max()))
            tiles = max(tiles, n // 16)
            mode = gemv_cuda.XMODES[ph.get("xmode", "plain")]
            x, out, y, xsum = ph["x"], ph["out"], ph.get("y"), ph.get("xsum")
            norm = ph.get("norm")
            for tensor in (x, out, y, xsum):
                if tensor is not None and (tensor.dtype != torch.bfloat16 or not tensor.is_contiguous()
                                           or tensor.data_ptr() % 16):
                    raise ValueError("chain buffers are contiguous, 16-byte aligned bf16")
            if x.numel() != (2 * k if mode == 1 else k) or out.numel() != n:
                raise ValueError(f"phase {i}: x has {x.numel()} values, out {out.numel()}, for a {n}x{k} layer")
            if mode == 2 and norm is None:
                raise ValueError(f"phase {i}: rms needs the norm")
            sz = layer.pairs() if bits == 4 else None
            rs = None if bits == 4 else layer.scales
            nw = norm.weight if mode == 2 else None
            self.keep += [layer.words, sz, rs, nw, x, out, y, xsum]
            table[i] = _Phase(ptr(layer.words), ptr(sz), ptr(x), ptr(y), ptr(nw), ptr(xsum), ptr(out), ptr(rs),
                              n, k, mode, 0, float(norm.eps) if mode == 2 else 0.0, 0, 0, 0)
        self.n_phases, self.slots, self.kmax = len(phases), slots, kmax
        self.table = torch.frombuffer(bytearray(bytes(table)), dtype=torch.uint8).to(device)
        self.ws = torch.empty(tiles * slots * 16, dtype=torch.float32, device=device)
        self.cnt = torch.zeros(tiles, dtype=torch.int32, device=device)
        self.bar = torch.zeros(2, dtype=torch.int32, device=device)

    def __call__(self) -> None:
        """Launch on the current stream (graph-capturable)."""
        def p(t):
            return ctypes.c_void_p(t.data_ptr())

        self.fn((self.grid, 1), self.smem, [p(self.table), ctypes.c_int(self.n_phases), p(self.ws), p(self.cnt),
                                            p(self.bar), ctypes.c_int(self.slots), ctypes.c_int(self.kmax)],
                self.device)
