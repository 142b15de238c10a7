"""Build an evaluation corpus and question file from the public sets (SQuAD 2.0, JSQuAD, CMRC 2018).

    python bench/eval_public.py --split dev --out bench/corpus/public-dev
    localgpt eval bench/corpus/public-dev/questions.jsonl --split dev \\
        --corpus bench/corpus/public-dev/docs --collection public-dev --retrieval-only

Documents nobody here wrote or tuned for: every article of one half of the sets (the fixed split of
``bench/public_qa.py``, by article) becomes a document in one of five formats (.md, .html, .txt,
.docx, .pdf, spread evenly over each language), under ``OUT/docs/<lang>/``; an article longer than
``MAX_DOC_CHARS`` is cut at paragraph boundaries into parts (SQuAD's articles are whole Wikipedia
pages of 25-35k characters), and CMRC's one-paragraph articles stay one short file each, so a half
holds about 450 documents. ``OUT/questions.jsonl`` is read by ``localgpt eval``; every record carries
``split``, ``lang``, ``kind`` and ``set``, and ``kind`` is one of

- ``answerable``: the question's answer (or one of its variants) is in the text localgpt extracts from
  its source document;
- ``adversarial``: SQuAD 2.0's unanswerable questions (on topic, plausible, not stated; English only);
- ``held-out``: a paragraph was left out of the corpus and one of its questions is asked (CMRC's
  articles are one paragraph, so there the whole article is left out); kept only when no answer
  variant occurs anywhere in the corpus;
- ``cut``: the sentence holding the answer was cut from its paragraph; kept only when no answer
  variant occurs anywhere in the corpus.

Absence and presence are checked on the text localgpt's own loaders extract from the written files
(``ingest.load.load_file``; headings and file names count for absence), with the token matching of
``localgpt eval`` (``answer_in_text``). Answerable questions come from untouched paragraphs only, and
only when their answer occurs in at most ``MAX_ANSWER_DOCS`` documents (an answer such as "1990" found
in ten documents would make answer-in-top-k meaningless). Questions are sampled per language and kind
(``TARGETS``) with a fixed seed, round robin over paragraphs; a question's article is never in the
other half. Same input, same files: documents are rewritten only when their bytes change.
``OUT/manifest.json`` records the documents, the held-out paragraphs and the cut sentences.

No cross-language questions: none of these sets is parallel, so a question in one language whose
answer is in another language's document would have to be written by hand here; the project's own
set (``bench/eval/qa.jsonl``) has those.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import io
import json
import random
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))  # first: bench/ingest.py must not hide the ingest package

import public_qa  # noqa: E402
from scripts.make_samples import _fixed_zip, _wrap  # noqa: E402  (one copy of the writers' helpers)
from localgpt.evaluation import answer_tokens  # noqa: E402
from localgpt.text import split_sentences  # noqa: E402

SEED = "localgpt-eval-public-v1"
LANGS = {"squad2": "en", "jsquad": "ja", "cmrc2018": "zh"}
KINDS = ("answerable", "adversarial", "held-out", "cut")
# Questions per split: per language 60 answerable and 40 unanswerable (about 300 in all).
TARGETS = {
    "en": {"answerable": 60, "adversarial": 14, "held-out": 13, "cut": 13},
    "ja": {"answerable": 60, "held-out": 20, "cut": 20},
    "zh": {"answerable": 60, "held-out": 20, "cut": 20},
}
# Paragraphs left out (CMRC: one-paragraph articles) and paragraphs with a sentence cut, per language:
# more than the questions wanted: a held-out paragraph qualifies only when an answer occurs nowhere else.
HOLD_OUT = {"en": 12, "ja": 24, "zh": 24}
CUT = {"en": 16, "ja": 25, "zh": 25}
# The abstention model's training set (--verifier-validation): every qualifying question of the verifier's
# validation articles up to these numbers, and more paragraphs held out and cut there.
VALIDATION_TARGETS = {
    "en": {"answerable": 200, "adversarial": 200, "held-out": 100, "cut": 100},
    "ja": {"answerable": 200, "held-out": 100, "cut": 100},
    "zh": {"answerable": 200, "held-out": 100, "cut": 100},
}
VALIDATION_HOLD_OUT = {"en": 8, "ja": 40, "zh": 25}
VALIDATION_CUT = {"en": 12, "ja": 60, "zh": 25}
MAX_DOC_CHARS = 10_000
MAX_ANSWER_DOCS = 3
FORMATS = (".md", ".html", ".txt", ".docx", ".pdf")
FIXED_DATE = datetime(2024, 1, 1, tzinfo=timezone.utc)
PDF_DATE = "D:20240101000000+00'00'"
PDF_FONTS = {"en": "helv", "ja": "japan", "zh": "china-s"}


@dataclass
class Para:
    key: str  # set/article/paragraph index
    set: str
    lang: str
    title: str
    index: int
    text: str  # as written (a cut sentence removed)
    questions: list
    held_out: bool = False
    cut: tuple | None = None  # (question id, sentence) when a sentence was cut


@dataclass
class Doc:
    path: str  # relative to OUT/docs
    lang: str
    set: str
    title: str
    part: int
    parts: int
    paras: list[Para] = field(default_factory=list)

    @property
    def heading(self) -> str:
        title = self.title.replace("_", " ")
        return title if self.parts == 1 else f"{title} ({self.part}/{self.parts})"


def _tokens(text: str) -> str:
    """Text as the eval compares answers: its answer tokens, space-separated and padded."""
    return " " + " ".join(answer_tokens(text)) + " "


def _occurs(answer: str, tokens: str) -> int:
    needle = answer_tokens(answer)
    return tokens.count(" " + " ".join(needle) + " ") if needle else 0


def _rng(*parts: str) -> random.Random:
    return random.Random("/".join((SEED, *parts)))


def _slug(title: str) -> str:
    return re.sub(r'[\\/:*?"<>|\s\x00-\x1f]+', "_", title).strip("_.")[:60] or "untitled"


# ------------------------------------------------------------------------------ the corpus


def plan(split: str, hold_out=HOLD_OUT, cut=CUT, pick=None) -> list[Para]:
    """Every paragraph of the split's articles, with the held-out paragraphs and cut sentences chosen
    (only in the articles ``pick(set, title)`` accepts, when given)."""
    paras: list[Para] = []
    for set_name, lang in LANGS.items():
        for a, article in enumerate(public_qa.load_articles(set_name, split)):
            for p, paragraph in enumerate(article.paragraphs):
                paras.append(Para(f"{set_name}/{a}/{p}", set_name, lang, article.title, p, paragraph.context,
                                  paragraph.questions))
    by_article = Counter(x.key.rsplit("/", 1)[0] for x in paras)
    for lang in LANGS.values():
        mine = [x for x in paras if x.lang == lang and any(not q.impossible for q in x.questions)
                and (pick is None or pick(x.set, x.title))]
        # Never an article's first paragraph (it says what the article is about), unless the article
        # is that one paragraph (CMRC): then the whole article is left out.
        holdable = [x for x in mine if x.index > 0 or by_article[x.key.rsplit("/", 1)[0]] == 1]
        if lang != "zh":
            holdable = [x for x in holdable if by_article[x.key.rsplit("/", 1)[0]] > 1]
        for x in _rng("hold", split, lang).sample(holdable, min(hold_out[lang], len(holdable))):
            x.held_out = True
    kept_tokens = _tokens("\n".join([x.title for x in paras] + [x.text for x in paras if not x.held_out]))
    for lang in LANGS.values():
        mine = [x for x in paras if x.lang == lang and not x.held_out and any(not q.impossible for q in x.questions)
                and (pick is None or pick(x.set, x.title))]
        rng = _rng("cut", split, lang)
        for x in rng.sample(mine, len(mine)):
            if sum(1 for y in paras if y.lang == lang and y.cut) >= cut[lang]:
                break
            _choose_cut(x, kept_tokens, rng)
    return paras


def _choose_cut(x: Para, kept_tokens: str, rng: random.Random) -> None:
    """Cut the sentence holding one question's answer when that leaves the answer nowhere in the corpus."""
    sentences = split_sentences(x.text)
    if len(sentences) < 3:
        return
    questions = [q for q in x.questions if not q.impossible]
    for q in rng.sample(questions, len(questions)):
        # The sentence holding the answer span (its offset; else the first that holds the answer).
        starts, pos = [], 0
        for s in sentences:
            pos = x.text.find(s, pos)
            starts.append(pos)
            pos += len(s)
        at = q.answer_start if q.answer_start is not None and q.answer_start >= 0 else x.text.find(q.answers[0])
        holding = [i for i, s in enumerate(sentences) if starts[i] <= at < starts[i] + len(s)]
        if not holding:
            continue
        i = holding[0]
        sentence = sentences[i]
        if len(sentence) > 0.5 * len(x.text) or not all(a in sentence for a in q.answers[:1]):
            continue
        if any(_occurs(a, kept_tokens) != _occurs(a, _tokens(sentence)) for a in q.answers):
            continue  # the answer is somewhere else too: cutting would not make it unanswerable
        x.cut = (q.id, sentence.strip())
        x.text = (x.text[: starts[i]] + x.text[starts[i] + len(sentence):]).strip()
        return


