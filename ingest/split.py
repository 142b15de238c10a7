"""Token-aware, element-aware splitting of a loaded document into chunks.

Chunks never cross a section heading or a page (so a citation's page is exact), tables
and list items stay whole when they fit, and sentences are packed up to ``chunk_size``
tokens of the embedding model with ``chunk_overlap`` tokens of whole sentences repeated.
Sentence ends include 。！？ so Chinese and Japanese split where a reader expects.
LangChain's splitters count length by re-measuring every merged string and know no
pages or headings; packing pre-counted sentences is both exact enough and much faster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from localgpt.documents import Chunk, Element, LoadedDocument
from localgpt.text import split_sentences

TokenCounter = Callable[[str], int]


@dataclass
class _Piece:
    text: str
    tokens: int


def chunk_id(sha256: str, index: int) -> str:
    """Deterministic: the same content always yields the same ids, so re-runs never duplicate."""
    return f"{sha256[:32]}-{index:05d}"


def split_document(
    doc: LoadedDocument, sha256: str, count_tokens: TokenCounter, chunk_size: int = 200, chunk_overlap: int = 32
) -> list[Chunk]:
    if chunk_overlap >= chunk_size:
        chunk_overlap = chunk_size // 4
    chunks: list[Chunk] = []
    for section in _sections(doc.elements):
        kind = section[0].kind if len(section) == 1 else "text"
        page = section[0].page
        heading = section[0].heading if section[0].kind != "title" else section[0].text.strip()
        for text, tokens in _pack(section, count_tokens, chunk_size, chunk_overlap):
            chunks.append(
                Chunk(
                    id=chunk_id(sha256, len(chunks)),
                    text=text,
                    content_hash=sha256,
                    chunk_index=len(chunks),
                    page=page,
                    heading=heading,
                    kind=kind,
                    tokens=tokens,
                )
            )
    return chunks


def _sections(elements: Iterable[Element]) -> Iterator[list[Element]]:
    """Runs of elements that share a heading and a page; a title opens a new run."""
    current: list[Element] = []
    for el in elements:
        if not el.text or not el.text.strip():
            continue
        starts_new = bool(current) and (
            el.kind == "title"
            or el.page != current[0].page
            or (el.heading is not None and el.heading != _heading_of(current[0]))
        )
        if starts_new:
            yield current
            current = []
        current.append(el)
    if current:
        yield current


def _heading_of(el: Element) -> str | None:
    return el.text.strip() if el.kind == "title" else el.heading


def _pack(section: list[Element], count: TokenCounter, size: int, overlap: int) -> Iterator[tuple[str, int]]:
    pieces: list[_Piece] = []
    for el in section:
        pieces.extend(_element_pieces(el, count, size))
    window: list[_Piece] = []
    total = 0
    for piece in pieces:
        if window and total + piece.tokens > size:
            yield _emit(window)
            window, total = _overlap_tail(window, overlap)
            # Keep the overlap only when the next piece still fits beside it.
            while window and total + piece.tokens > size:
                total -= window.pop(0).tokens
        window.append(piece)
        total += piece.tokens
    if window and any(p.text.strip() for p in window):
        text, tokens = _emit(window)
        if text:
            yield text, tokens


def _emit(window: list[_Piece]) -> tuple[str, int]:
    return "".join(p.text for p in window).strip(), sum(p.tokens for p in window)


def _overlap_tail(window: list[_Piece], overlap: int) -> tuple[list[_Piece], int]:
    tail: list[_Piece] = []
    total = 0
    for piece in reversed(window):
        if total + piece.tokens > overlap:
            break
        tail.insert(0, piece)
        total += piece.tokens
    return tail, total


def _element_pieces(el: Element, count: TokenCounter, size: int) -> list[_Piece]:
    text = el.text.strip()
    sep = "\n" if el.kind in ("title", "list", "table", "code") else " "
    tokens = count(text)
    if el.kind in ("title", "list", "table", "code") and tokens <= size:
        return [_Piece(text + "\n", tokens)]  # keep the element whole
    units = text.splitlines(keepends=True) if el.kind in ("table", "code") else split_sentences(text)
    pieces: list[_Piece] = []
    for unit in units:
        n = count(unit)
        if n <= size:
            pieces.append(_Piece(unit, n))
        else:
            pieces.extend(_hard_split(unit, count, size))
    if pieces:
        last = pieces[-1]
        if not last.text.endswith(("\n", " ")):
            pieces[-1] = _Piece(last.text + sep, last.tokens)
    return pieces


def _hard_split(text: str, count: TokenCounter, size: int) -> list[_Piece]:
    """A sentence longer than a chunk: cut at spaces when there are any, else between characters
    (Chinese and Japanese have no spaces), each part as long as fits."""
    parts: list[_Piece] = []
    rest = text
    while rest:
        lo, hi = 1, len(rest)
        # Binary search for the longest prefix that fits.
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count(rest[:mid]) <= size:
                lo = mid
            else:
                hi = mid - 1
        cut = lo
        if cut < len(rest):
            space = rest.rfind(" ", 0, cut)
            if space > cut // 2:
                cut = space + 1
        part = rest[:cut]
        parts.append(_Piece(part, count(part)))
        rest = rest[cut:]
    return parts


def split_characters(doc: LoadedDocument, sha256: str, chunk_size: int = 1000, chunk_overlap: int = 200) -> list[Chunk]:
    """localGPT's way, kept as the evaluation baseline: the whole document's text through
    LangChain's RecursiveCharacterTextSplitter (characters, not tokens; blind to headings,
    tables and pages). Each chunk records the page its first character is on."""
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    parts: list[str] = []
    starts: list[tuple[int, int | None]] = []  # (offset in the joined text, page)
    offset = 0
    for el in doc.elements:
        if not el.text or not el.text.strip():
            continue
        starts.append((offset, el.page))
        parts.append(el.text)
        offset += len(el.text) + 2
    text = "\n\n".join(parts)
    splitter = RecursiveCharacterTextSplitter(chunk_size=chunk_size, chunk_overlap=chunk_overlap, add_start_index=True)
    chunks: list[Chunk] = []
    for piece in splitter.create_documents([text]):
        start = piece.metadata.get("start_index", 0)
        page = next((p for o, p in reversed(starts) if o <= start), None)
        chunks.append(Chunk(id=chunk_id(sha256, len(chunks)), text=piece.page_content, content_hash=sha256,
                            chunk_index=len(chunks), page=page, kind="text", tokens=0))
    return chunks
