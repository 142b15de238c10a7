"""GPU decode benchmark: transformers ``generate`` against localgpt's fast engine, same run, same GPU.

Random-weight models at the real shapes (Llama-2-7B, Falcon-7B, FalconMamba-7B) are built from their
configs straight on the GPU in bf16; no checkpoint is read. For each: time to first token at 512 /
2,048 / 8,192 prompt tokens, decode tokens/s (512-token prompt, 128 new tokens), peak GPU memory, and
the fraction of the memory-bandwidth limit reached (bytes a decode step must read / a measured
device copy rate). Checks the engine against transformers at the real shapes first (logits).
Prints a table; with --results, appends it to bench/RESULTS.md.

    python bench/gpu.py --models llama,falcon,falcon-mamba --variants bf16,int8,int4 \
        --results bench/RESULTS.md --commit $(git rev-parse --short HEAD)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localgpt.generation.fast.engine import Engine  # noqa: E402
from localgpt.generation.fast.generator import build_network  # noqa: E402
from localgpt.generation.fast.quantize import decode_kernels, quantize_model, use_bf16_gemv  # noqa: E402

import alt_chain  # noqa: E402  (bench/, this script's folder)

# switches at start (by name: mamba's, gemv_chain's), for the rows whose flags do not set them
SWITCH_DEFAULTS: dict = {}
# the boolean ones (module, name) and their row flags (on, off)
BOOL_SWITCHES = (("mamba", "RES_CHAIN", "mambares", "nomambares"), ("mamba", "JOIN", "mambajoin", "nomambajoin"),
                 ("mamba", "XPROJ_FOLD", "xfold", "noxfold"), ("gemv_chain", "CONV_PREFETCH", "convpf", "noconvpf"),
                 ("mamba", "FOLD_SUM", "foldsum", "nofoldsum"), ("slot_triton", "STEP_PDL", "steppdl", "nosteppdl"),
                 ("slot_triton", "STEP_PDL_MAMBA", "mambapdl", "nomambapdl"))
STEP_MIN_CACHE: dict = {}  # slot_triton.STEP_ATTENTION_MIN_CACHE's default, for the rows without "+stepattn"
ALT_CHAIN = {"mod": None}  # --alt-chain's gemv_chain module, for the "+alt" rows

PROMPTS = (512, 2048, 8192)
# "bf16": the generator's bf16 path (the Triton GEMV for one token where its load check passes, quantize.use_bf16_gemv;
# "bf16-gemv" the same, its name before round 23); "bf16-cublas": one token through cuBLAS (the bench's "bf16" until
# round 23, 0.74-0.76 where the generator's path gives 0.79-0.88)
VARIANTS = ("bf16", "bf16-gemv", "bf16-cublas", "int8-legacy", "int8-triton", "int8-cuda", "int8", "int4-legacy",
            "int4-triton", "int4", "nf4", "bnb-int8")
DECODE_PROMPT, DECODE_NEW = 512, 128
DECODE_CACHE = 0  # --decode-cache
SLOT_CACHE = 0  # --slot-cache


def configs(tiny: bool = False):
    from transformers import FalconConfig, FalconMambaConfig, LlamaConfig

    if tiny:  # a dry run of this script's logic (CPU is fine)
        return {
            "llama": ("tiny-llama", LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, vocab_size=512)),
            "falcon": ("tiny-falcon", FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                   multi_query=True, parallel_attn=True, bias=False, alibi=False,
                                                   new_decoder_architecture=False, vocab_size=512)),
            "falcon-mamba": ("tiny-falcon-mamba", FalconMambaConfig(hidden_size=64, num_hidden_layers=2, state_size=8,
                                                                    vocab_size=512, use_mambapy=False)),
            "falcon-40b": ("tiny-falcon-40b", FalconConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=8,
                                                           num_kv_heads=2, new_decoder_architecture=True,
                                                           parallel_attn=True, bias=False, alibi=False, vocab_size=512)),
        }
    return {
        "llama": ("Llama-2-7B", LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                            num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                            max_position_embeddings=4096, rms_norm_eps=1e-5)),
        "falcon": ("Falcon-7B", FalconConfig(hidden_size=4544, num_hidden_layers=32, num_attention_heads=71,
                                             multi_query=True, parallel_attn=True, new_decoder_architecture=False,
                                             alibi=False, bias=False, vocab_size=65024, max_position_embeddings=2048)),
        "falcon-mamba": ("FalconMamba-7B", FalconMambaConfig(hidden_size=4096, num_hidden_layers=64, state_size=16,
                                                             expand=2, conv_kernel=4, time_step_rank=256,
                                                             vocab_size=65024, use_mambapy=False)),
        # 41.8B parameters: 84 GB in bf16, so it needs an H200 (141 GB) for the bf16 reference and HF's bf16 run.
        "falcon-40b": ("Falcon-40B", FalconConfig(hidden_size=8192, num_hidden_layers=60, num_attention_heads=128,
                                                  num_kv_heads=8, new_decoder_architecture=True, parallel_attn=True,
                                                  alibi=False, bias=False, vocab_size=65024,
                                                  max_position_embeddings=2048)),
    }


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: only for --tiny dry runs of this script
CUDA = DEVICE == "cuda"


def sync_time() -> float:
    if CUDA:
        torch.cuda.synchronize()
    return time.perf_counter()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if CUDA else 0.0


def reset_peak() -> None:
    if CUDA:
        torch.cuda.reset_peak_memory_stats()


def free_cache() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def copy_bandwidth() -> float:
    """Device-to-device copy rate in bytes/s (read + write), the practical ceiling for decode."""
    a = torch.empty(2 * 2**30, dtype=torch.uint8, device=DEVICE)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(10):
        t0 = sync_time()
        b.copy_(a)
        times.append(sync_time() - t0)
    del a, b
    return 2 * 2 * 2**30 / statistics.median(times)


def decode_bytes(network, max_seq: int) -> int:
    """Bytes one decode step reads: every weight except the embedding table (one row), plus the KV cache. The
    GEMV kernels' split-K scratch (workspaces sized for a batch, arrival counters) is not weights: left out."""
    total = 0
    for name, t in list(network.named_parameters()) + list(network.named_buffers()):
        if name in ("embed", "cos", "sin") or name.endswith(("k_cache", "v_cache", "conv_state", "ssm_state")):
            continue
        if name.endswith(("gemv_ws", "gemv_lock", "cuda_ws", "cuda_lock")):
            continue
        total += t.numel() * t.element_size()
    if getattr(network, "kind", "") == "transformer":
        s = network.shape
        total += 2 * s.n_layers * s.n_kv_heads * max_seq * s.head_dim * network.dtype.itemsize
    return total


def random_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (n,), generator=g).tolist()


# --- transformers generate ---------------------------------------------------------------------------


def bench_hf(model, vocab: int, prompts, decode_new: int, log) -> dict:
    out: dict = {"ttft_ms": {}}

    def gen(n_prompt, n_new):
        ids = torch.tensor([random_ids(n_prompt, vocab)], device=DEVICE)
        t0 = sync_time()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                       do_sample=False, pad_token_id=0)
        return sync_time() - t0

    gen(512, 2)  # warm-up
    for n in prompts:
        out["ttft_ms"][n] = 1000 * gen(n, 1)
        log(f"  hf ttft {n}: {out['ttft_ms'][n]:.0f} ms")
    reset_peak()
    total = gen(DECODE_PROMPT, decode_new)
    first = out["ttft_ms"].get(DECODE_PROMPT, 0) / 1000 or gen(DECODE_PROMPT, 1)
    out["tok_s"] = (decode_new - 1) / (total - first)
    out["peak_gib"] = peak_gib()
    log(f"  hf decode: {out['tok_s']:.1f} tok/s, peak {out['peak_gib']:.1f} GiB")
    return out


# --- the engine ------------------------------------------------------------------------------------------


@torch.inference_mode()
def check_against_hf(hf, network, vocab: int, log) -> dict:
    """Prefill and one decode step of the engine (eager) against transformers' forward, same weights."""
    ids = torch.tensor([random_ids(64, vocab, seed=1)], device=DEVICE)
    ref = hf(ids).logits[0, -2:].float()
    network.setup_cache(128)
    eng = Engine(network, mode="eager", max_seq=128)
    got_prefill = network.prefill(ids[:, :-1])[0]
    got_step = network.step(ids[:, -1:], torch.tensor([63], device=DEVICE))[0]
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    res = {"prefill_rel_err": rel(got_prefill, ref[0]), "step_rel_err": rel(got_step, ref[1]),
           "prefill_argmax_equal": bool(got_prefill.argmax() == ref[0].argmax()),
           "step_argmax_equal": bool(got_step.argmax() == ref[1].argmax())}
    del eng
    log(f"  logits vs transformers: {res}")
    return res


