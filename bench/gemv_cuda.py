"""The tensor-core CUDA decode GEMV (``gemv_cuda``) against tinygemm and the Triton X2 kernels. One GPU call.

Per Llama-2-7B shape, int4 (planar, group 128) and int8 (planar, per-row scale): every CUDA configuration
(warps a CTA, 16-row tiles a warp, split-K, and for int4 the ``offset`` variant) is first checked against the
dequantised reference (fp32), then timed: µs a call, median of CUDA-graph replays over enough weight copies to
stream from HBM (bench/gpu.py's ``graph_us``). A wrong result prints where it is wrong (rows / size of the error)
instead of a time. Prints the table (TB/s of weight bytes in brackets) and the summed decode step (32 layers +
lm_head) for the best configuration of each kernel; ``--json`` writes everything, ``--tuned`` prints the best
configs as a Python dict for ``gemv_cuda.TUNED``.

    python bench/gemv_cuda.py [--kinds int4,int8] [--quick]

``--chain``: the GEMVs of a Llama-2-7B decode step as they run in the engine (32 layers of random weights in the
"cuda" layouts, qkv -> o -> gate_up -> down; the attention left out: o reads q), one CUDA graph a step, µs a
step: the residual adds + RMSNorms and silu·up as their own Triton kernels ("separate") against folded into
the GEMVs' prologues ("prologue", ``quantize.prologue_gemv``), at the register depths ``--depths`` names (the
tuned configurations' otherwise), and against ``gemv_chain``'s persistent launch a layer ("chain w. d. b.":
warps, ring depth, blocks an item). The results of the variants are compared with each other.

    python bench/gemv_cuda.py --chain [--kinds int4,int8] [--layers 32]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from localgpt.generation.fast import gemv_cuda as C  # noqa: E402
from localgpt.generation.fast import gemv_triton as G  # noqa: E402
from localgpt.generation.fast.quantize import (  # noqa: E402
    dequantize_int4, int4_planes, int4_state, int8_planes, pack_int4_planar, pack_int8_planar,
)
from localgpt.generation.fast.transformer import Linear  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from gpu import GEMV_SHAPES, graph_us  # noqa: E402

# --shapes: the networks' layer shapes (N, K: bench/gpu.py's, Falcon-7B's inputs padded to whole 128-column blocks,
# as quantize_model does for the CUDA GEMV)
SHAPE_SETS = {name: [(n, -(-k // 128) * 128) for n, k in shapes] for name, shapes in GEMV_SHAPES.items()}


def configs(kind: str, quick: bool, depths: tuple[int, ...] | None = None):
    """(warps, tiles, split, offset, depth, L2 prefetch, cluster, tiled) to try: the tiled layout with L2 prefetch
    won every int4 shape in the first sweeps (bench/RESULTS.md, round 8), so those are fixed here."""
    for w in ((4,) if quick else (4, 8)):
        for s in ((1, 2, 4, 8) if quick else (1, 2, 4, 8, 16)):
            for d in depths or ((2,) if kind == "int4" else (2, 3)):
                for cl in ((False, True) if 2 <= s <= 8 else (False,)):
                    yield (w, 1, s, kind == "int4", d, True, cl, True)


def cuda_call(bits, x, words, sz, out, planes, cfg):
    ws, lock = C.scratch(words.shape[0], cfg, x.device)
    if cfg[7]:
        words = C.tile_words(words, planes)
    return lambda: C.gemv(bits, x, words, sz, out, ws, lock, planes, cfg)


def check(out, ref, tol, name):
    err = (out.float() - ref).abs()
    bad = ~(err <= tol)
    if bool(bad.any()):
        rows = bad.nonzero()[:4].tolist()
        return (f"wrong: {int(bad.sum())} of {bad.numel()} (first {rows}), max err {err.max().item():.3g}, ref max "
                f"{ref.abs().max().item():.3g}")
    return None


def chain_candidates(kind: str, k: int):
    """Configurations a layer's sweep inside the chain tries: warps, tiles, split-K (cluster or workspace)."""
    for w in (4, 8):
        for tiles in (1, 2):
            for split in (1, 2, 4, 8, 16):
                if split > k // 128 // 2:
                    continue
                for cl in ((False, True) if 2 <= split <= 8 else (False,)):
                    yield (w, tiles, split, kind == "int4", 2, True, cl, kind == "int4")


