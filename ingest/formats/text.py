"""Plain-text formats: decoding any encoding a user's files are likely in, then .txt, Markdown,
reStructuredText, CSV/TSV, JSON and XML.

Decoding: a BOM decides first, then strict UTF-8, then charset-normalizer limited to the legacy
encodings people actually have (GB18030/GBK, Big5, Shift_JIS/cp932, EUC-JP, cp1252). Letting it
consider every code page makes it pick cp1257 for French or cp949 for short Chinese texts.
"""

from __future__ import annotations

import csv
import io
import json
import re

from localgpt.errors import BadFile

from .elements import ElementList, clean_inline, join_cells

_BOMS = [
    (b"\xef\xbb\xbf", "utf-8-sig"),
    (b"\xff\xfe\x00\x00", "utf-32-le"),
    (b"\x00\x00\xfe\xff", "utf-32-be"),
    (b"\xff\xfe", "utf-16-le"),
    (b"\xfe\xff", "utf-16-be"),
]
_LEGACY = ["gb18030", "big5", "cp932", "euc_jp", "cp1252"]
# Names in charset declarations mapped to the superset decoders browsers use.
_ALIASES = {
    "gb2312": "gb18030", "gbk": "gb18030", "x-gbk": "gb18030", "shift_jis": "cp932", "shift-jis": "cp932",
    "sjis": "cp932", "x-sjis": "cp932", "windows-31j": "cp932", "iso-8859-1": "cp1252", "latin-1": "cp1252",
    "latin1": "cp1252", "us-ascii": "cp1252", "ascii": "cp1252", "big5-hkscs": "big5hkscs",
}
_SNIFF = 1 << 16