def bench_engine(network, vocab: int, prompts, mode: str, log, *, decode_contexts=(DECODE_PROMPT,),
                 sampled: bool = True, profile: bool = False, fused: bool | None = None) -> dict:
    out: dict = {"ttft_ms": {}, "decode": {}}
    # TTFT: prefill (eager, flash attention / chunked scan) + the first token on the host.
    network.setup_cache(max(prompts) + 64)
    eng = Engine(network, mode="eager", max_seq=max(prompts) + 64)
    reset_peak()
    with torch.inference_mode():
        for _ in range(2):
            next(eng.generate(random_ids(min(256, max(prompts)), vocab), 1))
        for n in prompts:
            times = []
            for rep in range(3 if n <= 2048 else 2):
                ids = random_ids(n, vocab, seed=rep)
                t0 = sync_time()
                next(eng.generate(ids, 1))
                times.append(time.perf_counter() - t0)
            out["ttft_ms"][n] = 1000 * statistics.median(times)
            log(f"  engine ttft {n}: {out['ttft_ms'][n]:.1f} ms")
        # A prompt length never seen before, once: the per-shape costs (cuDNN SDPA plans, cuBLAS heuristics) that
        # the medians above hide (bench/gpu_notes.md, continuous batching).
        fresh = min(max(prompts), 1000) - 13
        t0 = sync_time()
        next(eng.generate(random_ids(fresh, vocab, seed=99), 1))
        out["ttft_fresh_length_ms"] = 1000 * (time.perf_counter() - t0)
        log(f"  engine ttft at a new length ({fresh}), first time: {out['ttft_fresh_length_ms']:.1f} ms")
    out["prompt_peak_gib"] = peak_gib()  # with a KV cache of max(prompts) + 64 positions
    log(f"  engine peak over the prompts: {out['prompt_peak_gib']:.2f} GiB (cache {max(prompts) + 64} positions)")
    del eng
    # Decode: a cache sized to the longest context measured, the compiled step, 128 new tokens.
    cache = max(decode_contexts) + DECODE_NEW + 64
    # --decode-cache: a longer cache (as the product sizes it: the context window), the limit still counting the
    # KV of the positions decoded (the step reads no more)
    network.setup_cache(max(cache, DECODE_CACHE))
    free_cache()
    eng = Engine(network, mode=mode, max_seq=max(cache, DECODE_CACHE), fused=fused)
    if DECODE_CACHE > cache:
        log(f"  decode cache: {DECODE_CACHE} positions")
    out["fused_step"] = eng.fused
    t0 = time.perf_counter()
    eng.warm_up(steps=4)
    out["compile_s"] = time.perf_counter() - t0
    log(f"  engine warm-up ({mode}, fused step {'on' if eng.fused else 'off'}): {out['compile_s']:.1f} s")
    reset_peak()
    for ctx in decode_contexts:
        per_token = []
        for rep in range(2):
            ids = random_ids(ctx, vocab, seed=10 + rep)
            t0 = sync_time()
            stamps = []
            for _ in eng.generate(ids, DECODE_NEW, sampled=False):
                stamps.append(time.perf_counter())
            per_token.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
        out["decode"][ctx] = 1 / min(per_token)
        log(f"  engine decode after {ctx} tokens: {out['decode'][ctx]:.1f} tok/s")
    out["tok_s"] = out["decode"][decode_contexts[0]]
    if profile and CUDA:
        try:
            out["profile"] = profile_step(eng, vocab, log)
        except Exception as exc:  # noqa: BLE001
            out["profile"] = {"error": repr(exc)}
            log(traceback.format_exc())
    if sampled:  # temperature + top-p on the device: a second compiled step, measured once per model
        eng.warm_up(sampled=True, steps=4)
        stamps = [time.perf_counter() for _ in eng.generate(random_ids(DECODE_PROMPT, vocab), DECODE_NEW,
                                                                 temperature=0.8, top_p=0.95)]
        out["tok_s_sampled"] = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    out["peak_gib"] = peak_gib()
    out["bytes_per_token"] = decode_bytes(network, cache)
    sampled_note = f"{out['tok_s_sampled']:.1f} tok/s" if "tok_s_sampled" in out else "not measured"
    log(f"  engine sampled: {sampled_note}; peak {out['peak_gib']:.2f} GiB")
    del eng
    return out


def exposed_times(spans: list, steps: int) -> dict:
    """The kernels' (name, start, end) spans (us) on one stream, as a timeline: by name, the time a step by which
    each kernel ends later than every kernel that started before it (with dependent launches the durations
    overlap; these do not), and "(idle)": no kernel running. They add up to the spans' first start to last end, so
    a kernel's share is its cost on the critical path: a kernel that ends while the one before it runs costs 0."""
    out: dict = {"(idle)": 0.0}
    last = None
    for name, start, end in sorted(spans, key=lambda s: (s[1], s[2])):
        last = start if last is None else last
        out["(idle)"] += max(0.0, start - last)
        out[name] = out.get(name, 0.0) + max(0.0, end - max(last, start))
        last = max(last, end)
    return {name: t / steps for name, t in out.items()}


def time_and_profile(step, steps: int) -> tuple[float, dict]:
    """``step()`` (warmed up already) called ``steps`` times: its wall time a call in us, then under
    torch.profiler each CUDA kernel's self time (us) and calls a call, by kernel name, and its exposed time
    (``exposed_times``: its share of the timeline, "exposed_us_per_step")."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    t0 = sync_time()
    for _ in range(steps):
        step()
    wall_us = (sync_time() - t0) / steps * 1e6
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels: dict = {}
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", None)
        if t is None:
            t = getattr(ev, "self_cuda_time_total", 0)
        if t > 0:
            kernels[ev.key] = {"us_per_step": t / steps, "calls_per_step": ev.count / steps}
    spans = [(ev.name, ev.time_range.start, ev.time_range.end) for ev in prof.events()
             if ev.device_type == DeviceType.CUDA and ev.time_range.end > ev.time_range.start]
    for name, us in exposed_times(spans, steps).items():
        kernels.setdefault(name, {"us_per_step": 0.0, "calls_per_step": 0.0})["exposed_us_per_step"] = us
    return wall_us, kernels


@torch.inference_mode()
def profile_step(eng, vocab: int, log, steps: int = 16) -> dict:
    """Kernels of one decode step (the compiled CUDA graph replayed): time per step by kernel, against the
    step's wall time; the difference is launch gaps and host time."""
    step = eng._step_fn(False)
    eng._prefill(random_ids(DECODE_PROMPT, vocab), False)
    for _ in range(4):
        eng._advance(step)
    wall_us, kernels = time_and_profile(lambda: eng._advance(step), steps)
    idle = kernels.pop("(idle)", {}).get("exposed_us_per_step", 0.0)
    total = sum(k["us_per_step"] for k in kernels.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1]["us_per_step"])
    log(f"  profile: step {wall_us:.0f} us wall, kernels {total:.0f} us ({len(kernels)} kinds), "
        f"gaps/host {wall_us - total:.0f} us, no kernel running {idle:.0f} us")
    log("    duration us  exposed us  calls  kernel (exposed: its share of the step's timeline, durations "
        "overlap)")
    for name, k in top[:16]:
        log(f"    {k['us_per_step']:11.1f}  {k.get('exposed_us_per_step', 0.0):10.1f}  x{k['calls_per_step']:5.1f}  "
            f"{name[:100]}")
    return {"wall_us": wall_us, "kernel_us": total, "idle_us": idle, "kernels": dict(top[:40])}


