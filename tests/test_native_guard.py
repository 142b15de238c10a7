"""No native crash on a stranger's CPU: the llama.cpp build holds no AMX or AVX-512 code, it loads and
generates a token, and when a native library does crash (SIGILL) `ask`, `doctor` and the web page say so
in a sentence while `--extractive` answers still work.

The AMX crash cannot be reproduced without an AMX CPU; what stands in for it: the installed libraries
are disassembled (the bug's build held `tileloadd`), the scanner is shown to find AMX code in a library
compiled with it, and a stand-in llama_cpp package that dies with SIGILL exercises the guard."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from localgpt.doctor import amx_instructions, guard_llama_cpp, llama_cpp_lib_dir, run_probe
from localgpt.errors import NativeCrash
from localgpt.generation.gguf import embedded_model_path

x86_only = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 instruction checks")
needs_objdump = pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is not installed")

ILLEGAL_LLAMA_CPP = "import os, signal\nos.kill(os.getpid(), signal.SIGILL)  # a build made for another CPU\n"
DOCS = {"reactor.md": "# The alpha reactor\n\nThe alpha reactor runs at 42 degrees Celsius. It was built in Oslo in 1999.\n"}


def _libraries() -> list[Path]:
    lib = llama_cpp_lib_dir()
    assert lib is not None, "llama-cpp-python is not installed"
    seen, libs = set(), []
    for path in sorted(lib.glob("lib*.so*")):
        st = path.stat()
        if (st.st_ino, st.st_dev) not in seen and not path.is_symlink():
            seen.add((st.st_ino, st.st_dev))
            libs.append(path)
    assert any(p.name.startswith("libggml-cpu") for p in libs), libs
    return libs


@x86_only
@needs_objdump
def test_installed_llama_cpp_holds_no_amx_and_no_avx512_code():
    for library in _libraries():
        assert amx_instructions(library) == [], f"{library.name} holds AMX tile code: it faults on AMX Xeons"
        out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True,
                             check=True).stdout
        assert "%zmm" not in out, f"{library.name} uses AVX-512 registers: it cannot run on an AVX2-only CPU"


@x86_only
@needs_objdump
def test_the_amx_scanner_finds_tile_code_in_a_library_built_with_it(tmp_path):
    source = tmp_path / "tiles.c"
    source.write_text(
        "#include <immintrin.h>\n"
        "void load(const void *p) { _tile_loadd(0, p, 64); _tile_dpbssd(2, 0, 1); _tile_release(); }\n")
    library = tmp_path / "libtiles.so"
    built = subprocess.run(["gcc", "-O1", "-shared", "-fPIC", "-mamx-tile", "-mamx-int8", str(source), "-o", str(library)],
                           capture_output=True, text=True)
    if built.returncode:
        pytest.skip(f"this gcc cannot build AMX code: {built.stderr.strip()[:200]}")
    assert {"tileloadd", "tdpbssd", "tilerelease"} <= set(amx_instructions(library))


def test_llama_cpp_loads_and_generates_a_token_in_a_child_process():
    result = run_probe("gguf", str(embedded_model_path()), what="the llama.cpp build")
    assert result.ok, result.error
    assert result.data["token"].strip()
    if platform.machine() == "x86_64":
        assert "AMX" not in result.data["system_info"].replace("AMX_INT8 = 0", "")


@pytest.fixture
def crashing_llama_cpp(tmp_path, monkeypatch, subprocess_env):
    """A llama_cpp package that dies with SIGILL when imported, first on the path of this process and
    its children; a fresh check cache, so the guard does not trust an earlier success."""
    fake = tmp_path / "fake"
    (fake / "llama_cpp").mkdir(parents=True)
    (fake / "llama_cpp" / "__init__.py").write_text(ILLEGAL_LLAMA_CPP)
    env = dict(subprocess_env)
    env["PYTHONPATH"] = f"{fake}:{env['PYTHONPATH']}"
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    monkeypatch.setenv("PYTHONPATH", env["PYTHONPATH"])
    monkeypatch.setenv("XDG_CACHE_HOME", env["XDG_CACHE_HOME"])
    monkeypatch.syspath_prepend(str(fake))
    for name in [m for m in sys.modules if m == "llama_cpp" or m.startswith("llama_cpp.")]:
        monkeypatch.delitem(sys.modules, name)
    return env


def test_the_guard_turns_an_illegal_instruction_into_a_sentence_with_the_fix(crashing_llama_cpp):
    with pytest.raises(NativeCrash) as caught:
        guard_llama_cpp(embedded_model_path())
    message = str(caught.value)
    assert "illegal instruction" in message and "./install.sh" in message and "--extractive" in message


def test_guard_remembers_a_success_and_runs_no_child_next_time(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    guard_llama_cpp(embedded_model_path())
    cache = json.loads((tmp_path / "cache" / "localgpt" / "native-checks.json").read_text())
    assert len(cache) == 1
    monkeypatch.setattr("localgpt.doctor.run_probe", lambda *a, **k: pytest.fail("probed twice"))
    guard_llama_cpp(embedded_model_path())


def _cli(env, cwd, *args):
    return subprocess.run([sys.executable, "-m", "localgpt.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_ask_reports_a_crashing_llama_cpp_and_extractive_still_answers(tmp_path, crashing_llama_cpp):
    from conftest import ingested_collection

    settings = ingested_collection(tmp_path, DOCS, "guard")
    common = ["--data-dir", str(settings.data_dir), "--collection", "guard"]
    crashed = _cli(crashing_llama_cpp, tmp_path, "ask", "At what temperature does the alpha reactor run?", *common)
    assert crashed.returncode == 2, crashed.stderr
    assert "illegal instruction" in crashed.stderr and "Traceback" not in crashed.stderr
    assert "./install.sh" in crashed.stderr

    extractive = _cli(crashing_llama_cpp, tmp_path, "ask", "At what temperature does the alpha reactor run?",
                      *common, "--extractive", "--json")
    assert extractive.returncode == 0, extractive.stderr
    answer = json.loads(extractive.stdout)
    assert "42 degrees" in answer["answer"] and answer["sources"][0]["source"].endswith("reactor.md")


def test_doctor_says_what_is_wrong_with_a_crashing_build(tmp_path, crashing_llama_cpp):
    done = _cli(crashing_llama_cpp, tmp_path, "doctor", "--json", "--data-dir", str(tmp_path / "data"))
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    failed = {c["name"]: c for c in report["checks"] if c["status"] == "fail"}
    assert "illegal instruction" in failed["llama.cpp"]["detail"] and "install.sh" in failed["llama.cpp"]["fix"]
    passed = {c["name"] for c in report["checks"] if c["status"] == "ok"}
    assert {"Python", "torch", "embedder", "generator files"} <= passed


def test_doctor_passes_on_this_install(tmp_path, subprocess_env):
    done = _cli(subprocess_env, tmp_path, "doctor", "--data-dir", str(tmp_path / "data"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "one token generated" in done.stdout and "ready on this machine" in done.stdout


def test_the_web_page_reports_a_crashing_llama_cpp_in_words(tmp_path, crashing_llama_cpp, monkeypatch):
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    from conftest import ingested_collection

    settings = ingested_collection(tmp_path, DOCS, "default")
    monkeypatch.setenv("LOCALGPT_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("LOCALGPT_BACKEND", "auto")
    monkeypatch.chdir(tmp_path)
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "ui" / "app.py"), default_timeout=120)
    at.run()
    at.chat_input[0].set_value("At what temperature does the alpha reactor run?").run()
    assert not at.exception, at.exception
    message = at.chat_message[1].error[0].value
    assert "illegal instruction" in message and "Traceback" not in message