def decode_bytes(data: bytes, declared: str | None = None) -> str:
    """Bytes of a text file to str; raises BadFile for binary data."""
    for bom, codec in _BOMS:
        if data.startswith(bom):
            return data[len(bom):].decode(codec.replace("-sig", ""), errors="replace")
    if not data.strip():
        raise BadFile("empty file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    head = data[:_SNIFF]
    utf16 = _utf16_without_bom(head)
    if utf16:
        return data.decode(utf16, errors="replace")
    if _looks_binary(head):
        raise BadFile("binary data, not text")
    if declared:
        codec = _ALIASES.get(declared.lower().strip(), declared.lower().strip())
        try:
            return data.decode(codec)
        except (LookupError, UnicodeDecodeError):
            pass  # a wrong declaration is common; fall through to detection
    from charset_normalizer import from_bytes

    best = from_bytes(head, cp_isolation=_LEGACY).best()
    codecs = ([best.encoding] if best is not None else []) + _LEGACY
    for codec in codecs:
        try:
            data.decode(codec)  # the sniffed head may have agreed with a codec the rest refutes
            return data.decode(codec)
        except UnicodeDecodeError:
            continue
    return data.decode("cp1252" if best is None else best.encoding, errors="replace")


def _utf16_without_bom(head: bytes) -> str | None:
    """UTF-16 text of mostly ASCII has a zero in every other byte."""
    sample = head[: len(head) & ~1][:4096]
    if len(sample) < 4:
        return None
    even, odd = sample[0::2].count(0), sample[1::2].count(0)
    half = len(sample) // 2
    if odd > 0.4 * half and even < 0.05 * half:
        return "utf-16-le"
    if even > 0.4 * half and odd < 0.05 * half:
        return "utf-16-be"
    return None


def _looks_binary(head: bytes) -> bool:
    if b"\x00" in head:
        return True
    controls = sum(head.count(bytes([b])) for b in range(32) if b not in (9, 10, 12, 13, 27))
    return controls > max(8, len(head) // 100)


def read_text(data: bytes) -> ElementList:
    """A .txt file: paragraphs are separated by blank lines."""
    out = ElementList()
    for para in re.split(r"\n\s*\n", decode_bytes(data).replace("\r\n", "\n").replace("\r", "\n")):
        out.add(para)
    return out


# --- Markdown and reStructuredText -------------------------------------------------------

_ATX = re.compile(r"^ {0,3}(#{1,6})\s+(.*)$")  # the closing #s are cut by _atx_text, not by a lazy .*?
_FENCE = re.compile(r"^ {0,3}(```+|~~~+)")
_LIST = re.compile(r"^\s*(?:[-*+•]|\d+[.)]|#\.)\s+")
_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{2,}:?\s*(?:\|\s*:?-{2,}:?\s*)*\|?\s*$")
_RST_ADORN = re.compile(r"^([=\-~^\"'`#*+<>:._])\1{2,}\s*$")
# Spans are bounded: an unclosed [ or ` must not scan the rest of a megabyte line from every
# opener (quadratic: 40 KB of "`a " took 43 s); markup longer than this stays as it is.
_LINK = re.compile(r"!?\[([^\]]{0,500})\]\([^)]{0,2000}\)")
_RST_ROLE = re.compile(r":[\w-]+:`([^`<]*?)(?:\s*<[^>]*>)?`")
_RST_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`_+")
_EMPHASIS = re.compile(r"(\*\*|__|\*|`+)(?=\S)(.{1,300}?)(?<=\S)\1")


def _inline_markup(text: str) -> str:
    text = _LINK.sub(r"\1", text)
    text = _RST_LINK.sub(r"\1", text)
    text = _RST_ROLE.sub(r"\1", text)
    return _EMPHASIS.sub(r"\2", text)


def read_markup(data: bytes, *, rst: bool = False) -> ElementList:
    """Markdown or reStructuredText by their block structure: headings (ATX, setext, RST
    adornments), fenced/literal code, lists, pipe tables, paragraphs. Inline markup is
    reduced to its text; that is all retrieval needs."""
    lines = decode_bytes(data).replace("\r\n", "\n").replace("\r", "\n").split("\n")
    out = ElementList()
    para: list[str] = []
    items: list[str] = []

    def flush() -> None:
        if para:
            out.add(_inline_markup(" ".join(para)))
            para.clear()
        if items:
            out.add("\n".join(f"- {_inline_markup(i)}" for i in items), "list")
            items.clear()

    i = 0
    if not rst and lines and lines[0].strip() == "---":  # YAML front matter
        end = next((j for j in range(1, len(lines)) if lines[j].strip() in ("---", "...")), None)
        if end is not None:
            i = end + 1
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        fence = _FENCE.match(line)
        if fence and not rst:
            flush()
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith(fence.group(1)):
                j += 1
            out.add("\n".join(lines[i + 1 : j]), "code")
            i = j + 1
            continue
        if not stripped:
            flush()
            i += 1
            continue
        atx = None if rst else _ATX.match(line)
        if atx:
            flush()
            out.title(_inline_markup(_atx_text(atx.group(2))))
            i += 1
            continue
        if rst and _RST_ADORN.match(line) and nxt.strip() and i + 2 < len(lines) and _RST_ADORN.match(lines[i + 2]):
            flush()  # overlined title
            out.title(_inline_markup(nxt.strip()))
            i += 3
            continue
        underline = (_RST_ADORN if rst else re.compile(r"^ {0,3}(=+|-+)\s*$")).match(nxt)
        if underline and not para and not items and len(nxt.strip()) >= min(3, len(stripped)):
            out.title(_inline_markup(stripped))
            i += 2
            continue
        if rst and stripped.startswith(".. ") and not stripped.startswith(".. code"):
            flush()  # comments and directives: skip the block's indented body
            i += 1
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith((" ", "\t"))):
                i += 1
            continue
        if rst and (stripped.endswith("::") or stripped.startswith(".. code")):
            if not stripped.startswith(".."):
                para.append(stripped[:-1])
            flush()
            j = i + 1
            block = []
            while j < len(lines) and (not lines[j].strip() or lines[j].startswith((" ", "\t"))):
                block.append(lines[j])
                j += 1
            out.add("\n".join(block), "code")
            i = j
            continue
        if "|" in stripped and _TABLE_RULE.match(nxt) and not rst:
            flush()
            rows = [_cells(line)]
            j = i + 2
            while j < len(lines) and "|" in lines[j] and lines[j].strip():
                rows.append(_cells(lines[j]))
                j += 1
            out.table([[_inline_markup(c) for c in r] for r in rows])
            i = j
            continue
        if _LIST.match(line):
            if para:
                out.add(_inline_markup(" ".join(para)))
                para.clear()
            items.append(_LIST.sub("", line, count=1).strip())
        elif items and line.startswith((" ", "\t")):
            items[-1] += " " + stripped  # continuation of a list item
        else:
            if items:
                flush()
            para.append(stripped)
        i += 1
    flush()
    return out


