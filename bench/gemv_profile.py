"""One int4 / int8 decode GEMV launch per kernel at a Llama-2-7B shape, for Nsight Compute on the GPU.

``ncu --section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats
python bench/gemv_profile.py 22016 4096``: the X2 kernels at their tuned config, the FMA kernel and tinygemm,
each launched twice (the first compiles). Random weights; nothing is timed here (ncu times each launch).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from localgpt.generation.fast import gemv_triton as G  # noqa: E402
from localgpt.generation.fast.quantize import (  # noqa: E402
    int4_planes, int4_state, int8_planes, pack_int4_planar, pack_int8_planar,
)
from localgpt.generation.fast.transformer import Linear  # noqa: E402


def main(n: int, k: int) -> None:
    torch.manual_seed(0)
    layer = Linear(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
    x = torch.randn(k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    st = int4_state(layer, 128, 8)
    planes = int4_planes(k, 128)
    words4 = pack_int4_planar(st["nibbles"], planes)
    sz = st["scales_and_zeros"].view(torch.int32).reshape(k // 128, n)
    packed = torch.ops.aten._convert_weight_to_int4pack(st["nibbles"], 8)
    q8 = torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda")
    words8 = pack_int8_planar(q8, int8_planes(k))
    for _ in range(2):
        G.int4_gemv(x, words4, sz, 128, planes, out, G.Workspace(), G.TUNED[("int4", n, k)][:4],
                    dot=G.TUNED[("int4", n, k)][4])
        G.int4_gemv(x, words4, sz, 128, planes, out, G.Workspace(), G.FMA_TUNED[("int4", n, k)][:4], dot=G.FMA)
        torch.ops.aten._weight_int4pack_mm(x.view(1, k), packed, 128, st["scales_and_zeros"])
        G.int8_gemv(x, words8, int8_planes(k), out, G.Workspace(), G.TUNED[("int8", n, k)][:4],
                    dot=G.TUNED[("int8", n, k)][4])
    torch.cuda.synchronize()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 22016, int(sys.argv[2]) if len(sys.argv) > 2 else 4096)
