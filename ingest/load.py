"""Read one file into a ``LoadedDocument``: elements in reading order with page, sheet and the
section heading above each, ready for ``ingest.split``.

``load_file`` runs in parser processes: a plain function, libraries imported on first use,
picklable results. It never touches the network (no NLTK data, no layout models: the readers
below are chosen so that nothing has anything to fetch) and turns every failure into a
``BadFile`` whose reason a person can act on. The per-format readers live in ``ingest.formats``.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from localgpt.documents import LoadedDocument
from localgpt.errors import BadFile, UnsupportedFile

if TYPE_CHECKING:
    from ingest.formats.elements import ElementList

SUPPORTED_FORMATS: dict[str, str] = {
    ".pdf": "PDF: text per page, headings by font size; scanned pages OCRed when tesseract is installed",
    ".docx": "Word document: headings, paragraphs, lists and tables",
    ".pptx": "PowerPoint: one page per slide, slide titles as headings, tables and speaker notes",
    ".xlsx": "Excel workbook: one page per sheet, each row as 'column: value' pairs",
    ".csv": "comma-separated table: each row as 'column: value' pairs",
    ".tsv": "tab-separated table: each row as 'column: value' pairs",
    ".html": "web page: headings, paragraphs, lists and tables; scripts and navigation dropped",
    ".htm": "web page (same as .html)",
    ".xhtml": "XHTML page (same as .html)",
    ".md": "Markdown: headings, lists, tables and code blocks",
    ".markdown": "Markdown (same as .md)",
    ".rst": "reStructuredText: section titles, lists and literal blocks",
    ".txt": "plain text in UTF-8/16, cp1252, GBK/GB18030, Big5, Shift_JIS or EUC-JP",
    ".text": "plain text (same as .txt)",
    ".eml": "e-mail: subject, sender and date, and the message body",
    ".epub": "e-book: chapters in reading order",
    ".odt": "OpenDocument text: headings, paragraphs, lists and tables",
    ".json": "JSON: values as 'path: value' lines",
    ".jsonl": "JSON Lines: one record per line",
    ".xml": "XML: element text as 'tag: text' lines",
}


_READERS: dict[str, Callable[[bytes], ElementList]] = {}  # readers registered for other extensions


def register_reader(ext: str, description: str, read: Callable[[bytes], ElementList]) -> None:
    """Read files ending in ``ext`` with ``read`` (the file's bytes to an ``ElementList``). To take
    effect it must run in every process involved: the one that ingests (it decides which files are
    supported) and the parser processes it starts (e.g. from a ``sitecustomize`` module, as the
    parse time budget's test registers a reader that never finishes)."""
    ext = ext.lower()
    SUPPORTED_FORMATS[ext] = description
    _READERS[ext] = read


def load_file(path: Path, *, ocr: bool = True, max_bytes: int | None = None) -> LoadedDocument:
    """Load one file. Raises ``UnsupportedFile`` for an unknown extension and ``BadFile`` (with a
    short reason) for anything that cannot be read."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in SUPPORTED_FORMATS:
        raise UnsupportedFile(f"unsupported file type '{ext or '(none)'}'")
    data = _read_bytes(path, max_bytes)
    if not data:
        raise BadFile("empty file")
    try:
        doc = _load(path, ext, data, ocr)
    except (BadFile, UnsupportedFile):
        raise
    except MemoryError:
        raise BadFile("too large to load into memory", transient=True) from None
    except RecursionError:
        raise BadFile(f"{ext[1:].upper()} nested too deeply to read") from None
    except Exception as exc:  # a library's own error type: never show its traceback to a user
        first = (str(exc).strip().splitlines() or [""])[0][:120]
        detail = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        raise BadFile(f"corrupt or unreadable {ext[1:].upper()} file ({detail})") from None
    doc.elements = [el for el in doc.elements if el.text.strip()]
    if not doc.elements:
        raise BadFile(doc.notes[0] if doc.notes else "no text found")
    return doc


def _read_bytes(path: Path, max_bytes: int | None) -> bytes:
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise BadFile("is a directory, not a file")
        if not stat.S_ISREG(st.st_mode):
            raise BadFile("not a regular file")
        if max_bytes is not None and st.st_size > max_bytes:
            raise BadFile(f"too large: {_size(st.st_size)} is over the {_size(max_bytes)} limit", transient=True)
        with open(path, "rb") as fh:
            data = fh.read() if max_bytes is None else fh.read(max_bytes + 1)
    except BadFile:
        raise
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise BadFile("permission denied", transient=True) from None
        if exc.errno == errno.ENOENT:
            raise BadFile("file not found", transient=True) from None
        if exc.errno == errno.EISDIR:
            raise BadFile("is a directory, not a file") from None
        raise BadFile(f"cannot read: {exc.strerror or exc}") from None
    if max_bytes is not None and len(data) > max_bytes:  # grew since the stat
        raise BadFile(f"too large: over the {_size(max_bytes)} limit")
    return data


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n:,} bytes"


def _load(path: Path, ext: str, data: bytes, ocr: bool) -> LoadedDocument:
    from ingest.formats import html, mail, office, pdf, text

    notes: list[str] = []
    pages: int | None = None
    if ext in _READERS:
        out = _READERS[ext](data)
    elif ext == ".pdf":
        out, pages, notes = pdf.read_pdf(data, ocr=ocr)
    elif ext == ".docx":
        out = office.read_docx(data)
    elif ext == ".pptx":
        out, pages = office.read_pptx(data)
    elif ext == ".xlsx":
        out, pages, notes = office.read_xlsx(data)
    elif ext == ".odt":
        out = office.read_odt(data)
    elif ext in (".html", ".htm", ".xhtml"):
        out = html.read_html(data)
    elif ext == ".epub":
        out = html.read_epub(data)
    elif ext == ".eml":
        out, notes = mail.read_eml(data)
    elif ext in (".md", ".markdown"):
        out = text.read_markup(data)
    elif ext == ".rst":
        out = text.read_markup(data, rst=True)
    elif ext in (".csv", ".tsv"):
        out, notes = text.read_csv(data, delimiter="\t" if ext == ".tsv" else None)
    elif ext in (".json", ".jsonl"):
        out = text.read_json(data, lines=ext == ".jsonl")
    elif ext == ".xml":
        out = text.read_xml(data)
    else:  # .txt, .text
        out = text.read_text(data)
    return LoadedDocument(path=path, elements=out.elements, pages=pages, notes=notes)
