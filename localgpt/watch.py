"""Keep a collection ingested while a folder changes: one ingest, then an incremental ingest after
each burst of file events (``watchfiles``, debounced). Used by ``localgpt ingest --watch`` and
``localgpt serve --watch``.

Each run is the ordinary incremental ``ingest_folder`` (a stat per unchanged file), so a watched
folder gets the same crash safety and bad-file reports as a manual run, and a deleted file loses
its chunks. Never touches the network.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable

WAKE_MS = 250  # the watcher is in place once it first wakes; the first run starts then
DEBOUNCE_MS = 800  # events closer than this are one burst: an editor's save, a copied folder (setting watch_debounce_ms)


def relevant(folder: Path) -> Callable[[object, str], bool]:
    """watchfiles' filter: files that ``ingest.discover`` would consider (no hidden files or folders,
    no Office lock files, no partial uploads)."""
    root = os.path.abspath(folder)

    def accept(change, path: str) -> bool:
        rel = os.path.relpath(path, root) if os.path.isdir(root) else os.path.basename(path)
        return not any(part.startswith((".", "~$")) for part in Path(rel).parts)

    return accept


def watch_folder(
    folder: Path,
    ingest: Callable[[], object],
    *,
    on_report: Callable[[object, set], None],
    stop: threading.Event | None = None,
    debounce_ms: int = DEBOUNCE_MS,
) -> None:
    """Run ``ingest()`` now and after every burst of changes under ``folder``, handing each report
    (and the changes that caused it; empty for the first run) to ``on_report``. Returns when ``stop``
    is set; Ctrl-C raises KeyboardInterrupt between runs. A run that an interrupt cut short
    (``report.interrupted``) ends the watch.

    The folder is watched before the first run starts, so a file written while it runs (or just
    after) is picked up by the next one instead of waiting for some later event."""
    import watchfiles

    first = True
    for changes in watchfiles.watch(
        folder, watch_filter=relevant(folder), debounce=debounce_ms, stop_event=stop, raise_interrupt=True,
        yield_on_timeout=True, rust_timeout=WAKE_MS,
    ):
        if not changes and not first:
            continue  # a timeout: nothing happened
        report = ingest()
        on_report(report, set() if first else changes)
        first = False
        if getattr(report, "interrupted", False) or (stop is not None and stop.is_set()):
            return
