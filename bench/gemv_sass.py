"""Instructions per weight of the decode GEMV kernels, from their SASS for sm_90, without a GPU.

Compiles a kernel of ``localgpt.generation.fast.gemv_triton`` with Triton's own ptxas (``triton.compile`` of an
``ASTSource`` for ``GPUTarget("cuda", 90, 32)``, pointers and sizes marked divisible by 16 as the JIT does for
Llama's shapes), disassembles it with the wheel's cuobjdump, takes the main loop (the longest backward branch)
and divides its instruction count by the weights one trip covers per thread. Usage:
``python bench/gemv_sass.py`` (every variant) or ``python bench/gemv_sass.py int4 int4-x2`` (some).
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from localgpt.generation.fast import gemv_triton as G  # noqa: E402

PTR = {"x_ptr": "*bf16", "w_ptr": "*i32", "sz_ptr": "*i32", "out_ptr": "*bf16", "ws_ptr": "*fp32",
       "lock_ptr": "*i32", "N": "i32", "K": "i32", "stride": "i32"}

# name: (kernel, constexprs, warps, weights a loop trip covers in all (BN rows x columns a trip))
VARIANTS = {
    "int4": (G._int4_gemv_kernel, {"GROUP": 128, "P": 32, "BN": 32, "SPLIT": 4}, 2, 32 * 32 * 8),
    "int8": (G._int8_gemv_kernel, {"P": 32, "BN": 32, "SPLIT": 4}, 2, 32 * 32 * 4),
    "bf16": (G._bf16_gemv_kernel, {"BK": 256, "BN": 16, "SPLIT": 1}, 4, 16 * 256),
}
for _name, _kernel, _cx in (
        ("int4-x2", "_int4_x2_kernel", {"GROUP": 128, "P": 16, "ASM": True, "EXACT": False, "FULL": True}),
        ("int4-x2-exact", "_int4_x2_kernel", {"GROUP": 128, "P": 16, "ASM": True, "EXACT": True}),
        ("int4-x2-noasm", "_int4_x2_kernel", {"GROUP": 128, "P": 16, "ASM": False, "EXACT": False}),
        ("int8-x2", "_int8_x2_kernel", {"P": 32, "ASM": True, "FULL": True}),
        ("int8-x2-noasm", "_int8_x2_kernel", {"P": 32, "ASM": False})):
    if hasattr(G, _kernel):
        VARIANTS[_name] = (getattr(G, _kernel), _cx | {"BN": 32, "SPLIT": 4}, 2,
                           32 * _cx["P"] * (8 if "GROUP" in _cx else 4))


def sass(kernel, constexprs: dict, warps: int) -> str:
    names = kernel.arg_names
    types = PTR | ({"w_ptr": "*bf16"} if kernel is G._bf16_gemv_kernel else {})
    sig = {n: types.get(n, "constexpr") for n in names}
    for n in constexprs:
        sig[n] = "constexpr"
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n in PTR and sig[n] != "constexpr"}
    src = ASTSource(kernel, {n: sig[n] for n in names}, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout


def loop_body(text: str) -> list[str]:
    """The instructions of the longest loop (a backward branch's span)."""
    ins = [(int(m.group(1), 16), m.group(2)) for m in
           (re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line) for line in text.splitlines()) if m]
    best = (0, 0)
    for addr, op in ins:
        m = re.search(r"\bBRA\s+(?:`\()?0x([0-9a-f]+)", op)
        if m and int(m.group(1), 16) < addr and addr - int(m.group(1), 16) > best[1] - best[0]:
            best = (int(m.group(1), 16), addr)
    return [op for addr, op in ins if best[0] <= addr <= best[1]]


def report(name: str) -> dict:
    kernel, cx, warps, per_trip = VARIANTS[name]
    body = loop_body(sass(kernel, cx, warps))
    per_thread = per_trip / (32 * warps)
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", op).split()[0] for op in body)
    return {"name": name, "instructions": len(body), "weights_per_thread": per_thread,
            "per_weight": len(body) / per_thread, "ops": ops.most_common(12)}


if __name__ == "__main__":
    for name in sys.argv[1:] or list(VARIANTS):
        r = report(name)
        print(f"{name}: {r['instructions']} instructions a trip / {r['weights_per_thread']:.0f} weights a thread "
              f"= {r['per_weight']:.2f} a weight; {r['ops']}")
