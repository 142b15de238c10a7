"""int4 X2 decode GEMV: does a register cap (Triton's ``maxnreg``) buy occupancy and speed? One GPU call.

Round 3's ncu of the X2 int4 kernel at its tuned config (64 rows, 2 warps) read 128 registers a thread, 25%
theoretical occupancy, DRAM 35% of peak, top stall L1TEX scoreboard: latency-bound. SASS compiled here (sm_90,
no GPU) for that config: maxnreg 96 -> 96 registers, 2 local loads/stores in the main loop, 3.62 instructions a
weight (3.55 uncapped); 80 -> 19 local accesses, 3.77. Prediction: if latency hiding is the limit, 96 registers
(occupancy 25% -> ~33%) should cut the per-layer time by up to ~20% where the kernel trails tinygemm's bandwidth;
if the loop is issue-bound, no gain. This times, per Llama-2-7B shape, the tuned config with maxnreg None / 96 / 80
and the split-K factor x2 and /2, beside tinygemm: µs a call, median of CUDA-graph replays over enough weight
copies to stream from HBM, each result checked against the dequantised reference first.

    python bench/int4_occupancy.py            # prints a table; --json PATH writes the numbers
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from localgpt.generation.fast import gemv_triton as G  # noqa: E402
from localgpt.generation.fast.quantize import (  # noqa: E402
    dequantize_int4, int4_planes, int4_state, pack_int4_planar,
)
from localgpt.generation.fast.transformer import Linear  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from gpu import graph_us as gpu_graph_us  # noqa: E402

SHAPES = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (32000, 4096)]


def graph_us(calls) -> float:
    return gpu_graph_us(calls, repeats=9)


def launch(x, words, sz, out, ws, bn, split, warps, maxnreg):
    n, kw = words.shape
    blocks = triton.cdiv(n, bn)
    buf, lock = ws.get(n, split, blocks, x.device)
    extra = {"maxnreg": maxnreg} if maxnreg else {}
    G._int4_x2_kernel[(blocks, split)](x, words, sz, out, buf, lock, n, kw * 8, words.stride(0), GROUP=128,
                                       P=int4_planes(kw * 8, 128), BN=bn, SPLIT=split, ASM=True, FULL=n % bn == 0,
                                       AHEAD=False, num_warps=warps, num_stages=1, **extra)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    args = parser.parse_args()
    rows, total = [], {}
    with torch.inference_mode():
        for n, k in SHAPES:
            torch.manual_seed(n + k)
            layer = Linear(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
            x = torch.randn(k, device="cuda", dtype=torch.bfloat16)
            st = int4_state(layer, 128, 8)
            planes = int4_planes(k, 128)
            words = pack_int4_planar(st["nibbles"], planes)
            sz = st["scales_and_zeros"].view(torch.int32).reshape(k // 128, n)
            packed = torch.ops.aten._convert_weight_to_int4pack(st["nibbles"], 8)
            ref = dequantize_int4(st["nibbles"], st["scales_and_zeros"], 128) @ x.float()
            nbytes = n * k // 2 + sz.numel() * 4
            copies = max(2, math.ceil(400e6 / nbytes))
            words_ = [words] + [words.clone() for _ in range(copies - 1)]
            sz_ = [sz] + [sz.clone() for _ in range(copies - 1)]
            packed_ = [packed] + [packed.clone() for _ in range(copies - 1)]
            szt_ = [st["scales_and_zeros"]] + [st["scales_and_zeros"].clone() for _ in range(copies - 1)]
            bn0, split0, warps0 = G.TUNED[("int4", n, k)][:3]
            variants = [("tuned", bn0, split0, warps0, None), ("maxnreg 96", bn0, split0, warps0, 96),
                        ("maxnreg 80", bn0, split0, warps0, 80),
                        ("split x2", bn0, min(split0 * 2, 32), warps0, None),
                        ("split x2, maxnreg 96", bn0, min(split0 * 2, 32), warps0, 96),
                        ("split /2", bn0, max(split0 // 2, 1), warps0, None),
                        ("128 rows, 4 warps", 128, split0, 4, None)]
            out = torch.empty(n, dtype=torch.bfloat16, device="cuda")
            tol = 1e-2 * ref.abs().max().item() + 1e-3
            entry = {}
            t = graph_us([lambda i=i: torch.ops.aten._weight_int4pack_mm(x.view(1, k), packed_[i], 128, szt_[i])
                          for i in range(copies)])
            entry["tinygemm"] = t
            for name, bn, split, warps, mr in variants:
                ws = G.Workspace()
                out.fill_(float("nan"))
                try:
                    launch(x, words, sz, out, ws, bn, split, warps, mr)
                    torch.cuda.synchronize()
                    err = (out.float() - ref).abs().max().item()
                    if not err <= tol:
                        entry[name] = f"wrong ({err:.3g} > {tol:.3g})"
                        continue
                    entry[name] = graph_us([lambda i=i: launch(x, words_[i], sz_[i], out, ws, bn, split, warps, mr)
                                            for i in range(copies)])
                except Exception as exc:  # noqa: BLE001 - one variant failing leaves the others
                    entry[name] = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
            rows.append(((n, k), (bn0, split0, warps0), nbytes, entry))
            for name, v in entry.items():
                if isinstance(v, float):
                    mult = 1 if (n, k) == (32000, 4096) else 32  # 32 layers of qkv, o, gate+up, down; one head
                    total[name] = total.get(name, 0.0) + mult * v
            del words_, sz_, packed_, szt_
            torch.cuda.empty_cache()
    names = list(rows[0][3])
    print("| N × K (tuned rows, split, warps) | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for (n, k), cfg, nbytes, entry in rows:
        cells = [f"{v:.1f} ({nbytes / v / 1e6:.2f})" if isinstance(v, float) else str(v) for v in
                 (entry.get(x) for x in names)]
        print(f"| {n} × {k} {cfg} | " + " | ".join(cells) + " |")
    print("| a decode step (32 layers + lm_head), µs | "
          + " | ".join(f"{total.get(x, float('nan')):.0f}" for x in names) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": [[list(s), list(c), b, e] for s, c, b, e in rows], "step_us": total}, f, indent=1)


if __name__ == "__main__":
    main()
