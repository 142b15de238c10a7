"""Generate a mixed, realistic document corpus for the ingest benchmark (not committed).

Files in every supported format with varied prose, some with embedded images (as real
reports have), some deliberately bad (empty, corrupt, encrypted, junk). Deterministic for a
given seed. Usage: python bench/make_corpus.py OUT_DIR [--files 300] [--image-kb 700]
"""

from __future__ import annotations

import argparse
import json
import random
import zlib
from email.message import EmailMessage
from pathlib import Path

WORDS = (
    "system data report analysis result method process model value table figure section policy budget "
    "customer service network storage security backup recovery cluster node latency throughput memory "
    "engineer manager review project milestone schedule risk quality test release version feature issue "
    "river mountain harbour station valve pressure reading shift operator procedure inspection safety"
).split()
ZH = "本地文档问答系统在完全离线的环境中运行。所有数据都保存在本机。检索结合向量检索和关键词检索。答案会引用文件和页码。"
JA = "このシステムはインターネットに接続せずに動作します。文書は小さな塊に分割されて保存されます。回答には出典が付きます。"


def sentence(rng: random.Random) -> str:
    n = rng.randint(8, 22)
    words = [rng.choice(WORDS) for _ in range(n)]
    words[0] = words[0].capitalize()
    if rng.random() < 0.3:
        words.insert(rng.randint(1, n - 1), str(rng.randint(1, 9999)))
    return " ".join(words) + "."


def paragraphs(rng: random.Random, count: int) -> list[str]:
    out = []
    for _ in range(count):
        if rng.random() < 0.08:
            out.append(ZH * rng.randint(1, 3))
        elif rng.random() < 0.08:
            out.append(JA * rng.randint(1, 3))
        else:
            out.append(" ".join(sentence(rng) for _ in range(rng.randint(3, 7))))
    return out


def noise_png(rng: random.Random, kb: int) -> bytes:
    """An incompressible PNG of about ``kb`` kilobytes (a photo-like figure)."""
    import struct

    side = max(8, int((kb * 1024 / 3) ** 0.5))
    raw = b"".join(b"\x00" + rng.randbytes(side * 3) for _ in range(side))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 1)) + chunk(b"IEND", b"")


def write_pdf(path: Path, rng: random.Random, image: bytes | None) -> None:
    import pymupdf as fitz

    doc = fitz.open()
    for page_no in range(rng.randint(2, 6)):
        page = doc.new_page()
        y = 72
        page.insert_text((72, y), f"Chapter {page_no + 1}", fontsize=16)
        y += 30
        text = " ".join(paragraphs(rng, 2)).encode("ascii", "ignore").decode()
        page.insert_textbox(fitz.Rect(72, y, 540, 700), text, fontsize=10)
        if image and page_no == 0:
            page.insert_image(fitz.Rect(72, 600, 300, 780), stream=image)
    doc.save(str(path))


def write_docx(path: Path, rng: random.Random, image: bytes | None) -> None:
    import io

    import docx

    d = docx.Document()
    for i in range(rng.randint(2, 5)):
        d.add_heading(f"Part {i + 1}: {rng.choice(WORDS)} {rng.choice(WORDS)}", level=1)
        for p in paragraphs(rng, rng.randint(1, 4)):
            d.add_paragraph(p)
    if image:
        d.add_picture(io.BytesIO(image))
    d.save(str(path))


def write_pptx(path: Path, rng: random.Random, image: bytes | None) -> None:
    import io

    from pptx import Presentation
    from pptx.util import Inches

    prs = Presentation()
    for i in range(rng.randint(3, 8)):
        slide = prs.slides.add_slide(prs.slide_layouts[1])
        slide.shapes.title.text = f"Slide {i + 1}: {rng.choice(WORDS)}"
        slide.placeholders[1].text = "\n".join(sentence(rng) for _ in range(3))
        if image and i == 0:
            slide.shapes.add_picture(io.BytesIO(image), Inches(5), Inches(4), Inches(3))
    prs.save(str(path))


def write_xlsx(path: Path, rng: random.Random) -> None:
    import openpyxl

    wb = openpyxl.Workbook()
    for s in range(rng.randint(1, 3)):
        ws = wb.active if s == 0 else wb.create_sheet()
        ws.title = f"Sheet{s + 1}"
        ws.append(["id", "item", "status", "note"])
        for r in range(rng.randint(20, 80)):
            ws.append([r, rng.choice(WORDS), rng.choice(["open", "closed", "pending"]), sentence(rng)])
    wb.save(str(path))