def documents(paras: list[Para]) -> list[Doc]:
    """The kept paragraphs as documents: one per article, long articles in parts, formats spread."""
    articles: dict[str, list[Para]] = defaultdict(list)
    for x in paras:
        if not x.held_out:
            articles[x.key.rsplit("/", 1)[0]].append(x)
    docs: list[Doc] = []
    for members in articles.values():
        parts: list[list[Para]] = [[]]
        for x in members:
            if parts[-1] and sum(len(y.text) for y in parts[-1]) + len(x.text) > MAX_DOC_CHARS:
                parts.append([])
            parts[-1].append(x)
        first = members[0]
        for n, chunk in enumerate(parts, start=1):
            docs.append(Doc("", first.lang, first.set, first.title, n, len(parts), chunk))
    used: set[str] = set()
    for lang in LANGS.values():
        mine = sorted((d for d in docs if d.lang == lang),
                      key=lambda d: hashlib.sha1(f"{SEED}/{d.set}/{d.title}/{d.part}".encode()).hexdigest())
        for i, d in enumerate(mine):
            stem = _slug(d.title) + (f"-{d.part}" if d.parts > 1 else "")
            name, n = f"{lang}/{stem}{FORMATS[i % len(FORMATS)]}", 1
            while name.lower() in used:
                n += 1
                name = f"{lang}/{stem}-{n}{FORMATS[i % len(FORMATS)]}"
            used.add(name.lower())
            d.path = name
    return sorted(docs, key=lambda d: d.path)


