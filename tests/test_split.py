"""Splitting: token-aware, element-aware, and right for Chinese and Japanese text."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from localgpt.documents import Element, LoadedDocument
from localgpt.embeddings import token_counter
from ingest.split import split_document

ZH = (
    "本地知识库问答系统可以在完全离线的环境中运行。用户把文档放进一个文件夹，系统会把文档切分成小块并计算向量。"
    "所有数据都保存在本机的数据库里，不会上传到任何服务器！检索时，系统同时使用向量检索和关键词检索，再用倒数排名融合合并结果。"
    "生成答案时，模型只能根据检索到的内容回答，并且必须给出引用的文件和页码。如果资料里没有答案，系统会直接说不知道？"
) * 3
JA = (
    "このシステムは、インターネットに接続しなくても文書に関する質問に答えます。文書はチャンクに分割され、埋め込みベクトルとして保存されます。"
    "回答には必ず出典のファイル名とページ番号が付きます！資料に答えがない場合は、わからないと答えます。"
) * 4


@pytest.fixture(scope="module")
def count():
    return token_counter("e5-small")


def _doc(*elements: Element) -> LoadedDocument:
    return LoadedDocument(Path("x.txt"), list(elements))


def test_chinese_chunks_end_at_sentence_marks_and_fit_the_token_budget(count):
    chunks = split_document(_doc(Element(ZH)), "a" * 64, count, chunk_size=60, chunk_overlap=10)
    assert len(chunks) > 3
    for c in chunks:
        assert c.text.strip()
        assert count(c.text) <= 60 + 2  # joined text may differ by a token at a seam
        assert c.text.rstrip()[-1] in "。！？", c.text  # whole sentences only
    # Every sentence of the source survives in some chunk.
    for sentence in re.split("[。！？]", ZH)[:8]:
        assert any(sentence in c.text for c in chunks)


def test_japanese_text_without_spaces_is_counted_in_model_tokens_not_words(count):
    chunks = split_document(_doc(Element(JA)), "b" * 64, count, chunk_size=50, chunk_overlap=0)
    # A whitespace word count would see a handful of "words" and emit one chunk.
    assert len(chunks) >= 4
    assert all(c.tokens <= 50 for c in chunks)
    assert "".join(c.text for c in chunks).replace(" ", "") == JA.replace(" ", "")


def test_a_cjk_sentence_longer_than_a_chunk_is_cut_between_characters(count):
    long_sentence = "数据" * 400 + "。"
    chunks = split_document(_doc(Element(long_sentence)), "c" * 64, count, chunk_size=64, chunk_overlap=0)
    assert len(chunks) > 3
    assert all(c.tokens <= 64 for c in chunks)
    assert "".join(c.text for c in chunks) == long_sentence


def test_overlap_repeats_whole_sentences(count):
    text = " ".join(f"Sentence number {i} talks about topic {i}." for i in range(40))
    chunks = split_document(_doc(Element(text)), "d" * 64, count, chunk_size=40, chunk_overlap=12)
    assert len(chunks) > 3
    for a, b in zip(chunks, chunks[1:]):
        last_sentence = a.text.split(". ")[-1].rstrip(".")
        assert last_sentence in b.text  # the seam is covered


def test_chunks_never_cross_headings_or_pages_and_keep_citation_metadata(count):
    doc = _doc(
        Element("Installation", kind="title", page=1),
        Element("Run the installer. It takes a minute.", page=1, heading="Installation"),
        Element("Usage", kind="title", page=1),
        Element("Type a question and press enter.", page=1, heading="Usage"),
        Element("Answers cite their sources.", page=2, heading="Usage"),
        Element("| a | b |\n| 1 | 2 |", kind="table", page=2, heading="Usage"),
    )
    chunks = split_document(doc, "e" * 64, count, chunk_size=200, chunk_overlap=20)
    texts = [c.text for c in chunks]
    assert texts[0].startswith("Installation") and "installer" in texts[0] and "Usage" not in texts[0]
    assert chunks[0].heading == "Installation" and chunks[0].page == 1
    assert any("press enter" in t and "Usage" in t for t in texts)
    page2 = [c for c in chunks if c.page == 2]
    assert page2 and all(c.heading == "Usage" for c in page2)
    assert not any("press enter" in c.text for c in page2)
    assert [c.chunk_index for c in chunks] == list(range(len(chunks)))
    assert len({c.id for c in chunks}) == len(chunks)


def test_empty_and_whitespace_elements_never_make_chunks(count):
    doc = _doc(Element("   "), Element("\n\n"), Element("Real text."), Element(""))
    chunks = split_document(doc, "f" * 64, count)
    assert [c.text for c in chunks] == ["Real text."]


def test_same_content_gives_same_chunk_ids(count):
    a = split_document(_doc(Element(ZH)), "1" * 64, count, chunk_size=80)
    b = split_document(_doc(Element(ZH)), "1" * 64, count, chunk_size=80)
    assert [c.id for c in a] == [c.id for c in b]
