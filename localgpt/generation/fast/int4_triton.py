"""int4 weights back to bf16 for a prompt pass: Triton kernels that read tinygemm's packed layout.

tinygemm (``_weight_int4pack_mm``) is a small-M kernel: right for one decode token, ~20x slower than
cuBLAS bf16 for a 2,048-token prompt. For prompts ``Int4Linear`` writes the layer's bf16 weight into a
short-lived buffer with one of these kernels (0.5 byte read, 2 bytes written per weight) and runs cuBLAS
on it, so no bf16 copy of the model is ever kept. The layout they read is written out above
``quantize.pack_int4_reference``. "tile" is the one used; "gather", the first version, is kept as the
simple reference and the fallback. Imported only on CUDA (or under ``TRITON_INTERPRET=1`` in tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dequant_gather_kernel(packed_ptr, sz_ptr, out_ptr, N, K, GROUP: tl.constexpr, TILES: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    live = (n < N) & (k < K)
    # Where weight (n, k) sits in the [N/8, K/(TILES*16), 32, TILES/2] int32 tensor, and at which bits.
    super_k = TILES * 16
    kk = k % super_k
    r = kk % 16
    lane = (n % 8) * 4 + (r % 8) // 2
    word = (((n // 8) * (K // super_k) + k // super_k) * 32 + lane) * (TILES // 2) + kk // 32
    shift = (r % 2) * 16 + ((kk % 32) // 16 * 2 + r // 8) * 4
    q = (tl.load(packed_ptr + word, mask=live, other=0) >> shift) & 15
    g = k // GROUP
    scale = tl.load(sz_ptr + (g * N + n) * 2, mask=live, other=0.0).to(tl.float32)
    zero = tl.load(sz_ptr + (g * N + n) * 2 + 1, mask=live, other=0.0).to(tl.float32)
    w = (q.to(tl.float32) - 8.0) * scale + zero
    tl.store(out_ptr + n * K + k, w.to(out_ptr.dtype.element_ty), mask=live)


@triton.jit
def _dequant_tile_kernel(packed_ptr, sz_ptr, out_ptr, N, K, GROUP: tl.constexpr, PAIRS: tl.constexpr,
                         WIDTH: tl.constexpr, NG: tl.constexpr, GW: tl.constexpr, BLOCK_NT: tl.constexpr):
    # One program: BLOCK_NT n-tiles (8 rows each) x one k super-tile (TILES*16 columns). Its words are
    # BLOCK_NT contiguous runs of 32*PAIRS int32 (wide loads, each word read once); the nibbles are put
    # in row-major order by one reshape + permute in registers, so the bf16 stores are contiguous too.
    # PAIRS = TILES / 2 words per lane; the super-tile's WIDTH = 32 * PAIRS columns are NG groups of GW.
    nt = tl.program_id(0) * BLOCK_NT + tl.arange(0, BLOCK_NT)
    kt = tl.program_id(1)
    n_kt = K // WIDTH
    word = ((nt * n_kt + kt) * (32 * PAIRS))[:, None] + tl.arange(0, 32 * PAIRS)[None, :]
    words = tl.load(packed_ptr + word, mask=(nt < N // 8)[:, None], other=0)
    q = (words[:, :, None] >> (tl.arange(0, 8) * 4)[None, None, :]) & 15  # [nt, lane*pair, slot]
    q = tl.reshape(q, (BLOCK_NT, 8, 4, PAIRS, 2, 2, 2))  # nt, nr, q, pair, odd, half, hi8
    q = tl.permute(q, (0, 1, 3, 5, 6, 2, 4))  # nt, nr, pair, half, hi8, q, odd  ->  row n, column k
    q = tl.reshape(q, (BLOCK_NT * 8, NG, GW))
    n = tl.program_id(0) * BLOCK_NT * 8 + tl.arange(0, BLOCK_NT * 8)
    g = (kt * WIDTH) // GROUP + tl.arange(0, NG)
    sz = (g[None, :] * N + n[:, None]) * 2
    live = n < N
    scale = tl.load(sz_ptr + sz, mask=live[:, None], other=0.0).to(tl.float32)
    zero = tl.load(sz_ptr + sz + 1, mask=live[:, None], other=0.0).to(tl.float32)
    w = (q.to(tl.float32) - 8.0) * scale[:, :, None] + zero[:, :, None]
    w = tl.reshape(w, (BLOCK_NT * 8, WIDTH))
    col = kt * WIDTH + tl.arange(0, WIDTH)
    tl.store(out_ptr + n[:, None] * K + col[None, :], w.to(out_ptr.dtype.element_ty), mask=live[:, None])


def dequantize_int4pack(packed: torch.Tensor, scales_and_zeros: torch.Tensor, groupsize: int,
                        out: torch.Tensor, kernel: str = "tile") -> torch.Tensor:
    """Write the bf16 weight [N, K] of a tinygemm-packed int4 layer into ``out`` and return it.

    kernel: "tile" (each word loaded once, nibbles reordered in registers) or "gather" (each weight
    loads its own word: simpler, the first version; kept to compare).
    """
    n, k = out.shape
    tiles = packed.shape[-1] * 2
    assert packed.dtype == torch.int32 and packed.is_contiguous() and scales_and_zeros.is_contiguous()
    assert packed.numel() * 8 == n * k and k % (tiles * 16) == 0 and out.is_contiguous()
    if kernel == "tile":
        block_nt, width = 4, tiles * 16
        groups = max(width // groupsize, 1)
        grid = (triton.cdiv(n // 8, block_nt), k // width)
        _dequant_tile_kernel[grid](packed, scales_and_zeros, out, n, k, GROUP=groupsize, PAIRS=tiles // 2,
                                   WIDTH=width, NG=groups, GW=width // groups, BLOCK_NT=block_nt, num_warps=4)
        return out
    block_n, block_k = 32, 128
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _dequant_gather_kernel[grid](packed, scales_and_zeros, out, n, k, GROUP=groupsize, TILES=tiles,
                          BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out