def graph_us(calls, repeats: int = 7) -> float:
    """Median µs per call of ``calls`` captured in one CUDA graph (run once first: compile / warm)."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / len(calls))
    del g
    return statistics.median(times)


# --gemv-shapes: the networks' bf16 layer shapes (N, K); int4 / int8 sweep only shapes of whole 128-column groups
GEMV_SHAPES = {"llama": [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (32000, 4096)],
               "falcon": [(4672, 4544), (4544, 4544), (18176, 4544), (4544, 18176), (65024, 4544)],
               "falcon-mamba": [(16384, 4096), (288, 8192), (8192, 256), (4096, 8192), (65024, 4096)]}


def bench_gemv(log, kinds_wanted=("int4", "int8", "bf16"), kernels_wanted=("x2", "fma"),
               shape_sets=("llama",)) -> dict:
    """Triton GEMV kernels (int4 / int8 / bf16) at the networks' shapes (Llama-2-7B's unless told) against
    tinygemm and cuBLAS, over a sweep of (rows a program, split-K, warps; bf16 also columns a block); each timed as
    a CUDA graph of calls over enough weight copies that they stream from HBM (not L2). Sets gemv_triton.TUNED
    (and BF16_BK) to the fastest config per shape."""
    import math

    from localgpt.generation.fast import gemv_triton as G
    from localgpt.generation.fast.quantize import (
        dequantize_int4, int4_gemv_reference, int4_planes, int4_state, int8_planes, pack_int4_planar,
        pack_int8_planar,
    )
    from localgpt.generation.fast.transformer import Linear

    shapes = list(dict.fromkeys(s for name in shape_sets for s in GEMV_SHAPES[name]))
    # bf16: (rows a program, split-K, warps, columns a block)
    configs = [(bn, split, warps, bk) for bk in (64, 128, 256) for bn in (8, 16, 32) for split in (1, 2, 4)
               for warps in (2, 4)]
    # Quantised: (rows, split, warps, kernel code: G.FMA / G.DOT / G.X2). The FMA kernel at the config tuned in
    # round 2 (the tensor-core variant never won: only with "dot"); the bf16x2 kernel over a sweep.
    quant_configs = {"fma": None, "dot": [(bn, split, warps, G.DOT) for bn in (32, 64) for split in (1, 4)
                                          for warps in (2, 4)],
                     "x2": [(bn, split, warps, code) for code in (G.X2, G.X2_AHEAD) for bn in (32, 64, 128)
                            for split in (2, 4, 8, 16) for warps in (2, 4)]}
    res: dict = {}

    with torch.inference_mode():
        for n, k in shapes:
            torch.manual_seed(n + k)
            layer = Linear(torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * 0.02)
            x = torch.randn(k, device=DEVICE, dtype=torch.bfloat16)
            w = layer.weight.data.float()
            kinds = {"bf16": (2 * n * k, layer.weight.data, w @ x.float())}
            st = words4 = sz = packed = q8 = words8 = None
            if k % 128 == 0 and ({"int4", "int8"} & set(kinds_wanted)):
                st = int4_state(layer, 128, 8)
                planes = int4_planes(k, 128)
                words4 = pack_int4_planar(st["nibbles"], planes)
                sz = st["scales_and_zeros"].view(torch.int32).reshape(k // 128, n)
                packed = torch.ops.aten._convert_weight_to_int4pack(st["nibbles"], 8)
                scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
                q8 = torch.round(w / scales[:, None]).clamp(-128, 127).to(torch.int8)
                p8 = int8_planes(k)
                words8 = pack_int8_planar(q8, p8)
                kinds["int4"] = (n * k // 2 + sz.numel() * 4, words4,
                                 dequantize_int4(st["nibbles"], st["scales_and_zeros"], 128) @ x.float())
                kinds["int8"] = (n * k, words8, q8.float() @ x.float())
            del w
            for kind, (nbytes, weight, ref) in kinds.items():
                if kind not in kinds_wanted:
                    continue
                copies = max(2, math.ceil(400e6 / nbytes))
                ws_ = [weight] + [weight.clone() for _ in range(copies - 1)]
                sz_ = [sz] + [sz.clone() for _ in range(copies - 1)] if kind == "int4" else None
                out = torch.empty(n, dtype=torch.bfloat16, device=DEVICE)
                entry: dict = {"bytes": nbytes, "configs": {}}
                if kind == "int4":
                    pk = [packed] + [packed.clone() for _ in range(copies - 1)]
                    xm = x.view(1, k)
                    base = graph_us([lambda i=i: torch.ops.aten._weight_int4pack_mm(xm, pk[i], 128, sz_[i].view(
                        torch.bfloat16).reshape(k // 128, n, 2)) for i in range(copies)])
                    entry["tinygemm_us"] = base
                    del pk
                elif kind == "bf16":
                    xm = x.view(1, k)
                    entry["cublas_us"] = graph_us([lambda i=i: torch.nn.functional.linear(xm, ws_[i])
                                                   for i in range(copies)])
                if kind == "bf16":
                    sweep = configs
                    # the engine's config before this sweep (TUNED or the shape rule, BF16_BK or the K rule)
                    default = tuple(G._config("bf16", n, k, G._sms(x.device))[:3]) + (G.bf16_block(n, k),)
                    sweep = sweep + [default] * (default not in sweep)
                    default_cfg = str(default)
                else:
                    tuned = G.FMA_TUNED.get((kind, n, k))
                    sweep = [c for name in kernels_wanted for c in (quant_configs[name] or (
                        [tuple(tuned[:3]) + (G.FMA,)] if tuned else [(32, 4, 2, G.FMA)]))]
                for cfg in sweep:
                    scratch_ = G.Workspace()
                    try:
                        if kind == "int4":
                            call = lambda i, c=cfg: G.int4_gemv(x, ws_[i], sz_[i], 128, planes, out, scratch_, c[:3] + (1,), dot=c[3])  # noqa: E731
                        elif kind == "int8":
                            call = lambda i, c=cfg: G.int8_gemv(x, ws_[i], p8, out, scratch_, c[:3] + (1,), dot=c[3])  # noqa: E731
                        else:
                            call = lambda i, c=cfg: G.bf16_gemv(x, ws_[i], out, scratch_, c[:3] + (1,), bk=c[3])  # noqa: E731
                        out.fill_(float("nan"))
                        call(0)
                        err = ((out.float() - ref).norm() / ref.norm()).item()
                        us = graph_us([lambda i=i: call(i) for i in range(copies)])
                        call(1)
                        err = max(err, ((out.float() - ref).norm() / ref.norm()).item())
                        entry["configs"][str(cfg)] = {"us": us, "tb_s": nbytes / us / 1e6, "rel_err": err}
                    except Exception as exc:  # noqa: BLE001
                        entry["configs"][str(cfg)] = {"error": repr(exc)[:300]}
                good = {c: v for c, v in entry["configs"].items() if "us" in v and v["rel_err"] < 1e-2}
                if good:
                    best = min(good, key=lambda c: good[c]["us"])
                    entry["best"] = best
                    tuned = tuple(eval(best))  # noqa: S307 - our own tuple's repr
                    if kind == "bf16":
                        G.TUNED[(kind, n, k)] = tuned[:3] + (1,)
                        G.BF16_BK[(n, k)] = tuned[3]
                    else:
                        G.TUNED[(kind, n, k)] = tuned[:3] + (1,) + tuned[3:]
                    b = good[best]
                    for codes, label in (((G.FMA,), "fma"), ((G.X2, G.X2_AHEAD), "x2")):
                        mine = {c: v for c, v in good.items() if kind != "bf16" and eval(c)[3] in codes}  # noqa: S307
                        if mine:
                            c = min(mine, key=lambda c: mine[c]["us"])
                            entry[f"best_{label}"] = c
                            log(f"  gemv {kind} {n}x{k} {label}: {c} {mine[c]['us']:.1f} us = {mine[c]['tb_s']:.2f} TB/s")
                    if kind == "bf16" and default_cfg in good:
                        entry["default"] = default_cfg
                        d = good[default_cfg]
                        log(f"  gemv bf16 {n}x{k} default {default_cfg}: {d['us']:.1f} us = {d['tb_s']:.2f} TB/s")
                    base = entry.get("tinygemm_us") or entry.get("cublas_us")
                    log(f"  gemv {kind} {n}x{k}: best {best} {b['us']:.1f} us = {b['tb_s']:.2f} TB/s "
                        f"(err {b['rel_err']:.1e})" + (f"; baseline {base:.1f} us = {nbytes / base / 1e6:.2f} TB/s"
                                                        if base else ""))
                else:
                    log(f"  gemv {kind} {n}x{k}: no config passed: {list(entry['configs'].values())[:2]}")
                res[f"{kind} {n}x{k}"] = entry
                del ws_, sz_
                free_cache()
            del layer, st, words4, words8, packed, q8
            free_cache()
    log("  TUNED = " + repr(G.TUNED))
    log("  BF16_BK = " + repr(G.BF16_BK))
    return res


def time_ms(fn, reps: int = 20) -> float:
    """Median milliseconds of ``fn()`` on the GPU (events around each call, after warm-up)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@torch.inference_mode()
def bench_int4_rows(log, out_features: int = 22016, in_features: int = 4096) -> dict:
    """One int4 layer (Llama-2-7B's fused gate/up): tinygemm against dequantise + cuBLAS, by rows."""
    from localgpt.generation.fast.quantize import Int4Linear, int4_state
    from localgpt.generation.fast.transformer import Linear

    layer = Linear(torch.randn(out_features, in_features, device=DEVICE, dtype=torch.bfloat16) * 0.02)
    int4 = Int4Linear.from_state(int4_state(layer, 128, 8), DEVICE)
    dense = layer.weight.data
    res: dict = {"shape": [out_features, in_features], "dequant": {}}
    for kernel in ("gather", "tile"):
        try:
            ms = time_ms(lambda: int4.dequantize_packed(kernel))
        except Exception as exc:  # noqa: BLE001
            res["dequant"][kernel] = {"error": repr(exc)}
            log(f"  int4 dequant kernel {kernel}: {exc!r}")
            continue
        res["dequant"][kernel] = {"ms": ms, "tb_s": out_features * in_features * 2.5 / ms / 1e9}
        log(f"  int4 dequant ({kernel}) {out_features}x{in_features}: {ms:.3f} ms "
            f"({res['dequant'][kernel]['tb_s']:.2f} TB/s counting 0.5 B read + 2 B written per weight)")
    res["rows"] = {}
    for m in (1, 16, 32, 64, 128, 512, 2048):
        x = torch.randn(m, in_features, device=DEVICE, dtype=torch.bfloat16)
        tiny = time_ms(lambda: torch.ops.aten._weight_int4pack_mm(x, int4.packed, 128, int4.scales_and_zeros))
        deq = time_ms(lambda: torch.nn.functional.linear(x, int4.dequantize_packed()))
        bf16 = time_ms(lambda: torch.nn.functional.linear(x, dense))
        res["rows"][m] = {"tinygemm_ms": tiny, "dequant_cublas_ms": deq, "bf16_cublas_ms": bf16}
        log(f"  int4 rows {m:5d}: tinygemm {tiny:.3f} ms, dequant+cuBLAS {deq:.3f} ms, bf16 cuBLAS {bf16:.3f} ms")
    del layer, int4, dense
    free_cache()
    return res


