"""Same-call A/B for ``gemv_chain``: another version of the module (a file, or a git revision's) loaded beside the
working tree's, and swapped in for some rows of a benchmark.

The GPU machines of a session move by 5-11 % between calls (bench/gpu_notes.md round 12), so a change to the chain
is judged against the code before it in the same call: ``bench/gemv_cuda.py --chain --chain-alt REV`` and
``bench/gpu.py --alt-chain REV --variants int4@graph,int4+alt@graph``. A revision's module runs with the working
tree's ``gemv_cuda`` (its helpers and launcher), so it compares changes to ``gemv_chain.py`` itself. The device
tool's machines get the working tree without ``.git``: give them a file (``git show REV:localgpt/generation/fast/
gemv_chain.py > ab_gemv_chain.py`` here, untracked and not ignored, so it travels), not a revision.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import types

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
NAME = "localgpt.generation.fast.gemv_chain"


def module_at(spec: str, name: str = "gemv_chain") -> types.ModuleType:
    """``localgpt/generation/fast/<name>.py`` from the file ``spec`` or as it is at git revision ``spec``, as a
    separate module object (its own kernel cache)."""
    if os.path.isfile(spec):
        path, temp = spec, False
    else:
        src = subprocess.run(["git", "show", f"{spec}:localgpt/generation/fast/{name}.py"], capture_output=True,
                             text=True, cwd=ROOT, check=True).stdout
        with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
            f.write(src)
        path, temp = f.name, True
    try:
        loader_spec = importlib.util.spec_from_file_location(f"{name}_alt", path)
        mod = importlib.util.module_from_spec(loader_spec)
        loader_spec.loader.exec_module(mod)
    finally:
        if temp:
            os.unlink(path)
    return mod


@contextlib.contextmanager
def swapped(mod: types.ModuleType | None):
    """``import``s of gemv_chain (the engine imports it where it builds the chain) get ``mod`` inside; None: as is."""
    if mod is None:
        yield
        return
    import localgpt.generation.fast as package

    before = sys.modules.get(NAME), getattr(package, "gemv_chain", None)
    sys.modules[NAME] = mod
    package.gemv_chain = mod
    try:
        yield
    finally:
        sys.modules[NAME] = before[0]
        package.gemv_chain = before[1]
