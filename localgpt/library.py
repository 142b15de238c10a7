"""A collection's documents as people manage them: uploads saved safely into the collection's own
folder, the collections and their files listed, files removed, collections dropped.

The CLI, the web page and the HTTP server all call these, so the three behave the same. Never
touches the network; never writes outside ``<data_dir>/uploads/<collection>/`` except the store.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import unicodedata
import uuid
from pathlib import Path
from typing import Iterable

from localgpt.config import Settings
from localgpt.errors import LocalGPTError
from localgpt.store import Store, collection_names


# ------------------------------------------------------------------ uploads
class UploadRefused(LocalGPTError):
    """An uploaded file that is not saved: a name with a folder in it, a disallowed type, too large."""


def upload_folder(settings: Settings, collection: str | None = None) -> Path:
    """The collection's source folder: where uploads land and what the page ingests."""
    return Path(settings.data_dir).resolve() / "uploads" / (collection or settings.collection)


def clean_upload_name(name: str, allowed: Iterable[str]) -> str:
    """The name an upload is saved under, or ``UploadRefused`` saying why it cannot be.

    Names with a folder part are refused rather than trimmed: a browser never sends one, so
    ``../../etc/x.pdf`` is a crafted request, not a user's file.
    """
    shown = name if len(name) <= 80 else name[:79] + "…"
    name = unicodedata.normalize("NFC", name)
    if not name.strip():
        raise UploadRefused("a file without a name was refused")
    if "/" in name or "\\" in name or name in (".", "..") or ".." in Path(name).parts:
        raise UploadRefused(f"'{shown}' was refused: a file name may not contain a folder or '..'")
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name):
        raise UploadRefused(f"{shown!r} was refused: the name contains control characters")
    if name.startswith((".", "~$")):
        raise UploadRefused(f"'{shown}' was refused: hidden and temporary files are not ingested")
    if len(name.encode("utf-8")) > 200:
        raise UploadRefused(f"'{shown}' was refused: the name is longer than 200 bytes")
    ext = Path(name).suffix.lower()
    allowed = sorted(allowed)
    if ext not in allowed:
        raise UploadRefused(
            f"'{shown}' was refused: {'files of type ' + repr(ext) if ext else 'files without an extension'} "
            f"are not supported (allowed: {' '.join(allowed)})"
        )
    return name


def save_upload(folder: Path, name: str, data: bytes, *, allowed: Iterable[str], max_bytes: int) -> tuple[Path, str | None]:
    """Save one upload into ``folder`` without ever overwriting: returns the path and a note for the user.

    The same content under the same name is left as it is; a different file with a name already
    taken is saved as ``name (2).ext``. The file appears whole (written aside, then linked in),
    so an ingest running meanwhile never reads half of it.
    """
    name = clean_upload_name(name, allowed)
    if len(data) > max_bytes:
        mb = 1024 * 1024
        raise UploadRefused(f"'{name}' was refused: {len(data) / mb:.3g} MB is over the {max_bytes / mb:.3g} MB limit")
    folder.mkdir(parents=True, exist_ok=True)
    root = folder.resolve()
    digest = hashlib.sha256(data).hexdigest()
    stem, ext = Path(name).stem, Path(name).suffix
    tmp = root / f".upload-{uuid.uuid4().hex}.part"  # hidden: ingest never reads it
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
        for n in range(1, 1000):
            target = root / (name if n == 1 else f"{stem} ({n}){ext}")
            if target.parent != root:  # cannot happen after clean_upload_name; belt and braces
                raise UploadRefused(f"'{name}' was refused: it would land outside {root}")
            if os.path.lexists(target):
                if target.is_file() and not target.is_symlink() and _sha256_file(target) == digest:
                    return target, f"{target.name} is already in the collection with the same content"
                continue
            try:
                os.link(tmp, target)  # fails if the name was taken meanwhile: no overwrite, no race
            except FileExistsError:
                continue
            note = None if n == 1 else f"another file named {name} is already here, so this one was saved as {target.name}"
            return target, note
        raise UploadRefused(f"'{name}' was refused: too many files with that name")
    finally:
        tmp.unlink(missing_ok=True)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------ collections and their files
def collection_summaries(settings: Settings) -> list[dict]:
    """Every collection under the data folder with its file and chunk counts and its embedder."""
    rows = []
    for name in collection_names(settings):
        with Store.open(settings, name, create=False) as store:
            rows.append(collection_summary(store, name))
    return rows


def collection_summary(store: Store, name: str) -> dict:
    return dict(name=name, files=len(store.files()), chunks=store.count_chunks(), embedder=store.meta("embedder"))


def supported_formats() -> dict[str, str]:
    """The file types ingest reads (extension -> how), which is what uploads may be."""
    from ingest.load import SUPPORTED_FORMATS

    return dict(SUPPORTED_FORMATS)


def inside(path: str | Path, folder: Path) -> bool:
    """Whether ``path`` lies under ``folder`` (both resolved)."""
    try:
        return Path(path).resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def remove_sources(store: Store, target: str, uploads: Path | None = None) -> list[str]:
    """Remove the file ``target`` (or every file under the folder ``target``) and its chunks from
    ``store``; returns the paths removed (none: not in the collection). A removed file that is an
    upload's copy in ``uploads`` is deleted too, or the next ingest of that folder would add it back."""
    removed = []
    for record in store.files(under=os.path.abspath(target)):
        store.remove_file(record.path)
        if uploads is not None and inside(record.path, uploads):
            Path(record.path).unlink(missing_ok=True)
        removed.append(record.path)
    return removed


def drop_collection(settings: Settings, name: str) -> None:
    """Delete a collection: its vectors, manifest and keyword index, and the copies uploaded into it.
    Files ingested from people's own folders are not touched."""
    Store.open(settings.with_overrides(collection=name), name, create=False).drop()
    shutil.rmtree(upload_folder(settings, name), ignore_errors=True)