# --- many streams: continuous batching (batch.BatchEngine) against HF generate on the same padded batch ----------

CONC_NEW = 128  # new tokens per stream
CONC_PROMPTS = (128, 512)  # prompt lengths drawn uniformly in this range, one per stream


def conc_prompts(c: int, vocab: int) -> list[list[int]]:
    import random

    rng = random.Random(c)
    return [random_ids(rng.randint(*CONC_PROMPTS), vocab, seed=100 + i) for i in range(c)]


def pct(values, q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))] if v else float("nan")


@torch.inference_mode()
def bench_hf_batch(model, vocab: int, levels, log, new: int) -> dict:
    """HF generate, greedy, the same prompts left-padded into one batch; per-stream ITL = (total - TTFT) / (new - 1)."""
    out = {}
    for c in levels:
        asks = conc_prompts(c, vocab)
        width = max(map(len, asks))
        ids = torch.tensor([[0] * (width - len(a)) + a for a in asks], device=DEVICE)
        mask = torch.tensor([[0] * (width - len(a)) + [1] * len(a) for a in asks], device=DEVICE)

        def gen(n):
            t0 = sync_time()
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)
            return sync_time() - t0

        gen(2)
        ttft = gen(1)
        total = gen(new)
        itl = (total - ttft) / (new - 1)
        out[c] = {"aggregate_tok_s": c * new / total, "itl_ms_mean": 1000 * itl, "ttft_ms": 1000 * ttft,
                  "wall_s": total}
        log(f"  hf generate x{c}: {out[c]['aggregate_tok_s']:.1f} tok/s aggregate, ITL {1000 * itl:.1f} ms, "
            f"TTFT {1000 * ttft:.0f} ms")
    return out


@torch.inference_mode()
def profile_slots(batch, bucket: int, log, context: int = 384, steps: int = 16) -> dict:
    """Kernels of the bucket's captured decode step with every slot decoding at ``context`` (torch.profiler over
    graph replays): time per step by kernel against the step's wall time."""
    batch.tokens[:bucket].fill_(7)
    batch.positions[:bucket].fill_(context)
    step = batch._step_fn(bucket, False)
    for _ in range(3):
        step()
    wall_us, kernels = time_and_profile(step, steps)
    batch.positions.fill_(batch.max_seq)
    idle = kernels.pop("(idle)", {}).get("exposed_us_per_step", 0.0)
    total = sum(k["us_per_step"] for k in kernels.values())
    calls = sum(k["calls_per_step"] for k in kernels.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1]["us_per_step"])
    log(f"  profile x{bucket} at {context} positions: step {wall_us:.0f} us wall, kernels {total:.0f} us, "
        f"{calls:.0f} launches ({len(kernels)} kinds), no kernel running {idle:.0f} us")
    for name, k in top[:16]:
        log(f"    {k['us_per_step']:8.1f} us  x{k['calls_per_step']:5.1f}  {name[:110]}")
    return {"wall_us": wall_us, "kernel_us": total, "idle_us": idle, "launches": calls, "kernels": dict(top[:30])}


@torch.inference_mode()
def sweep_slot_attention(network, log, slots: int = 16, cache: int = 672, context: int = 384) -> dict:
    """slot_triton.decode_attention's (split, block_n, warps) at this network's heads: every slot at ``context``
    of a ``cache``-position slot cache (x1 and x``slots``); sets the fastest (summed) as the default."""
    import triton

    from localgpt.generation.fast import slot_triton

    s = network.shape
    k = torch.randn(slots, s.n_kv_heads, cache, s.head_dim, dtype=network.dtype, device=DEVICE)
    v = torch.randn_like(k)
    out: dict = {}
    wide: dict = {}  # the x``slots`` part alone
    narrow: dict = {}  # x1 alone
    configs = [(sp, n, w, dot) for sp in (32, 64, 128, 256) for n in (32, 64, 128) for w in (4, 8)
               for dot in (False, True) if n <= sp]
    for cfg in configs:
        total = 0.0
        for b in (1, slots):
            q = torch.randn(b, s.n_heads, s.head_dim, dtype=network.dtype, device=DEVICE)
            pos = torch.full((b,), context, dtype=torch.long, device=DEVICE)
            ms = triton.testing.do_bench(lambda: slot_triton.decode_attention(q, k, v, pos, cache - 1, cfg),
                                         warmup=10, rep=40, return_mode="median")
            total += ms
            if b == 1:
                narrow[str(cfg)] = 1000 * ms
        out[str(cfg)], wide[str(cfg)] = 1000 * total, 1000 * ms
    for name, times in ((f"x{slots}", wide), ("x1", narrow)):
        log(f"  slot attention sweep, {name} alone (us a layer): " + ", ".join(
            f"{c} {t:.1f}" for c, t in sorted(times.items(), key=lambda kv: kv[1])[:6]))
    best = min(out, key=out.get)
    split, block_n, warps, dot = eval(best)  # noqa: S307 - our own tuple's repr
    slot_triton.ATTENTION.update(split=split, block_n=block_n, warps=warps, dot=dot)
    per_layer = slots * (context + 1) * 2 * s.n_kv_heads * s.head_dim * network.dtype.itemsize
    log(f"  slot attention sweep (split, block_n, warps, dot; x1 + x{slots} at {context} positions, us a layer): "
        f"best {best} {out[best]:.1f} (x{slots} {wide[best]:.1f} us = {per_layer / wide[best] / 1e6:.2f} TB/s); "
        + ", ".join(f"{c} {t:.1f}" for c, t in sorted(out.items(), key=lambda kv: kv[1])[1:6])
        + f"; old default (256, 32, 4, False) {out.get(str((256, 32, 4, False)), 0):.1f}")
    del k, v
    return {"us": out, "x_slots_us": wide, "x1_us": narrow, "best": best}


@torch.inference_mode()
def bench_fresh_ttft(network, vocab: int, log) -> dict:
    """The batch-1 engine's prefill (eager) at prompt lengths it has never seen, each once, then again: the
    per-shape costs (attention plans, GEMM heuristics) that a median over repeats hides."""
    network.setup_cache(1100)
    eng = Engine(network, mode="eager", max_seq=1100)
    for n in (256, 300):
        next(eng.generate(random_ids(n, vocab), 1))
    out = {}
    for n in (987, 613, 1031):
        times = []
        for rep in range(2):
            t0 = sync_time()
            next(eng.generate(random_ids(n, vocab, seed=50 + rep), 1))
            times.append(1000 * (time.perf_counter() - t0))
        out[n] = {"first_ms": times[0], "again_ms": times[1]}
        log(f"  batch-1 TTFT at a new length {n}: first {times[0]:.1f} ms, again {times[1]:.1f} ms")
    del eng
    return out


@torch.inference_mode()
def time_prompt_passes(batch, vocab: int, log, reps: int = 10) -> dict:
    """GPU time of the fixed-shape prompt pass at each row count (graph replays, a chunk filling it, at position
    0 of slot 0; then the same chunk through the variable-shape eager pass, host and GPU): ms a pass."""
    out = {}
    for rows in batch.prompt_rows:
        ids = torch.tensor(random_ids(rows, vocab, seed=7), device=DEVICE)
        batch._prompt_in[:3] = torch.tensor([0, 0, rows])
        batch._prompt_in[3:3 + rows] = ids
        fn = batch._prompt_fn(rows)
        for _ in range(3):
            fn()
        t0 = sync_time()
        for _ in range(reps):
            fn()
        graph_ms = 1000 * (sync_time() - t0) / reps
        model = batch.model
        for _ in range(2):
            model.prefill_slots([(0, ids, 0)])
        t0 = sync_time()
        for _ in range(reps):
            model.prefill_slots([(0, ids, 0)])
        host_ms = 1000 * (time.perf_counter() - t0) / reps
        eager_ms = 1000 * (sync_time() - t0) / reps
        out[rows] = {"graph_ms": graph_ms, "eager_ms": eager_ms, "eager_host_ms": host_ms}
        log(f"  prompt pass of {rows} rows: graph {graph_ms:.2f} ms; the eager variable-shape pass {eager_ms:.2f} ms "
            f"({host_ms:.2f} ms of host time to queue it)")
    return out


