"""The public reading-comprehension sets (SQuAD 2.0, JSQuAD, CMRC 2018) as articles, with a fixed split.

One loader and one split rule for everything built from them: the evaluation corpus
(``bench/eval_public.py``) and the verifier's training data. The split is by article, decided by a
hash of the set and the article's title, so it never changes with code order and no article's
paragraphs are in both halves. Tune and train on ``dev``; ``test`` is reported once.

Files live in ``../shared/data/qa`` (``LOCALGPT_QA_DATA`` overrides); nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETS = {  # name -> (file, language)
    "squad2": ("squad2-dev-part1.json", "en"),
    "jsquad": ("jsquad-v1.3-valid.json", "ja"),
    "cmrc2018": ("cmrc2018-dev.json", "zh"),
}


@dataclasses.dataclass
class Question:
    id: str
    question: str
    answers: list[str]  # distinct answer texts, first the most given; [] when impossible
    impossible: bool  # SQuAD 2.0's adversarial unanswerable questions
    answer_start: int | None = None  # offset of answers[0] in its paragraph


@dataclasses.dataclass
class Paragraph:
    context: str
    questions: list[Question]


@dataclasses.dataclass
class Article:
    set: str
    language: str
    title: str
    paragraphs: list[Paragraph]

    @property
    def split(self) -> str:
        return split_of(self.set, self.title)


def data_dir() -> Path:
    return Path(os.environ.get("LOCALGPT_QA_DATA") or ROOT.parent / "shared" / "data" / "qa")


def split_of(set_name: str, title: str) -> str:
    """'dev' or 'test' for an article, fixed forever by a hash of its set and title (about half each)."""
    digest = hashlib.sha1(f"{set_name}\0{title}".encode("utf-8")).digest()
    return "dev" if digest[0] % 2 == 0 else "test"


def _question(qa: dict) -> Question:
    texts: list[str] = []
    for answer in qa.get("answers") or []:
        text = answer["text"].strip()
        if text and text not in texts:
            texts.append(text)
    if texts:  # the most often given answer first (annotators repeat the consensus span)
        counts = [sum(a["text"].strip() == t for a in qa["answers"]) for t in texts]
        texts = [t for _, t in sorted(zip(counts, texts), key=lambda p: -p[0])]
    impossible = bool(qa.get("is_impossible")) or not texts
    start = next((a["answer_start"] for a in qa.get("answers") or [] if a["text"].strip() == (texts or [""])[0]), None)
    return Question(qa["id"], qa["question"].strip(), [] if impossible else texts, impossible,
                    None if impossible else start)


def load_articles(set_name: str, split: str | None = None) -> list[Article]:
    """Every article of one set (entries sharing a title are one article), optionally one split only."""
    file, language = SETS[set_name]
    raw = json.loads((data_dir() / file).read_text(encoding="utf-8"))["data"]
    articles: "OrderedDict[str, Article]" = OrderedDict()
    for entry in raw:
        title = entry["title"].strip() or entry["paragraphs"][0]["context"][:20]
        article = articles.setdefault(title, Article(set_name, language, title, []))
        for para in entry["paragraphs"]:
            context = para["context"]
            offset = 0
            if set_name == "jsquad" and " [SEP] " in context[:200]:  # "title [SEP] text"
                offset = context.index(" [SEP] ") + len(" [SEP] ")
                context = context[offset:]
            questions = [_question(qa) for qa in para["qas"]]
            for q in questions:
                if q.answer_start is not None:
                    q.answer_start -= offset
            article.paragraphs.append(Paragraph(context, questions))
    chosen = list(articles.values())
    return [a for a in chosen if split is None or a.split == split]


def load_all(split: str | None = None) -> list[Article]:
    return [a for name in SETS for a in load_articles(name, split)]


if __name__ == "__main__":  # a summary of the halves
    for name in SETS:
        for half in ("dev", "test"):
            arts = load_articles(name, half)
            qs = [q for a in arts for p in a.paragraphs for q in p.questions]
            print(f"{name:9s} {half:4s} articles {len(arts):4d} paragraphs {sum(len(a.paragraphs) for a in arts):5d} "
                  f"questions {len(qs):5d} impossible {sum(q.impossible for q in qs):5d}")