# gemv_chain's (warps, ring depth, blocks an item) the chain bench tries
# (a fourth True: the bulk-copy kernel, its depth None: as many stages as fit)
CHAIN_SHAPES = {"int4": [(16, 2, 2), (16, None, 1, True), (16, None, 2, True), (8, None, 2, True),
                         (16, 6, 1, True), (24, None, 1, True), (16, 2, 2, True)],
                "int8": [(16, 2, 1), (16, 3, 1), (8, 3, 2), (24, 1, 1)]}


def shape_label(shape) -> str:
    f16 = "" if len(shape) < 5 or shape[4] is None else (" f16" if shape[4] else " bf16")
    return ("chain tma" if len(shape) > 3 and shape[3] else "chain") + (
        f" w{shape[0]} d{shape[1] or 'max'} b{shape[2]}") + f16


def trace_summary(label: str, trace: torch.Tensor, n_phases: int = 4) -> str:
    """Where a layer's launch spends its time, from gemv_chain's DIAG & 16 stamps [CTA, phase, point] (ns):
    per phase the barrier wait, the staging and the multiply (mean and max over the CTAs), the spread of the
    CTAs' ends (the slowest against the fastest) and the bulk-copy producer's lead (its last copy of the phase
    issued, before the multiply ended)."""
    t = trace.double().cpu()
    base = t[:, 0, 0].min()
    t = (t - base) / 1000.0  # µs from the first CTA past its start
    lines = [f"{label}: trace (µs; mean / max over {t.shape[0]} CTAs)"]
    totals = [0.0, 0.0, 0.0]  # a launch's means: waits, stagings, multiplies
    for p in range(n_phases):
        wait = (t[:, p, 0] - t[:, p - 1, 2]) if p else t[:, p, 0]
        stage, mult = t[:, p, 1] - t[:, p, 0], t[:, p, 2] - t[:, p, 1]
        ends = t[:, p, 2]
        lead = t[:, p, 2] - t[:, p, 3] if bool((trace[:, p, 3] != 0).any()) else None
        slow = torch.topk(ends, 3).indices.tolist()
        for k, v in enumerate((wait, stage, mult)):
            totals[k] += float(v.mean())
        lines.append(f"  phase {p}: wait {wait.mean():.2f}/{wait.max():.2f}  stage {stage.mean():.2f}/{stage.max():.2f}"
                     f"  multiply {mult.mean():.2f}/{mult.max():.2f} (min {mult.min():.2f})"
                     f"  ends {ends.min():.2f}..{ends.max():.2f} (slowest CTAs {slow})"
                     + (f"  producer lead {lead.mean():.2f} (min {lead.min():.2f})" if lead is not None else ""))
    lines.append(f"  the launch: waits {totals[0]:.2f}, stagings {totals[1]:.2f}, multiplies {totals[2]:.2f} "
                 f"(means, summed over its phases); its slowest CTA ends at {t[:, n_phases - 1, 2].max():.2f}")
    return "\n".join(lines)


