"""The evaluation metrics a user relies on to tune localgpt: hand-checked numbers, no models."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest

from localgpt.documents import SourceRef
from localgpt.evaluation import (
    EvalCase,
    QAFileError,
    QuestionResult,
    RetrievedChunk,
    answer_in_text,
    evaluate,
    exact_match,
    latency_summary,
    load_beir,
    load_qa,
    ndcg_at_k,
    normalize_for_match,
    percentile,
    read_qa,
    recall_at_k,
    render_comparison,
    render_report,
    report_from_dict,
    score_beir,
    token_f1,
)

BEIR_TINY = Path(__file__).parent / "data" / "beir_tiny"
QA_SET = Path(__file__).parent.parent / "bench" / "eval" / "qa.jsonl"


def chunk(source: str, text: str = "", page: int | None = None, score: float = 1.0) -> RetrievedChunk:
    return RetrievedChunk(source=source, page=page, score=score, text=text)


def case(answer: str = "Squid", source: str = "en/proxy.html", page: int | None = None, **kw) -> EvalCase:
    return EvalCase(question=kw.pop("question", "Which proxy?"), answer=answer, sources=[source] if source else [],
                    page=page, **kw)


# ------------------------------------------------------------------------------ text metrics


def test_exact_match_ignores_case_punctuation_and_articles():
    assert exact_match("The Squid.", ["squid"]) == 1.0
    assert exact_match("Squid proxy", ["squid"]) == 0.0


def test_token_f1_english_by_hand():
    # pred {the, cat, sat, on, mat} minus articles = cat sat on mat (4); gold = cat on mat (3); common 3
    # precision 3/4, recall 3/3 -> F1 = 2*0.75*1/(1.75) = 6/7
    assert token_f1("the cat sat on the mat", ["a cat on a mat"]) == pytest.approx(6 / 7)
    assert token_f1("dog", ["cat"]) == 0.0
    assert token_f1("cat", ["dog", "cat"]) == 1.0  # best over aliases


def test_token_f1_chinese_counts_characters_not_spaces():
    # pred 9 characters 使用硬链接节省空间, gold 3 characters 硬链接: precision 3/9, recall 1 -> F1 = 0.5
    assert token_f1("使用硬链接节省空间", ["硬链接"]) == pytest.approx(0.5)
    assert token_f1("硬 链 接", ["硬链接"]) == 1.0
    assert exact_match("硬链接。", ["硬链接"]) == 1.0


def test_token_f1_mixed_script_answer():
    # tokens: 1993 年 由 ian murdock 建 立 (7) vs gold ian murdock (2): P 2/7, R 1 -> 4/9
    assert token_f1("1993 年由 Ian Murdock 建立", ["Ian Murdock"]) == pytest.approx(4 / 9)


def test_answer_in_text_needs_whole_tokens_but_not_spaces_in_cjk():
    assert answer_in_text(["squid"], "Falcot Corp selected Squid as their proxy server.")
    assert not answer_in_text(["squid"], "The squidguard package filters URLs.")
    assert answer_in_text(["/var/tmp"], "Files in /var/tmp survive reboots")
    assert answer_in_text(["猶予期間"], "edquota -t コマンドを使えば、「猶予\n期間」の最長値を定義")
    assert not answer_in_text([], "anything")


def test_normalize_for_match_survives_pdf_and_wrapped_cjk_text():
    assert normalize_for_match("Files  and\ndirectories") == "files and directories"
    assert normalize_for_match("完整拷\n    贝") == "完整拷贝"
    assert normalize_for_match("ＡＢＣ　１２３") == "abc 123"


# ------------------------------------------------------------------------------- retrieval


def test_hit_at_k_and_mrr_by_hand():
    results = [
        # expected file at rank 2, answer text at rank 3
        QuestionResult(case("Squid"), [chunk("/data/x.html"), chunk("/data/en/proxy.html"), chunk("/d/y", "uses Squid")]),
        # expected file at rank 1
        QuestionResult(case("Squid"), [chunk("en/proxy.html", "Squid is used")]),
        # never found
        QuestionResult(case("Squid"), [chunk("a"), chunk("b"), chunk("c"), chunk("d"), chunk("e")]),
    ]
    report = evaluate(results, ks=(1, 3))
    o = report.overall
    assert o["file_hit@1"] == pytest.approx(1 / 3)
    assert o["file_hit@3"] == pytest.approx(2 / 3)
    assert o["file_recall@3"] == pytest.approx(2 / 3)
    assert o["file_mrr"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert o["answer_in_top1"] == pytest.approx(1 / 3)
    assert o["answer_in_top3"] == pytest.approx(2 / 3)
    assert o["answer_mrr"] == pytest.approx((1 / 3 + 1) / 3)
    assert [s.file_rank for s in report.scores] == [2, 1, None]


def test_page_level_hits_need_the_right_file_and_page():
    c = case("/srv", source="en/fhs.pdf", page=23)
    r = QuestionResult(c, [chunk("en/fhs.pdf", page=22), chunk("other.pdf", page=23), chunk("/x/en/fhs.pdf", page=23)])
    report = evaluate([r], ks=(1, 3))
    assert report.scores[0].file_rank == 1 and report.scores[0].page_rank == 3
    assert report.overall["page_hit@1"] == 0.0 and report.overall["page_hit@3"] == 1.0
    assert report.overall["page_mrr"] == pytest.approx(1 / 3)


def test_similar_file_names_do_not_count_as_the_expected_source():
    r = QuestionResult(case(source="en/proxy.html"), [chunk("/data/en/oldproxy.html")])
    assert evaluate([r]).scores[0].file_rank is None


def test_recall_with_several_expected_files():
    c = EvalCase(question="q", answer="a", sources=["a.txt", "b.txt"])
    r = QuestionResult(c, [chunk("a.txt"), chunk("c.txt"), chunk("b.txt")])
    s = evaluate([r], ks=(1, 3)).scores[0]
    assert s.file_recall == {1: 0.5, 3: 1.0}


def test_duplicate_file_chunk_counts_for_any_of_its_paths():
    ref = SourceRef(chunk_id="c1", text="Squid", sources=["/d/copy.html", "/d/en/proxy.html"], page=None, heading=None, score=0.5)
    r = QuestionResult(case(), [RetrievedChunk.from_source_ref(ref)])
    assert evaluate([r]).scores[0].file_rank == 1


# --------------------------------------------------------------------- answers and abstention


def test_answer_citation_and_abstention_counting():
    answerable = case("Squid")
    unanswerable = EvalCase(question="What port does Squid use?", answer="")
    right = [chunk("en/proxy.html", "Falcot selected Squid")]
    wrong = [chunk("en/other.html", "nothing here")]
    results = [
        QuestionResult(answerable, right, answer="They use Squid [1].", cited=right),  # correct, cited ok
        QuestionResult(answerable, right, answer="Squid", cited=wrong),  # correct, citation wrong
        QuestionResult(answerable, right, answer="I don't know.", abstained=True),  # false abstention
        QuestionResult(answerable, right, answer="Apache", cited=right),  # wrong answer, citation holds answer
        QuestionResult(unanswerable, wrong, answer="I don't know.", abstained=True),  # right abstention
        QuestionResult(unanswerable, wrong, answer="Port 3128", cited=wrong),  # hallucination
        QuestionResult(unanswerable, wrong, answer="", abstained=True),
    ]
    o = evaluate(results).overall
    assert o["exact_match"] == pytest.approx(1 / 4)  # only "Squid"
    assert o["contains_answer"] == pytest.approx(2 / 4)
    assert o["citation_correct"] == pytest.approx(2 / 3)  # over the 3 non-abstained answers
    assert o["citation_source_correct"] == pytest.approx(2 / 3)
    assert o["false_abstention_rate"] == pytest.approx(1 / 4)
    assert o["abstention_rate"] == pytest.approx(2 / 3)


def test_a_confident_answer_to_an_unanswerable_question_is_counted_apart_from_a_flagged_one():
    answerable = case("Squid")
    unanswerable = EvalCase(question="What port does Squid use?", answer="")
    right = [chunk("en/proxy.html", "Falcot selected Squid")]
    results = [
        QuestionResult(answerable, right, answer="Squid [1]", cited=right, confidence="high"),
        QuestionResult(answerable, right, answer="Squid [1]", cited=right, confidence="low"),
        QuestionResult(unanswerable, right, answer="Port 3128", cited=right, confidence="high"),  # the harm
        QuestionResult(unanswerable, right, answer="Port 3128", cited=right, confidence="low"),  # flagged: check quotes
        QuestionResult(unanswerable, right, answer="I don't know.", abstained=True),
        QuestionResult(unanswerable, right, answer="I don't know.", abstained=True),
    ]
    report = evaluate(results)
    o = report.overall
    assert o["abstention_rate"] == pytest.approx(2 / 4)
    assert o["confident_when_unanswerable"] == pytest.approx(1 / 4)
    assert o["confident_when_answerable"] == pytest.approx(1 / 2)
    again = report_from_dict(report.to_dict())  # survives the --json round trip
    assert again.overall["confident_when_unanswerable"] == pytest.approx(1 / 4)


def test_citing_more_chunks_shows_in_precision_not_only_in_correctness():
    answerable = case("Squid")
    right = chunk("en/proxy.html", "Falcot selected Squid")
    others = [chunk("en/a.html", "nothing here"), chunk("en/b.html", "nor here"), chunk("en/c.html", "nor here either")]
    one = evaluate([QuestionResult(answerable, [right], answer="Squid", cited=[right])]).overall
    four = evaluate([QuestionResult(answerable, [right], answer="Squid", cited=[right, *others, right])]).overall
    assert one["citation_correct"] == four["citation_correct"] == 1.0  # any cited chunk with the answer counts
    assert one["citation_precision"] == 1.0 and one["cited_per_answer"] == 1.0
    assert four["citation_precision"] == pytest.approx(1 / 4)  # the repeated chunk counts once
    assert four["cited_per_answer"] == 4.0


def test_retrieval_only_run_has_no_answer_metrics():
    report = evaluate([QuestionResult(case(), [chunk("en/proxy.html", "Squid")])])
    assert report.overall["file_hit@1"] == 1.0
    assert report.overall["f1"] is None and report.overall["abstention_rate"] is None
    assert report.counts["generated"] == 0


def test_latency_percentiles_per_stage():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([10], 95) == 10
    lat = latency_summary([{"retrieve": 0.1, "generate": 1.0}, {"retrieve": 0.3, "generate": 2.0}])
    assert lat["retrieve"]["mean"] == pytest.approx(0.2)
    assert lat["total"]["p50"] == pytest.approx(1.7)
    assert lat["generate"]["n"] == 2


# ---------------------------------------------------------------------------- QA validation


def _lines(*records) -> list[str]:
    return [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]


def test_qa_file_reads_answerable_and_unanswerable_questions():
    cases = read_qa(_lines(
        {"question": "Which proxy?", "answer": "Squid", "aliases": ["squid-cache"], "source": "en/p.html", "lang": "en"},
        "",
        "# a comment",
        {"question": "Debian 12 的内核版本？", "answer": "", "lang": "zh"},
        {"question": "Where?", "answer": "/srv", "source": "fhs.pdf", "page": 23, "lang": "zh", "doc_lang": "en"},
    ))
    assert [c.answerable for c in cases] == [True, False, True]
    assert cases[0].answers == ["Squid", "squid-cache"] and cases[1].answers == []
    assert cases[2].page == 23 and cases[2].cross_language and cases[2].line == 5
    assert cases[0].id == "q1"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "qa.jsonl:2: not valid JSON"),
        (json.dumps({"answer": "x", "source": "a"}), "qa.jsonl:2: 'question'"),
        (json.dumps({"question": "q", "answer": "x"}), "qa.jsonl:2: an answerable question needs its 'source'"),
        (json.dumps({"question": "q", "answer": "x", "source": "a", "page": 0}), "qa.jsonl:2: 'page'"),
        (json.dumps({"question": "q", "answer": "x", "source": "a", "page": "3"}), "qa.jsonl:2: 'page'"),
        (json.dumps({"question": "q", "answer": "", "aliases": ["y"]}), "qa.jsonl:2: 'aliases' given but 'answer' is empty"),
        (json.dumps({"question": "q", "answer": "x", "source": "a", "aliases": "y", "extra": 1}), "qa.jsonl:2: unknown field(s) extra"),
        (json.dumps({"question": "q", "answer": 3, "source": "a"}), "qa.jsonl:2: 'answer' must be a string"),
        ("[1, 2]", "qa.jsonl:2: expected a JSON object"),
    ],
)
def test_qa_errors_name_the_file_and_line(line, message):
    first = json.dumps({"question": "ok?", "answer": "yes", "source": "a.txt"})
    with pytest.raises(QAFileError) as err:
        read_qa([first, line], "qa.jsonl")
    assert message in str(err.value)


def test_qa_duplicate_ids_and_empty_files_are_errors(tmp_path):
    rec = json.dumps({"id": "a", "question": "q", "answer": "x", "source": "s"})
    with pytest.raises(QAFileError, match="already used on line 1"):
        read_qa([rec, rec], "qa.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(QAFileError, match="no questions"):
        load_qa(empty)
    with pytest.raises(QAFileError, match="cannot read"):
        load_qa(tmp_path / "missing.jsonl")


def test_shipped_question_set_is_valid_and_balanced():
    cases = load_qa(QA_SET)
    assert len(cases) >= 60
    assert sum(not c.answerable for c in cases) >= 10
    assert sum(c.lang in ("zh", "ja") for c in cases) >= 15
    assert sum(c.cross_language for c in cases) >= 5
    assert all(c.quote for c in cases if c.answerable)
    assert all(answer_in_text(c.answers, c.quote) for c in cases if c.answerable)


# ------------------------------------------------------------------------------------- BEIR


def test_ndcg_against_a_hand_computation():
    rel = {"a": 2, "b": 1, "c": 0}
    # ranking b, x, a: DCG = 1/log2(2) + 2/log2(4) = 1 + 1 = 2; IDCG = 2/log2(2) + 1/log2(3)
    expected = 2 / (2 + 1 / math.log2(3))
    assert ndcg_at_k(["b", "x", "a"], rel, 10) == pytest.approx(expected)
    assert ndcg_at_k(["a", "b"], rel, 10) == pytest.approx(1.0)
    assert ndcg_at_k(["x", "a"], rel, 1) == 0.0
    assert ndcg_at_k(["a"], {"a": 0}, 10) == 0.0


def test_recall_at_k_counts_only_relevant_documents():
    rel = {"a": 2, "b": 1, "c": 0}
    assert recall_at_k(["c", "a"], rel, 100) == 0.5
    assert recall_at_k(["a", "x", "b"], rel, 2) == 0.5


def test_beir_fixture_loads_and_a_perfect_ranking_scores_one():
    data = load_beir(BEIR_TINY)
    assert len(data.corpus) == 30 and len(data.queries) == 10  # q11 has no judgements
    assert data.qrels["q1"] == {"d03": 2, "d01": 1, "d04": 1}
    assert data.doc_text("d05").startswith("Reading the journal\n")
    perfect = {q: sorted(rel, key=lambda d: -rel[d]) for q, rel in data.qrels.items()}
    scores = score_beir(data, perfect, name="oracle")
    assert scores.ndcg_at_10 == pytest.approx(1.0) and scores.recall_at_100 == pytest.approx(1.0)
    nothing = score_beir(data, {}, name="empty")
    assert nothing.ndcg_at_10 == 0.0 and nothing.recall_at_100 == 0.0


def test_beir_chunks_of_one_document_count_once():
    data = load_beir(BEIR_TINY)
    # q2 has one relevant document; two chunks of an irrelevant doc must not push it down twice
    s = score_beir(data, {"q2": ["d08", "d08", "d09"]})
    assert s.per_query["q2"]["ndcg@10"] == pytest.approx(1 / math.log2(3))


def test_beir_errors_name_the_file(tmp_path):
    (tmp_path / "qrels").mkdir()
    (tmp_path / "corpus.jsonl").write_text('{"_id": "d1", "text": "x"}\n', encoding="utf-8")
    (tmp_path / "queries.jsonl").write_text('{"_id": "q1", "text": "y"}\n', encoding="utf-8")
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td9\t1\n", encoding="utf-8")
    with pytest.raises(QAFileError, match="test.tsv:2: document 'd9'"):
        load_beir(tmp_path)


# -------------------------------------------------------------------------------- rendering


def _two_reports():
    right = [chunk("/c/en/proxy.html", "Squid", score=0.9)]
    a = evaluate([QuestionResult(case(), right, answer="Squid", cited=right, timings={"retrieve": 0.01, "generate": 0.5}),
                  QuestionResult(EvalCase(question="port?"), right, answer="3128", timings={"retrieve": 0.02})],
                 name="baseline", config={"k": 4})
    b = evaluate([QuestionResult(case(), right, answer="Squid", cited=right, timings={"retrieve": 0.01}),
                  QuestionResult(EvalCase(question="port?"), right, answer="", abstained=True, timings={"retrieve": 0.01})],
                 name="defaults")
    return a, b


def test_json_report_holds_metrics_and_ranked_chunks():
    a, _ = _two_reports()
    data = json.loads(a.to_json())
    assert data["overall"]["file_hit@1"] == 1.0 and data["config"] == {"k": 4}
    q = data["questions"][0]
    assert q["retrieved"] == [{"source": "/c/en/proxy.html", "page": None, "score": 0.9, "text": "Squid"}]
    assert q["scores"]["file_rank"] == 1 and q["timings"]["generate"] == 0.5
    again = report_from_dict(data)
    assert again.overall == a.overall and again.scores[0].file_rank == 1


def test_tables_render_report_and_comparison():
    from rich.console import Console

    a, b = _two_reports()
    out = io.StringIO()
    console = Console(file=out, width=140, color_system=None)
    render_report(a, console, per_question=True)
    render_comparison(a, b, console)
    text = out.getvalue()
    assert "file hit@1" in text and "abstains when unanswerable" in text and "latency" in text
    assert "baseline" in text and "defaults" in text and "+1.000" in text  # abstention 0 -> 1


def test_dev_and_test_halves_split_every_group_and_never_overlap():
    from localgpt.evaluation import split_cases

    cases = load_qa(QA_SET)
    dev, test = split_cases(cases, "dev"), split_cases(cases, "test")
    assert {c.id for c in dev}.isdisjoint(c.id for c in test)
    assert len(dev) + len(test) == len(cases) and split_cases(cases, "all") == cases
    assert split_cases(cases, "dev") == dev  # fixed by the ids, not by chance
    for half in (dev, test):
        assert sum(not c.answerable for c in half) >= 10
        assert {c.lang for c in half} == {"en", "zh", "ja"}
        assert any(c.cross_language for c in half)
    with pytest.raises(QAFileError, match="split"):
        split_cases(cases, "train")
