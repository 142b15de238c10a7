"""Walk a folder for ingestible files: recursive, symlink-loop safe, hidden folders skipped.

Yields every regular file with its stat, and a ``Skipped`` for what cannot be considered
(loops, broken links, unreadable folders). Never reads file contents.
"""

from __future__ import annotations

import os
import stat as stat_module
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


@dataclass
class Found:
    path: str  # absolute, symlinks kept as named
    size: int
    mtime_ns: int


@dataclass
class Skipped:
    path: str
    reason: str


def discover(root: Path) -> Iterator[Found | Skipped]:
    root = Path(os.path.abspath(root))
    if root.is_file():
        st = root.stat()
        yield Found(str(root), st.st_size, st.st_mtime_ns)
        return
    seen_dirs: set[tuple[int, int]] = set()
    yield from _walk(str(root), seen_dirs)


def _walk(folder: str, seen_dirs: set[tuple[int, int]]) -> Iterator[Found | Skipped]:
    try:
        st = os.stat(folder)
    except OSError as exc:
        yield Skipped(folder, f"cannot open folder: {exc.strerror or exc}")
        return
    key = (st.st_dev, st.st_ino)
    if key in seen_dirs:
        yield Skipped(folder, "symlink loop (folder already visited)")
        return
    seen_dirs.add(key)
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        yield Skipped(folder, f"cannot list folder: {exc.strerror or exc}")
        return
    for entry in entries:
        if entry.name.startswith((".", "~$")):
            continue  # hidden files, .git, Office lock files
        path = os.path.join(folder, entry.name)
        try:
            est = os.stat(path)  # follows symlinks
        except OSError as exc:
            reason = "broken symlink" if entry.is_symlink() else (exc.strerror or str(exc))
            if getattr(exc, "errno", None) == 40:  # ELOOP: a link that points at itself
                reason = "symlink loop"
            yield Skipped(path, reason)
            continue
        if stat_module.S_ISDIR(est.st_mode):
            yield from _walk(path, seen_dirs)
        elif stat_module.S_ISREG(est.st_mode):
            yield Found(path, est.st_size, est.st_mtime_ns)
        else:
            yield Skipped(path, "not a regular file")