def chain(kinds: list[str], n_layers: int, depths: tuple[int, ...] = (2,), sweep: bool = False,
          diag: bool = False, chain_shapes: str = "", diags: tuple[int, ...] = (), chain_attn: int = 0,
          alt: str = "") -> dict:
    """µs a decode step of GEMVs (see the module's note) per (kind, variant); prints a table. ``alt``: a git
    revision or file of gemv_chain.py whose chains run too, after each of the working tree's ("... alt" rows)."""
    from localgpt.generation.fast import gemv_chain, slot_triton
    from localgpt.generation.fast.gemv_chain import Chain
    from localgpt.generation.fast.quantize import Int4Linear, Int8Linear, prologue_gemv
    from localgpt.generation.fast.transformer import RMSNorm

    dim, inner = 4096, 11008
    shapes = {"wqkv": (3 * dim, dim), "wo": (dim, dim), "w_in": (2 * inner, dim), "w_out": (dim, inner)}
    results = {}
    alt_mod = None
    if alt:
        from alt_chain import module_at

        alt_mod = module_at(alt)
    for kind in kinds:
        torch.manual_seed(0)
        layers = []
        for _ in range(n_layers):
            blk = {}
            for name, (n, k) in shapes.items():
                if kind == "int4":
                    st = int4_state(Linear(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02), 128, 8)
                    blk[name] = Int4Linear.from_state(st, torch.device("cuda"), layout="cuda")
                else:
                    q = torch.randint(-128, 128, (n, k), device="cuda", dtype=torch.int8)
                    sc = (torch.rand(n, device="cuda") * 2e-4 + 1e-4).to(torch.bfloat16)
                    blk[name] = Int8Linear.from_state({"weight": q, "scales": sc, "bias": None}, torch.device("cuda"),
                                                      layout="cuda")
                assert blk[name].prologue_ok, (kind, name)
            blk["n1"] = RMSNorm(1 + 0.1 * torch.randn(dim, device="cuda", dtype=torch.bfloat16), 1e-5)
            blk["n2"] = RMSNorm(1 + 0.1 * torch.randn(dim, device="cuda", dtype=torch.bfloat16), 1e-5)
            layers.append(blk)
        x0 = torch.randn(1, dim, device="cuda", dtype=torch.bfloat16)
        final = {}

        def separate():
            x, pend = x0, None
            for b in layers:
                if pend is None:
                    h = slot_triton.rms_norm(x, b["n1"].weight, b["n1"].eps)
                else:
                    x, h = slot_triton.add_rms_norm(x, pend, b["n1"].weight, b["n1"].eps)
                o = b["wo"](b["wqkv"](h)[:, :dim])
                x, h = slot_triton.add_rms_norm(x, o, b["n2"].weight, b["n2"].eps)
                pend = b["w_out"](slot_triton.silu_mul(b["w_in"](h)))
            final["out"] = x + pend

        def prologue():
            x, pend = x0, None
            for b in layers:
                qkv, x = prologue_gemv(b["wqkv"], x, "rms", pend, b["n1"])
                o = b["wo"](qkv[:, :dim])
                h, x = prologue_gemv(b["w_in"], x, "rms", o, b["n2"])
                pend, _ = prologue_gemv(b["w_out"], h, "swiglu")
            final["out"] = x + pend

        entry, outs = {}, {}

        def set_depth(depth):
            for b in layers:
                for name in shapes:
                    lin = b[name]
                    if kind == "int4":
                        lin.gemv_config = lin.gemv_config[:4] + (depth,) + lin.gemv_config[5:]
                    else:
                        lin.cuda_config = lin.cuda_config[:4] + (depth,) + lin.cuda_config[5:]

        attn_state = {}

        def attention_state():
            # --chain-attn POS: each layer's caches (POS + 64 positions, random), the rotary tables, the position
            if not attn_state:
                heads, hd, length = dim // 128, 128, chain_attn + 64
                angles = torch.arange(length, device="cuda")[:, None] * (
                    10000 ** (-torch.arange(0, hd, 2, device="cuda") / hd))
                angles = torch.cat([angles, angles], -1)
                attn_state.update(
                    heads=heads, hd=hd, cos=angles.cos().to(torch.bfloat16), sin=angles.sin().to(torch.bfloat16),
                    pos=torch.full((1,), chain_attn, dtype=torch.long, device="cuda"),
                    ws=torch.zeros(heads * 8 * (hd + 4), device="cuda"),
                    att=torch.zeros(dim, device="cuda", dtype=torch.bfloat16),
                    caches=[(torch.randn(1, heads, length, hd, device="cuda").to(torch.bfloat16),
                             torch.randn(1, heads, length, hd, device="cuda").to(torch.bfloat16)) for _ in layers])
            return attn_state

        def persistent(shape, attn="", mod=None):
            Chain = (mod or gemv_chain).Chain  # noqa: N806 - the working tree's class or the --chain-alt one
            # gemv_chain: wo -> w_in -> w_out -> the next wqkv in one launch a layer (the buffers fixed); attn
            # "phase": the attention as each launch's first phase, "kernels": slot_triton's three kernels before it
            bufs = {k: torch.zeros(n, device="cuda", dtype=torch.bfloat16) for k, n in (
                ("qkv", 3 * dim), ("o", dim), ("ra", dim), ("rb", dim), ("gu", 2 * inner), ("d", dim))}
            chains = [Chain([dict(layer=layers[0]["wqkv"], x=bufs["ra"], out=bufs["qkv"], xmode="rms",
                                  norm=layers[0]["n1"])], torch.device("cuda"), *shape[:3], tma=tma_of(shape),
                            f16=f16_of(shape))]
            st = attention_state() if attn else {}
            for i, b in enumerate(layers):
                ph = [dict(layer=b["wo"], x=st["att"] if attn else bufs["qkv"][:dim], out=bufs["o"])]
                if attn == "phase":
                    kc, vc = st["caches"][i]
                    ph.insert(0, dict(xmode="attn", x=bufs["qkv"], out=st["att"], k_cache=kc, v_cache=vc,
                                      cos=st["cos"], sin=st["sin"], pos=st["pos"], heads=st["heads"], kv=st["heads"],
                                      hd=st["hd"], ws=st["ws"]))
                ph += [dict(layer=b["w_in"], x=bufs["ra"], y=bufs["o"], norm=b["n2"], xsum=bufs["rb"],
                            out=bufs["gu"], xmode="rms"),
                       dict(layer=b["w_out"], x=bufs["gu"], out=bufs["d"], xmode="swiglu")]
                if i + 1 < len(layers):
                    ph.append(dict(layer=layers[i + 1]["wqkv"], x=bufs["rb"], y=bufs["d"], norm=layers[i + 1]["n1"],
                                   xsum=bufs["ra"], out=bufs["qkv"], xmode="rms"))
                chains.append(Chain(ph, torch.device("cuda"), *shape[:3], tma=tma_of(shape), f16=f16_of(shape)))

            def run():
                bufs["ra"].copy_(x0.view(-1))
                chains[0]()
                for i, c in enumerate(chains[1:]):
                    if attn == "kernels":
                        kc, vc = st["caches"][i]
                        q = slot_triton.rope_store(bufs["qkv"].view(1, -1), st["cos"], st["sin"], st["pos"], kc, vc,
                                                   st["heads"])
                        slot_triton.decode_attention(q, kc, vc, st["pos"], -1, out=st["att"].view(1, -1))
                    c()
                final["out"] = (bufs["rb"] + bufs["d"]).view(1, -1)
            run.chains = chains
            return run

        def single(name, shape=None):
            # one layer shape alone, 32 launches: gemv_chain's one-phase chain, or prologue_gemv's launch
            n, k = shapes[name]
            xin = torch.randn(k, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(n, device="cuda", dtype=torch.bfloat16)
            if shape is None:
                return lambda: [prologue_gemv(b[name], xin.view(1, -1), "plain") for b in layers]
            chains = [Chain([dict(layer=b[name], x=xin, out=out)], torch.device("cuda"), *shape[:3],
                            tma=tma_of(shape), f16=f16_of(shape)) for b in layers]
            return lambda: [c() for c in chains]

        runs = [("separate", separate, depths[0], True)] + [("prologue", prologue, d, True) for d in depths]

        def unique(label):  # a shape asked for twice (alternating rows of an A/B) gets " #2", ...
            taken = {r[0] for r in runs}
            n, out = 1, label
            while out in taken:
                n += 1
                out = f"{label} #{n}"
            return out
        runs.append(("prologue", prologue, depths[0], False))
        def tma_of(shape):
            return bool(len(shape) > 3 and shape[3])

        def f16_of(shape):  # a fifth value: fp16 operands (1) or bf16 (0); none: gemv_chain.F16
            return None if len(shape) < 5 or shape[4] is None else bool(shape[4])

        shapes_run = CHAIN_SHAPES[kind] if not diag else CHAIN_SHAPES[kind][:2]
        if chain_shapes:
            shapes_run = [tuple(int(v) if v != "max" else None for v in c.split(",")) for c in chain_shapes.split(";")]
        for shape in shapes_run:
            for dg in diags or ((0, 1, 2, 3, 7, 11, 15) if diag else (0,)):
                for mod in [gemv_chain] + ([alt_mod] if alt_mod else []):
                    mod.DIAG = dg
                    try:
                        for attn in (("", "kernels", "phase") if chain_attn else ("",)):
                            runs.append((unique(shape_label(shape) + (f" attn {attn}" if attn else "")
                                                + (f" diag{dg}" if dg else "") + (" alt" if mod is alt_mod else "")),
                                         persistent(shape, attn, mod), None, True))
                    except Exception as exc:  # noqa: BLE001 - a shape that does not fit this GPU
                        print(f"{kind} chain {shape}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                    mod.DIAG = 0
            if diag:
                for name in ("w_in", "wo"):
                    runs.append((f"{name} alone: gemv_cuda", single(name), None, True))
                    runs.append((f"{name} alone: {shape_label(shape)}", single(name, shape), None, True))
                    gemv_chain.DIAG = 3
                    runs.append((f"{name} alone: {shape_label(shape)} diag3", single(name, shape), None, True))
                    gemv_chain.DIAG = 11
                    runs.append((f"{name} alone: {shape_label(shape)} diag11", single(name, shape), None, True))
                    gemv_chain.DIAG = 0
        for name, fn, depth, acqrel in runs:
            if depth is not None:
                set_depth(depth)
            C.SPLITK_ACQREL = acqrel
            label = name if depth is None else f"{name} d{depth}" + ("" if acqrel else " fenced split-K")
            try:
                entry[label] = graph_us([fn], repeats=15)
                torch.cuda.synchronize()
                if getattr(fn, "chains", None) and fn.chains[1].trace is not None:
                    print(trace_summary(f"{kind} {label}", fn.chains[1].trace, fn.chains[1].n_phases), flush=True)
                outs[label] = final["out"].float().clone()
            except Exception as exc:  # noqa: BLE001 - one variant failing leaves the others
                entry[label] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
        C.SPLITK_ACQREL = True
        ref = outs.get(f"separate d{depths[0]}")
        for label, v in entry.items():
            diff = ((outs[label] - ref).abs().max().item() / ref.abs().max().item()) if label in outs and ref is not None else None
            print(f"{kind} {label}: " + (f"{v:.0f} us a step" if isinstance(v, float) else v)
                  + (f", max diff vs separate {diff:.2e} of max" if diff is not None else ""), flush=True)
        results[kind] = entry
        if sweep:
            # Each layer shape's configuration swept in place (the others as tuned), checked against the
            # separate kernels' result, then all the best together.
            set_depth(depths[0])
            best_cfgs = {}
            for name, (n, k) in shapes.items():
                attr = ("gemv_config", "gemv_ws", "gemv_lock") if kind == "int4" else ("cuda_config", "cuda_ws", "cuda_lock")
                held = [tuple(getattr(b[name], a) for a in attr) for b in layers]
                timed = []
                for cfg in chain_candidates(kind, k):
                    for b in layers:
                        ws, lock = C.scratch(n, cfg, "cuda")
                        setattr(b[name], attr[0], cfg)
                        setattr(b[name], attr[1], ws)
                        setattr(b[name], attr[2], lock)
                    try:
                        us = graph_us([prologue], repeats=9)
                        torch.cuda.synchronize()
                        diff = (final["out"].float() - ref).abs().max().item() / ref.abs().max().item()
                        if diff < 1e-2:
                            timed.append((us, cfg))
                    except Exception as exc:  # noqa: BLE001 - a configuration that does not build or fit
                        print(f"  {kind} {name} {cfg}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                for b, vals in zip(layers, held):
                    for a, v in zip(attr, vals):
                        setattr(b[name], a, v)
                timed.sort()
                best_cfgs[name] = timed[0][1] if timed else held[0][0]
                print(f"{kind} sweep {name} {n}x{k}: tuned {held[0][0]}; best " + ", ".join(
                    f"{us:.0f} us {cfg}" for us, cfg in timed[:4]), flush=True)
            for name, (n, k) in shapes.items():
                for b in layers:
                    ws, lock = C.scratch(n, best_cfgs[name], "cuda")
                    if kind == "int4":
                        b[name].gemv_config, b[name].gemv_ws, b[name].gemv_lock = best_cfgs[name], ws, lock
                    else:
                        b[name].cuda_config, b[name].cuda_ws, b[name].cuda_lock = best_cfgs[name], ws, lock
            entry["prologue swept"] = graph_us([prologue], repeats=15)
            print(f"{kind} prologue with every best: {entry['prologue swept']:.0f} us a step; TUNED entries: "
                  + repr({(kind, *shapes[name]): cfg for name, cfg in best_cfgs.items()}), flush=True)
        del layers
        torch.cuda.empty_cache()
    labels = list(next(iter(results.values())).keys()) if results else []
    print("\n| kind | " + " | ".join(labels) + " |")
    print("|---|" + "---|" * len(labels))
    for kind, entry in results.items():
        base = entry.get(f"separate d{depths[0]}")
        print(f"| {kind} | " + " | ".join((f"{entry[lb]:.0f}" + (f" ({base / entry[lb]:.2f}x)" if isinstance(base, float) else ""))
                                          if isinstance(entry.get(lb), float) else "-" for lb in labels) + " |")
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kinds", default="int4,int8")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--chain", action="store_true")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--sweep", action="store_true", help="--chain: sweep each layer's configuration in it")
    parser.add_argument("--chain-diag", action="store_true",
                        help="--chain: gemv_chain without its multiply / staging, and each shape alone")
    parser.add_argument("--chain-shapes", default="",
                        help='--chain: "warps,depth,bpi[,tma[,f16]];..." instead of CHAIN_SHAPES (depth "max": '
                             'all that fit; f16 1 / 0: fp16 / bf16 operands)')
    parser.add_argument("--chain-attn", type=int, default=0,
                        help="--chain: also with the attention at this position, as a phase and as its own kernels")
    parser.add_argument("--chain-diags", default="", help="--chain: these DIAG values for each shape (e.g. 0,15)")
    parser.add_argument("--chain-alt", default="", help="--chain: a git revision or file of gemv_chain.py run too, "
                                                          "each shape after the working tree's (same-call A/B)")
    parser.add_argument("--depths", default="", help="register depths to try (e.g. 2,3,4; first = the baseline's)")
    parser.add_argument("--shapes", default="llama", help='layer shapes: "llama", "falcon", "falcon-mamba" (comma '
                        'separated) or "N,K;N,K"')
    parser.add_argument("--json")
    args = parser.parse_args()
    shapes = ([tuple(int(v) for v in part.split(",")) for part in args.shapes.split(";")] if ";" in args.shapes
              or args.shapes[:1].isdigit() else [sh for name in args.shapes.split(",") for sh in SHAPE_SETS[name]])
    if args.chain:
        with torch.inference_mode():
            res = chain(args.kinds.split(","), args.layers,
                        tuple(int(d) for d in args.depths.split(",")) if args.depths else (2,), args.sweep,
                        args.chain_diag, args.chain_shapes,
                        tuple(int(d) for d in args.chain_diags.split(",")) if args.chain_diags else (),
                        args.chain_attn, args.chain_alt)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
        return
    results = {}
    t0 = time.time()
    with torch.inference_mode():
        for kind in args.kinds.split(","):
            bits = 4 if kind == "int4" else 8
            for n, k in shapes:
                torch.manual_seed(n + k)
                x = torch.randn(k, device="cuda", dtype=torch.bfloat16)
                if kind == "int4":
                    layer = Linear(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
                    st = int4_state(layer, 128, 8)
                    planes = int4_planes(k, 128)
                    words = pack_int4_planar(st["nibbles"], planes)
                    sz = st["scales_and_zeros"].view(torch.int32).reshape(k // 128, n)
                    ref = dequantize_int4(st["nibbles"], st["scales_and_zeros"], 128) @ x.float()
                    wref = None
                    nbytes = n * k // 2 + sz.numel() * 4
                else:
                    q = torch.randint(-128, 128, (n, k), device="cuda", dtype=torch.int8)
                    planes = int8_planes(k)
                    words = pack_int8_planar(q, planes)
                    sz = None
                    ref = q.float() @ x.float()
                    nbytes = n * k
                copies = max(2, math.ceil(400e6 / nbytes))
                words_ = [words] + [words.clone() for _ in range(copies - 1)]
                sz_ = [sz] + [(sz.clone() if sz is not None else None) for _ in range(copies - 1)]
                out = torch.empty(n, dtype=torch.bfloat16, device="cuda")
                scale = ref.abs().max().item()
                tol = 2 ** -7 * ref.abs() + 1e-5 * scale * 50 + 1e-3
                entry = {}
                # baselines: tinygemm (int4) and the Triton kernel at its tuned config
                if kind == "int4":
                    packed = torch.ops.aten._convert_weight_to_int4pack(st["nibbles"], 8)
                    packed_ = [packed] + [packed.clone() for _ in range(copies - 1)]
                    szt = st["scales_and_zeros"]
                    entry["tinygemm"] = graph_us([lambda i=i: torch.ops.aten._weight_int4pack_mm(
                        x.view(1, k), packed_[i], 128, szt) for i in range(copies)], repeats=9)
                tws = G.Workspace()
                if kind == "int4":
                    trit = [lambda i=i: G.int4_gemv(x, words_[i], sz_[i], 128, planes, out, tws,
                                                    dot=G.TUNED.get(("int4", n, k), G.TUNED[("int4", 4096, 4096)])[4])
                            for i in range(copies)]
                else:
                    trit = [lambda i=i: G.int8_gemv(x, words_[i], planes, out, tws,
                                                    dot=G.TUNED.get(("int8", n, k), G.TUNED[("int8", 4096, 4096)])[4])
                            for i in range(copies)]
                try:
                    entry["triton"] = graph_us(trit, repeats=9)
                except Exception as exc:  # noqa: BLE001 - a shape the Triton kernel does not take
                    print(f"{kind} {n}x{k}: the Triton kernel failed ({type(exc).__name__}: {exc})"[:300])
                    entry["triton"] = float("nan")
                depths = tuple(int(d) for d in args.depths.split(",")) if args.depths else None
                for cfg in configs(kind, args.quick, depths):
                    name = "cuda w%d s%d d%d%s" % (cfg[0], cfg[2], cfg[4], " c" if cfg[6] else "")
                    if cfg[2] > k // 128:
                        continue
                    try:
                        call = cuda_call(bits, x, words, sz, out, planes, cfg)
                        out.fill_(float("nan"))
                        call()
                        torch.cuda.synchronize()
                        wrong = check(out, ref, tol, name)
                        if wrong:
                            entry[name] = wrong
                            continue
                        calls = [cuda_call(bits, x, words_[i], sz_[i], out, planes, cfg) for i in range(copies)]
                        entry[name] = graph_us(calls, repeats=9)
                    except Exception as exc:  # noqa: BLE001 - one variant failing leaves the others
                        entry[name] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
                # several tokens at the best one-token config: 3 and 8 checked, 8 and 16 timed, against the
                # baselines at the same rows (tinygemm for int4; int8: the bytes as bf16 through cuBLAS, what
                # the layer's prompt path does)
                ok = sorted((v, name) for name, v in entry.items() if isinstance(v, float) and name.startswith("cuda w"))
                if ok:
                    best_name = ok[0][1]
                    cfg = next(c for c in configs(kind, args.quick, depths)
                               if "cuda w%d s%d d%d%s" % (c[0], c[2], c[4], " c" if c[6] else "") == best_name)
                    ws, lock = C.scratch(n, cfg, x.device)
                    tw_ = [C.tile_words(wd, planes) for wd in words_]
                    for m in (3, 8, 12, 16):
                        xm = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                        if kind == "int4":
                            refm = xm.float() @ dequantize_int4(st["nibbles"], st["scales_and_zeros"], 128).t()
                        else:
                            refm = xm.float() @ q.float().t()
                        outm = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
                        if kind == "int4":
                            run = [lambda i=i: C.call(4, xm, tw_[i], sz_[i], ws, lock, planes, cfg)
                                   for i in range(copies)]
                        else:
                            run = [lambda i=i: C.call(8, xm, tw_[i], None, ws, lock, planes, cfg) for i in range(copies)]
                        got = run[0]()
                        torch.cuda.synchronize()
                        tolm = 2 ** -7 * refm.abs() + 1e-5 * refm.abs().max().item() * 50 + 1e-3
                        wrong = check(got, refm, tolm, f"m{m}")
                        if wrong:
                            entry[f"cuda x{m}"] = wrong
                            continue
                        if m in (3, 12):
                            continue
                        entry[f"cuda x{m}"] = graph_us(run, repeats=9)
                        if kind == "int4":
                            entry[f"tinygemm x{m}"] = graph_us([lambda i=i: torch.ops.aten._weight_int4pack_mm(
                                xm, packed_[i], 128, szt) for i in range(copies)], repeats=9)
                        else:
                            entry[f"cublas(int8 as bf16) x{m}"] = graph_us([lambda i=i: torch.nn.functional.linear(
                                xm, words_[i].view(torch.int8).to(torch.bfloat16)) for i in range(min(copies, 4))],
                                repeats=9)
                    del tw_
                results[(kind, n, k)] = (nbytes, entry)
                best = min(top) if (top := [(v, name) for name, v in entry.items()
                                            if isinstance(v, float) and name.startswith("cuda w")]) else None
                base = entry.get("tinygemm", entry["triton"])
                print(f"{kind} {n}x{k}: triton {entry['triton']:.1f} us"
                      + (f", tinygemm {entry['tinygemm']:.1f}" if "tinygemm" in entry else "")
                      + (f", best cuda {best[0]:.1f} ({best[1]}) = {nbytes / best[0] / 1e6:.2f} TB/s, "
                         f"{base / best[0]:.2f}x" if best else ", no cuda config worked")
                      + f"  [{time.time() - t0:.0f} s]", flush=True)
                top = sorted((v, name) for name, v in entry.items() if isinstance(v, float) and name.startswith("cuda w"))
                print("   top:", ", ".join(f"{name} {v:.1f}" for v, name in top[:5]), flush=True)
                wrong = [f"  {name}: {v}" for name, v in entry.items() if isinstance(v, str)]
                if wrong:
                    print("\n".join(wrong[:6]), flush=True)
                print("   tokens:", ", ".join(f"{name} {v:.1f}" if isinstance(v, float) else f"{name} {v}"
                                             for name, v in entry.items() if " x" in name), flush=True)
                del words_, sz_
                packed_ = None
                torch.cuda.empty_cache()
    # the decode step (32 layers of each shape but the head)
    print("\n| kind | N × K | bytes (MB) | tinygemm | triton | best cuda | its config | TB/s |")
    print("|---|---|---|---|---|---|---|---|")
    step = {}
    tuned = {}
    for (kind, n, k), (nbytes, entry) in results.items():
        cuda = [(v, name) for name, v in entry.items() if isinstance(v, float) and name.startswith("cuda w")]
        best = min(cuda) if cuda else (float("nan"), "-")
        mult = 1 if n == 32000 else 32
        for key, v in (("tinygemm", entry.get("tinygemm")), ("triton", entry["triton"]), ("cuda", best[0])):
            if v is not None:
                step[(kind, key)] = step.get((kind, key), 0.0) + mult * v
        if cuda:
            parts = best[1].split()
            w, s, d = (int(p[1:]) for p in parts[1:4])
            tuned[(kind, n, k)] = (w, 1, s, kind == "int4", d, True, "c" in parts[4:], True)
        tg = entry.get("tinygemm")
        print(f"| {kind} | {n} × {k} | {nbytes / 1e6:.1f} | {tg:.1f} |" if tg else f"| {kind} | {n} × {k} | "
              f"{nbytes / 1e6:.1f} | – |", f"{entry['triton']:.1f} | {best[0]:.1f} | {best[1]} | "
              f"{nbytes / best[0] / 1e6:.2f} |")
    for (kind, key), v in sorted(step.items()):
        print(f"step {kind} {key}: {v:.0f} us")
    print("TUNED =", {f"{k[0]},{k[1]},{k[2]}": v for k, v in tuned.items()})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": [[list(key), nb, e] for key, (nb, e) in results.items()],
                       "step_us": {f"{a} {b}": v for (a, b), v in step.items()},
                       "tuned": {f"{k[0]},{k[1]},{k[2]}": v for k, v in tuned.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