def write_epub(path: Path, rng: random.Random) -> None:
    from ebooklib import epub

    book = epub.EpubBook()
    book.set_identifier(f"id{rng.randint(0, 10**9)}")
    book.set_title("Field manual")
    book.set_language("en")
    chapters = []
    for i in range(3):
        c = epub.EpubHtml(title=f"Chapter {i + 1}", file_name=f"c{i}.xhtml", lang="en")
        c.content = f"<h1>Chapter {i + 1}</h1>" + "".join(f"<p>{p}</p>" for p in paragraphs(rng, 3))
        book.add_item(c)
        chapters.append(c)
    book.toc = chapters
    book.spine = ["nav", *chapters]
    book.add_item(epub.EpubNcx())
    book.add_item(epub.EpubNav())
    epub.write_epub(str(path), book)


def write_odt(path: Path, rng: random.Random) -> None:
    from odf.opendocument import OpenDocumentText
    from odf.text import H, P

    doc = OpenDocumentText()
    for i in range(3):
        doc.text.addElement(H(outlinelevel=1, text=f"Heading {i + 1}"))
        for p in paragraphs(rng, 2):
            doc.text.addElement(P(text=p))
    doc.save(str(path))


def write_text_formats(path: Path, ext: str, rng: random.Random) -> None:
    paras = paragraphs(rng, rng.randint(3, 12))
    if ext == ".md":
        body = "\n\n".join(f"## {rng.choice(WORDS).title()}\n\n{p}" for p in paras)
    elif ext == ".rst":
        body = "\n\n".join(f"{w}\n{'=' * len(w)}\n\n{p}" for p in paras for w in [rng.choice(WORDS).title()])
    elif ext == ".html":
        body = "<html><body>" + "".join(f"<h2>{rng.choice(WORDS)}</h2><p>{p}</p>" for p in paras) + "</body></html>"
    elif ext == ".csv":
        rows = ["id,item,status,note"] + [f"{i},{rng.choice(WORDS)},{rng.choice(['ok', 'late'])},\"{sentence(rng)}\"" for i in range(60)]
        body = "\n".join(rows)
    elif ext == ".json":
        body = json.dumps({"title": rng.choice(WORDS), "sections": [{"heading": rng.choice(WORDS), "text": p} for p in paras]}, ensure_ascii=False)
    elif ext == ".xml":
        body = "<doc>" + "".join(f"<section><title>{rng.choice(WORDS)}</title><p>{p}</p></section>" for p in paras) + "</doc>"
    elif ext == ".eml":
        msg = EmailMessage()
        msg["Subject"] = f"Status of {rng.choice(WORDS)}"
        msg["From"] = "ops@example.org"
        msg["To"] = "team@example.org"
        msg.set_content("\n\n".join(paras))
        path.write_bytes(bytes(msg))
        return
    else:
        body = "\n\n".join(paras)
    path.write_text(body, encoding="utf-8")


def write_bad_files(out: Path, rng: random.Random) -> int:
    import pymupdf as fitz

    bad = out / "bad"
    bad.mkdir(exist_ok=True)
    (bad / "empty.txt").write_bytes(b"")
    (bad / "junk.txt").write_bytes(rng.randbytes(20000))
    (bad / "corrupt.pdf").write_bytes(b"%PDF-1.7\n" + rng.randbytes(5000))
    (bad / "corrupt.docx").write_bytes(b"PK\x03\x04" + rng.randbytes(3000))
    doc = fitz.open()
    doc.new_page().insert_text((72, 72), "secret")
    doc.save(str(bad / "encrypted.pdf"), encryption=fitz.PDF_ENCRYPT_AES_256, user_pw="pw", owner_pw="pw")
    (bad / "program.exe").write_bytes(rng.randbytes(1000))
    return 6


FORMATS = [".pdf", ".docx", ".pptx", ".xlsx", ".csv", ".html", ".md", ".txt", ".rst", ".eml", ".epub", ".odt", ".json", ".xml"]


def make_corpus(out: Path, files: int = 300, image_kb: int = 900, image_every: int = 1, seed: int = 7) -> dict:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    image = noise_png(rng, image_kb)
    for i in range(files):
        ext = FORMATS[i % len(FORMATS)]
        sub = out / f"dept{i % 7}"
        sub.mkdir(exist_ok=True)
        path = sub / f"doc{i:04d}{ext}"
        img = image if (ext in (".pdf", ".docx", ".pptx") and (i // len(FORMATS)) % image_every == 0) else None
        if img:  # vary the bytes so images are not deduplicated by the container formats
            img = noise_png(rng, image_kb)
        if ext == ".pdf":
            write_pdf(path, rng, img)
        elif ext == ".docx":
            write_docx(path, rng, img)
        elif ext == ".pptx":
            write_pptx(path, rng, img)
        elif ext == ".xlsx":
            write_xlsx(path, rng)
        elif ext == ".epub":
            write_epub(path, rng)
        elif ext == ".odt":
            write_odt(path, rng)
        else:
            write_text_formats(path, ext, rng)
    nbad = write_bad_files(out, rng)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"files": files + nbad, "bad": nbad, "bytes": total}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--files", type=int, default=300)
    ap.add_argument("--image-kb", type=int, default=900)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    print(make_corpus(a.out, a.files, a.image_kb, seed=a.seed))
