"""Measuring answer quality: question sets, retrieval and answer metrics, BEIR scoring, reports.

Pure functions over small dataclasses: the caller (``localgpt eval``) runs the real chain and
fills ``QuestionResult``s; this module scores them and renders tables and JSON. It never
retrieves, generates, loads a model or touches the network.

Text comparisons work for Chinese and Japanese as well as spaced scripts: NFKC + case folding,
and CJK text is compared character by character (no splitting on spaces that are not there).
"""

from __future__ import annotations

import csv
import json
import math
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from localgpt.errors import LocalGPTError
from localgpt.text import CJK_RANGES as _CJK, normalize

DEFAULT_KS = (1, 3, 5, 10)


class QAFileError(LocalGPTError):
    """A question file (or BEIR folder) cannot be read; the message names the file and line."""


# ------------------------------------------------------------------------------- normalisation

_CJK_CHAR = f"[{_CJK}\u3000-\u303f\uff01-\uff60\uffe0-\uffee]"  # CJK scripts and their punctuation
_SPACE_NEXT_TO_CJK = re.compile(f"(?<={_CJK_CHAR})\\s+|\\s+(?={_CJK_CHAR})")
_INVISIBLE = re.compile("[\u00ad\u200b\u200c\u200d\u2060\ufeff]")
_WS = re.compile(r"\s+")
_ANSWER_TOKEN = re.compile(f"[{_CJK}]|[^\\W_]+", re.UNICODE)
_ARTICLES = frozenset(("a", "an", "the"))


def normalize_for_match(text: str) -> str:
    """Text for substring checks that survive extraction: NFKC, case folded, whitespace collapsed,
    and no whitespace next to CJK characters (PDF and wrapped text put line breaks inside words)."""
    text = _INVISIBLE.sub("", normalize(text))
    text = _WS.sub(" ", text)
    return _SPACE_NEXT_TO_CJK.sub("", text).strip()


def answer_tokens(text: str) -> list[str]:
    """Tokens for answer comparison: words for spaced scripts (articles dropped, as SQuAD does),
    one token per character for CJK; punctuation is ignored."""
    tokens = _ANSWER_TOKEN.findall(normalize(text))
    return [t for t in tokens if t not in _ARTICLES]


def _contains_tokens(haystack: Sequence[str], needle: Sequence[str]) -> bool:
    if not needle:
        return False
    n = len(needle)
    first = needle[0]
    for i in range(len(haystack) - n + 1):
        if haystack[i] == first and list(haystack[i : i + n]) == list(needle):
            return True
    return False


def answer_in_text(answers: Iterable[str], text: str) -> bool:
    """Whether any of ``answers`` occurs in ``text`` as a whole run of tokens (CJK: characters)."""
    hay = answer_tokens(text)
    return any(_contains_tokens(hay, answer_tokens(a)) for a in answers)


def exact_match(prediction: str, answers: Iterable[str]) -> float:
    pred = answer_tokens(prediction)
    return float(any(pred and pred == answer_tokens(a) for a in answers))


def token_f1(prediction: str, answers: Iterable[str]) -> float:
    """Best token F1 against the answers (SQuAD definition; CJK counted per character)."""
    pred = answer_tokens(prediction)
    best = 0.0
    for answer in answers:
        gold = answer_tokens(answer)
        if not pred or not gold:
            continue
        counts: dict[str, int] = {}
        for t in gold:
            counts[t] = counts.get(t, 0) + 1
        common = 0
        for t in pred:
            if counts.get(t, 0) > 0:
                counts[t] -= 1
                common += 1
        if common:
            precision, recall = common / len(pred), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


# ------------------------------------------------------------------------------------ QA sets


@dataclass
class EvalCase:
    """One question of a QA set. An empty ``answer`` means the documents do not answer it."""

    question: str
    answer: str = ""
    aliases: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # files (relative paths) that hold the answer
    page: int | None = None
    quote: str | None = None
    lang: str | None = None  # language of the question
    doc_lang: str | None = None  # language of the source document, for cross-language counts
    id: str = ""
    line: int = 0
    kind: str | None = None  # e.g. answerable, adversarial, held-out, cut (bench/eval_public.py)
    split: str | None = None  # "dev" or "test" when the file says which half a question is in
    set: str | None = None  # the public set a question comes from

    @property
    def answerable(self) -> bool:
        return bool(self.answer.strip())

    @property
    def answers(self) -> list[str]:
        return [a for a in [self.answer, *self.aliases] if a.strip()] if self.answerable else []

    @property
    def source(self) -> str | None:
        return self.sources[0] if self.sources else None

    @property
    def cross_language(self) -> bool:
        return bool(self.lang and self.doc_lang and self.lang != self.doc_lang)


_KNOWN_FIELDS = {"id", "question", "answer", "aliases", "source", "sources", "page", "quote", "lang", "doc_lang", "notes",
                 "kind", "split", "set"}


