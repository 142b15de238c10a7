"""Two checks that the passages found *can* answer a question, run before the generator is asked.

A question that is on topic but not answered by the documents ("Which TCP port does the proxy
listen on?" when the handbook never gives one) retrieves passages that look relevant: similarity
scores cannot tell it from an answerable one. Two cheap facts often can:

* **Expected answer type.** "How many / how long / 多少 / 何秒" asks for a number, "what date / which
  year / 哪一天 / 何年に" for a date, "which version / 版本号" for a version, "where on disk / 哪个目录" for a path. If
  none of the best sentences holds one (numbers the question itself contains do not count), the
  passages do not hold the answer.
* **Names the question is about.** Acronyms and mixed-case names (SELinux, TCP, DHCPv6), names with
  digits (ext4, S3), package- and file-like tokens (apt-cacher-ng, ip_network, cron.daily) and
  capitalised words inside a sentence (Squid, Amazon): if no passage found mentions one of them,
  the passages are about something else. Japanese writes technical loanwords in katakana
  (フェイルオーバー, ログインシェル): when Japanese passages were found, a katakana term of the question
  counts as mentioned if at least half of its three-character pieces occur in them (so ディスククォータ
  is mentioned by クォータ and ディスク; a trailing ー is ignored, ユーザー = ユーザ), and as missing
  otherwise. English passages are not held to it: a cross-language answer has no katakana.

Both were designed on the dev half of ``bench/eval/qa.jsonl`` and are reported on its test half
(bench/RESULTS.md). They only ever make the chain abstain, and say why, so a user can rephrase.
Pure functions, no models.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from localgpt.text import has_cjk, has_kana, normalize

# Checked in this order: "which year" asks for a date, "how many years" (no date words) for a number.
ANSWER_TYPES: tuple[tuple[str, re.Pattern[str]], ...] = (
    # Only explicit date words: a bare "when" (いつ, 什么时候) is as often answered by a time of day,
    # an event or a condition ("at 7:15", "after the upgrade") as by a date.
    ("date", re.compile(r"\b(?:what|which) (?:date|year|day)\b|哪一天|哪天|哪一年|哪年|何年に|何月|何日に", re.I)),
    ("number", re.compile(
        r"\bhow (?:many|much|long|often|big|large|old)\b|\b(?:which|what) (?:tcp |udp )?port\b"
        r"|\bwhat (?:size|percentage|number)\b|多少|几[个天年次分秒小位]"
        r"|何(?:秒|日|個|人|回|分|時間|バイト|ヶ月|か月|年)|いくら|どのくらい|どれくらい", re.I)),
    ("version", re.compile(r"\b(?:which|what) version\b|版本号|哪个.{0,6}版本|バージョン", re.I)),
    ("path", re.compile(
        r"\bwhere on disk\b|\b(?:which|what) (?:directory|folder|path)\b(?! names?\b)"
        r"|\bwhere\b.*\b(?:stored|kept|saved|installed|mounted|located)\b"
        r"|哪个目录|什么目录|哪个路径|どのディレクトリ|どこに(?:保存|置か|インストール)", re.I)),
)
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
# Numbers written out count too ("six hours", "twice a week", "五年"): lenient on purpose.
_NUMBER_WORD = re.compile(
    r"\b(?:one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|fifteen|twenty|thirty|forty|fifty"
    r"|hundred|thousand|million|once|twice|dozen|single|double|hourly|daily|nightly|weekly|monthly|yearly"
    r"|annually|every)\b|[一二两三四五六七八九十百千万億亿]", re.I)
_DATE = re.compile(
    r"\b(?:1[89]\d\d|20\d\d)\b|\d+\s*[年月日]|\b(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?\s+\d"
    r"|\b(?:mon|tues|wednes|thurs|fri|satur|sun)day\b|星期[一二三四五六日天]|周[一二三四五六日]|[月火水木金土日]曜", re.I)
_PATH = re.compile(r"(?:^|[\s(\"'`“「（])(?:~?/[\w.+-]+)+")
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+/-]*[A-Za-z0-9]|[A-Za-z0-9]")
_NOT_NAMES = frozenset({"e.g", "i.e", "etc", "vs"})
_KATAKANA_TERM = re.compile(r"[\u30a1-\u30fa\u30fc]{3,}")  # ァ…ヺ and the long-vowel mark ー
KATAKANA_MENTIONED_SHARE = 0.5

TYPE_WORDS = {
    "en": {"number": "number", "date": "date", "version": "version", "path": "path"},
    "zh": {"number": "数字", "date": "日期", "version": "版本号", "path": "路径"},
    "ja": {"number": "数値", "date": "日付", "version": "バージョン", "path": "パス"},
}


@dataclass(frozen=True)
class EvidenceGap:
    """Why the passages cannot answer: the answer type they lack, or the names they never mention."""

    kind: str  # "answer_type", "names", "answerability", "verifier", "cross_language" or "model_check" (the verifier or the generator said no: localgpt.chain)
    detail: tuple[str, ...]

    def explain(self, lang: str = "en") -> str:
        if self.kind == "answerability":
            return {
                "en": "the best passages found do not seem to answer the question",
                "zh": "找到的最佳段落似乎没有回答这个问题",
                "ja": "見つかった文書は質問に答えていないようです",
            }.get(lang, "")
        if self.kind == "cross_language":
            return {
                "en": "passages found are in another language than the question, so the answer could not be verified",
                "zh": "找到的段落有的与问题语言不同，无法验证答案",
                "ja": "見つかった文書の一部は質問と別の言語のため、答えを検証できませんでした",
            }.get(lang, "")
        if self.kind == "verifier":
            return {
                "en": "the answer verifier judged that none of the passages found states the answer",
                "zh": "答案验证模型判断找到的段落都没有给出答案",
                "ja": "回答検証モデルは見つかった文書のどれにも答えが書かれていないと判断しました",
            }.get(lang, "")
        if self.kind == "model_check":
            return {
                "en": "the model judged that the passages found do not state the answer",
                "zh": "模型判断找到的段落没有给出答案",
                "ja": "モデルは見つかった文書に答えが書かれていないと判断しました",
            }.get(lang, "")
        if self.kind == "answer_type":
            what = TYPE_WORDS.get(lang, TYPE_WORDS["en"])[self.detail[0]]
            return {
                "en": f"the passages found give no {what} for this",
                "zh": f"找到的段落里没有相关的{what}",
                "ja": f"見つかった文書に該当する{what}がありません",
            }.get(lang, "")
        names = ", ".join(self.detail)
        return {
            "en": f"none of the passages found mention {names}",
            "zh": f"找到的段落都没有提到 {names}",
            "ja": f"見つかった文書は {names} に触れていません",
        }.get(lang, "")


def expected_answer_type(question: str) -> str | None:
    """'number', 'date', 'version' or 'path' when the question's wording asks for one."""
    for kind, pattern in ANSWER_TYPES:
        if pattern.search(question):
            return kind
    return None


