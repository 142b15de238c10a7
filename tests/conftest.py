"""Shared fixtures. The whole suite runs with the network forbidden: any socket that
connects (or sends) to a non-loopback address fails the test that opened it."""

from __future__ import annotations

import ipaddress
import os
import socket
import tempfile

import pytest

from localgpt.offline import enforce_offline

enforce_offline()
# The llama.cpp load guard remembers its checks under $XDG_CACHE_HOME: the suite (and its child
# processes) use a folder of their own, never the user's ~/.cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="localgpt-test-cache-")


class NetworkForbidden(AssertionError):
    pass


def _is_loopback(address) -> bool:
    if isinstance(address, (str, bytes)) and not isinstance(address, tuple):
        return True  # AF_UNIX path
    host = address[0]
    if isinstance(host, bytes):
        host = host.decode()
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        # A host name: resolving it would itself be network traffic.
        return False


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_sendto = socket.socket.sendto
_real_getaddrinfo = socket.getaddrinfo
_violations: list[str] = []


def _guard(address):
    if not _is_loopback(address):
        _violations.append(repr(address))
        raise NetworkForbidden(f"test tried to reach the network: {address!r}")


def _connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _guard(address)
    return _real_connect(self, address)


def _connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _guard(address)
    return _real_connect_ex(self, address)


def _sendto(self, *args):
    address = args[-1]
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _guard(address)
    return _real_sendto(self, *args)


def _getaddrinfo(host, *args, **kwargs):
    if host not in (None, "localhost") and not _is_loopback((host if isinstance(host, str) else host.decode(), 0)):
        _violations.append(f"getaddrinfo({host!r})")
        raise NetworkForbidden(f"test tried to resolve a host name: {host!r}")
    return _real_getaddrinfo(host, *args, **kwargs)


socket.socket.connect = _connect
socket.socket.connect_ex = _connect_ex
socket.socket.sendto = _sendto
socket.getaddrinfo = _getaddrinfo


@pytest.fixture(autouse=True)
def _no_network_violations():
    """Fail a test even when the code under test swallowed the NetworkForbidden error."""
    before = len(_violations)
    yield
    new = _violations[before:]
    assert not new, f"non-loopback network access: {new}"


@pytest.fixture
def network_probe():
    """For the test that proves the guard works: yields the violation list and forgives its entries."""
    before = len(_violations)
    yield _violations
    del _violations[before:]


@pytest.fixture
def subprocess_env(tmp_path):
    """Environment for child processes (CLI runs, servers): offline, and the same socket guard
    installed through sitecustomize so that children cannot reach the network either."""
    guard_dir = tmp_path / "_netguard"
    guard_dir.mkdir()
    (guard_dir / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(guard_dir), env.get("PYTHONPATH", "")]))
    env["LOCALGPT_NETGUARD_LOG"] = str(tmp_path / "_netguard.log")
    return env


_SITECUSTOMIZE = r'''
import ipaddress, os, socket
_log = os.environ.get("LOCALGPT_NETGUARD_LOG")
def _ok(address):
    if not isinstance(address, tuple):
        return True
    host = address[0]
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False
def _wrap(real):
    def inner(self, address, *a):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _ok(address):
            if _log:
                with open(_log, "a") as fh:
                    fh.write(repr(address) + "\n")
            raise OSError(f"network forbidden in tests: {address!r}")
        return real(self, address, *a)
    return inner
socket.socket.connect = _wrap(socket.socket.connect)
socket.socket.connect_ex = _wrap(socket.socket.connect_ex)
'''


def default_sigint() -> None:
    """``preexec_fn`` for a child that a test stops with Ctrl-C (SIGINT): a runner started in the
    background (``cmd &``) ignores SIGINT, children inherit that, and Python then installs no
    KeyboardInterrupt handler; restore the default so the child behaves as under a terminal."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_in_triton_interpreter(subprocess_env: dict, module: str, check: str, passed: str) -> None:
    """``check()`` of the test module ``module`` run by Triton's interpreter on the CPU, in a child process (the
    interpreter must be chosen before Triton is first imported, which this process may have done already):
    it exits 0 and prints ``passed``."""
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    env = subprocess_env | {"TRITON_INTERPRET": "1",
                            "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent), subprocess_env["PYTHONPATH"]])}
    done = subprocess.run([sys.executable, "-c", f"import {module} as t; t.{check}()"],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tests)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert passed in done.stdout


def ingested_collection(base, docs: dict[str, str], collection: str, **settings):
    """``docs`` (relative path -> text) written under ``base/docs`` and ingested into ``collection``
    in ``base/data`` with the default embedder: the real store that chain and retrieval tests query."""
    from ingest.pipeline import ingest_folder
    from localgpt.config import Settings

    folder = base / "docs"
    for name, text in docs.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    s = Settings(data_dir=base / "data", collection=collection, workers=1, **settings)
    report = ingest_folder(folder, s)
    assert not report.skipped, report.skipped
    return s


def interpreter_scalar_index():
    """Triton 3.6's interpreter turns a scalar tensor into an int with ``int(array of one element)`` (the kernels'
    ``range(first, last)``), which NumPy 2.4 made an error; read the one element instead."""
    import triton.runtime.interpreter as interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "scalar_index", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0])
                       if self.handle.data.size == 1 else int(self.handle.data))

    patched.scalar_index = True
    interpreter._patch_lang_tensor = patched