def bench_batched(network, vocab: int, levels, log, new: int, kernels: str | None = None,
                  profile: bool = False, share: bool = False, shared_chunk: int = 2048, own_chunk: int | None = None,
                  prompt_passes: int | None = None, fixed: bool | None = None, one_shape: bool = False) -> dict:
    """The fast engine's continuous batching: c streams submitted together (prompts 128-512 tokens, prefilled in
    chunks between decode steps), each to ``new`` tokens. Aggregate tok/s over the whole run (prefill included),
    per-stream inter-token latency p50/p95 over every gap of every stream, and the decode rate of each stream."""
    from localgpt.generation.fast import slot_triton
    from localgpt.generation.fast.batch import BatchEngine

    # "fused": the fused kernels with step_attention for long caches (slot_triton.SLOT_STEP, the default);
    # "fused-old": with decode_attention at every cache length
    slot_triton.SLOT_STEP = kernels != "fused-old"
    kernels = "fused" if kernels == "fused-old" else kernels
    slots = max(levels)
    batch = BatchEngine(network, slots=slots, max_seq=max(CONC_PROMPTS[1] + new + 16, SLOT_CACHE),
                        prefill_chunk=shared_chunk if share else own_chunk,  # None: the engine's default
                        buckets=None if one_shape else tuple(levels), kernels=kernels, share_prefill=share,
                        prompt_passes=prompt_passes, fixed_prompts=None if share else fixed)
    warm = batch.warm_up()
    kernels = getattr(network, "slot_kernels", "eager")
    log(f"  batched engine: {slots} slots, buckets {batch.buckets}, {kernels} step kernels, prompt chunks of "
        f"{batch.prefill_chunk} tokens{' shared by requests' if share else ' a request'}"
        f"{f', fixed-shape passes of {batch.prompt_rows} rows' if batch.fixed_prompts else ''}, "
        f"{batch.prompt_passes} prompt passes a step at most, graphs captured in {warm:.1f} s")
    out: dict = {"capture_s": warm, "kernels": kernels, "share_prefill": share, "prefill_chunk": batch.prefill_chunk,
                 "fixed_prompts": batch.fixed_prompts, "prompt_rows": batch.prompt_rows,
                 "prompt_passes": batch.prompt_passes, "buckets": batch.buckets, "slot_cache": batch.max_seq,
                 "attention": ("step_attention" if kernels == "fused" and slot_triton.SLOT_STEP
                               and batch.max_seq > slot_triton.STEP_ATTENTION_MIN_CACHE else "decode_attention"
                               if kernels == "fused" else "eager")}
    for c in levels:
        asks = conc_prompts(c, vocab)
        batch.submit(asks[0], 4)  # one short request first: page in anything lazy
        batch.run()
        t0 = sync_time()
        reqs = [batch.submit(a, new) for a in asks]
        steps0, passes0 = batch.steps_run, batch.prompt_passes_run
        prefill0, decode0 = batch.prefill_s, batch.decode_s
        batch.run()
        wall = sync_time() - t0
        gaps = [b - a for r in reqs for a, b in zip(r.times, r.times[1:])]
        per_stream = [(len(r.times) - 1) / (r.times[-1] - r.times[0]) for r in reqs]
        res = {"aggregate_tok_s": c * new / wall, "wall_s": wall, "itl_ms_p50": 1000 * pct(gaps, 0.5),
               "itl_ms_p95": 1000 * pct(gaps, 0.95), "stream_tok_s_median": statistics.median(per_stream),
               "ttft_ms_p50": 1000 * pct([r.times[0] - t0 for r in reqs], 0.5),
               "ttft_ms_max": 1000 * max(r.times[0] - t0 for r in reqs), "decode_steps": batch.steps_run - steps0,
               "prompt_passes": batch.prompt_passes_run - passes0,
               "prefill_s": batch.prefill_s - prefill0, "decode_s": batch.decode_s - decode0}
        out[c] = res
        log(f"  batched x{c}: {res['aggregate_tok_s']:.1f} tok/s aggregate, ITL p50 {res['itl_ms_p50']:.2f} / p95 "
            f"{res['itl_ms_p95']:.2f} ms, stream {res['stream_tok_s_median']:.1f} tok/s, TTFT p50 "
            f"{res['ttft_ms_p50']:.0f} / max {res['ttft_ms_max']:.0f} ms, {res['decode_steps']} steps, "
            f"{res['prompt_passes']} prompt passes; host time in "
            f"prompt chunks {res['prefill_s']:.2f} s, in decode steps {res['decode_s']:.2f} s")
    # Greedy equality at the real shapes: stream 0 of the largest level alone, in the same engine and bucket
    # (one slot busy runs bucket 1, a different shape: compare its first tokens only, bf16 near ties flip).
    solo = batch.submit(asks[0], 16)
    batch.run()
    out["solo_first_tokens_equal"] = solo.tokens[:8] == reqs[0].tokens[:8]
    out["solo_first_difference"] = next((i for i, (a, b) in enumerate(zip(solo.tokens, reqs[0].tokens)) if a != b),
                                        None)
    log(f"  stream 0 alone vs in the batch of {c}, first 8 tokens equal: {out['solo_first_tokens_equal']} "
        f"(first difference at token {out['solo_first_difference']})")
    if CUDA and batch.fixed_prompts and batch.mode == "graph":
        try:
            out["prompt_pass_ms"] = time_prompt_passes(batch, vocab, log)
        except Exception as exc:  # noqa: BLE001
            out["prompt_pass_ms"] = {"error": repr(exc)}
            log(traceback.format_exc())
    if profile and CUDA:
        for bucket in [b for b in batch.buckets if b in (1, 16)]:
            try:
                out[f"profile_x{bucket}"] = profile_slots(batch, bucket, log)
            except Exception as exc:  # noqa: BLE001
                out[f"profile_x{bucket}"] = {"error": repr(exc)}
                log(traceback.format_exc())
    del batch
    free_cache()
    return out


def run_concurrency(args, log, results: dict, key: str = "llama") -> None:
    levels = [int(c) for c in args.concurrency.split(",")]
    label, cfg = configs(args.tiny)[key]
    vocab = cfg.vocab_size
    new = CONC_NEW if not args.tiny else 8
    name = "concurrency" if key == "llama" else f"concurrency-{key}"
    entry = results.setdefault(name, {"label": label, "levels": levels, "new_tokens": new,
                                      "prompts": list(CONC_PROMPTS)})
    hf = build_hf(cfg)
    if not args.skip_hf and key in args.concurrency_hf.split(","):
        try:
            entry["hf"] = bench_hf_batch(hf, vocab, levels, log, new)
        except Exception as exc:  # noqa: BLE001
            entry["hf"] = {"error": repr(exc)}
            log(traceback.format_exc())
        dump(results, args)
    variants = args.variants.split(",")
    for variant in variants:
        try:
            with torch.inference_mode():
                net = build_network(hf)
                base, _, decode = variant.partition("-")  # int4, int4-legacy (tinygemm), int8-triton, ...
                if base in ("int4", "int8"):
                    quantize_model(net, base, decode=decode or "auto")
                if CUDA and getattr(net, "kind", "") in ("transformer", "mamba"):
                    use_bf16_gemv(net)  # the bf16 layers' one-row path, as the generator sets it up
            free_cache()
            log(f"{label} {variant} batched: {torch.cuda.memory_allocated() / 2**30 if CUDA else 0:.2f} GiB on the GPU"
                + (f" ({decode_kernels(net)})" if variant != "bf16" else ""))
            if variant == variants[0] and CUDA and getattr(net, "kind", "") == "transformer":
                entry["fresh_ttft"] = bench_fresh_ttft(net, vocab, log)
                if "fused" in args.slot_kernels and args.attention_sweep:
                    try:
                        entry["attention_sweep"] = sweep_slot_attention(net, log)
                    except Exception as exc:  # noqa: BLE001
                        entry["attention_sweep"] = {"error": repr(exc)}
                        log(traceback.format_exc())
            step_kernels = args.slot_kernels.split(",") if getattr(net, "kind", "") == "transformer" else [None]
            fixed_opts = {"on": True, "off": False, "auto": None}
            runs = [(k, share == "on", chunk, passes, fixed_opts[fixed]) for k in step_kernels
                    for share in args.share_prefill.split(",")
                    for chunk in ([int(c) if c != "default" else None for c in args.own_chunk.split(",")]
                                  if share == "off" else [None])
                    for passes in [int(p) if p != "default" else None for p in args.prompt_passes.split(",")]
                    for fixed in (args.fixed_prompts.split(",") if share == "off" else ["auto"])]
            for run in runs:
                kernels, share, chunk, passes, fixed = run
                name = variant if run == runs[-1] else (f"{variant}/{kernels}/{'shared' if share else 'own'}/{chunk}"
                                                        f"/{passes}/{fixed}")
                try:
                    entry[name] = bench_batched(net, vocab, levels, log, new, kernels=kernels, profile=args.profile,
                                                share=share, shared_chunk=args.shared_chunk, own_chunk=chunk,
                                                prompt_passes=passes, fixed=fixed, one_shape=args.one_shape)
                except Exception as exc:  # noqa: BLE001
                    entry[name] = {"error": repr(exc)}
                    log(traceback.format_exc())
                free_cache()
                dump(results, args)
        except Exception as exc:  # noqa: BLE001
            entry[variant] = {"error": repr(exc)}
            log(traceback.format_exc())
        net = None
        free_cache()
        dump(results, args)
    del hf
    free_cache()


def concurrency_table(results: dict) -> str:
    # "decode phase" = streams / ITL p50: the aggregate rate of a step with every stream decoding (no prefill).
    rows = ["| engine | streams | aggregate tok/s (whole run) | decode phase tok/s | per-stream tok/s | "
            "ITL p50 / p95 ms | TTFT p50 / max ms |", "|---|---|---|---|---|---|---|"]
    for name, entry in results.items():
        if name.startswith("concurrency") and isinstance(entry, dict) and "levels" in entry:
            _concurrency_rows(entry, rows, prefix="" if name == "concurrency" else f"{entry['label']}: ")
    return "\n".join(rows) if len(rows) > 2 else ""