def holds_answer_type(kind: str, sentences: Iterable[str], question: str = "") -> bool:
    """Whether any sentence holds a value of ``kind`` (numbers that the question has don't count)."""
    own = set(_NUMBER.findall(question))
    for s in sentences:
        if kind in ("number", "version"):
            if any(n not in own for n in _NUMBER.findall(s)) or (kind == "number" and _NUMBER_WORD.search(s)):
                return True
        elif kind == "date":
            if _DATE.search(s):
                return True
        elif kind == "path":
            if _PATH.search(s):
                return True
    return False


def question_names(question: str) -> list[str]:
    """The Latin-script names a question is about (see the module docstring)."""
    names: list[str] = []
    for m in _WORD.finditer(question):
        tok = m.group(0)
        if tok.isdigit() or tok.casefold() in _NOT_NAMES:
            continue
        starts_sentence = not question[: m.start()].strip() or question[: m.start()].rstrip()[-1] in ".!?:;。！？"
        has_digit = any(c.isdigit() for c in tok) and any(c.isalpha() for c in tok)
        mixed_case = len(tok) >= 2 and any(c.isupper() for c in tok[1:])
        code_like = any(c in tok for c in "._+/") or tok.count("-") >= 2 or ("-" in tok and has_digit)
        capitalised = len(tok) >= 3 and tok[0].isupper() and not starts_sentence
        if has_digit or mixed_case or code_like or capitalised or (has_cjk(question) and tok[0].isupper()):
            names.append(tok)
    return list(dict.fromkeys(names))


def _mentions(name: str, text: str) -> bool:
    needle = re.sub(r"['’]s$", "", name.casefold())
    return needle in text


def katakana_terms(question: str) -> list[str]:
    """The katakana words of a question (three characters or more, NFKC: half-width kana too)."""
    text = normalize(question)
    return list(dict.fromkeys(t for t in _KATAKANA_TERM.findall(text) if len(t.rstrip("ー")) >= 3))


def _mentions_katakana(term: str, text: str) -> bool:
    core = term.rstrip("ー")
    pieces = [core[i : i + 3] for i in range(len(core) - 2)]
    return sum(p in text for p in pieces) >= KATAKANA_MENTIONED_SHARE * len(pieces)


def missing_names(question: str, texts: Iterable[str]) -> list[str]:
    """The question's names that none of ``texts`` mention (case-insensitive), and its katakana
    terms that the Japanese ones among ``texts`` do not mention (see the module docstring)."""
    texts = list(texts)
    haystack = "\n".join(texts).casefold()
    missing = [n for n in question_names(question) if not _mentions(n, haystack)]
    japanese = "\n".join(normalize(t) for t in texts if has_kana(t))
    if japanese:
        missing += [t for t in katakana_terms(question) if not _mentions_katakana(t, japanese)]
    return missing


def evidence_gap(question: str, best_sentences: Sequence[str], passages: Sequence[str]) -> EvidenceGap | None:
    """Why ``passages`` (and their ``best_sentences``, best first) cannot answer, or None."""
    missing = missing_names(question, passages)
    if missing:
        return EvidenceGap("names", tuple(missing))
    kind = expected_answer_type(question)
    if kind and not holds_answer_type(kind, best_sentences, question):
        return EvidenceGap("answer_type", (kind,))
    return None