# ------------------------------------------------------------------------------ writers


def _clean(text: str) -> str:
    return re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\u200b]", "", text)


def render(doc: Doc) -> bytes:
    paras = [_clean(x.text) for x in doc.paras]
    ext = Path(doc.path).suffix
    if ext == ".md":
        return (f"# {doc.heading}\n\n" + "\n\n".join(paras) + "\n").encode("utf-8")
    if ext == ".txt":
        return (f"{doc.heading}\n\n" + "\n\n".join(paras) + "\n").encode("utf-8")
    if ext == ".html":
        body = "\n".join(f"<p>{html.escape(p, quote=False)}</p>" for p in paras)
        return (f'<!DOCTYPE html>\n<html lang="{doc.lang}">\n<head><meta charset="utf-8"><title>'
                f"{html.escape(doc.heading)}</title></head>\n<body>\n<h1>{html.escape(doc.heading)}</h1>\n"
                f"{body}\n</body>\n</html>\n").encode("utf-8")
    if ext == ".docx":
        return _docx(doc.heading, paras)
    if ext == ".pdf":
        return _pdf(doc.heading, paras, doc.lang)
    raise ValueError(ext)


def _docx(heading: str, paras: list[str]) -> bytes:
    import docx

    d = docx.Document()
    props = d.core_properties
    props.author, props.title = "bench/eval_public.py", heading
    props.created = props.modified = props.last_printed = FIXED_DATE.replace(tzinfo=None)
    props.revision = 1
    d.add_heading(heading, level=1)
    for p in paras:
        d.add_paragraph(p)
    buffer = io.BytesIO()
    d.save(buffer)
    return _fixed_zip(buffer.getvalue())  # every member dated 1980-01-01: the same bytes on every run


