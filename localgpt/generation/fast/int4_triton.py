"""int4 weights back to bf16 for a prompt pass: one Triton kernel that reads tinygemm's packed layout.

tinygemm (``_weight_int4pack_mm``) is a small-M kernel: right for one decode token, ~14x slower than
cuBLAS for a 2,048-token prompt. For prompts ``Int4Linear`` writes the layer's bf16 weight into a
short-lived buffer with this kernel (0.5 byte read, 2 bytes written per weight) and runs cuBLAS on it,
so no bf16 copy of the model is ever kept. The layout it reads is documented in
``quantize.pack_int4_reference``; imported only on CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dequant_kernel(packed_ptr, sz_ptr, out_ptr, N, K, GROUP: tl.constexpr, TILES: tl.constexpr,
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


def dequantize_int4pack(packed: torch.Tensor, scales_and_zeros: torch.Tensor, groupsize: int,
                        out: torch.Tensor) -> torch.Tensor:
    """Write the bf16 weight [N, K] of a tinygemm-packed int4 layer into ``out`` and return it."""
    n, k = out.shape
    tiles = packed.shape[-1] * 2
    assert packed.dtype == torch.int32 and packed.is_contiguous() and scales_and_zeros.is_contiguous()
    assert packed.numel() * 8 == n * k and k % (tiles * 16) == 0 and out.is_contiguous()
    block_n, block_k = 32, 128
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _dequant_kernel[grid](packed, scales_and_zeros, out, n, k, GROUP=groupsize, TILES=tiles,
                          BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out
