"""Decode speed of the embedded generator under different llama.cpp builds, measured in one run.

Why: install.sh builds llama.cpp for any x86-64 CPU (no -march=native, no AMX); this script shows
what that costs against builds that use more of this CPU. Each build is a llama-cpp-python wheel;
it is unpacked into its own folder and measured in a child process that imports it from there, so
the builds take turns on the same machine (rounds interleave them: machines are noisy).

    python bench/llama_builds.py --wheel avx2=path/to.whl --wheel avx512=other.whl [--rounds 3]
    python bench/llama_builds.py --build avx2 --build avx512 --build native    # pip builds each first

``--build NAME`` compiles llama-cpp-python with the CMake arguments of ``CONFIGS[NAME]`` (the
"portable" entry is what install.sh uses) and records how long the build took. Never touches the
network except pip's download of the llama-cpp-python source for ``--build``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
from bench.record import commit, publish  # noqa: E402
from localgpt.doctor import cpu_features  # noqa: E402

LLAMA_CPP_VERSION = "0.3.36"


def _portable_args() -> str:
    done = subprocess.run([str(ROOT / "install.sh"), "--llama-cmake-args"], capture_output=True, text=True, check=True)
    return done.stdout.strip()


CONFIGS = {
    "portable": None,  # install.sh's own arguments, read at run time
    "avx512": "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON "
              "-DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DLLAVA_BUILD=OFF",
    "native": "",  # pip's default: GGML_NATIVE on, multimodal tools built (the build that crashed on AMX)
}

CHILD = r"""
import json, sys, time
from llama_cpp import Llama, llama_print_system_info
path, n_new, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t = time.perf_counter()
llm = Llama(model_path=path, n_ctx=2048, n_threads=int(sys.argv[4]), n_threads_batch=int(sys.argv[4]), verbose=False)
load_s = time.perf_counter() - t
context = ("Employees may work from home two days a week after their first three months. Requests go to the "
           "team lead, who answers within five working days. Equipment for home work is lent by IT. ") * 8
decode, prefill = [], []
for rep in range(reps + 1):
    prompt = f"Run {rep}. Context: {context[:1500]}\nQuestion: explain the home working rules in detail.\nAnswer:"
    tokens = llm.tokenize(prompt.encode())
    llm.reset()
    out = 0
    t = time.perf_counter()
    for tok in llm.generate(tokens, top_k=1, temp=0.0):
        out += 1
        if out == 1:
            t_prefill = time.perf_counter() - t  # the prompt pass and the first token
            t = time.perf_counter()
        if out > n_new:
            break
    t_decode = time.perf_counter() - t
    out -= 1
    if rep:  # the first repetition warms caches
        prefill.append(len(tokens) / t_prefill); decode.append(out / t_decode)
print(json.dumps({"load_s": load_s, "decode": decode, "prefill": prefill,
                  "system": llama_print_system_info().decode()}))
"""


def _build(name: str, out: Path) -> tuple[Path, float]:
    args = _portable_args() if CONFIGS[name] is None else CONFIGS[name]
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-w", str(folder),
                    f"llama-cpp-python=={LLAMA_CPP_VERSION}"], check=True, env={**os.environ, "CMAKE_ARGS": args})
    seconds = time.perf_counter() - started
    (folder / "build.json").write_text(json.dumps({"cmake_args": args, "seconds": seconds}))
    return next(folder.glob("llama_cpp_python-*.whl")), seconds


def _unpack(wheel: Path, into: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(into)
    for lib in (into / "llama_cpp" / "lib").glob("*.so*"):
        lib.chmod(0o755)
    return into


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheel", action="append", default=[], metavar="NAME=PATH", help="a built wheel to measure")
    ap.add_argument("--build", action="append", default=[], choices=sorted(CONFIGS), help="build this config first")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="llama.cpp threads (default: every core this process may use)")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()

    from localgpt.generation.gguf import _cpu_threads, embedded_model_path

    model = embedded_model_path()
    threads = args.threads or _cpu_threads()
    builds: dict[str, dict] = {}
    out = HERE / "out" / "llama-builds"
    for name in args.build:
        wheel, seconds = _build(name, out)
        builds[name] = {"wheel": Path(wheel), "build_s": seconds}
    for spec in args.wheel:
        name, _, path = spec.partition("=")
        meta = Path(path).parent / "build.json"
        builds[name] = {"wheel": Path(path), "build_s": json.loads(meta.read_text())["seconds"] if meta.exists() else None}
    if not builds:
        ap.error("give --wheel NAME=PATH or --build NAME")

    with tempfile.TemporaryDirectory() as tmp:
        for name, build in builds.items():
            build["dir"] = _unpack(build["wheel"], Path(tmp) / name)
            build["decode"], build["prefill"] = [], []
        for _ in range(args.rounds):
            for name, build in builds.items():
                env = {**os.environ, "PYTHONPATH": str(build["dir"])}
                done = subprocess.run([sys.executable, "-c", CHILD, str(model), str(args.tokens), "2", str(threads)],
                                      capture_output=True, text=True, env=env)
                if done.returncode:
                    raise SystemExit(f"{name}: the child failed ({done.returncode}): {done.stderr[-800:]}")
                row = json.loads(done.stdout.strip().splitlines()[-1])
                build["decode"] += row["decode"]
                build["prefill"] += row["prefill"]
                build["system"] = row["system"]

    first = next(iter(builds))
    base = statistics.median(builds[first]["decode"])
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    lines = [f"### llama.cpp builds: decode speed of the embedded SmolLM2 — {date.today()} — commit {commit()} — "
             f"{cpu}, {threads} thread(s)",
             "",
             f"Command: `python {' '.join(['bench/llama_builds.py', *sys.argv[1:]])}`. {args.rounds} rounds, builds "
             f"interleaved, {args.tokens} new tokens greedy after a ~350-token prompt, 2 timed repetitions each round.",
             "",
             f"| build | decode tok/s (median) | best | vs {first} (median) | prefill tok/s (median) | build minutes | CPU features llama.cpp reports |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for name, build in builds.items():
        decode = statistics.median(build["decode"])
        features = " ".join(cpu_features(build["system"]))
        minutes = f"{build['build_s'] / 60:.1f}" if build["build_s"] else "—"
        lines.append(f"| {name} | {decode:.1f} | {max(build['decode']):.1f} | {decode / base:.2f} | {statistics.median(build['prefill']):.0f} | "
                     f"{minutes} | {features} |")
    publish(lines, record=not args.no_record)


if __name__ == "__main__":
    main()