def _pdf(heading: str, paras: list[str], lang: str) -> bytes:
    import pymupdf

    def font_for(text: str) -> str:
        if lang != "en":
            return PDF_FONTS[lang]
        try:
            text.encode("cp1252")
            return "helv"
        except UnicodeEncodeError:  # Greek letters, math signs: a CJK font has them, Helvetica not
            return "china-s"

    doc = pymupdf.open()
    page, y = None, 0.0

    def line(text: str, font: str, size: float, step: float) -> None:
        nonlocal page, y
        if page is None or y + step > 770:
            page = doc.new_page(width=595, height=842)  # A4
            y = 80.0
        y += step
        page.insert_text((72, y), text, fontname=font, fontsize=size)

    hfont = font_for(heading) if lang == "en" else PDF_FONTS[lang]
    for text in _wrap(pymupdf, heading, "hebo" if hfont == "helv" else hfont, 16, 451, lang != "en"):
        line(text, "hebo" if hfont == "helv" else hfont, 16, 22)
    y += 10
    for p in paras:
        font = font_for(p)
        for text in _wrap(pymupdf, p, font, 11, 451, lang != "en"):
            line(text, font, 11, 15)
        y += 8
    doc.set_metadata({"title": heading, "author": "bench/eval_public.py", "creator": "bench/eval_public.py",
                      "producer": "PyMuPDF", "creationDate": PDF_DATE, "modDate": PDF_DATE})
    return doc.tobytes(garbage=3, deflate=True, no_new_id=True)


def write_docs(docs: list[Doc], folder: Path) -> int:
    """Write every document (only those whose bytes changed) and remove files no longer in the corpus."""
    written = 0
    wanted = set()
    for d in docs:
        path = folder / d.path
        wanted.add(path)
        data = render(d)
        if path.is_file() and path.read_bytes() == data:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written += 1
    if folder.is_dir():
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path not in wanted:
                path.unlink()
    return written


def extracted(docs: list[Doc], folder: Path) -> dict[str, tuple[str, str]]:
    """Per document: (body text, everything) as localgpt's loaders read the written file."""
    from ingest.load import load_file

    out = {}
    for d in docs:
        loaded = load_file(folder / d.path, ocr=False)
        body = "\n".join(el.text for el in loaded.elements)
        headings = "\n".join(sorted({el.heading for el in loaded.elements if el.heading}))
        out[d.path] = (body, "\n".join((d.path, headings, body)))
    return out


# ------------------------------------------------------------------------------ questions


def candidates(split: str, paras: list[Para], docs: list[Doc], texts: dict[str, tuple[str, str]], pick=None):
    """Every question that qualifies, as (kind, paragraph key, record); only from the articles
    ``pick(set, title)`` accepts, when given."""
    body = {path: _tokens(t[0]) for path, t in texts.items()}
    everything = _tokens("\n".join(t[1] for t in texts.values()))
    doc_of = {x.key: d for d in docs for x in d.paras}
    out = []

    def record(q, x: Para, kind: str, answer: str = "", aliases=(), source: str | None = None, notes: str = ""):
        rec = {"id": f"{x.lang}-{kind}-{q.id}", "question": q.question, "answer": answer, "aliases": list(aliases)}
        if source:
            rec["source"] = source
        rec.update({"lang": x.lang, "doc_lang": x.lang, "kind": kind, "split": split, "set": x.set})
        if notes:
            rec["notes"] = notes
        return rec

    for x in paras:
        if pick is not None and not pick(x.set, x.title):
            continue
        doc = doc_of.get(x.key)
        where = f"{x.set} '{x.title}' paragraph {x.index + 1}"
        for q in x.questions:
            if q.impossible:
                if doc and x.cut is None and x.set == "squad2":
                    out.append(("adversarial", x.key, record(q, x, "adversarial", notes=f"{where}, in {doc.path}")))
                continue
            absent = all(_occurs(a, everything) == 0 for a in q.answers)
            if x.held_out:
                if absent:
                    out.append(("held-out", x.key, record(q, x, "held-out", notes=f"{where} left out; answer: {q.answers[0]}")))
            elif x.cut is not None:
                if x.cut[0] == q.id and absent:
                    out.append(("cut", x.key, record(q, x, "cut", notes=f"sentence cut from {doc.path}: {x.cut[1]}; answer: {q.answers[0]}")))
            else:
                present = [a for a in q.answers if _occurs(a, body[doc.path])]
                spread = sum(1 for t in body.values() if any(_occurs(a, t) for a in q.answers))
                if present and spread <= MAX_ANSWER_DOCS:
                    rest = [a for a in q.answers if a != present[0]]
                    out.append(("answerable", x.key, record(q, x, "answerable", present[0], rest, doc.path)))
    return out