def _concurrency_rows(entry: dict, rows: list, prefix: str = "") -> None:
    hf = entry.get("hf", {})
    for c in entry["levels"]:
        h = hf.get(c) or hf.get(str(c))
        if h:
            rows.append(f"| {prefix}HF generate bf16 (padded batch) | {c} | {h['aggregate_tok_s']:.1f} | "
                        f"{1000 * c / h['itl_ms_mean']:.0f} | {1000 / h['itl_ms_mean']:.1f} | {h['itl_ms_mean']:.1f} (mean) | {h['ttft_ms']:.0f} (batch) |")
    for variant in [v for base in ("bf16", "int8", "int4") for v in entry if v.split("/")[0].split("-")[0] == base]:
        e = entry.get(variant)
        if not e:
            continue
        if "kernels" in e:
            if e.get("share_prefill"):
                prompts = f", prompts shared in {e['prefill_chunk']}-token passes"
            else:
                prompts = (f", own {e['prefill_chunk']}-token chunks"
                           + (" in fixed-shape graph passes" if e.get("fixed_prompts") else ", eager passes"))
            passes = e.get("prompt_passes", 1)
            attention = f", {e['attention']} over {e['slot_cache']}-position caches" if "attention" in e else ""
            variant = (f"{variant.split('/')[0]} ({e['kernels']} step{attention}{prompts}"
                       + (f", {passes} prompt passes a step" if passes > 1 else "")
                       + (", one decode shape" if e.get("buckets") and len(e["buckets"]) == 1 else "") + ")")
        if "error" in e:
            rows.append(f"| {prefix}fast batched {variant} | error: {e['error'][:80]} |")
            continue
        for c in entry["levels"]:
            r = e.get(c) or e.get(str(c))
            if r:
                rows.append(f"| {prefix}fast batched {variant} | {c} | {r['aggregate_tok_s']:.1f} | "
                            f"{1000 * c / r['itl_ms_p50']:.0f} | {r['stream_tok_s_median']:.1f} | {r['itl_ms_p50']:.2f} / {r['itl_ms_p95']:.2f} | "
                            f"{r['ttft_ms_p50']:.0f} / {r['ttft_ms_max']:.0f} |")


def to_bitsandbytes_nf4(model) -> None:
    """Swap the transformers model's linears (not lm_head) for bitsandbytes NF4 ones, as load_in_4bit would."""
    import bitsandbytes as bnb

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and name != "lm_head":
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                        compute_dtype=torch.bfloat16, quant_type="nf4", device="cpu")
                new.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                               compress_statistics=True)
                if child.bias is not None:
                    new.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, new.to(DEVICE))
                del child
    free_cache()


def build_hf(cfg):
    from transformers import AutoModelForCausalLM

    if cfg.model_type != "falcon_mamba":
        cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return model.eval()


