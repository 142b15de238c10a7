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


# No language averages this many characters per token: a unit longer than chunk_size times this
# cannot fit a chunk and is cut without being measured whole, and no cut stretch is longer (a
# tokenizer may count a run it does not know as one token: BERT's [UNK] takes a 100-letter word).
MAX_CHARS_PER_TOKEN = 16


@dataclass
class _Piece:
    text: str
    tokens: int
    sentence: bool = True  # False for a stretch cut out of a sentence: overlap repeats whole sentences only


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
        if not piece.sentence or total + piece.tokens > overlap:
            break
        tail.insert(0, piece)
        total += piece.tokens
    return tail, total


def _element_pieces(el: Element, count: TokenCounter, size: int) -> list[_Piece]:
    text = el.text.strip()
    whole = el.kind in ("title", "list", "table", "code")
    sep = "\n" if whole else " "
    if whole:
        tokens = _measure(text, count, size)
        if tokens <= size:
            return [_Piece(text + "\n", tokens)]  # keep the element whole
    units = text.splitlines(keepends=True) if el.kind in ("table", "code") else split_sentences(text)
    pieces: list[_Piece] = []
    for unit in units:
        n = _measure(unit, count, size)
        if n <= size:
            pieces.append(_Piece(unit, n))
        else:
            pieces.extend(_hard_split(unit, count, size))
    if pieces:
        last = pieces[-1]
        if not last.text.endswith(("\n", " ")):
            pieces[-1] = _Piece(last.text + sep, last.tokens, last.sentence)
    return pieces


def _measure(text: str, count: TokenCounter, size: int) -> int:
    """Tokens of ``text``, or ``size + 1`` for a text too long to fit whatever it holds (not
    tokenized: a 30 MB line is cut by ``_hard_split`` and measured there, one stretch at a time)."""
    return count(text) if len(text) <= size * MAX_CHARS_PER_TOKEN else size + 1


def _hard_split(text: str, count: TokenCounter, size: int) -> list[_Piece]:
    """A unit longer than a chunk (a minified file, a base64 blob, Chinese without punctuation):
    stretches of about an eighth of a chunk, cut at a space when the stretch's second half has one,
    else between characters (Chinese and Japanese have no spaces), each tokenized once; ``_pack``
    then fills chunks with them. Linear in the text's length: measuring ever longer prefixes of
    the rest, as a binary search for the longest one that fits does, made a 30 MB line quadratic."""
    target = max(4, size // 8)  # tokens a stretch aims at
    longest = size * MAX_CHARS_PER_TOKEN
    per_token = 4.0  # characters per token, learnt from the stretch before
    parts: list[_Piece] = []
    start = 0
    while start < len(text):
        want = max(1, min(longest, int(target * per_token)))
        while True:
            end = min(len(text), start + want)
            if end < len(text):
                space = text.rfind(" ", start + want // 2, end)
                if space >= 0:
                    end = space + 1
            tokens = count(text[start:end])
            if tokens <= size or want == 1:
                break
            want = max(1, want * target // tokens)  # denser than the stretch before: shorter
        parts.append(_Piece(text[start:end], tokens, sentence=False))
        per_token = (end - start) / max(1, tokens)
        start = end
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
