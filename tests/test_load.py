"""Loading every supported format: real files built with the writers people use (python-docx,
python-pptx, openpyxl, pypdf, Pillow, the email package, odfpy, EbookLib), the right page,
slide, sheet and heading on each element, and a short reason for every file that cannot be read."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import zipfile
import zlib
from email.message import EmailMessage
from pathlib import Path

import pytest

from ingest.load import SUPPORTED_FORMATS, load_file
from localgpt.errors import BadFile, UnsupportedFile


def texts(doc) -> str:
    return "\n".join(el.text for el in doc.elements)


def find(doc, needle: str):
    return next(el for el in doc.elements if needle in el.text)


def make_pdf(pages: list[list[tuple[int, str]]]) -> bytes:
    """A small, valid PDF with Helvetica text: ``pages`` lists (font size, line) per page.
    Written by hand so that the PDF tests need no PDF-writing library."""
    objects: list[bytes] = []
    kids = []
    for lines in pages:
        ops, y = ["BT"], 760
        for size, line in lines:
            escaped = line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
            ops.append(f"/F1 {size} Tf 1 0 0 1 72 {y} Tm ({escaped}) Tj")
            y -= int(size * 1.4)
        ops.append("ET")
        stream = "\n".join(ops).encode("cp1252")
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))
        content_id = len(objects) + 3
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents %d 0 R "
            b"/Resources << /Font << /F1 3 0 R >> >> >>" % content_id
        )
        kids.append(len(objects) + 3)
    head = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(b"%d 0 R" % k for k in kids), len(kids)),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
    ]
    body, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, obj in enumerate(head + objects, start=1):
        offsets.append(len(body))
        body += b"%d 0 obj\n%s\nendobj\n" % (number, obj)
    xref = len(body)
    body += b"xref\n0 %d\n0000000000 65535 f \n" % (len(offsets) + 1)
    body += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    body += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(offsets) + 1, xref)
    return bytes(body)


GUIDE_PDF = [
    [(20, "Getting started"), (11, "localgpt answers questions over your own documents."), (11, "Nothing leaves the machine.")],
    [(20, "Where the data lives"), (11, "The store lives in the local_data folder."), (11, "Delete it to start over.")],
    [(11, "Re-running ingest only reads new or changed files.")],
]


# --- PDF -----------------------------------------------------------------------------------


def test_pdf_pages_and_headings_round_trip(tmp_path):
    path = tmp_path / "guide.pdf"
    path.write_bytes(make_pdf(GUIDE_PDF))
    doc = load_file(path)
    assert doc.pages == 3
    title = find(doc, "Where the data lives")
    assert (title.kind, title.page) == ("title", 2)
    store = find(doc, "local_data folder")
    assert (store.kind, store.page, store.heading) == ("text", 2, "Where the data lives")
    # One paragraph from two lines, and the heading carries over to a page without one.
    assert "documents. Nothing leaves" in find(doc, "Nothing leaves").text
    assert find(doc, "Re-running ingest").page == 3
    assert find(doc, "Re-running ingest").heading == "Where the data lives"


def test_blank_page_in_a_pdf_is_neither_an_error_nor_a_note(tmp_path, monkeypatch):
    path = tmp_path / "with-blank.pdf"
    path.write_bytes(make_pdf([GUIDE_PDF[0], [], GUIDE_PDF[2]]))
    monkeypatch.setenv("PATH", str(tmp_path))  # no tesseract: a blank page must not ask for it
    doc = load_file(path)
    assert doc.pages == 3 and doc.notes == []
    assert find(doc, "Re-running ingest").page == 3


def test_running_page_numbers_are_not_text(tmp_path):
    path = tmp_path / "numbered.pdf"
    path.write_bytes(make_pdf([[(11, "Body text on the first page."), (9, "1")], [(11, "More body text."), (9, "Page 2 of 2")]]))
    assert [el.text for el in load_file(path).elements] == ["Body text on the first page.", "More body text."]


def test_chinese_and_japanese_pdf_text_is_extracted(tmp_path):
    pymupdf = pytest.importorskip("pymupdf")
    path = tmp_path / "cjk.pdf"
    pdf = pymupdf.open()
    pdf.new_page().insert_text((72, 72), "本地文档问答系统完全离线运行。", fontname="china-s", fontsize=12)
    pdf.new_page().insert_text((72, 72), "文書はすべてこのパソコンに保存されます。", fontname="japan", fontsize=12)
    pdf.save(path)
    doc = load_file(path)
    assert find(doc, "离线运行").page == 1
    assert find(doc, "保存されます").page == 2


def test_encrypted_pdf_is_reported_not_crashed(tmp_path):
    import pypdf

    writer = pypdf.PdfWriter(clone_from=io.BytesIO(make_pdf(GUIDE_PDF)))
    writer.encrypt(user_password="secret", owner_password="owner", algorithm="AES-256")
    path = tmp_path / "locked.pdf"
    with open(path, "wb") as fh:
        writer.write(fh)
    with pytest.raises(BadFile, match="encrypted PDF: needs a password"):
        load_file(path)


def test_corrupt_pdf_is_reported_not_crashed(tmp_path):
    path = tmp_path / "broken.pdf"
    path.write_bytes(b"%PDF-1.7\n" + os.urandom(3000))
    with pytest.raises(BadFile, match="corrupt PDF"):
        load_file(path)


def test_file_named_pdf_that_is_not_one_is_reported(tmp_path):
    path = tmp_path / "notes.pdf"
    path.write_text("just some text")
    with pytest.raises(BadFile, match="not a PDF"):
        load_file(path)


def _scanned_pdf(path: Path, text: str) -> None:
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("L", (1700, 400), 255)
    ImageDraw.Draw(image).text((60, 150), text, fill=0, font=ImageFont.load_default(size=64))
    image.save(path, "PDF", resolution=200)


def test_scanned_pdf_without_tesseract_says_how_to_fix_it(tmp_path, monkeypatch):
    path = tmp_path / "scan.pdf"
    _scanned_pdf(path, "Invoice number 4711")
    monkeypatch.setenv("PATH", str(tmp_path))  # no tesseract on this PATH
    with pytest.raises(BadFile, match="page 1 has no text layer; install tesseract-ocr to OCR it"):
        load_file(path)


def test_scanned_page_is_noted_when_the_rest_of_the_pdf_has_text(tmp_path, monkeypatch):
    import pypdf

    scan = tmp_path / "scan.pdf"
    _scanned_pdf(scan, "Invoice number 4711")
    writer = pypdf.PdfWriter(clone_from=io.BytesIO(make_pdf(GUIDE_PDF[:1])))
    writer.append(str(scan))
    path = tmp_path / "mixed.pdf"
    with open(path, "wb") as fh:
        writer.write(fh)
    monkeypatch.setenv("PATH", str(tmp_path))
    doc = load_file(path)
    assert doc.pages == 2
    assert "Nothing leaves the machine" in texts(doc)
    assert doc.notes == ["page 2 has no text layer; install tesseract-ocr to OCR it"]


@pytest.mark.skipif(shutil.which("tesseract") is None, reason="tesseract-ocr is not installed")
def test_scanned_pdf_is_ocred_when_tesseract_is_installed(tmp_path):
    path = tmp_path / "scan.pdf"
    _scanned_pdf(path, "Invoice number 4711")
    doc = load_file(path)
    assert "4711" in texts(doc)
    assert {el.page for el in doc.elements} == {1}
    assert any("OCRed" in note for note in doc.notes)


def test_scanned_pdf_with_ocr_turned_off_is_reported(tmp_path):
    path = tmp_path / "scan.pdf"
    _scanned_pdf(path, "Invoice number 4711")
    with pytest.raises(BadFile, match="no text layer; OCR is turned off"):
        load_file(path, ocr=False)


# --- Office formats ------------------------------------------------------------------------


def test_docx_headings_lists_and_tables_round_trip(tmp_path):
    import docx

    d = docx.Document()
    d.add_heading("Installing localgpt", level=1)
    d.add_paragraph("Run the install script once.")
    d.add_heading("Settings", level=2)
    d.add_paragraph("Chunks are about 200 tokens.")
    d.add_paragraph("ingest", style="List Bullet")
    d.add_paragraph("ask", style="List Bullet")
    table = d.add_table(rows=2, cols=2)
    for cell, value in zip(table.rows[0].cells + table.rows[1].cells, ["setting", "default", "chunk_size", "200"]):
        cell.text = value
    d.add_paragraph("本地运行，无需联网。")
    path = tmp_path / "guide.docx"
    d.save(path)
    doc = load_file(path)
    assert [el.text for el in doc.elements if el.kind == "title"] == ["Installing localgpt", "Settings"]
    assert find(doc, "install script").heading == "Installing localgpt"
    assert find(doc, "200 tokens").heading == "Settings"
    assert find(doc, "ingest").kind == "list" and find(doc, "ingest").text == "- ingest\n- ask"
    table_el = find(doc, "chunk_size")
    assert (table_el.kind, table_el.text) == ("table", "setting: chunk_size; default: 200")
    assert find(doc, "无需联网").heading == "Settings"
    assert all(el.page is None for el in doc.elements)


def test_pptx_slides_are_pages_with_their_titles(tmp_path):
    from pptx import Presentation
    from pptx.util import Inches

    prs = Presentation()
    for title, bullets in [("Why offline", ["No telemetry", "No cloud"]), ("Commands", ["ingest", "ask", "chat"])]:
        slide = prs.slides.add_slide(prs.slide_layouts[1])
        slide.shapes.title.text = title
        body = slide.placeholders[1].text_frame
        body.text = bullets[0]
        for b in bullets[1:]:
            body.add_paragraph().text = b
    slide = prs.slides.add_slide(prs.slide_layouts[5])
    slide.shapes.title.text = "Formats"
    table = slide.shapes.add_table(2, 2, Inches(1), Inches(2), Inches(4), Inches(1)).table
    for (r, c), value in zip([(0, 0), (0, 1), (1, 0), (1, 1)], ["extension", "reader", ".pdf", "PDFium"]):
        table.cell(r, c).text = value
    slide.notes_slide.notes_text_frame.text = "Mention OCR here."
    path = tmp_path / "deck.pptx"
    prs.save(path)
    doc = load_file(path)
    assert doc.pages == 3
    assert [(el.text, el.page) for el in doc.elements if el.kind == "title"] == [
        ("Why offline", 1), ("Commands", 2), ("Formats", 3)
    ]
    bullets = find(doc, "No telemetry")
    assert (bullets.kind, bullets.page, bullets.heading, bullets.text) == ("list", 1, "Why offline", "- No telemetry\n- No cloud")
    assert find(doc, "chat").page == 2
    assert find(doc, "PDFium").text == "extension: .pdf; reader: PDFium"
    assert find(doc, "Mention OCR").page == 3


def test_xlsx_rows_keep_their_header_and_sheet(tmp_path):
    import openpyxl

    wb = openpyxl.Workbook()
    ws = wb.active
    ws.title = "Settings"
    ws.append(["setting", "default"])
    ws.append(["chunk_size", 200])
    ws.append(["embedder", "e5-small"])
    ws2 = wb.create_sheet("Formats")
    ws2.append(["extension", "pages"])
    ws2.append([".pdf", "yes"])
    path = tmp_path / "book.xlsx"
    wb.save(path)
    doc = load_file(path)
    assert doc.pages == 2
    row = find(doc, "chunk_size")
    assert (row.text, row.kind, row.page, row.sheet, row.heading) == (
        "setting: chunk_size; default: 200", "table", 1, "Settings", "Settings"
    )
    pdf_row = find(doc, ".pdf")
    assert (pdf_row.text, pdf_row.page, pdf_row.sheet) == ("extension: .pdf; pages: yes", 2, "Formats")


@pytest.mark.timeout(60)
def test_xlsx_claiming_absurd_dimensions_loads_only_its_real_cells(tmp_path):
    import openpyxl

    wb = openpyxl.Workbook()
    wb.active.append(["name", "value"])
    wb.active.append(["answer", 42])
    buffer = io.BytesIO()
    wb.save(buffer)
    path = tmp_path / "huge.xlsx"
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "xl/worksheets/sheet1.xml":
                data = data.replace(b'<dimension ref="A1:B2"/>', b'<dimension ref="A1:XFD1048576"/>')
                assert b"XFD1048576" in data
            dst.writestr(item, data)
    doc = load_file(path)
    assert [el.text for el in doc.elements if el.kind == "table"] == ["name: answer; value: 42"]


def test_zip_bomb_named_docx_is_refused(tmp_path):
    path = tmp_path / "bomb.docx"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("[Content_Types].xml", "<Types/>")
        zf.writestr("word/document.xml", b"\0" * (60 << 20))
    assert path.stat().st_size < 200_000
    with pytest.raises(BadFile, match="zip bomb"):
        load_file(path)


def test_old_word_file_renamed_docx_is_reported(tmp_path):
    path = tmp_path / "old.docx"
    path.write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 512)
    with pytest.raises(BadFile, match="not a valid DOCX file"):
        load_file(path)


def test_odt_headings_and_paragraphs_round_trip(tmp_path):
    pytest.importorskip("odf")
    from odf.opendocument import OpenDocumentText
    from odf.text import H, List, ListItem, P

    odt = OpenDocumentText()
    odt.text.addElement(H(outlinelevel=1, text="Privacy"))
    odt.text.addElement(P(text="Nothing is sent anywhere."))
    items = List()
    for word in ("ingest", "ask"):
        item = ListItem()
        item.addElement(P(text=word))
        items.addElement(item)
    odt.text.addElement(items)
    path = tmp_path / "notes.odt"
    odt.save(str(path))
    doc = load_file(path)
    assert (doc.elements[0].kind, doc.elements[0].text) == ("title", "Privacy")
    assert find(doc, "Nothing is sent").heading == "Privacy"
    assert find(doc, "ingest").text == "- ingest\n- ask"


def test_epub_chapters_in_reading_order(tmp_path):
    epub = pytest.importorskip("ebooklib.epub")
    book = epub.EpubBook()
    book.set_identifier("guide-1")
    book.set_title("Guide")
    book.set_language("en")
    chapters = []
    for n, (title, body) in enumerate([("Offline", "No network is used."), ("检索", "混合检索结合向量和关键词。")], 1):
        ch = epub.EpubHtml(title=title, file_name=f"ch{n}.xhtml", lang="en")
        ch.content = f"<html><body><h1>{title}</h1><p>{body}</p></body></html>"
        book.add_item(ch)
        chapters.append(ch)
    book.add_item(epub.EpubNcx())
    book.add_item(epub.EpubNav())
    book.spine = chapters
    path = tmp_path / "guide.epub"
    epub.write_epub(str(path), book)
    doc = load_file(path)
    assert [el.text for el in doc.elements if el.kind == "title"] == ["Offline", "检索"]
    assert find(doc, "No network").heading == "Offline"
    assert find(doc, "混合检索").heading == "检索"


# --- Markup and text -----------------------------------------------------------------------


def test_html_keeps_structure_and_drops_scripts(tmp_path):
    path = tmp_path / "page.html"
    path.write_text(
        "<html><head><title>Guide</title><style>p{}</style></head><body>"
        "<nav><a href='/'>Home</a></nav><script>var tracking = 1;</script>"
        "<h1>localgpt</h1><p>Answers   questions <b>offline</b>.</p>"
        "<h2>Commands</h2><ul><li>ingest</li><li>ask</li></ul>"
        "<table><tr><th>setting</th><th>default</th></tr><tr><td>chunk_size</td><td>200</td></tr></table>"
        "<pre>localgpt ask \"hi\"\n  --json</pre><p>本地\n运行</p></body></html>",
        encoding="utf-8",
    )
    doc = load_file(path)
    assert "tracking" not in texts(doc) and "Home" not in texts(doc)
    assert find(doc, "Answers").text == "Answers questions offline."
    assert find(doc, "Answers").heading == "localgpt"
    assert (find(doc, "ingest").kind, find(doc, "ingest").text) == ("list", "- ingest\n- ask")
    assert find(doc, "chunk_size").text == "setting: chunk_size; default: 200"
    assert find(doc, "--json").kind == "code"
    assert find(doc, "本地").text == "本地运行"  # a source line break between CJK characters is no space


def test_html_in_gbk_with_meta_charset_decodes(tmp_path):
    path = tmp_path / "zh.htm"
    path.write_bytes('<html><head><meta charset="gb2312"></head><body><h1>常见问题</h1><p>数据保存在本机。</p></body></html>'.encode("gbk"))
    doc = load_file(path)
    assert find(doc, "数据保存在本机").heading == "常见问题"


def test_markdown_headings_lists_tables_and_code(tmp_path):
    path = tmp_path / "guide.md"
    path.write_text(
        "---\ntitle: front matter\n---\n# Guide\n\nlocalgpt runs **offline**, see [the docs](http://x).\n\n"
        "Setup\n-----\n\n- install\n- ingest\n  your folder\n\n"
        "| setting | default |\n|---|---|\n| chunk_size | 200 |\n\n```bash\nlocalgpt ingest\n```\n",
        encoding="utf-8",
    )
    doc = load_file(path)
    assert "front matter" not in texts(doc)
    assert [el.text for el in doc.elements if el.kind == "title"] == ["Guide", "Setup"]
    assert find(doc, "offline").text == "localgpt runs offline, see the docs."
    assert find(doc, "install").text == "- install\n- ingest your folder"
    assert find(doc, "install").heading == "Setup"
    assert find(doc, "chunk_size").text == "setting: chunk_size; default: 200"
    assert find(doc, "localgpt ingest").kind == "code"


def test_rst_section_titles_and_literal_blocks(tmp_path):
    path = tmp_path / "guide.rst"
    path.write_text(
        "=====\nGuide\n=====\n\nIntro text.\n\nInstall\n-------\n\nRun this::\n\n    ./install.sh\n\n.. note::\n\n   skipped\n",
        encoding="utf-8",
    )
    doc = load_file(path)
    assert [el.text for el in doc.elements if el.kind == "title"] == ["Guide", "Install"]
    assert find(doc, "./install.sh").kind == "code" and find(doc, "./install.sh").heading == "Install"
    assert find(doc, "Run this").text == "Run this:"


def test_plain_text_paragraphs(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("First paragraph\nwraps here.\n\nSecond one.\n", encoding="utf-8")
    doc = load_file(path)
    assert [el.text for el in doc.elements] == ["First paragraph wraps here.", "Second one."]
    assert doc.pages is None


def test_csv_rows_carry_their_header(tmp_path):
    path = tmp_path / "formats.csv"
    path.write_text("extension,description\n.pdf,\"PDF, with pages\"\n.md,Markdown\n", encoding="utf-8")
    doc = load_file(path)
    assert [el.text for el in doc.elements] == [
        "extension: .pdf; description: PDF, with pages",
        "extension: .md; description: Markdown",
    ]
    assert all(el.kind == "table" for el in doc.elements)


def test_tsv_and_semicolon_csv_are_split_on_the_right_delimiter(tmp_path):
    (tmp_path / "a.tsv").write_text("name\tcity\nAnna\tZürich\n", encoding="utf-8")
    (tmp_path / "b.csv").write_text("name;city\nBo;Lyon\n", encoding="cp1252")
    assert texts(load_file(tmp_path / "a.tsv")) == "name: Anna; city: Zürich"
    assert texts(load_file(tmp_path / "b.csv")) == "name: Bo; city: Lyon"


def test_json_and_jsonl_become_path_value_lines(tmp_path):
    (tmp_path / "c.json").write_text('{"store": {"path": "local_data", "engine": "chroma"}, "tags": ["a", "b"]}')
    (tmp_path / "d.jsonl").write_text('{"q": "where?", "a": "local_data"}\n{"q": "语言", "a": "中文"}\n')
    doc = load_file(tmp_path / "c.json")
    assert [el.text for el in doc.elements] == ["store.path: local_data\nstore.engine: chroma", "tags[0]: a\ntags[1]: b"]
    assert "q: 语言\na: 中文" in texts(load_file(tmp_path / "d.jsonl"))


def test_invalid_json_is_reported(tmp_path):
    (tmp_path / "bad.json").write_text('{"a": ')
    with pytest.raises(BadFile, match="invalid JSON"):
        load_file(tmp_path / "bad.json")


def test_xml_text_is_read_and_entities_are_not_expanded(tmp_path):
    path = tmp_path / "data.xml"
    path.write_text(
        '<?xml version="1.0" encoding="utf-8"?>\n<!DOCTYPE r [<!ENTITY x SYSTEM "http://example.com/x">]>'
        "<faq><item><q>Where is the store?</q><a>In local_data/ &x;</a></item><item><q>离线吗？</q></item></faq>",
        encoding="utf-8",
    )
    doc = load_file(path)
    assert [el.text for el in doc.elements] == ["q: Where is the store?\na: In local_data/", "q: 离线吗？"]


def test_email_subject_headers_and_body(tmp_path):
    msg = EmailMessage()
    msg["Subject"] = "Ingest finished"
    msg["From"] = "ops@example.com"
    msg["To"] = "me@example.com"
    msg.set_content("All 12 files were ingested.\n\n> old quoted reply\n\n请查看报告。\n", charset="utf-8")
    msg.add_attachment(b"%PDF-1.4", maintype="application", subtype="pdf", filename="report.pdf")
    path = tmp_path / "mail.eml"
    path.write_bytes(msg.as_bytes())
    doc = load_file(path)
    assert (doc.elements[0].kind, doc.elements[0].text) == ("title", "Ingest finished")
    assert "From: ops@example.com" in doc.elements[1].text
    assert find(doc, "12 files").heading == "Ingest finished"
    assert "请查看报告。" in texts(doc) and "old quoted" not in texts(doc)
    assert doc.notes == ["attachments not read: report.pdf"]


def test_html_only_email_is_read(tmp_path):
    msg = EmailMessage()
    msg["Subject"] = "Newsletter"
    msg.set_content("<html><body><h2>News</h2><p>Hybrid retrieval shipped.</p></body></html>", subtype="html")
    path = tmp_path / "news.eml"
    path.write_bytes(msg.as_bytes())
    assert find(load_file(path), "Hybrid retrieval").heading == "News"


# --- Encodings -----------------------------------------------------------------------------

ENCODED = [
    ("utf-8", "café naïve — € 本地运行 日本語"),
    ("utf-8-sig", "café naïve — € 本地运行 日本語"),
    ("utf-16", "café naïve — € 本地运行 日本語"),  # with BOM
    ("utf-16-le", "plain ASCII mostly, café"),  # no BOM
    ("cp1252", "Un café naïve — coûte 5 €. Déjà vu."),
    ("cp1252", "café naïve — €"),
    ("latin-1", "Größe und Übermaß, façade."),
    ("gbk", "本地文档问答系统在完全离线的环境中运行。所有数据都保存在本机。"),
    ("gbk", "你好，世界"),
    ("gb18030", "检索结合向量检索和关键词检索。"),
    ("big5", "本地文件問答系統在完全離線的環境中運行。所有資料都保存在本機。"),
    ("shift_jis", "このシステムはインターネットに接続せずに動作します。"),
    ("shift_jis", "localgpt は日本語に対応しています。"),
    ("euc_jp", "文書は小さな塊に分割されて保存されます。回答には出典が付きます。"),
]


@pytest.mark.parametrize("encoding,text", ENCODED, ids=[f"{e}-{i}" for i, (e, _) in enumerate(ENCODED)])
def test_text_in_every_common_encoding_decodes(tmp_path, encoding, text):
    path = tmp_path / "note.txt"
    path.write_bytes(text.encode(encoding))
    assert texts(load_file(path)) == text


def test_shift_jis_csv_decodes(tmp_path):
    path = tmp_path / "ja.csv"
    path.write_bytes("コマンド,説明\ningest,文書を取り込みます\n".encode("shift_jis"))
    assert texts(load_file(path)) == "コマンド: ingest; 説明: 文書を取り込みます"


# --- Files that cannot be read -------------------------------------------------------------


@pytest.mark.parametrize("ext", [".pdf", ".docx", ".txt", ".csv", ".html", ".xlsx", ".eml"])
def test_empty_file_is_reported(tmp_path, ext):
    path = tmp_path / f"empty{ext}"
    path.write_bytes(b"")
    with pytest.raises(BadFile, match="empty file"):
        load_file(path)


def test_binary_junk_named_txt_is_reported(tmp_path):
    path = tmp_path / "junk.txt"
    path.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(BadFile, match="binary data, not text"):
        load_file(path)


def test_file_larger_than_the_limit_is_reported(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("word " * 1000)
    with pytest.raises(BadFile, match="too large"):
        load_file(path, max_bytes=1000)
    assert load_file(path, max_bytes=10_000).elements


def test_directory_is_reported(tmp_path):
    folder = tmp_path / "folder.md"
    folder.mkdir()
    with pytest.raises(BadFile, match="is a directory"):
        load_file(folder)


def test_unreadable_file_is_reported(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text("hidden")
    path.chmod(0)
    if os.geteuid() != 0:
        with pytest.raises(BadFile, match="permission denied"):
            load_file(path)
        return
    # root reads everything: ask a child that has given up the capability to override permissions.
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv to drop CAP_DAC_OVERRIDE")
    caps = "-dac_override,-dac_read_search"
    code = (
        "from pathlib import Path\nfrom ingest.load import load_file\nfrom localgpt.errors import BadFile\n"
        f"try:\n    load_file(Path({str(path)!r}))\nexcept BadFile as e:\n    print(e)\n"
    )
    done = subprocess.run(
        [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}", sys.executable, "-c", code],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120,
    )
    if done.returncode != 0 and "setpriv" in done.stderr:
        pytest.skip(f"setpriv cannot drop capabilities here: {done.stderr.strip()}")
    assert done.stdout.strip() == "permission denied", done.stderr


def test_unknown_extension_is_unsupported(tmp_path):
    path = tmp_path / "photo.heic"
    path.write_bytes(b"\0" * 10)
    with pytest.raises(UnsupportedFile, match="unsupported file type '.heic'"):
        load_file(path)


def test_corrupt_office_files_are_reported(tmp_path):
    for ext in (".docx", ".pptx", ".xlsx", ".odt", ".epub"):
        path = tmp_path / f"broken{ext}"
        path.write_bytes(b"PK\x03\x04" + os.urandom(500))
        with pytest.raises(BadFile, match=ext[1:].upper()):
            load_file(path)


def test_every_supported_format_has_a_description():
    assert all(ext.startswith(".") and desc for ext, desc in SUPPORTED_FORMATS.items())
    assert {".pdf", ".docx", ".pptx", ".xlsx", ".csv", ".html", ".htm", ".md", ".txt", ".rst", ".eml", ".epub", ".odt",
            ".json", ".xml"} <= set(SUPPORTED_FORMATS)


def test_bundled_samples_load(tmp_path):
    root = Path(__file__).resolve().parents[1] / "source_documents"
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in SUPPORTED_FORMATS) if root.is_dir() else []
    if not files:
        pytest.skip("no bundled samples (run scripts/make_samples.py)")
    for path in files:
        doc = load_file(path)
        assert doc.elements, path
    assert load_file(root / "localgpt-guide.pdf").pages >= 3