def _atx_text(text: str) -> str:
    """A heading's text without trailing spaces and the optional closing #s ("## Title ##")."""
    text = text.rstrip()
    bare = text.rstrip("#")
    if bare != text and bare[-1:].isspace():
        text = bare.rstrip()
    return text


def _cells(line: str) -> list[str]:
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|"):
        line = line[:-1]
    return [c.strip() for c in line.split("|")]


# --- CSV / TSV ---------------------------------------------------------------------------

MAX_TABLE_ROWS = 200_000


def read_csv(data: bytes, *, delimiter: str | None = None) -> tuple[ElementList, list[str]]:
    """Each row becomes ``column: value; ...`` so that a row split away from the header still
    says what its values are."""
    text = decode_bytes(data)
    notes: list[str] = []
    if delimiter is None:
        try:
            delimiter = csv.Sniffer().sniff(text[:8192], delimiters=",;\t|").delimiter
        except csv.Error:
            delimiter = ","
    csv.field_size_limit(10 * 1024 * 1024)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    out = ElementList()
    header: list[str] | None = None
    for n, row in enumerate(reader):
        row = [clean_inline(c) for c in row]
        if not any(row):
            continue
        if header is None:
            header = row if all(row) and not any(_is_number(c) for c in row) else []
            if header:
                continue
        if n > MAX_TABLE_ROWS:
            notes.append(f"only the first {MAX_TABLE_ROWS} rows were read")
            break
        names = header + [f"column {k + 1}" for k in range(len(header), len(row))] if header else [""] * len(row)
        out.add(join_cells(list(zip(names, row))) if header else " | ".join(c for c in row if c), "table")
    return out, notes


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False


# --- JSON and XML ------------------------------------------------------------------------


def read_json(data: bytes, *, lines: bool = False) -> ElementList:
    """Structured data as ``path: value`` lines, one element per top-level entry."""
    text = decode_bytes(data)
    try:
        values = [json.loads(x) for x in text.splitlines() if x.strip()] if lines else [json.loads(text)]
    except (ValueError, RecursionError) as exc:
        raise BadFile(f"invalid JSON ({str(exc).splitlines()[0][:80]})") from None
    out = ElementList()
    for value in values:
        if isinstance(value, dict):
            groups = [(str(k), v) for k, v in value.items()]
        elif isinstance(value, list):
            groups = [(f"[{i}]", v) for i, v in enumerate(value)]
        else:
            groups = [("", value)]
        for key, item in groups:
            flat: list[str] = []
            _flatten(item, key, flat)
            out.add("\n".join(flat), "table")
    return out


def _flatten(value, path: str, out: list[str], depth: int = 0) -> None:
    if depth > 64:
        return
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{path}.{k}" if path else str(k), out, depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _flatten(v, f"{path}[{i}]", out, depth + 1)
    elif value is not None and str(value).strip():
        out.append(f"{path}: {value}" if path else str(value))


def read_xml(data: bytes) -> ElementList:
    """Generic XML: the text of every element as ``tag: text`` lines, one element per child of
    the root. Entities are not expanded and no DTD is fetched (billion laughs, XXE)."""
    from lxml import etree

    if not data.strip():
        raise BadFile("empty file")
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False, recover=False)
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        raise BadFile(f"invalid XML ({str(exc)[:80]})") from None
    out = ElementList()
    children = [c for c in root if isinstance(c.tag, str)] or [root]
    for child in children:
        lines = []
        for el in child.iter():
            if not isinstance(el.tag, str):
                continue
            text = clean_inline(el.text or "")
            if text:
                lines.append(f"{etree.QName(el).localname}: {text}")
            tail = clean_inline(el.tail or "") if el is not child else ""
            if tail:
                lines.append(tail)
        out.add("\n".join(lines), "table")
    return out