def sample(split: str, found, targets=TARGETS) -> list[dict]:
    """Per language and kind, the wanted number, round robin over paragraphs in a seeded order."""
    chosen = []
    groups: dict[tuple, list] = defaultdict(list)
    for kind, key, rec in found:
        groups[(rec["lang"], kind)].append((key, rec))
    for (lang, kind), members in sorted(groups.items()):
        want = targets.get(lang, {}).get(kind, 0)
        members.sort(key=lambda m: m[1]["id"])
        _rng("sample", split, lang, kind).shuffle(members)
        seen: Counter = Counter()
        ranked = []
        for position, (key, rec) in enumerate(members):
            ranked.append((seen[key], position, rec))
            seen[key] += 1
        chosen += [rec for _, _, rec in sorted(ranked, key=lambda r: r[:2])[:want]]
    order = {k: i for i, k in enumerate(KINDS)}
    return sorted(chosen, key=lambda r: (r["lang"], order[r["kind"]], r["id"]))


def build(split: str, out: Path, *, targets=TARGETS, hold_out=HOLD_OUT, cut=CUT, pick=None) -> dict:
    """Write OUT/docs/, OUT/questions.jsonl and OUT/manifest.json; returns the manifest."""
    if split not in ("dev", "test"):
        raise SystemExit(f"--split must be dev or test, not {split!r}")
    paras = plan(split, hold_out, cut, pick)
    docs = documents(paras)
    folder = out / "docs"
    written = write_docs(docs, folder)
    texts = extracted(docs, folder)
    questions = sample(split, candidates(split, paras, docs, texts, pick), targets)
    lines = "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions)
    (out / "questions.jsonl").write_text(lines, encoding="utf-8")
    counts = Counter(f"{q['lang']}/{q['kind']}" for q in questions)
    manifest = {
        "split": split, "seed": SEED, "sets": {s: public_qa.SETS[s][0] for s in LANGS},
        "documents": len(docs), "questions": len(questions),
        "questions_per_lang_kind": dict(sorted(counts.items())),
        "documents_per_lang_format": dict(sorted(Counter(f"{d.lang}{Path(d.path).suffix}" for d in docs).items())),
        "characters": sum(len(t[0]) for t in texts.values()),
        "docs": [{"path": d.path, "set": d.set, "title": d.title, "part": d.part, "parts": d.parts,
                  "paragraphs": len(d.paras)} for d in docs],
        "held_out": [{"set": x.set, "title": x.title, "paragraph": x.index + 1} for x in paras if x.held_out],
        "cut": [{"set": x.set, "title": x.title, "paragraph": x.index + 1, "question": x.cut[0], "sentence": x.cut[1]}
                for x in paras if x.cut],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    manifest["written"] = written
    return manifest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", required=True, choices=("dev", "test"), help="Which half of the articles.")
    ap.add_argument("--out", type=Path, help="Output folder (default bench/corpus/public-SPLIT).")
    ap.add_argument("--verifier-validation", action="store_true",
                    help="The abstention model's training set (dev only): questions, held-out paragraphs and cut "
                         "sentences only from the dev articles the answer verifier did not train on, and many more "
                         "of them (VALIDATION_TARGETS); default output bench/corpus/public-dev-vv.")
    args = ap.parse_args(argv)
    extra = {}
    if args.verifier_validation:
        if args.split != "dev":
            raise SystemExit("--verifier-validation builds from the dev half only")
        from train_verifier import validation_articles

        chosen = validation_articles(public_qa.load_all("dev"))
        extra = dict(targets=VALIDATION_TARGETS, hold_out=VALIDATION_HOLD_OUT, cut=VALIDATION_CUT,
                     pick=lambda set_name, title: (set_name, title) in chosen)
    name = f"public-{args.split}" + ("-vv" if args.verifier_validation else "")
    out = args.out or ROOT / "bench" / "corpus" / name
    out.mkdir(parents=True, exist_ok=True)
    m = build(args.split, out, **extra)
    print(f"{out}/docs: {m['documents']} documents ({m['characters']:,} characters; {m['written']} written), "
          f"{out}/questions.jsonl: {m['questions']} questions")
    for lang in LANGS.values():
        row = "  ".join(f"{k} {m['questions_per_lang_kind'].get(f'{lang}/{k}', 0):3d}" for k in KINDS)
        formats = " ".join(f"{e} {m['documents_per_lang_format'].get(lang + e, 0)}" for e in FORMATS)
        print(f"  {lang}: {row}   documents: {formats}")


if __name__ == "__main__":
    main()
