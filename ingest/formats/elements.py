"""Building a document's element list: the current section heading, text clean-up, no empty texts."""

from __future__ import annotations

import re

from localgpt.documents import Element

_CJK = "\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
# A line break between two CJK characters (wrapped HTML source, PDF lines) is no space to a
# reader, and a space there would break keyword bigrams; a space typed on one line stays.
_CJK_WRAP = re.compile(f"(?<=[{_CJK}])[ \\t]*[\\r\\n][ \\t\\r\\n]*(?=[{_CJK}])")
_CJK_SPACED = re.compile(f"(?<=[{_CJK}]) (?=[{_CJK}])")
_SPACES = re.compile(r"[ \t\r\f\v\u00a0]+")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffe\uffff]")


def clean_inline(text: str) -> str:
    """One line of running text: whitespace collapsed, CJK gaps closed, controls dropped."""
    text = _CONTROL.sub("", text)
    text = _CJK_WRAP.sub("", text)
    return " ".join(text.split())


def close_cjk_spaces(text: str) -> str:
    """OCR engines put a space between every CJK character; take them out."""
    return _CJK_SPACED.sub("", text)


def clean_block(text: str) -> str:
    """Text whose line breaks mean something (lists, tables, code): trim each line, keep the breaks."""
    text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    lines = [_SPACES.sub(" ", line).rstrip() for line in text.split("\n")]
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    return "\n".join(lines)


def join_cells(pairs: list[tuple[str, str]]) -> str:
    """A table row as ``col: value; col: value`` so that it still makes sense on its own."""
    return "; ".join(f"{k}: {v}" if k else v for k, v in pairs if v)


class ElementList:
    """Collects elements in reading order and stamps each with the heading above it."""

    def __init__(self) -> None:
        self.elements: list[Element] = []
        self.heading: str | None = None

    def title(self, text: str, *, page: int | None = None, sheet: str | None = None) -> None:
        text = clean_inline(text)
        if text:
            self.heading = text
            self.elements.append(Element(text, "title", page, text, sheet))

    def add(self, text: str, kind: str = "text", *, page: int | None = None, sheet: str | None = None) -> None:
        text = clean_inline(text) if kind == "text" else clean_block(text)
        if text.strip():
            self.elements.append(Element(text, kind, page, self.heading, sheet))

    def table(self, rows: list[list[str]], *, page: int | None = None, sheet: str | None = None) -> None:
        """A small table (HTML, DOCX, PPTX, ODT): the first row is taken as the header when it
        looks like one; every row then carries its column names."""
        rows = [[clean_inline(c) for c in row] for row in rows]
        rows = [r for r in rows if any(r)]
        if not rows:
            return
        header: list[str] = []
        if len(rows) > 1 and all(rows[0]) and len(set(rows[0])) == len(rows[0]):
            header, rows = rows[0], rows[1:]
        lines = []
        for row in rows:
            names = header + [""] * (len(row) - len(header))
            lines.append(join_cells(list(zip(names, row))) if header else " | ".join(c for c in row if c))
        self.add("\n".join(lines), "table", page=page, sheet=sheet)