def run_model(key: str, variants: list[str], args, log, results: dict) -> None:
    label, cfg = configs(args.tiny)[key]
    vocab = cfg.vocab_size
    entry = results.setdefault(key, {"label": label})
    t0 = time.perf_counter()
    hf = build_hf(cfg)
    log(f"{label}: built in {time.perf_counter() - t0:.1f} s")
    hf_prompts = [p for p in PROMPTS if p <= args.hf_max_prompt[key]]
    if not args.skip_hf:
        try:
            entry["hf"] = bench_hf(hf, vocab, hf_prompts, args.hf_new, log)
        except Exception as exc:  # noqa: BLE001 - keep the rest of the run
            entry["hf"] = {"error": repr(exc)}
            log(traceback.format_exc())
        dump(results, args)
    contexts = (1024, 16384) if key == "falcon-mamba" else (DECODE_PROMPT,)
    if args.tiny:
        contexts = (DECODE_PROMPT, 4 * DECODE_PROMPT) if key == "falcon-mamba" else (DECODE_PROMPT,)
    for i, name in enumerate(variants):
        # A name may end in "+plain" (the batch-1 step without the fused kernels: Engine(fused=False)), "+sep"
        # (the norms and silu·up as their own kernels, not in the GEMVs' prologues), "+nochain" (a launch a GEMV,
        # not gemv_chain's one a layer; "+nochain8": int8 layers not chained; "+ring": the chain's cp.async ring kernel,
        # not the bulk-copy one, on Hopper; "+attn" / "+noattn": the attention as every / no chain's first phase (default:
        # int8's, transformer.CHAIN_ATTN); "+nopdl": plain launches, not programmatic dependent ones (gemv_chain.PDL);
        # "+stepattn": step_attention at every cache length (slot_triton.STEP_ATTENTION_MIN_CACHE 0);
        # "+bf16" / "+int8f16": the chain's mma operands bf16 / fp16 for int8 only (default: fp16); "+nopad8": int8 inputs
        # not padded to whole 128-column blocks (LOCALGPT_INT8_PAD=0); "+alt": the chain of
        # --alt-chain's gemv_chain.py, for a same-call A/B; "+oldattn": the step's attention by rope_store +
        # decode_attention, not step_attention; "+nomerge": step_attention's parts combined by a second launch (or,
        # for short caches of one kv head a head, rope_store + decode_attention), not in its one launch;
        # "+noearly" / "+early2" (its rows asked for before the wait: none / two tiles), "+saSxBxW" (its shape);
        # "+nomambafused": Mamba / FalconMamba's step compiled, not through mamba_triton's kernels
        # (LOCALGPT_MAMBA_FUSED=0, with "@compile"); "+nomambachain": its fused step's in_proj / out_proj as their own
        # GEMV launches, not one-phase gemv_chain ones (LOCALGPT_MAMBA_CHAIN=0); "+xfold" / "+noxfold": x_proj
        # folded into its conv kernel or not (mamba.XPROJ_FOLD); "+mambares" / "+nomambares": the residual's add
        # and the norm in its chains or not (mamba.RES_CHAIN); "+mambajoin" / "+nomambajoin": a layer's out_proj
        # and the next in_proj in one chain launch or not (mamba.JOIN); "+mambaconv" / "+nomambaconv": the conv
        # step and x_proj in in_proj's chain or not (mamba.CONV_CHAIN), "+mambafold": x_proj folded into it
        # (CONV_CHAIN "fold"); "+nofalcongraph": Falcon's fused step compiled, not its graph step
        # (LOCALGPT_FALCON_GRAPH=0, with "@compile")),
        # and then "@graph" / "@compile" (that engine mode for this row instead of --mode).
        name_mode = name.partition("@")
        variant, *flags = name_mode[0].split("+")
        plain = "plain" in flags
        try:
            # Each variant is built from the transformers model's weights; the model itself waits in host
            # memory, so the GPU holds one variant at a time and its peak memory is its own.
            if i > 0:
                hf.to(DEVICE)
            mode = name_mode[2] or args.mode
            if variant == "nf4":  # the last variant: the transformers model itself becomes NF4
                to_bitsandbytes_nf4(hf)
                reset_peak()
                entry["hf-nf4"] = bench_hf(hf, vocab, [p for p in hf_prompts if p <= 2048], min(args.hf_new, 24), log)
                mode = "graph"
            with torch.inference_mode():
                net = build_network(hf)
                if i == 0:
                    try:
                        entry["check"] = check_against_hf(hf, net, vocab, log)
                    except Exception as exc:  # noqa: BLE001
                        entry["check"] = {"error": repr(exc)}
                        log(traceback.format_exc())
            if variant != "nf4":
                hf.to("cpu")
            free_cache()
            from localgpt.generation.fast import quantize

            base = variant.split("-")[0]
            kernels = ""
            if base in ("int8", "int4"):
                with torch.inference_mode():
                    decode = variant.split("-")[1] if "-" in variant else "auto"  # int4-legacy, int8-triton, ...
                    # int8 inputs padded to whole 128-column blocks unless "+nopad8" (LOCALGPT_INT8_PAD=0)
                    quantize.INT8_PAD = "nopad8" not in flags
                    quantize_model(net, base, decode=decode)
                free_cache()
                kernels = decode_kernels(net)
                log(f"  {variant} one-token layers run as: {kernels}")
                if base == "int4":
                    kinds = {m.prompt_kernel for m in net.modules() if hasattr(m, "prompt_kernel")}
                    entry["int4_prompt_path"] = ", ".join(sorted(f"dequant ({k}) + cuBLAS" if k else "tinygemm"
                                                                 for k in kinds)) or "cpu"
                    log(f"  int4 prompts run as: {entry['int4_prompt_path']}")
            elif variant in ("bf16", "bf16-gemv") and CUDA:
                with torch.inference_mode():
                    count = use_bf16_gemv(net)
                kernels = f"bf16 Triton GEMV ({count} layers)" if count else "cuBLAS (GEMV check failed)"
                log(f"  {variant}: {kernels}")
            log(f"{label} {variant}: {torch.cuda.memory_allocated() / 2**30 if CUDA else 0:.2f} GiB on the GPU")
            if mode == "default":
                from localgpt.generation.fast.generator import default_engine_mode

                mode = default_engine_mode(net, "cuda" if CUDA else "cpu", "torch")
            # "+alt": the chain from --alt-chain's gemv_chain.py (a git revision or a file) for this row
            with alt_chain.swapped(ALT_CHAIN["mod"] if "alt" in flags else None):
                from localgpt.generation.fast import gemv_chain, mamba, transformer

                quantize.PROLOGUE = "sep" not in flags
                transformer.CHAIN = "nochain" not in flags and "sep" not in flags
                # int8 chained unless "+nochain8"
                transformer.CHAIN_INT8 = "nochain8" not in flags
                gemv_chain.TMA = "ring" not in flags  # "+ring": the chain's cp.async ring kernel on Hopper too
                # "+nopdl": the chain and the attention's kernels as plain launches, not programmatic dependent ones
                gemv_chain.PDL = "nopdl" not in flags
                # "+xfwN": an XFOLD phase's tiles of conv channels weigh 1 + N / 100 (gemv_chain.XFOLD_WEIGHT)
                xfw = SWITCH_DEFAULTS.setdefault("XFOLD_WEIGHT", gemv_chain.XFOLD_WEIGHT)
                gemv_chain.XFOLD_WEIGHT = next((int(f[3:]) / 100 for f in flags if f.startswith("xfw")), xfw)
                from localgpt.generation.fast import slot_triton

                # "+stepattn": step_attention's one kernel (and the merge) at every cache length, not rope_store +
                # decode_attention up to STEP_ATTENTION_MIN_CACHE positions of a one-kv-head-a-head model
                min_cache = STEP_MIN_CACHE.setdefault("default", slot_triton.STEP_ATTENTION_MIN_CACHE)
                slot_triton.STEP_ATTENTION_MIN_CACHE = 0 if "stepattn" in flags else min_cache
                # "+attn": the attention as every chain's first phase, "+noattn": in none; else the default
                transformer.CHAIN_ATTN = "1" if "attn" in flags else "0" if "noattn" in flags else "auto"
                transformer.STEP_ATTN = "oldattn" not in flags  # "+oldattn": rope_store + decode_attention
                # "+nomerge": the step's attention as two launches (or rope_store + decode_attention's three for a
                # short cache, one kv head a head), not step_attention's one with its parts merged in it
                transformer.STEP_MERGE = "nomerge" not in flags
                # "+noearly" / "+early2": the merged kernel asks for no / two tiles' rows before the wait (default one)
                transformer.STEP_EARLY = 0 if "noearly" in flags else 2 if "early2" in flags else 1
                # "+saSxBxW": the merged step attention's (splits, block_n, warps), e.g. "+sa8x32x4"
                held_sa = dict(slot_triton.STEP_MERGE_ATTENTION)
                for f in flags:
                    if f.startswith("sa") and f[2:3].isdigit():
                        sp, bn, wp = (int(v) for v in f[2:].split("x"))
                        slot_triton.STEP_MERGE_ATTENTION.update(splits=sp, block_n=bn, warps=wp)
                mamba.FUSED = "nomambafused" not in flags  # "+nomambafused": Mamba's step compiled (@compile)
                # "+nomambachain": the fused Mamba step's in_proj / out_proj as the layers' own GEMV launches
                mamba.CHAIN = "nomambachain" not in flags
                # "+xfold" / "+noxfold" (mamba.XPROJ_FOLD), "+mambares" / "+nomambares" (RES_CHAIN), "+mambajoin" /
                # "+nomambajoin" (JOIN), "+convpf" / "+noconvpf" (gemv_chain.CONV_PREFETCH: a CONV phase's conv
                # rows asked into the L2 by the chain's producer), "+foldsum" / "+nofoldsum" (mamba.FOLD_SUM: the
                # fold's parts added by the conv kernel's last programs), "+steppdl" / "+nosteppdl" (slot_triton.STEP_PDL:
                # the step's norms, activations and bf16 GEMVs as dependent launches), "+mambapdl" / "+nomambapdl"
                # (slot_triton.STEP_PDL_MAMBA: Mamba's fused bf16 step all dependent launches): that switch on or
                # off, else its value at start;
                # "+mambaconv" / "+nomambaconv": CONV_CHAIN "1" or "0", "+mambafold": "fold", else its value at start
                for mod, attr, on, off in BOOL_SWITCHES:
                    mod = {"mamba": mamba, "gemv_chain": gemv_chain, "slot_triton": slot_triton}[mod]
                    start = SWITCH_DEFAULTS.setdefault(attr, getattr(mod, attr))
                    setattr(mod, attr, (on in flags or start) and off not in flags)
                conv = SWITCH_DEFAULTS.setdefault("CONV_CHAIN", mamba.CONV_CHAIN)
                mamba.CONV_CHAIN = ("1" if "mambaconv" in flags else "fold" if "mambafold" in flags
                                    else "0" if "nomambaconv" in flags else conv)
                transformer.FALCON_GRAPH = "nofalcongraph" not in flags  # "+nofalcongraph": compiled (@compile)
                # the chain's mma operands in fp16 (the default); "+bf16": in bf16; "+int8f16": fp16 for int8 only
                gemv_chain.F16_BITS = (8,) if "int8f16" in flags else () if "bf16" in flags else (4, 8)
                gemv_chain.F16 = bool(gemv_chain.F16_BITS)
                try:
                    entry[name] = bench_engine(net, vocab, PROMPTS, mode, log, decode_contexts=contexts,
                                               sampled=variant in args.sampled.split(",") and key == "llama",
                                               profile=args.profile, fused=False if plain else None)
                finally:
                    quantize.PROLOGUE = True
                    transformer.CHAIN, transformer.CHAIN_INT8 = True, True
                    gemv_chain.TMA = True
                    transformer.CHAIN_ATTN = "auto"
                    transformer.STEP_MERGE, transformer.STEP_EARLY = True, 1
                    mamba.CHAIN = True
                    slot_triton.STEP_MERGE_ATTENTION.update(held_sa)
            entry[name]["kernels"] = kernels + (f"; the step's GEMVs in gemv_chain ({net.chain_kernel}"
                                                  + (", attention in it)" if getattr(net._chain, "attn", False) else ")")
                                                  if getattr(net, "_chain", None) else "")
            if getattr(net, "chain_note", ""):
                log(f"  gemv_chain not used: {net.chain_note}")
            elif getattr(net, "chain_kernel", ""):
                log(f"  gemv_chain: the {net.chain_kernel} kernel")
            entry[name]["mode"] = mode
        except Exception as exc:  # noqa: BLE001 - keep the rest of the run
            entry[name] = {"error": repr(exc)}
            log(traceback.format_exc())
        net = None
        torch._dynamo.reset()
        free_cache()
        dump(results, args)
    del hf
    free_cache()


def dump(results: dict, args) -> None:
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_results.json").write_text(json.dumps(results, indent=1, default=str))


