"""The data that flows from a file to an answer: elements, chunks and source references.

Plain dataclasses with no behaviour beyond small conveniences; every other module
speaks in these terms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Element:
    """One structural piece of a document as a loader sees it.

    ``kind`` is one of ``title``, ``text``, ``list``, ``table``, ``code``.
    ``page`` is the PDF page, PPTX slide or XLSX sheet number (1-based) when the
    format has one; ``sheet`` names the XLSX sheet.
    """

    text: str
    kind: str = "text"
    page: int | None = None
    heading: str | None = None
    sheet: str | None = None


@dataclass
class LoadedDocument:
    """What a loader returns: the elements in reading order plus notes for the user."""

    path: Path
    elements: list[Element]
    pages: int | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Chunk:
    """A piece of a document small enough to embed, with what a citation needs."""

    id: str
    text: str
    content_hash: str
    chunk_index: int
    page: int | None = None
    heading: str | None = None
    kind: str = "text"
    tokens: int = 0


@dataclass
class SourceRef:
    """A retrieved chunk as an answer cites it."""

    chunk_id: str
    text: str
    sources: list[str]
    page: int | None
    heading: str | None
    score: float
    content_hash: str = ""
    chunk_index: int = 0
    similarity: float = 0.0  # cosine similarity to the question under the collection's embedder
    verifier_score: float | None = None  # the answer verifier's P(this chunk states the answer), when it scored it

    @property
    def source(self) -> str:
        return self.sources[0] if self.sources else ""

    def label(self) -> str:
        where = self.source
        if self.page is not None:
            where += f", p. {self.page}"
        return where