def parse_qa_line(record: Any, line: int, name: str = "<qa>") -> EvalCase:
    """One JSON object of a QA file as an EvalCase; QAFileError names the file, line and field."""
    where = f"{name}:{line}"
    if not isinstance(record, dict):
        raise QAFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - _KNOWN_FIELDS)
    if unknown:
        raise QAFileError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(_KNOWN_FIELDS))})")
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise QAFileError(f"{where}: 'question' must be a non-empty string")
    answer = record.get("answer", "")
    if answer is None:
        answer = ""
    if not isinstance(answer, str):
        raise QAFileError(f"{where}: 'answer' must be a string (empty for an unanswerable question)")
    aliases = record.get("aliases", [])
    if isinstance(aliases, str):
        aliases = [aliases]
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise QAFileError(f"{where}: 'aliases' must be a list of strings")
    raw_sources = record.get("sources", record.get("source"))
    if raw_sources in (None, ""):
        sources: list[str] = []
    elif isinstance(raw_sources, str):
        sources = [raw_sources]
    elif isinstance(raw_sources, list) and all(isinstance(s, str) and s for s in raw_sources):
        sources = list(raw_sources)
    else:
        raise QAFileError(f"{where}: 'source' must be a file path (or 'sources' a list of them)")
    page = record.get("page")
    if page is not None and (isinstance(page, bool) or not isinstance(page, int) or page < 1):
        raise QAFileError(f"{where}: 'page' must be a positive integer (1-based) or absent")
    for key in ("quote", "lang", "doc_lang", "id", "kind", "split", "set"):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise QAFileError(f"{where}: '{key}' must be a string")
    if record.get("split") not in (None, "dev", "test"):
        raise QAFileError(f"{where}: 'split' must be 'dev' or 'test'")
    case = EvalCase(
        question=question.strip(), answer=answer.strip(), aliases=[a.strip() for a in aliases if a.strip()],
        sources=sources, page=page, quote=record.get("quote"), lang=record.get("lang"),
        doc_lang=record.get("doc_lang"), id=record.get("id") or f"q{line}", line=line,
        kind=record.get("kind"), split=record.get("split"), set=record.get("set"),
    )
    if case.answerable and not sources:
        raise QAFileError(f"{where}: an answerable question needs its 'source' file")
    if not case.answerable and case.aliases:
        raise QAFileError(f"{where}: 'aliases' given but 'answer' is empty (empty answer means unanswerable)")
    if page is not None and not sources:
        raise QAFileError(f"{where}: 'page' given without a 'source'")
    return case


