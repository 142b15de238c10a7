"""The persistent chain kernels' SASS for sm_90, without a GPU: registers, instructions, the multiply loop, and
whether a change compiles to the same code as a git revision.

``gemv_chain``'s kernels are CUDA C built by NVRTC at run time; this compiles the same sources with an NVRTC library
(PyTorch's CUDA wheels carry one; on a CPU-only machine ``pip install --target DIR nvidia-cuda-nvrtc`` and pass
``--nvrtc DIR/nvidia/cu13/lib/libnvrtc.so.13``) and disassembles them with the cuobjdump in Triton's wheel. The
multiply loop is the backward branch that spans the kernel's HMMA instructions (the consumer warps' stage loop).

    python bench/chain_sass.py                      # the default kernels: registers, stack, instructions, loop
    python bench/chain_sass.py --against HEAD       # the same kernels from HEAD's sources: same SASS or not
    python bench/chain_sass.py --diags 0,2,4,16,32 --against 0523a49

A refactoring that compiles to the same SASS for every kernel and DIAG variant needs no GPU run to keep its
timings (round 12 folded a phase's start that way); one that changes it does.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import glob
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import triton  # noqa: E402

from alt_chain import module_at  # noqa: E402
from localgpt.generation.fast import gemv_chain, gemv_cuda  # noqa: E402

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
# (bits, planes, consumer warps, depth, blocks a warp, bulk-copy, fp16 operands): the defaults of each kernel
KERNELS = [(4, 16, *gemv_chain.TMA_DEFAULTS[4], True, True), (4, 16, *gemv_chain.DEFAULTS[4], False, True),
           (8, 32, *gemv_chain.TMA_DEFAULTS[8], True, True), (8, 32, *gemv_chain.DEFAULTS[8], False, True),
           (8, 32, *gemv_chain.DEFAULTS[8], False, False), (4, 16, *gemv_chain.TMA_DEFAULTS_BF16[4], True, False),
           (4, 16, *gemv_chain.DEFAULTS[4], False, False),
           (4, 16, *gemv_chain.TMA_DEFAULTS_BF16[4], True, False, 1),  # Falcon's (EXTRA)
           (4, 16, *gemv_chain.TMA_DEFAULTS[4], True, True, 0, 1),
           (8, 32, *gemv_chain.TMA_DEFAULTS[8], True, True, 0, 1),
           (4, 16, *gemv_chain.TMA_DEFAULTS[4], True, True, 2),  # Mamba's out_proj with its residual (RES32)
           (8, 32, *gemv_chain.TMA_DEFAULTS[8], True, True, 2), (4, 16, *gemv_chain.DEFAULTS[4], False, True, 2),
           (4, 16, *gemv_chain.TMA_DEFAULTS[4], True, True, 6),  # and its in_proj's conv step (CONV)
           (8, 32, *gemv_chain.TMA_DEFAULTS[8], True, True, 6),
           (4, 16, *gemv_chain.TMA_DEFAULTS[4], True, True, 22),  # and x_proj folded into it (XFOLD)
           (8, 32, *gemv_chain.TMA_DEFAULTS[8], True, True, 22),
           (4, 16, *gemv_chain.TMA_DEFAULTS[4], True, True, 54),  # and its conv rows prefetched (CONV_PREFETCH)
           (8, 32, *gemv_chain.TMA_DEFAULTS[8], True, True, 54)]
# the two before those: with the attention phase (ATTN; a revision before ATTN has the attention in every kernel)


def nvrtc_library(path: str | None) -> ctypes.CDLL:
    if path:
        return ctypes.CDLL(path)
    try:
        return gemv_cuda._nvrtc()
    except RuntimeError:
        for found in glob.glob(os.path.join(sys.prefix, "lib", "python*", "site-packages", "nvidia", "cu*", "lib",
                                            "libnvrtc.so.*")):
            return ctypes.CDLL(found)
        raise SystemExit("no NVRTC here: pip install --target DIR nvidia-cuda-nvrtc, then --nvrtc "
                         "DIR/nvidia/cu13/lib/libnvrtc.so.13")


def sass(chain_mod, cuda_mod, kernel: tuple, diag: int, lib) -> tuple[str, list[str], str]:
    """(name, instructions without addresses and encodings, resource usage) of one kernel."""
    bits, planes, warps, depth, bpi, tma, f16, *ln = kernel
    chain_mod.DIAG = diag
    args = {"tma": tma}
    if len(ln) > 1 and ln[1] and "attn" in chain_mod.source.__code__.co_varnames:
        args["attn"] = True
    if ln and ln[0]:
        if "extra" not in chain_mod.source.__code__.co_varnames:
            raise ValueError("no such kernel at that revision (a parallel block's ln / gelu prologues)")
        args["extra"] = ln[0]
    if "f16" in chain_mod.source.__code__.co_varnames:
        args["f16"] = f16
    elif f16 or (tma and bits == 8):
        raise ValueError("no such kernel at that revision (fp16 operands, int8 bulk copies)")
    name, src = chain_mod.source(bits, planes, warps, depth, bits == 4, bpi, **args)
    # the revision's chain source carries its own copy of gemv_cuda's helpers only if built with its gemv_cuda
    if cuda_mod is not gemv_cuda:
        src = src.replace(gemv_cuda.HELPERS, cuda_mod.HELPERS)
    cubin = gemv_cuda.compile_cubin(src, name, "90", lib)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True).stdout
        res = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    ins = [re.sub(r"/\*[0-9a-f]+\*/", "", line).strip() for line in text.splitlines()
           if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line)]
    return name, ins, " ".join(re.findall(r"REG:\d+|STACK:\d+", res))


def loop_body(ins: list[str]) -> list[str]:
    """The instructions of the backward branch's span that holds the HMMAs (the multiply loop), or []."""
    hmma = [i for i, t in enumerate(ins) if "HMMA" in t]
    if not hmma:
        return []
    # instruction i sits at 16 i; a branch target is a byte address
    for i in range(hmma[-1], len(ins)):
        m = re.search(r"BRA (0x[0-9a-f]+)", ins[i])
        if m and int(m.group(1), 16) // 16 <= hmma[0]:
            return ins[int(m.group(1), 16) // 16:i + 1]
    return []


def opcode(t: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", t).split()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nvrtc", help="libnvrtc.so path (default: PyTorch's, or an nvidia-cuda-nvrtc wheel's)")
    parser.add_argument("--diags", default="0", help="DIAG values to compile each kernel with (e.g. 0,2,4,16,32)")
    parser.add_argument("--against", help="a git revision (or a gemv_chain.py file): compile its sources too, compare")
    parser.add_argument("--ops", type=int, default=8, help="the loop's most frequent opcodes to list")
    args = parser.parse_args()
    lib = nvrtc_library(args.nvrtc)
    old = None
    if args.against:
        cuda_old = gemv_cuda if os.path.isfile(args.against) else module_at(args.against, "gemv_cuda")
        old = (module_at(args.against), cuda_old)
    differ = 0
    for diag in (int(d) for d in args.diags.split(",")):
        for kernel in KERNELS:
            name, ins, res = sass(gemv_chain, gemv_cuda, kernel, diag, lib)
            body = loop_body(ins)
            ops = collections.Counter(opcode(t) for t in body).most_common(args.ops)
            line = f"{name}: {res}, {len(ins)} instructions, loop {len(body)}: " + ", ".join(
                f"{n} {op}" for op, n in ops)
            if old is not None:
                try:
                    _, before, _ = sass(*old, kernel, diag, lib)
                    same = before == ins
                    differ += not same
                    line += f" | against {args.against}: " + ("same SASS" if same else
                                                             f"DIFFERENT ({len(before)} instructions there, loop "
                                                             f"{len(loop_body(before))})")
                except Exception as exc:  # noqa: BLE001 - a kernel the revision does not have
                    line += f" | against {args.against}: {type(exc).__name__}: {str(exc)[:120]}"
            print(line, flush=True)
    gemv_chain.DIAG = 0
    if old is not None:
        print(f"{differ} kernel(s) compile to other SASS than at {args.against}")


if __name__ == "__main__":
    main()
