"""Question / answer pairs from FAQ documents in Debian packages, for the answer verifier's training.

SQuAD 2.0's dev part gives the verifier two English training articles, and every public pair is one
language. FAQs are documentation whose headings are the questions users ask, each followed by its
answer, and the Debian FAQ is translated section by section (same DocBook ids in every language), so
it gives honest cross-language pairs: a Japanese heading and the English answer of the same id.

Sources (``apt-get download``, cached in ``.faq_cache/``; nothing is fetched at run time):
- ``debian-faq`` / ``debian-faq-ja`` / ``debian-faq-zh-cn``: HTML, aligned by section id; only ids
  whose English heading is a question;
- ``python3.11-doc``: the Python FAQ's reStructuredText sources (English), **without**
  ``general.rst``, which is in the project's own evaluation corpus (``bench/corpus/eval``).

Sections of the Debian FAQ that hold a quote of the project's own question set
(``bench/eval/qa.jsonl``, which asks about ``debian-faq.zh-cn.txt``) are dropped in every language,
so training never sees an answer that set asks for.

    python bench/faq_pairs.py            # a summary: entries per source and language
    python bench/faq_pairs.py --floor    # e5's similarity of headings to their sections, in and across languages
    python bench/faq_pairs.py --refusal-corpus bench/corpus/faq-refusal   # rows for bench/abstention_model.py
"""

from __future__ import annotations

import dataclasses
import html
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".faq_cache"
PACKAGES = ["debian-faq", "debian-faq-ja", "debian-faq-zh-cn", "python3.11-doc"]
FAQ = "usr/share/doc/debian/FAQ"
PYFAQ = "usr/share/doc/python3.11/html/_sources/faq"
PY_SKIP = {"general.rst.txt", "index.rst.txt"}  # general: in the own evaluation corpus


@dataclasses.dataclass
class Entry:
    source: str  # "debian-faq" or "python-faq"
    chapter: str  # file stem
    id: str  # the same across languages of one source
    lang: str
    question: str
    answer: str


def fetch() -> Path:
    """Unpack the packages into the cache (apt-get download once; the registries answer installers)."""
    root = CACHE / "x"
    if (root / FAQ).exists() and (root / PYFAQ).exists():
        return root
    CACHE.mkdir(exist_ok=True)
    subprocess.run(["apt-get", "download", *PACKAGES], cwd=CACHE, check=True)
    for deb in CACHE.glob("*.deb"):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


_HEAD = re.compile(r'<h([23]) class="title"><a id="([^"]+)"></a>(.*?)</h\1>', re.S)


_CJK = "\u3000-\u30ff\u3400-\u9fff\uff00-\uffef"


def _text(fragment: str) -> str:
    # source line breaks inside a paragraph: nothing between CJK characters, a space elsewhere
    fragment = re.sub(f"(?<=[{_CJK}])[ \t]*\n[ \t]*(?=[{_CJK}])", "", fragment)
    fragment = re.sub(r"\s*\n\s*", " ", fragment)
    fragment = re.sub(r"</(p|li|pre|div|tr|h\d)>|<br\s*/?>", "\n", fragment)
    fragment = re.sub(r"<[^>]+>", "", fragment)
    fragment = html.unescape(fragment)
    lines = [re.sub(r"[ \t]+", " ", ln).strip() for ln in fragment.splitlines()]  # <pre> lines are lost: fine
    text = "\n".join(ln for ln in lines if ln)
    return re.sub(r"\n{3,}", "\n\n", text)