def read_qa(lines: Iterable[str], name: str = "<qa>") -> list[EvalCase]:
    """Parse QA JSON lines (blank lines and lines starting with # are skipped)."""
    cases: list[EvalCase] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise QAFileError(f"{name}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
        case = parse_qa_line(record, number, name)
        if case.id in seen:
            raise QAFileError(f"{name}:{number}: id {case.id!r} already used on line {seen[case.id]}")
        seen[case.id] = number
        cases.append(case)
    if not cases:
        raise QAFileError(f"{name}: no questions in the file")
    return cases


SPLITS = ("all", "dev", "test")


def split_cases(cases: Sequence[EvalCase], part: str) -> list[EvalCase]:
    """The ``dev`` or ``test`` half of a question set (``all``: every question).

    Tuning reads only ``dev``; results are reported on ``test``. Questions that name their half
    (a ``split`` field, as bench/eval_public.py writes: split by article) are taken as named.
    Otherwise the split depends on the question ids alone (sha256 order, alternating inside each
    group of question language × answerable × cross-language), so each half has the same mix of
    languages and kinds.
    """
    if part == "all":
        return list(cases)
    if part not in SPLITS:
        raise QAFileError(f"unknown split {part!r}: use {', '.join(SPLITS)}")
    named = [c for c in cases if c.split]
    if named:
        if len(named) != len(cases):
            raise QAFileError(f"{len(named)} of {len(cases)} questions name their split: give every question one, or none")
        return [c for c in cases if c.split == part]
    import hashlib

    groups: dict[tuple, list[EvalCase]] = {}
    for case in cases:
        groups.setdefault((case.lang, case.answerable, case.cross_language), []).append(case)
    chosen: set[str] = set()
    for members in groups.values():
        ordered = sorted(members, key=lambda c: hashlib.sha256(c.id.encode("utf-8")).hexdigest())
        chosen.update(c.id for i, c in enumerate(ordered) if (i % 2 == 0) == (part == "dev"))
    return [c for c in cases if c.id in chosen]


def load_qa(path: str | Path) -> list[EvalCase]:
    """Read and validate a QA file: JSON lines with question, answer, aliases, source, page."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise QAFileError(f"cannot read question file {path}: {exc}") from exc
    return read_qa(text.splitlines(), path.name)


# ------------------------------------------------------------------------- results and scores


@dataclass
class RetrievedChunk:
    """A retrieved (or cited) chunk as the metrics see it."""

    source: str
    page: int | None
    score: float
    text: str
    also_in: tuple[str, ...] = ()  # other files with identical content
    chunk_id: str = ""

    @classmethod
    def from_source_ref(cls, ref: Any) -> "RetrievedChunk":
        """From a ``localgpt.documents.SourceRef`` (or anything with its attributes)."""
        sources = list(getattr(ref, "sources", None) or [getattr(ref, "source", "")])
        return cls(source=sources[0] if sources else "", page=ref.page, score=float(ref.score), text=ref.text,
                   also_in=tuple(sources[1:]), chunk_id=getattr(ref, "chunk_id", ""))

    @property
    def files(self) -> tuple[str, ...]:
        return (self.source, *self.also_in)

    def as_dict(self) -> dict:
        out = {"source": self.source, "page": self.page, "score": self.score, "text": self.text}
        if self.also_in:
            out["also_in"] = list(self.also_in)
        if self.chunk_id:
            out["chunk_id"] = self.chunk_id
        return out


@dataclass
class QuestionResult:
    """What the system did for one question. ``answer`` is None when generation was skipped."""

    case: EvalCase
    retrieved: list[RetrievedChunk] = field(default_factory=list)
    answer: str | None = None
    cited: list[RetrievedChunk] = field(default_factory=list)
    abstained: bool = False
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    error: str | None = None
    confidence: str | None = None  # "high" or "low" for an answer the chain gave; None when abstaining or unknown
    # The chunks the chain packs into the generator's prompt (its top k while they fit the window)
    # and their tokens (the generator's tokenizer); None when not measured.
    context: list[RetrievedChunk] | None = None
    context_tokens: int | None = None


def same_file(found: str, expected: str) -> bool:
    """A stored path matches an expected relative path when it is it or ends with it."""
    f = found.replace("\\", "/")
    e = expected.replace("\\", "/").lstrip("./")
    return f == e or f.endswith("/" + e)


def _first_rank(chunks: Sequence[RetrievedChunk], test) -> int | None:
    for rank, chunk in enumerate(chunks, start=1):
        if test(chunk):
            return rank
    return None


@dataclass
class QuestionScores:
    """The metrics of one question. Ranks are 1-based; None means not found / not applicable."""

    id: str
    answerable: bool
    file_rank: int | None = None
    page_rank: int | None = None
    answer_rank: int | None = None
    file_recall: dict[int, float] = field(default_factory=dict)  # k -> share of expected files in the top k
    exact: float | None = None
    f1: float | None = None
    contains: float | None = None
    citation_correct: float | None = None  # a cited chunk holds the answer
    citation_source_correct: float | None = None  # a cited chunk comes from an expected file
    citation_precision: float | None = None  # the share of cited chunks that hold the answer
    cited_chunks: int | None = None  # how many distinct chunks the answer shows as backing it
    abstained: bool = False
    confidence: str | None = None  # the chain's "high" / "low" for an answer
    answer_in_context: float | None = None  # a chunk of the packed context holds the answer
    context_chunks: int | None = None  # how many chunks were packed
    context_tokens: int | None = None  # and their tokens

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["file_recall"] = {str(k): v for k, v in self.file_recall.items()}
        return d


def score_question(result: QuestionResult, ks: Sequence[int] = DEFAULT_KS) -> QuestionScores:
    case = result.case
    s = QuestionScores(id=case.id, answerable=case.answerable, abstained=result.abstained,
                       confidence=None if result.abstained else result.confidence)
    chunks = result.retrieved
    if result.context is not None:
        s.context_chunks = len(result.context)
        s.context_tokens = result.context_tokens
    if case.sources:
        s.file_rank = _first_rank(chunks, lambda c: any(same_file(f, e) for f in c.files for e in case.sources))
        for k in ks:
            top = chunks[:k]
            found = sum(1 for e in case.sources if any(same_file(f, e) for c in top for f in c.files))
            s.file_recall[k] = found / len(case.sources)
        if case.page is not None:
            s.page_rank = _first_rank(
                chunks, lambda c: c.page == case.page and any(same_file(f, e) for f in c.files for e in case.sources)
            )
    if not case.answerable:
        return s
    answers = case.answers
    s.answer_rank = _first_rank(chunks, lambda c: answer_in_text(answers, c.text))
    if result.context is not None:
        s.answer_in_context = float(any(answer_in_text(answers, c.text) for c in result.context))
    if result.answer is not None:
        text = "" if result.abstained else result.answer
        s.exact = exact_match(text, answers)
        s.f1 = token_f1(text, answers)
        s.contains = float(answer_in_text(answers, text))
        if not result.abstained:
            cited = list({(c.chunk_id or c.text): c for c in result.cited}.values())
            holding = [answer_in_text(answers, c.text) for c in cited]
            s.citation_correct = float(any(holding))
            s.cited_chunks = len(cited)
            s.citation_precision = sum(holding) / len(cited) if cited else 0.0
            s.citation_source_correct = float(
                any(same_file(f, e) for c in result.cited for f in c.files for e in case.sources)
            )
    return s


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation, as numpy's default."""
    if not values:
        raise ValueError("percentile of no values")
    data = sorted(values)
    pos = (len(data) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def latency_summary(timings: Iterable[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Per stage (plus ``total``): mean, p50, p95 and count, in seconds."""
    per_stage: dict[str, list[float]] = {}
    for t in timings:
        if not t:
            continue
        for stage, seconds in t.items():
            per_stage.setdefault(stage, []).append(float(seconds))
        if "total" not in t:
            per_stage.setdefault("total", []).append(float(sum(t.values())))
    return {
        stage: {"mean": sum(v) / len(v), "p50": percentile(v, 50), "p95": percentile(v, 95), "n": len(v)}
        for stage, v in per_stage.items()
    }


@dataclass
class EvalReport:
    """Scores of one configuration on one QA set: per question and overall."""

    name: str
    results: list[QuestionResult]
    scores: list[QuestionScores]
    overall: dict[str, float | None]
    counts: dict[str, int]
    latency: dict[str, dict[str, float]]
    ks: tuple[int, ...] = DEFAULT_KS
    config: dict[str, Any] = field(default_factory=dict)
    # Per group of questions (each language, each kind, each language × kind; see ``breakdown``).
    breakdown: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self, *, chunk_text: bool = True) -> dict:
        """JSON-ready: overall metrics, counts, latency, and per question its ranked chunks."""
        questions = []
        for result, score in zip(self.results, self.scores):
            case = result.case
            chunks = [c.as_dict() for c in result.retrieved]
            if not chunk_text:
                for c in chunks:
                    c.pop("text", None)
            questions.append({
                "id": case.id, "question": case.question, "expected_answer": case.answer,
                "aliases": case.aliases, "expected_sources": case.sources, "expected_page": case.page,
                "lang": case.lang, "answer": result.answer, "abstained": result.abstained, "confidence": result.confidence,
                "cited": [{"source": c.source, "page": c.page} for c in result.cited],
                "timings": result.timings, "error": result.error, "scores": score.as_dict(), "retrieved": chunks,
            })
            questions[-1].update({key: getattr(case, key) for key in ("kind", "split", "set") if getattr(case, key)})
            if result.context is not None:
                questions[-1]["context"] = [{"source": c.source, "page": c.page, "chunk_id": c.chunk_id}
                                            for c in result.context]
                questions[-1]["context_tokens"] = result.context_tokens
        return {"name": self.name, "config": self.config, "ks": list(self.ks), "counts": self.counts,
                "overall": self.overall, "breakdown": self.breakdown, "latency": self.latency, "questions": questions}

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(**kwargs), ensure_ascii=False, indent=1)


def evaluate(
    results: Sequence[QuestionResult], *, name: str = "run", ks: Sequence[int] = DEFAULT_KS,
    config: Mapping[str, Any] | None = None,
) -> EvalReport:
    """Score every question and aggregate.

    Retrieval metrics are over answerable questions with a source (page metrics over those with a
    page too); answer and citation metrics over answerable questions that were generated for;
    abstention over unanswerable ones and false abstention over answerable ones. The same metrics
    per language and per kind of question come in ``breakdown`` when the set has more than one.
    """
    ks = tuple(sorted(set(ks)))
    scores = [score_question(r, ks) for r in results]
    overall, counts = _aggregate(results, scores, ks)
    return EvalReport(name=name, results=list(results), scores=scores, overall=overall, counts=counts,
                      latency=latency_summary(r.timings for r in results), ks=ks, config=dict(config or {}),
                      breakdown=breakdown(results, scores, ks))


def _aggregate(
    results: Sequence[QuestionResult], scores: Sequence[QuestionScores], ks: Sequence[int],
) -> tuple[dict[str, float | None], dict[str, int]]:
    answerable = [s for s in scores if s.answerable]
    unanswerable = [s for s in scores if not s.answerable]
    with_source = [s for r, s in zip(results, scores) if s.answerable and r.case.sources]
    with_page = [s for r, s in zip(results, scores) if s.answerable and r.case.sources and r.case.page is not None]
    generated = [(r, s) for r, s in zip(results, scores) if r.answer is not None]

    def hit(ranks: Iterable[int | None], k: int) -> float | None:
        ranks = list(ranks)
        return sum(1 for r in ranks if r is not None and r <= k) / len(ranks) if ranks else None

    def mrr(ranks: Iterable[int | None]) -> float | None:
        ranks = list(ranks)
        return sum(1 / r for r in ranks if r) / len(ranks) if ranks else None

    overall: dict[str, float | None] = {}
    for k in ks:
        overall[f"file_hit@{k}"] = hit((s.file_rank for s in with_source), k)
        overall[f"file_recall@{k}"] = _mean(s.file_recall.get(k) for s in with_source)
        overall[f"page_hit@{k}"] = hit((s.page_rank for s in with_page), k)
        overall[f"answer_in_top{k}"] = hit((s.answer_rank for s in answerable), k)
    overall["file_mrr"] = mrr(s.file_rank for s in with_source)
    overall["page_mrr"] = mrr(s.page_rank for s in with_page)
    overall["answer_mrr"] = mrr(s.answer_rank for s in answerable)
    # What the generator is given: the top k as packed into its window (chunk size and k compared at
    # the same context budget), and how many chunks that is.
    overall["answer_in_context"] = _mean(s.answer_in_context for s in answerable)
    overall["context_chunks"] = _mean(s.context_chunks for s in scores)
    overall["context_tokens"] = _mean(s.context_tokens for s in scores)
    gen_answerable = [s for r, s in generated if s.answerable]
    overall["exact_match"] = _mean(s.exact for s in gen_answerable)
    overall["f1"] = _mean(s.f1 for s in gen_answerable)
    overall["contains_answer"] = _mean(s.contains for s in gen_answerable)
    overall["citation_correct"] = _mean(s.citation_correct for s in gen_answerable)
    overall["citation_source_correct"] = _mean(s.citation_source_correct for s in gen_answerable)
    # Citing more chunks makes "a cited chunk holds the answer" easier: these two keep it honest.
    overall["citation_precision"] = _mean(s.citation_precision for s in gen_answerable)
    overall["cited_per_answer"] = _mean(s.cited_chunks for s in gen_answerable)
    # Abstention is decided before generation too (the relevance threshold), so a retrieval-only
    # run measures it as well.
    overall["abstention_rate"] = _mean(float(s.abstained) for s in unanswerable)
    overall["false_abstention_rate"] = _mean(float(s.abstained) for s in answerable)
    # What the user sees besides a refusal: an answer marked "low confidence" sends them to its quotes;
    # the failure that remains is an unanswerable question answered with high confidence.
    if any(s.confidence for s in scores):
        overall["confident_when_unanswerable"] = _mean(float(s.confidence == "high") for s in unanswerable)
        overall["confident_when_answerable"] = _mean(float(s.confidence == "high") for s in answerable)
    counts = {
        "questions": len(scores), "answerable": len(answerable), "unanswerable": len(unanswerable),
        "with_source": len(with_source), "with_page": len(with_page), "generated": len(generated),
        "cross_language": sum(1 for r in results if r.case.answerable and r.case.cross_language),
        "errors": sum(1 for r in results if r.error),
    }
    return overall, counts


BREAKDOWN_FIELDS = ("lang", "kind")
KIND_ORDER = ("answerable", "adversarial", "held-out", "cut", "unanswerable")


def _group_value(case: EvalCase, key: str) -> str:
    if key == "kind":  # a set without kinds: answerable or not
        return case.kind or ("answerable" if case.answerable else "unanswerable")
    return getattr(case, key) or "–"


def breakdown(
    results: Sequence[QuestionResult], scores: Sequence[QuestionScores], ks: Sequence[int] = DEFAULT_KS,
    by: Sequence[str] = BREAKDOWN_FIELDS,
) -> list[dict[str, Any]]:
    """The metrics per group of questions: each value of each field of ``by`` that the set uses
    (language; kind when the questions name theirs), then every combination of two fields.
    A field with a single value makes no groups. Each row: ``group`` ({field: value}), counts,
    the metrics of ``evaluate`` and ``retrieve_p50`` (seconds)."""
    used = [key for key in by if (key != "kind" or any(r.case.kind for r in results))
            and len({_group_value(r.case, key) for r in results}) > 1]
    if not used:
        return []

    def order(key: str, value: str):
        return (KIND_ORDER.index(value) if value in KIND_ORDER else len(KIND_ORDER), value) if key == "kind" else (0, value)

    combos: list[tuple[str, ...]] = [(key,) for key in used]
    if len(used) == 2:
        combos.append(tuple(used))
    rows = []
    for fields in combos:
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, r in enumerate(results):
            groups.setdefault(tuple(_group_value(r.case, f) for f in fields), []).append(i)
        for values in sorted(groups, key=lambda v: [order(f, x) for f, x in zip(fields, v)]):
            members = groups[values]
            overall, counts = _aggregate([results[i] for i in members], [scores[i] for i in members], ks)
            retrieve = [results[i].timings["retrieve"] for i in members if "retrieve" in results[i].timings]
            rows.append({"group": dict(zip(fields, values)), "counts": counts,
                         **{k: v for k, v in overall.items() if v is not None},
                         "retrieve_p50": percentile(retrieve, 50) if retrieve else None})
    return rows


def report_from_dict(data: Mapping[str, Any]) -> EvalReport:
    """An EvalReport read back from ``to_dict`` output (for comparing saved runs); per-question
    results keep their retrieved chunks, answers and scores."""
    results, scores = [], []
    for q in data.get("questions", []):
        case = EvalCase(question=q["question"], answer=q.get("expected_answer") or "", aliases=q.get("aliases") or [],
                        sources=q.get("expected_sources") or [], page=q.get("expected_page"), lang=q.get("lang"),
                        id=q["id"], kind=q.get("kind"), split=q.get("split"), set=q.get("set"))
        chunks = [RetrievedChunk(source=c["source"], page=c.get("page"), score=c.get("score", 0.0), text=c.get("text", ""),
                                 also_in=tuple(c.get("also_in", ()))) for c in q.get("retrieved", [])]
        cited = [RetrievedChunk(source=c["source"], page=c.get("page"), score=0.0, text="") for c in q.get("cited", [])]
        context = None if q.get("context") is None else [
            RetrievedChunk(source=c["source"], page=c.get("page"), score=0.0, text="", chunk_id=c.get("chunk_id", ""))
            for c in q["context"]]
        results.append(QuestionResult(case=case, retrieved=chunks, answer=q.get("answer"), cited=cited,
                                      abstained=bool(q.get("abstained")), timings=q.get("timings") or {}, error=q.get("error"),
                                      confidence=q.get("confidence"),
                                      context=context, context_tokens=q.get("context_tokens")))
        sd = dict(q.get("scores") or {})
        sd["file_recall"] = {int(k): v for k, v in (sd.get("file_recall") or {}).items()}
        scores.append(QuestionScores(**{k: v for k, v in sd.items() if k in QuestionScores.__dataclass_fields__}))
    return EvalReport(name=data.get("name", "run"), results=results, scores=scores, overall=dict(data["overall"]),
                      counts=dict(data.get("counts", {})), latency=dict(data.get("latency", {})),
                      ks=tuple(data.get("ks", DEFAULT_KS)), config=dict(data.get("config", {})),
                      breakdown=list(data.get("breakdown", [])))


# ------------------------------------------------------------------------------------- BEIR


@dataclass
class BeirDataset:
    """A BEIR-format folder: corpus (id -> title, text), queries (id -> text), graded qrels."""

    name: str
    corpus: dict[str, dict[str, str]]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: relevance}; only queries with qrels

    def doc_text(self, doc_id: str) -> str:
        doc = self.corpus[doc_id]
        return f"{doc['title']}\n{doc['text']}".strip() if doc.get("title") else doc["text"]


def _read_jsonl(path: Path) -> Iterable[tuple[int, dict]]:
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise QAFileError(f"cannot read {path}: {exc}") from exc
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise QAFileError(f"{path.name}:{number}: not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict) or "_id" not in record:
                raise QAFileError(f"{path.name}:{number}: each line needs an '_id'")
            yield number, record


def load_beir(folder: str | Path, split: str = "test") -> BeirDataset:
    """Read ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv`` from a BEIR folder."""
    folder = Path(folder)
    corpus = {str(r["_id"]): {"title": r.get("title") or "", "text": r.get("text") or ""}
              for _, r in _read_jsonl(folder / "corpus.jsonl")}
    queries = {str(r["_id"]): r.get("text") or "" for _, r in _read_jsonl(folder / "queries.jsonl")}
    qrels_path = folder / "qrels" / f"{split}.tsv"
    qrels: dict[str, dict[str, int]] = {}
    try:
        handle = qrels_path.open(encoding="utf-8", newline="")
    except OSError as exc:
        raise QAFileError(f"cannot read {qrels_path}: {exc}") from exc
    with handle:
        for number, row in enumerate(csv.reader(handle, delimiter="\t"), start=1):
            if not row or (number == 1 and row[0].strip().lower() in ("query-id", "query_id", "qid")):
                continue
            if len(row) != 3:
                raise QAFileError(f"{qrels_path.name}:{number}: expected 'query-id<TAB>corpus-id<TAB>score'")
            qid, did, rel = (x.strip() for x in row)
            try:
                relevance = int(float(rel))
            except ValueError:
                raise QAFileError(f"{qrels_path.name}:{number}: score {rel!r} is not a number") from None
            if qid not in queries:
                raise QAFileError(f"{qrels_path.name}:{number}: query {qid!r} is not in queries.jsonl")
            if did not in corpus:
                raise QAFileError(f"{qrels_path.name}:{number}: document {did!r} is not in corpus.jsonl")
            qrels.setdefault(qid, {})[did] = relevance
    return BeirDataset(name=folder.name, corpus=corpus, queries={q: queries[q] for q in qrels}, qrels=qrels)


def unique_ranking(doc_ids: Iterable[str]) -> list[str]:
    """Documents in order of their best-ranked chunk (several chunks may come from one document)."""
    seen: dict[str, None] = {}
    for d in doc_ids:
        seen.setdefault(d, None)
    return list(seen)


def ndcg_at_k(ranking: Sequence[str], relevance: Mapping[str, int], k: int = 10) -> float:
    """nDCG@k with linear gains (rel / log2(rank + 1)), as trec_eval and BEIR's published numbers."""
    dcg = sum(relevance.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranking[:k]) if relevance.get(d, 0) > 0)
    ideal = sorted((r for r in relevance.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranking: Sequence[str], relevance: Mapping[str, int], k: int = 100) -> float:
    """Share of the relevant documents (relevance > 0) that are in the top k."""
    relevant = {d for d, r in relevance.items() if r > 0}
    if not relevant:
        return 0.0
    return len(relevant.intersection(ranking[:k])) / len(relevant)


@dataclass
class BeirScores:
    name: str
    ndcg_at_10: float
    recall_at_100: float
    per_query: dict[str, dict[str, float]]
    latency: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "ndcg@10": self.ndcg_at_10, "recall@100": self.recall_at_100,
                "queries": len(self.per_query), "per_query": self.per_query, "latency": self.latency}


def score_beir(
    dataset: BeirDataset, rankings: Mapping[str, Sequence[str]], *, name: str = "run",
    timings: Iterable[Mapping[str, float]] = (),
) -> BeirScores:
    """Mean nDCG@10 and recall@100 over every query with qrels; a query without a ranking scores 0."""
    per_query = {}
    for qid, rel in dataset.qrels.items():
        ranking = unique_ranking(rankings.get(qid, ()))
        per_query[qid] = {"ndcg@10": ndcg_at_k(ranking, rel, 10), "recall@100": recall_at_k(ranking, rel, 100)}
    n = len(per_query) or 1
    return BeirScores(name=name, ndcg_at_10=sum(v["ndcg@10"] for v in per_query.values()) / n,
                      recall_at_100=sum(v["recall@100"] for v in per_query.values()) / n, per_query=per_query,
                      latency=latency_summary(timings))


# ---------------------------------------------------------------------------------- rendering

_SECTIONS: list[tuple[str, list[str]]] = [
    ("Retrieval (answerable questions)", ["file_hit@{k}", "file_mrr", "page_hit@{k}", "page_mrr", "answer_in_top{k}", "answer_mrr",
                                          "answer_in_context", "context_chunks", "context_tokens"]),
    ("Answers", ["exact_match", "f1", "contains_answer", "citation_correct", "citation_precision", "cited_per_answer",
                 "citation_source_correct"]),
    ("Abstention", ["abstention_rate", "false_abstention_rate", "confident_when_unanswerable", "confident_when_answerable"]),
]
_LABELS = {
    "file_mrr": "file MRR", "page_mrr": "page MRR", "answer_mrr": "answer MRR", "exact_match": "exact match",
    "f1": "token F1", "contains_answer": "contains answer", "citation_correct": "cited chunk holds answer",
    "citation_source_correct": "cited file is expected", "citation_precision": "cited chunks holding answer (share)",
    "cited_per_answer": "chunks cited per answer", "abstention_rate": "abstains when unanswerable",
    "false_abstention_rate": "abstains when answerable (lower is better)",
    "confident_when_unanswerable": "answers unanswerable with high confidence (lower is better)",
    "confident_when_answerable": "answers answerable with high confidence",
    "answer_in_context": "answer in packed context (what the generator sees)",
    "context_chunks": "chunks in packed context (all questions)",
    "context_tokens": "tokens in packed context (generator's tokenizer)",
}


def _metric_rows(report: EvalReport) -> list[tuple[str, str | None]]:
    """(section or metric key) rows in display order; section rows have key None."""
    rows: list[tuple[str, str | None]] = []
    for title, keys in _SECTIONS:
        section = []
        for key in keys:
            expanded = [key.format(k=k) for k in report.ks] if "{k}" in key else [key]
            section.extend((label, label) for label in expanded if report.overall.get(label) is not None)
        if section:
            rows.append((title, None))
            rows.extend(section)
    return rows


def _label(key: str) -> str:
    if key in _LABELS:
        return _LABELS[key]
    return key.replace("_", " ").replace("answer in top", "answer in top-")


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _counts_line(report: EvalReport) -> str:
    c = report.counts
    return (f"{c.get('questions', 0)} questions: {c.get('answerable', 0)} answerable "
            f"({c.get('cross_language', 0)} cross-language), {c.get('unanswerable', 0)} unanswerable"
            + (f", {c['errors']} errors" if c.get("errors") else ""))


def render_report(report: EvalReport, console: Any = None, *, per_question: bool = False) -> None:
    """Print a report as rich tables: overall metrics, latency per stage, optionally each question."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"{report.name} — {_counts_line(report)}", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, metric in _metric_rows(report):
        if metric is None:
            table.add_row(f"[bold]{key}[/bold]", "")
        else:
            table.add_row(f"  {_label(metric)}", _fmt(report.overall[metric]))
    console.print(table)
    if report.breakdown:
        console.print(breakdown_table(report))
    if report.latency:
        console.print(_latency_table(report.latency, f"{report.name} — latency (ms)"))
    if per_question:
        console.print(_question_table(report))


def breakdown_table(report: EvalReport):
    """One row per group of ``report.breakdown``: answer in top-5 and in the packed context, file MRR,
    abstention on unanswerable and on answerable questions, retrieve p50."""
    from rich.table import Table

    k = 5 if 5 in report.ks else max(report.ks)
    columns = [("group", None), ("answerable / unanswerable", None), (f"answer in top-{k}", f"answer_in_top{k}"),
               ("answer in packed context", "answer_in_context"), ("file MRR", "file_mrr"),
               ("abstention (unanswerable)", "abstention_rate"), ("false abstention", "false_abstention_rate"),
               ("retrieve p50 ms", "retrieve_p50")]
    table = Table(title=f"{report.name} — per group", title_justify="left")
    for title, _ in columns:
        table.add_column(title, justify="left" if title == "group" else "right")
    for row in report.breakdown:
        cells = [" / ".join(row["group"].values()), f"{row['counts']['answerable']} / {row['counts']['unanswerable']}"]
        for _, key in columns[2:]:
            value = row.get(key)
            cells.append("–" if value is None else f"{value * 1000:.0f}" if key == "retrieve_p50" else f"{value:.3f}")
        table.add_row(*cells)
    return table


def _latency_table(latency: Mapping[str, Mapping[str, float]], title: str):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in ("stage", "mean", "p50", "p95", "n"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for stage, s in sorted(latency.items(), key=lambda kv: (kv[0] == "total", kv[0])):
        table.add_row(stage, f"{s['mean'] * 1000:.0f}", f"{s['p50'] * 1000:.0f}", f"{s['p95'] * 1000:.0f}", str(int(s["n"])))
    return table


def _question_table(report: EvalReport):
    from rich.table import Table

    table = Table(title=f"{report.name} — per question", title_justify="left")
    for col in ("id", "question", "file rank", "answer rank", "F1", "cited ok", "abstained"):
        table.add_column(col, overflow="fold")
    for result, s in zip(report.results, report.scores):
        q = result.case.question
        table.add_row(
            s.id, q if len(q) <= 60 else q[:57] + "…",
            "–" if not s.answerable else (str(s.file_rank) if s.file_rank else "miss"),
            "–" if not s.answerable else (str(s.answer_rank) if s.answer_rank else "miss"),
            _fmt(s.f1), _fmt(s.citation_correct),
            ("yes" if s.abstained else "no") + ("" if s.answerable else " (unanswerable)"),
        )
    return table


def render_comparison(a: EvalReport, b: EvalReport, console: Any = None) -> None:
    """Two reports side by side with the difference (b − a); false abstention reads lower-is-better."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"{a.name} vs {b.name}", title_justify="left", caption=f"{a.name}: {_counts_line(a)}\n{b.name}: {_counts_line(b)}")
    table.add_column("metric")
    table.add_column(a.name, justify="right")
    table.add_column(b.name, justify="right")
    table.add_column("Δ", justify="right")
    keys: list[tuple[str, str | None]] = []
    for key, metric in _metric_rows(a) + _metric_rows(b):
        if (key, metric) not in keys:
            keys.append((key, metric))
    for key, metric in keys:
        if metric is None:
            table.add_row(f"[bold]{key}[/bold]", "", "", "")
            continue
        va, vb = a.overall.get(metric), b.overall.get(metric)
        delta = ""
        if va is not None and vb is not None:
            d = vb - va
            better = d < 0 if metric == "false_abstention_rate" else d > 0
            colour = "green" if better else "red" if d else "dim"
            delta = f"[{colour}]{d:+.3f}[/{colour}]"
        table.add_row(f"  {_label(metric)}", _fmt(va), _fmt(vb), delta)
    for stage in sorted(set(a.latency) & set(b.latency), key=lambda s: (s == "total", s)):
        ma, mb = a.latency[stage]["p50"] * 1000, b.latency[stage]["p50"] * 1000
        table.add_row(f"  latency {stage} p50 (ms)", f"{ma:.0f}", f"{mb:.0f}", f"{mb - ma:+.0f}")
    console.print(table)
    for report in (a, b):
        if report.breakdown:
            console.print(breakdown_table(report))


def render_beir(scores: Sequence[BeirScores], console: Any = None, *, dataset: str = "") -> None:
    """One row per retrieval mode: nDCG@10, recall@100, queries, p50 latency."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"BEIR {dataset}".strip(), title_justify="left")
    for col in ("mode", "nDCG@10", "recall@100", "queries", "p50 ms"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for s in scores:
        p50 = s.latency.get("total", {}).get("p50")
        table.add_row(s.name, f"{s.ndcg_at_10:.3f}", f"{s.recall_at_100:.3f}", str(len(s.per_query)),
                      "–" if p50 is None else f"{p50 * 1000:.0f}")
    console.print(table)
