"""The batch-1 decode step's attention: ``slot_triton.step_attention`` (rotary, cache write and attention in one
kernel, runs whose length follows the position) against ``rope_store`` + ``decode_attention`` (the engine's two
launches before, a grid that grows with the cache). One GPU call.

Llama-2-7B heads (32 x 128, one kv head each) and Falcon-7B's (71 x 64, one kv head for all), 32 layers of their
own caches (so the rows stream from HBM, as in a step), one CUDA graph of the 32 layers' attentions; µs a layer
(median of replays). Every configuration's output and the cache rows it writes are checked against the two-launch
reference first. Prints a table per (network, cache positions, position): the reference, the best ``--top``
configurations of the sweep (splits, block_n, warps, dot, stages), the default (``slot_triton.STEP_ATTENTION``) and the
default without the rotary (q rotated already: the compiled step's case).

    python bench/attention_step.py [--models llama,falcon] [--cases 704:512,4096:512,4096:4000] [--quick] [--merge]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from localgpt.generation.fast import slot_triton as S  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from gpu import graph_us  # noqa: E402

MODELS = {"llama": (32, 32, 128), "falcon": (71, 1, 64)}  # heads, kv heads, head dim


def run(args) -> dict:
    dev = torch.device("cuda")
    results = {}
    for model in args.models.split(","):
        heads, kv, hd = MODELS[model]
        for case in args.cases.split(","):
            length, pos = (int(v) for v in case.split(":"))
            torch.manual_seed(0)
            layers = []
            for _ in range(args.layers):
                kc = torch.randn(1, kv, length, hd, device=dev).to(torch.bfloat16)
                vc = torch.randn(1, kv, length, hd, device=dev).to(torch.bfloat16)
                qkv = torch.randn(1, (heads + 2 * kv) * hd, device=dev).to(torch.bfloat16)
                layers.append((kc, vc, qkv))
            cos = torch.randn(length, hd, device=dev).to(torch.bfloat16)
            sin = torch.randn(length, hd, device=dev).to(torch.bfloat16)
            where = torch.tensor([pos], device=dev)
            outs = [torch.empty(1, heads * hd, dtype=torch.bfloat16, device=dev) for _ in layers]

            def reference(i):
                kc, vc, qkv = layers[i]
                q = S.rope_store(qkv, cos, sin, where, kc, vc, heads)
                S.decode_attention(q, kc, vc, where, -1, out=outs[i])

            for i in range(len(layers)):
                reference(i)
            want = [o.clone() for o in outs]
            want_rows = [(kc[:, :, pos].clone(), vc[:, :, pos].clone()) for kc, vc, _ in layers]
            q_rot = [S.rope_store(qkv, cos, sin, where, kc, vc, heads) for kc, vc, qkv in layers]
            rows = [("rope_store + decode_attention (before)", graph_us([lambda i=i: reference(i)
                                                                          for i in range(len(layers))]))]
            sweep = []
            # --merge: the sweep's kernels combine their parts themselves (one launch a layer) and ask for their first
            # tile's rows before the dependent launch waits, as the batch-1 step runs them (transformer.STEP_MERGE)
            merge = {"counts": S.step_counts(heads, dev), "early": 1} if args.merge else {}
            tag = "step_attention merged" if args.merge else "step_attention"
            splits = (8, 16) if args.quick else (8, 16, 32)
            block_ns = (32,) if args.quick else (16, 32, 64)
            splits = tuple(int(v) for v in args.splits.split(",")) if args.splits else splits
            block_ns = tuple(int(v) for v in args.block_n.split(",")) if args.block_n else block_ns
            warps = (4,) if args.quick else (2, 4)
            dots = (True,) if args.quick or not args.no_dot else (False, True)
            stages = (1,) if args.merge else (1, 2) if args.quick else (1, 2, 3)  # merged: its own two stages
            for cfg in itertools.product(splits, block_ns, warps, dots, stages):
                for kc, vc, _ in layers:  # clear the step's rows: the kernel must write them
                    kc[:, :, pos] = 0
                    vc[:, :, pos] = 0
                try:
                    for i, (kc, vc, qkv) in enumerate(layers):
                        S.step_attention(qkv, kc, vc, where, heads, cos, sin, cfg, out=outs[i], **merge)
                except Exception as exc:  # noqa: BLE001 - a configuration Triton cannot build (shared memory)
                    sweep.append((cfg, None, f"{type(exc).__name__}"))
                    continue
                err = max(float((o.float() - w.float()).norm() / w.float().norm()) for o, w in zip(outs, want))
                row_err = max(float((kc[:, :, pos].float() - wk.float()).norm() / wk.float().norm())
                              + float((vc[:, :, pos].float() - wv.float()).norm() / wv.float().norm())
                              for (kc, vc, _), (wk, wv) in zip(layers, want_rows))
                if err > 1e-2 or row_err > 1e-2:
                    sweep.append((cfg, None, f"wrong: out {err:.1e}, rows {row_err:.1e}"))
                    continue
                us = graph_us([lambda i=i, c=cfg: S.step_attention(layers[i][2], layers[i][0], layers[i][1], where,
                                                                   heads, cos, sin, c, out=outs[i], **merge)
                               for i in range(len(layers))])
                sweep.append((cfg, us, ""))
            ok = sorted((r for r in sweep if r[1] is not None), key=lambda r: r[1])
            for cfg, us, _ in ok[:args.top]:
                rows.append((f"{tag} {cfg}", us))
            default = tuple(S.STEP_ATTENTION[k] for k in ("splits", "block_n", "warps", "dot", "stages"))
            hit = [us for cfg, us, _ in sweep if cfg == default and us is not None]
            if hit:
                rows.append((f"{tag} default {default}", hit[0]))
            cfg = ok[0][0] if ok else default
            rows.append((f"best {cfg} without the rotary (q given)",
                         graph_us([lambda i=i: S.step_attention(q_rot[i], layers[i][0], layers[i][1], where, heads,
                                                                config=cfg, out=outs[i])
                                   for i in range(len(layers))])))
            bad = [(cfg, note) for cfg, us, note in sweep if us is None]
            key = f"{model} L{length} pos{pos}"
            results[key] = {"rows": rows, "failed": bad, "sweep": [(list(c), u) for c, u, _ in sweep]}
            print(f"\n### {key} (heads {heads}, kv {kv}, hd {hd}; µs a layer, {args.layers} layers a graph)")
            print("| attention | µs a layer |\n|---|---:|")
            for name, us in rows:
                print(f"| {name} | {us:.2f} |")
            if bad:
                print(f"failed: {bad[:6]}{' ...' if len(bad) > 6 else ''}")
            del layers
            torch.cuda.empty_cache()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="llama,falcon")
    parser.add_argument("--cases", default="704:512,4096:512,4096:4000", help="cache positions:position, ...")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--top", type=int, default=6)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-dot", action="store_true", help="sweep the kernel without tensor-core dots too")
    parser.add_argument("--merge", action="store_true", help="sweep the one-launch kernel (its parts merged in it)")
    parser.add_argument("--splits", help="the sweep's splits a head (default 8,16,32; --quick 8,16)")
    parser.add_argument("--block-n", help="the sweep's positions a tile (default 16,32,64; --quick 32)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    results = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
