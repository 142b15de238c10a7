"""The Mamba selective scan as one Triton kernel: channels in parallel, positions in order.

Each program owns BLOCK channels and their full SSM state in registers and walks the chunk's
positions, so the state never goes to memory between positions; it starts from and ends in the
carried state ``h`` (fp32), which is what makes chunked prefill exact. Same contract as
``mamba.scan_reference``; imported only on CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _scan_kernel(x_ptr, dt_ptr, z_ptr, b_ptr, c_ptr, a_ptr, d_ptr, h_ptr, y_ptr, T, INNER,
                 sx, sdt, sz, sb, sc, sy, STATE: tl.constexpr, BLOCK: tl.constexpr):
    ch = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    st = tl.arange(0, STATE)
    live = ch < INNER
    grid = ch[:, None] * STATE + st[None, :]
    A = tl.load(a_ptr + grid, mask=live[:, None], other=0.0)
    h = tl.load(h_ptr + grid, mask=live[:, None], other=0.0)
    Dv = tl.load(d_ptr + ch, mask=live, other=0.0).to(tl.float32)
    for t in range(T):
        x = tl.load(x_ptr + t * sx + ch, mask=live, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + t * sdt + ch, mask=live, other=0.0)
        z = tl.load(z_ptr + t * sz + ch, mask=live, other=0.0).to(tl.float32)
        B = tl.load(b_ptr + t * sb + st).to(tl.float32)
        C = tl.load(c_ptr + t * sc + st).to(tl.float32)
        h = h * tl.exp(dt[:, None] * A) + (dt * x)[:, None] * B[None, :]
        y = tl.sum(h * C[None, :], axis=1) + Dv * x
        y = y * z / (1.0 + tl.exp(-z))
        tl.store(y_ptr + t * sy + ch, y.to(y_ptr.dtype.element_ty), mask=live)
    tl.store(h_ptr + grid, h, mask=live[:, None])


def selective_scan(x, dt, A, B, C, D, z, h, block: int = 32):
    """x, z: [t, inner]; dt: [t, inner] fp32 (softplus-ed); B, C: [t, state]; A, h: [inner, state] fp32."""
    t, inner = x.shape
    state = A.shape[1]
    assert x.stride(1) == dt.stride(1) == z.stride(1) == B.stride(1) == C.stride(1) == 1
    assert A.is_contiguous() and h.is_contiguous() and h.dtype == torch.float32 and dt.dtype == torch.float32
    y = torch.empty(t, inner, dtype=x.dtype, device=x.device)
    _scan_kernel[(triton.cdiv(inner, block),)](
        x, dt, z, B, C, A, D, h, y, t, inner,
        x.stride(0), dt.stride(0), z.stride(0), B.stride(0), C.stride(0), y.stride(0),
        STATE=state, BLOCK=block, num_warps=4)
    return y