def table(results: dict) -> str:
    bw = results.get("copy_bandwidth_tb_s", 0.0)
    rows = ["| model | engine | TTFT 512 | TTFT 2k | TTFT 8k | decode tok/s | sampled tok/s | peak GiB | "
            "bandwidth limit tok/s | fraction | logits check |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    ms = lambda d, n: f"{d['ttft_ms'][n]:.0f} ms" if n in d.get("ttft_ms", {}) else "–"  # noqa: E731
    for key, entry in results.items():
        if not isinstance(entry, dict) or "label" not in entry:
            continue
        for hf_key, what in (("hf", "bf16"), ("hf-nf4", "bnb NF4")):
            hf = entry.get(hf_key)
            if hf and "error" not in hf:
                rows.append(f"| {entry['label']} | HF generate {what} | {ms(hf, 512)} | {ms(hf, 2048)} | {ms(hf, 8192)} | "
                            f"{hf['tok_s']:.1f} | – | {hf['peak_gib']:.1f} | | | |")
            elif hf:
                rows.append(f"| {entry['label']} | HF generate {what} | error: {hf['error'][:80]} |")
        check = entry.get("check", {})
        note = (f"prefill {check['prefill_rel_err']:.1e}, step {check['step_rel_err']:.1e}"
                if "prefill_rel_err" in check else "")
        names = [k for k in entry if isinstance(entry[k], dict) and k.partition("@")[0].split("+")[0] in VARIANTS]
        for variant in names:
            e = entry.get(variant)
            if not e:
                continue
            if "error" in e:
                rows.append(f"| {entry['label']} | fast {variant} | error: {e['error'][:80]} |")
                continue
            limit = bw * 1e12 / e["bytes_per_token"] if bw else 0
            # Sampled decode is measured only for the variants --sampled names: "–" elsewhere, never a made-up 0.
            sampled = f"{e['tok_s_sampled']:.1f}" if "tok_s_sampled" in e else "–"
            decode = " / ".join(f"{v:.0f} @{k}" for k, v in e["decode"].items()) if len(e["decode"]) > 1 \
                else f"{e['tok_s']:.1f}"
            rows.append(f"| {entry['label']} | fast {variant} | {ms(e, 512)} | {ms(e, 2048)} | {ms(e, 8192)} | "
                        f"{decode} | {sampled} | {e['peak_gib']:.2f} | {limit:.0f} | "
                        f"{e['tok_s'] / limit if limit else 0:.2f} | {note if variant == 'bf16' else ''}"
                        + (f" {e['kernels']}" if e.get("kernels") else "")
                        + (f" mode {e['mode']}, fused step {'on' if e.get('fused_step') else 'off'}"
                           if "mode" in e else "") + " |"
                        + (" (CUDA graph, bitsandbytes kernels)" if variant == "nf4" else ""))
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="llama,falcon,falcon-mamba")
    parser.add_argument("--variants", default="bf16,int8,int4")
    parser.add_argument("--mode", default="default", choices=["default", "compile", "graph"],
                        help="the engine's step: 'default' is what the engine picks (generator.default_engine_mode)")
    parser.add_argument("--hf-new", type=int, default=32, help="new tokens for HF generate's decode rate")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--sampled", default="bf16", help="variants whose sampled decode is measured too (llama)")
    parser.add_argument("--profile", action="store_true", help="profile one decode step of each variant")
    parser.add_argument("--gemv-sweep", action="store_true", help="tune the Triton GEMV kernels first (llama shapes)")
    parser.add_argument("--gemv-kinds", default="int4,int8,bf16")
    parser.add_argument("--gemv-shapes", default="llama", help="--gemv-sweep: the layer shapes of these networks "
                        "(llama, falcon, falcon-mamba; bf16 only where K is not a multiple of 128)")
    parser.add_argument("--gemv-kernels", default="x2,fma", help="quantised GEMV kernels to sweep: x2, fma, dot")
    parser.add_argument("--skip-int4-rows", action="store_true")
    parser.add_argument("--concurrency", default="", help="e.g. 1,4,16: continuous batching (llama) at these "
                        "stream counts against HF generate on the same padded batch; skips the batch-1 benches")
    parser.add_argument("--concurrency-models", default="llama", help="models for --concurrency (llama, falcon, "
                        "falcon-mamba)")
    parser.add_argument("--concurrency-hf", default="llama", help="models whose HF generate batch runs with "
                        "--concurrency (HF's FalconMamba has no fused kernels here: minutes a level)")
    parser.add_argument("--slot-kernels", default="eager,fused", help="--concurrency, Llama / Falcon: decode-step "
                        "kernels to measure, each a row (eager PyTorch, fused Triton: with step_attention for caches "
                        "over 1,024 positions, fused-old: with decode_attention at every length); the last is the "
                        "plain row")
    parser.add_argument("--share-prefill", default="off", help="--concurrency: off, on or off,on (each a row): "
                        "prompt chunks of several requests in one pass (BatchEngine share_prefill)")
    parser.add_argument("--shared-chunk", type=int, default=2048, help="prompt tokens a shared pass takes")
    parser.add_argument("--own-chunk", default="default", help="--concurrency: prompt tokens a request's own pass "
                        "takes (each value a row; default: the engine's)")
    parser.add_argument("--prompt-passes", default="default", help="--concurrency: prompt passes a scheduler step at "
                        "most (BatchEngine prompt_passes; each value a row; default: the engine's)")
    parser.add_argument("--fixed-prompts", default="auto", help="--concurrency: own-chunk passes at fixed shapes "
                        "in CUDA graphs: on, off (eager variable-shape passes), auto (the engine's default); "
                        "each value a row")
    parser.add_argument("--attention-sweep", action="store_true", help="--concurrency: sweep the slot decode "
                        "attention's shapes first and run with the fastest (was part of --profile before round 6)")
    parser.add_argument("--one-shape", action="store_true", help="--concurrency: decode at one shape (all slots, "
                        "the engine's and localgpt serve's default) instead of buckets of the levels")
    parser.add_argument("--prompts", default="", help="TTFT prompt lengths, e.g. 512,2048 (default 512,2048,8192)")
    parser.add_argument("--decode-prompt", type=int, default=0, help="prompt tokens before the decode runs (their "
                        "positions; default 512; with --decode-cache, late positions of a long cache)")
    parser.add_argument("--tiny", action="store_true", help="tiny configs and prompts: check the script, not speed")
    parser.add_argument("--decode-cache", type=int, default=0, help="KV-cache positions of the decode runs (default: "
                        "the positions decoded + 64; the product sizes it to the context window, e.g. 4096)")
    parser.add_argument("--slot-cache", type=int, default=0, help="--concurrency: positions of each slot's cache "
                        "(default: the longest prompt + the new tokens; the server sizes it to the context window)")
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--results", type=Path, help="append the table to this markdown file")
    parser.add_argument("--commit", default=os.environ.get("LOCALGPT_COMMIT", "unknown"))
    parser.add_argument("--alt-chain", default="", help='a git revision or file of gemv_chain.py: the rows of '
                                                        'variants with "+alt" run its chain (same-call A/B)')
    args = parser.parse_args()
    if args.alt_chain:
        ALT_CHAIN["mod"] = alt_chain.module_at(args.alt_chain)
    elif any("+alt" in v for v in args.variants.split(",")):
        parser.error('"+alt" rows need --alt-chain (a git revision or a gemv_chain.py file)')
    # HF's FalconMamba has no fused kernels here: its prompt loop is too slow for an 8k prompt in one call.
    args.hf_max_prompt = {"llama": 8192, "falcon": 8192, "falcon-mamba": 2048, "falcon-40b": 8192}

    import transformers

    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    logf = open(Path(args.out) / "gpu_log.txt", "a") if args.out else None

    def log(msg: str) -> None:
        print(msg, flush=True)
        if logf:
            logf.write(msg + "\n")
            logf.flush()

    global PROMPTS, DECODE_PROMPT, DECODE_NEW, DECODE_CACHE, SLOT_CACHE
    DECODE_CACHE, SLOT_CACHE = args.decode_cache, args.slot_cache
    DECODE_PROMPT = args.decode_prompt or DECODE_PROMPT
    if args.tiny:
        PROMPTS, DECODE_PROMPT, DECODE_NEW = (32, 64, 128), 32, 16
        args.hf_max_prompt = dict.fromkeys(args.hf_max_prompt, 128)
    elif args.prompts:
        PROMPTS = tuple(int(n) for n in args.prompts.split(","))
    results: dict = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "torch": torch.__version__,
                     "transformers": transformers.__version__, "commit": args.commit,
                     "date": datetime.date.today().isoformat(), "mode": args.mode}
    results["copy_bandwidth_tb_s"] = copy_bandwidth() / 1e12 if CUDA else 0.0
    log(f"{results['device']}, torch {results['torch']}, copy bandwidth {results['copy_bandwidth_tb_s']:.2f} TB/s")
    variants = args.variants.split(",")
    if args.concurrency:
        for key in filter(None, args.concurrency_models.split(",")):
            run_concurrency(args, log, results, key)
        text = (f"\n### Continuous batching vs transformers generate — {results['device']}, torch {results['torch']}, "
                f"{results['date']}, commit {results['commit']}\n\nReal shapes ({args.concurrency_models}), random weights; each stream a "
                f"prompt of {CONC_PROMPTS[0]}-{CONC_PROMPTS[1]} tokens and {CONC_NEW if not args.tiny else 8} "
                f"greedy new tokens, all submitted at once. Command: `python bench/gpu.py --concurrency "
                f"{args.concurrency} --concurrency-models {args.concurrency_models} --variants {args.variants}`\n\n"
                + concurrency_table(results))
        log(text)
        dump(results, args)
        if args.results:
            with open(args.results, "a", encoding="utf-8") as f:
                f.write(text + "\n")
        return
    if CUDA and args.gemv_sweep:
        try:
            results["gemv"] = bench_gemv(log, args.gemv_kinds.split(","), args.gemv_kernels.split(","),
                                         args.gemv_shapes.split(","))
        except Exception as exc:  # noqa: BLE001
            results["gemv"] = {"error": repr(exc)}
            log(traceback.format_exc())
        dump(results, args)
    if CUDA and "int4" in variants and "llama" in args.models.split(",") and not args.skip_int4_rows:
        try:
            results["int4_rows"] = bench_int4_rows(log)
        except Exception as exc:  # noqa: BLE001 - keep the rest of the run
            results["int4_rows"] = {"error": repr(exc)}
            log(traceback.format_exc())
    for key in filter(None, args.models.split(",")):
        all_variants = key in ("llama", "falcon-40b")
        run_model(key, variants if all_variants else [v for v in variants if v == "bf16"] or variants, args, log,
                  results)
    text = (f"\n### GPU decode engine vs transformers generate — {results['device']}, torch {results['torch']}, "
            f"transformers {results['transformers']}, {results['date']}, commit {results['commit']}\n\n"
            f"Batch 1, random weights at the real shapes, bf16 activations; decode = {DECODE_NEW} new tokens after a "
            f"{DECODE_PROMPT}-token prompt (FalconMamba: after 1k / 16k tokens); TTFT = prompt to first token on the "
            f"host. Bandwidth limit = measured copy rate {results['copy_bandwidth_tb_s']:.2f} TB/s / bytes a decode "
            f"step reads. Engine step mode: {args.mode}"
            + (" (the engine's own choice: each row says)" if args.mode == "default" else "") + ".\n"
            f"Command: `python bench/gpu.py --models {args.models} --variants {args.variants}`\n\n" + table(results))
    log(text)
    dump(results, args)
    if args.results:
        with open(args.results, "a", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
