"""HTML and XHTML (also the body of EPUB chapters and HTML e-mails), read with lxml.

lxml.html is used directly rather than through BeautifulSoup: the same parser underneath, about
five times less Python work per node. Headings become titles, lists/tables/pre keep their
shape, scripts, styles and navigation chrome are dropped.
"""

from __future__ import annotations

import re

from .elements import ElementList, clean_inline
from .text import decode_bytes

_SKIP = {"script", "style", "noscript", "template", "head", "svg", "math", "nav", "button", "select", "iframe", "object"}
_HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}
_BLOCKS = {
    "p", "div", "section", "article", "main", "aside", "header", "footer", "blockquote", "figure", "figcaption",
    "address", "form", "fieldset", "details", "summary", "dl", "dt", "dd", "li", "body", "html", "center", "hr",
    "caption", "tr", "td", "th",
}
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9._:-]+)""", re.I)
_XML_DECL = re.compile(r"^\s*<\?xml[^>]*\?>")
_XML_ENCODING = re.compile(rb"""^\s*<\?xml[^>]*encoding\s*=\s*["']([A-Za-z0-9._:-]+)""")


def html_to_text(data: bytes) -> str:
    m = _META_CHARSET.search(data[:4096]) or _XML_ENCODING.search(data[:200])
    return _XML_DECL.sub("", decode_bytes(data, declared=m.group(1).decode("ascii") if m else None), count=1)


def read_html(data: bytes, out: ElementList | None = None) -> ElementList:
    import lxml.html
    from lxml import etree

    out = out if out is not None else ElementList()
    text = html_to_text(data)
    if not text.strip():
        return out
    try:
        root = lxml.html.document_fromstring(text)
    except (etree.ParserError, ValueError):
        return out
    if root.find(".//h1") is None:
        title = root.findtext(".//title")
        if title and title.strip():
            out.title(title)
    _Walker(out).block(root)
    return out


class _Walker:
    def __init__(self, out: ElementList) -> None:
        self.out = out
        self.buffer: list[str] = []

    def flush(self) -> None:
        if self.buffer:
            self.out.add("".join(self.buffer))
            self.buffer.clear()

    def block(self, el) -> None:
        """Walk an element's content; inline text accumulates, blocks flush it."""
        if el.text:
            self.buffer.append(el.text)
        for child in el:
            tag = child.tag.lower() if isinstance(child.tag, str) else ""
            if not tag or tag in _SKIP:
                pass  # comments, processing instructions, scripts
            elif tag in _HEADINGS:
                self.flush()
                self.out.title(child.text_content())
            elif tag in ("ul", "ol"):
                self.flush()
                items = [clean_inline(li.text_content()) for li in child if isinstance(li.tag, str) and li.tag.lower() == "li"]
                self.out.add("\n".join(f"- {i}" for i in items if i), "list")
            elif tag == "table":
                self.flush()
                rows = [
                    [cell.text_content() for cell in tr if isinstance(cell.tag, str) and cell.tag.lower() in ("td", "th")]
                    for tr in child.iter("tr")
                ]
                self.out.table(rows)
            elif tag == "pre":
                self.flush()
                self.out.add(child.text_content(), "code")
            elif tag == "br":
                self.buffer.append("\n")
            elif tag in _BLOCKS:
                self.flush()
                self.block(child)
                self.flush()
            else:
                self.block(child)  # inline: its text joins the running paragraph
            if child.tail:
                self.buffer.append(child.tail)
        if el.tag in ("body", "html"):
            self.flush()


def read_epub(data: bytes) -> ElementList:
    """EPUB: the spine's XHTML chapters in reading order. Read with zipfile + lxml; EbookLib
    would do the same but is AGPL-licensed and slower to open a book."""
    import posixpath
    from urllib.parse import unquote

    from lxml import etree

    from localgpt.errors import BadFile

    from .office import open_zip

    zf = open_zip(data, "EPUB")
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    try:
        container = etree.fromstring(zf.read("META-INF/container.xml"), parser)
    except KeyError:
        raise BadFile("not an EPUB (no META-INF/container.xml)") from None
    opf_path = container.xpath("string(//*[local-name()='rootfile']/@full-path)")
    opf = etree.fromstring(zf.read(opf_path), parser)
    base = posixpath.dirname(opf_path)
    manifest = {
        item.get("id"): item.get("href")
        for item in opf.xpath("//*[local-name()='manifest']/*[local-name()='item']")
    }
    out = ElementList()
    for ref in opf.xpath("//*[local-name()='spine']/*[local-name()='itemref']/@idref"):
        href = manifest.get(ref)
        if not href:
            continue
        name = posixpath.normpath(posixpath.join(base, unquote(href.split("#")[0])))
        try:
            read_html(zf.read(name), out)
        except KeyError:
            continue  # a spine entry the book does not contain
    return out
