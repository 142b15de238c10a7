"""Language-aware text pieces shared by splitting, keyword search and answer support:
sentence boundaries that know 。！？, and keyword terms that work for text without spaces.

Chinese and Japanese have no spaces between words, so the keyword index uses overlapping
character bigrams (plus single characters for one-character queries) for CJK runs and
lower-cased words for everything else. Pure functions, no models.
"""

from __future__ import annotations

import re
import unicodedata

# Han, Hiragana, Katakana, Hangul, CJK punctuation-free ranges.
CJK_RANGES = _CJK = (
    "\u3040-\u309f"  # Hiragana
    "\u30a0-\u30ff"  # Katakana
    "\u31f0-\u31ff"
    "\u3400-\u4dbf"  # CJK ext A
    "\u4e00-\u9fff"  # CJK unified
    "\uf900-\ufaff"
    "\uac00-\ud7af"  # Hangul
    "\uff66-\uff9f"  # half-width Katakana
)
_CJK_RUN = re.compile(f"[{_CJK}]+")
_TOKEN = re.compile(f"[{_CJK}]+|[^\\W_]+(?:[.'’][^\\W_]+)*", re.UNICODE)
_SENTENCE_END = re.compile(
    r"(?<=[。！？!?])(?:[」』）)\"'”’]*)\s*"  # CJK and ! ? end a sentence even without a space
    r"|(?<=[.;:])\s+(?=[\"'“‘(\[]?[A-Z0-9\u4e00-\u9fff\u3040-\u30ff])"  # Latin: period + space + capital
    r"|\n\s*\n|\n(?=\s*(?:[-*•·]|\d+[.)])\s)"  # blank lines, list items
)

_STOPWORDS = frozenset(
    """a an and are as at be by for from has have how i in is it its of on or that the this to was were what
    when where which who why will with do does did can could should would you your my our their there these
    those than then so not no yes if into about which also""".split()
)


_KANA = re.compile(r"[\u3040-\u30ff]")


def has_kana(text: str) -> bool:
    """Whether ``text`` has hiragana or katakana: Japanese rather than Chinese."""
    return _KANA.search(text) is not None


def has_cjk(text: str) -> bool:
    return _CJK_RUN.search(text) is not None


def text_language(text: str) -> str:
    """'ja' (any kana), 'zh' (other CJK) or 'en' (the rest): enough to tell same-language pairs."""
    if has_kana(text):
        return "ja"
    if has_cjk(text):
        return "zh"
    return "en"


def normalize(text: str) -> str:
    """NFKC (full-width to half-width, compatibility forms) and case folding."""
    return unicodedata.normalize("NFKC", text).casefold()


def keyword_terms(text: str, *, stopwords: bool = True) -> list[str]:
    """Terms for the keyword index: words for spaced scripts, bigrams for CJK runs."""
    terms: list[str] = []
    for match in _TOKEN.finditer(normalize(text)):
        tok = match.group(0)
        if _CJK_RUN.fullmatch(tok):
            if len(tok) == 1:
                terms.append(tok)
            else:
                terms.extend(tok[i : i + 2] for i in range(len(tok) - 1))
        elif not (stopwords and tok in _STOPWORDS):
            terms.append(tok)
    return terms


def split_sentences(text: str) -> list[str]:
    """Sentences (and list items / paragraphs) in order; the pieces join back to the text."""
    pieces: list[str] = []
    start = 0
    for m in _SENTENCE_END.finditer(text):
        end = m.end()
        if end > start:
            pieces.append(text[start:end])
            start = end
    if start < len(text):
        pieces.append(text[start:])
    return [p for p in pieces if p.strip()]