def debian_faq(root: Path) -> list[Entry]:
    out = []
    for lang, folder, suffix in (("en", "", "en"), ("ja", "ja/", "ja"), ("zh", "zh-cn/", "zh-cn")):
        for path in sorted((root / FAQ / folder).glob(f"*.{suffix}.html")):
            chapter = path.name.split(".")[0]
            if chapter in ("index", "faqinfo"):
                continue
            page = path.read_text(encoding="utf-8")
            heads = list(_HEAD.finditer(page))
            for h, nxt in zip(heads, heads[1:] + [None]):
                title = re.sub(r"^[\d.]+\s*", "", _text(h.group(3))).strip()
                body = _text(page[h.end(): nxt.start() if nxt else len(page)])
                body = body.split("\n上一页")[0].split("\nPrev")[0]  # navigation footer
                if len(body) >= 40:
                    out.append(Entry("debian-faq", chapter, h.group(2), lang, title, body.strip()))
    questions = {e.id for e in out if e.lang == "en" and e.question.endswith("?")}
    return [e for e in out if e.id in questions]


def _rst_text(block: str) -> str:
    block = re.sub(r":[a-z:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", block)  # :func:`x` -> x
    block = re.sub(r"`([^`<]+?)\s*<[^>]+>`_+", r"\1", block)  # `name <url>`_ -> name
    block = re.sub(r"``([^`]+)``", r"\1", block)
    lines = [ln for ln in block.splitlines() if not ln.lstrip().startswith(".. ")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def python_faq(root: Path) -> list[Entry]:
    out = []
    for path in sorted((root / PYFAQ).glob("*.rst.txt")):
        if path.name in PY_SKIP:
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        heads = []  # (line index of the title, underline char)
        for i in range(len(lines) - 1):
            under = lines[i + 1]
            if lines[i].strip() and under and len(set(under)) == 1 and under[0] in "-=~^" \
                    and len(under) >= len(lines[i].rstrip()) - 2 and len(under) >= 3:
                heads.append(i)
        for h, nxt in zip(heads, heads[1:] + [len(lines)]):
            title = lines[h].strip()
            body = _rst_text("\n".join(lines[h + 2: nxt]))
            if title.endswith("?") and len(body) >= 40:
                chapter = path.name.split(".")[0]
                out.append(Entry("python-faq", chapter, f"{chapter}#{title}", "en", title, body))
    return out


def own_quotes() -> list[str]:
    rows = [json.loads(ln) for ln in (ROOT / "bench/eval/qa.jsonl").read_text(encoding="utf-8").splitlines() if ln]
    return [r["quote"] for r in rows if r.get("quote")]


def load() -> list[Entry]:
    root = fetch()
    entries = debian_faq(root) + python_faq(root)
    norm = lambda s: re.sub(r"\s+", "", s)  # noqa: E731
    quotes = [norm(q)[:40] for q in own_quotes()]
    banned = {e.id for e in entries if any(q and q in norm(e.answer) for q in quotes)}
    return [e for e in entries if e.id not in banned]


def cross_language_floor(same_floor: float = 0.83, spec: str = "e5-small") -> None:
    """The embedder's similarity of each Debian FAQ heading to its own section, in the heading's
    language and in each other one; prints the share of answer sections under ``same_floor`` and
    the cross-language floor that refuses the same share (``chain.CROSS_LANGUAGE_DROP``)."""
    import numpy as np

    from localgpt.embeddings import get_embedder

    emb = get_embedder(spec)
    es = [e for e in load() if e.source == "debian-faq"]
    where = {(e.id, e.lang): i for i, e in enumerate(es)}
    q = np.array([emb.embed_query(e.question) for e in es])
    p = np.array(emb.embed_documents([e.answer[:700] for e in es]))  # about one default chunk
    sims = q @ p.T
    res: dict[tuple[str, str, str], list[float]] = {}
    for i, e in enumerate(es):
        for lang in ("en", "ja", "zh"):
            j = where.get((e.id, lang))
            if j is not None:
                res.setdefault(("same" if lang == e.lang else "cross", e.lang, lang), []).append(sims[i, j])
    print(f"{emb.name}: similarity of a heading to its own section")
    print("| pair | n | p10 | median | under %.2f |" % same_floor)
    print("|---|---:|---:|---:|---:|")
    for key, v in sorted(res.items()):
        v = np.array(v)
        print(f"| {key[0]} {key[1]}→{key[2]} | {len(v)} | {np.percentile(v, 10):.3f} | {np.median(v):.3f} "
              f"| {(v < same_floor).mean():.3f} |")
    same = np.concatenate([np.array(v) for k, v in res.items() if k[0] == "same"])
    cross = np.concatenate([np.array(v) for k, v in res.items() if k[0] == "cross"])
    share = float((same < same_floor).mean())
    floor = float(np.quantile(cross, share))
    print(f"same-language answers under {same_floor}: {share:.3f}; the cross-language floor refusing the same "
          f"share: {floor:.3f} (drop {same_floor - floor:.3f})")


def refusal_corpus(out: Path) -> None:
    """Rows for the refusal model (bench/abstention_model.py) from the FAQs: every Debian FAQ id is,
    by a hash of its id, in the corpus in exactly one language (en, ja or zh) or left out; its
    heading is asked in all three languages (answerable when the section is in, in its own or in
    another language; "held-out" when it is left out, the rest of its chapter still there). Python
    FAQ ids (English) are in or out the same way. Documents are the included sections of a chapter,
    without their headings (a question that repeats a heading word for word would be too easy)."""
    import hashlib

    from localgpt.text import split_sentences

    entries = load()
    by_key = {(e.source, e.id, e.lang): e for e in entries}
    langs = ("en", "ja", "zh")

    def place(e: Entry) -> str | None:
        h = hashlib.sha1(f"refusal\0{e.source}\0{e.id}".encode()).digest()[0]
        if e.source == "python-faq":
            return "en" if h % 4 else None
        return (langs + (None,))[h % 4]

    docs: dict[tuple[str, str, str], list[str]] = {}
    rows = []
    seen = set()
    for e in entries:
        if (e.source, e.id) in seen:
            continue
        seen.add((e.source, e.id))
        where = place(e)
        if where is not None and (e.source, e.id, where) not in by_key:
            where = "en"  # a section not translated (2 ids)
        if where is not None:
            kept = by_key[(e.source, e.id, where)]
            docs.setdefault((where, e.source, kept.chapter), []).append(kept.answer)
        for lang in langs:
            q = by_key.get((e.source, e.id, lang))
            if q is None:
                continue
            answerable = where is not None
            first = split_sentences(by_key[(e.source, e.id, where)].answer)[0].strip() if answerable else ""
            rows.append({
                "id": f"{lang}-{'answerable' if answerable else 'held-out'}-{e.source}-{e.id}"[:120],
                "question": q.question, "answer": first[:200], "aliases": [],
                **({"source": f"{where}/{e.source}-{e.chapter}.txt"} if answerable else {}),
                "lang": lang, "doc_lang": where or lang, "kind": "answerable" if answerable else "held-out",
                "split": "dev", "set": "faq", "notes": f"faq '{e.source}:{e.id}' paragraph",
            })
    for (lang, source, chapter), bodies in docs.items():
        path = out / "docs" / lang / f"{source}-{chapter}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n\n".join(bodies) + "\n", encoding="utf-8")
    (out / "questions.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                         encoding="utf-8")
    from collections import Counter

    print(f"{len(docs)} documents; questions {Counter((r['lang'], r['kind'], r['lang'] == r['doc_lang']) for r in rows)}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--refusal-corpus"]:
        refusal_corpus(Path(sys.argv[2]))
        sys.exit(0)
    from collections import Counter

    if sys.argv[1:] == ["--floor"]:
        cross_language_floor()
        sys.exit(0)
    entries = load()
    print(Counter((e.source, e.lang) for e in entries))
    print("ids present in 2+ languages:",
          sum(1 for n in Counter(e.id for e in entries if e.source == "debian-faq").values() if n > 1))
    for e in entries[:3] + [e for e in entries if e.lang == "ja"][:2]:
        print(json.dumps(dataclasses.asdict(e), ensure_ascii=False)[:400])
    sys.exit(0)
