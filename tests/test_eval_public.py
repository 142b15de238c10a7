"""bench/eval_public.py builds a corpus and question file from SQuAD-format sets, and ``localgpt eval``
reports the packed context and a per-language / per-kind breakdown on it."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from localgpt.evaluation import (
    EvalCase, QAFileError, QuestionResult, RetrievedChunk, answer_in_text, evaluate, render_report, split_cases,
)

ROOT = Path(__file__).resolve().parents[1]


def _bench(name: str):
    saved = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved  # bench/ on the path would hide packages behind its script names
    return module


def _qa(qid: str, question: str, context: str, answer: str | None) -> dict:
    if answer is None:
        return {"id": qid, "question": question, "answers": [], "is_impossible": True}
    return {"id": qid, "question": question, "answers": [{"text": answer, "answer_start": context.index(answer)}]}


def _paragraph(context: str, *qas) -> dict:
    return {"context": context, "qas": [_qa(q[0], q[1], context, q[2]) for q in qas]}


def _dev_title(public_qa, set_name: str, stem: str) -> str:
    return next(t for t in (f"{stem}{i}" for i in range(100)) if public_qa.split_of(set_name, t) == "dev")


def write_fixture(folder: Path, public_qa) -> None:
    """One English and one Japanese article of three paragraphs (the first too short to cut), and
    seven one-paragraph Chinese articles: every kind can be made, every answer is unique."""
    en = _dev_title(public_qa, "squad2", "Zarvian_Bridge_")
    squad = {"data": [{"title": en, "paragraphs": [
        _paragraph("The Zarvian Bridge crosses the Ostra fjord near Velmo. It was designed by the engineer Hilda Brask.",
                   ("en1", "Who designed the Zarvian Bridge?", "Hilda Brask"),
                   ("en2", "Who painted the Zarvian Bridge?", None)),
        _paragraph("Construction of the bridge began in the spring. The main span is 1,250 metres long. "
                   "Ferries stopped running when it opened.",
                   ("en3", "How long is the main span of the Zarvian Bridge?", "1,250 metres")),
        _paragraph("The bridge carries four lanes of traffic. Its toll was abolished in 2011 after a referendum. "
                   "Cyclists use a separate path.",
                   ("en4", "When was the toll of the Zarvian Bridge abolished?", "2011")),
    ]}]}
    ja = _dev_title(public_qa, "jsquad", "ミドリ湖")
    jsquad = {"data": [{"title": ja, "paragraphs": [
        _paragraph(f"{ja} [SEP] {ja}は北海道の東部にある湖である。湖の名前はアイヌ語に由来する。",
                   ("ja1", f"{ja}の名前は何語に由来する？", "アイヌ語")),
        _paragraph(f"{ja} [SEP] 湖の面積はおよそ十二平方キロメートルである。最も深い地点は四十三メートルに達する。冬には全面が結氷する。",
                   ("ja2", f"{ja}の最も深い地点は何メートル？", "四十三メートル")),
        _paragraph(f"{ja} [SEP] 湖畔には小さな温泉街がある。温泉は千九百五年に開湯した。毎年夏に花火大会が開かれる。",
                   ("ja3", f"{ja}の温泉は何年に開湯した？", "千九百五年")),
    ]}]}
    zh_articles = [
        ("青石镇", "青石镇位于云山县北部。全镇面积为八十六平方公里。镇上以出产青石闻名。", "青石镇面积多少？", "八十六平方公里"),
        ("白河水库", "白河水库建于一九五八年。水库的总库容为三亿立方米。它为下游城市供水。", "白河水库的总库容是多少？", "三亿立方米"),
        ("金鸡岭隧道", "金鸡岭隧道是一条铁路隧道。隧道全长四千二百米。它于二零零九年通车。", "金鸡岭隧道全长多少？", "四千二百米"),
        ("红叶寺", "红叶寺是一座古老的佛寺。寺内有一口明代铜钟。", "红叶寺内有什么明代文物？", "铜钟"),
        ("东湖公园", "东湖公园开放于一九九九年。公园内有一座九孔桥。", "东湖公园内有一座什么桥？", "九孔桥"),
        ("松林站", "松林站是一座地铁车站。该站共有三个出入口。", "松林站共有几个出入口？", "三个"),
        ("黄沙岛", "黄沙岛是一座无人岛。岛上栖息着大量海鸟。", "黄沙岛上栖息着什么？", "海鸟"),
    ]
    cmrc = {"data": [{"title": _dev_title(public_qa, "cmrc2018", title), "paragraphs": [
        _paragraph(text, (f"DEV_{i}_QUERY_0", question, answer))]} for i, (title, text, question, answer) in enumerate(zh_articles)]}
    for name, data in (("squad2", squad), ("jsquad", jsquad), ("cmrc2018", cmrc)):
        (folder / public_qa.SETS[name][0]).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


TARGETS = {"en": {"answerable": 1, "adversarial": 1, "held-out": 1, "cut": 1},
           "ja": {"answerable": 1, "held-out": 1, "cut": 1}, "zh": {"answerable": 2, "held-out": 1, "cut": 1}}
ONE = {"en": 1, "ja": 1, "zh": 1}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny fixture sets built into a corpus folder and question file (twice, to compare)."""
    base = tmp_path_factory.mktemp("public")
    data = base / "qa"
    data.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOCALGPT_QA_DATA", str(data))
        eval_public = _bench("eval_public")
        write_fixture(data, eval_public.public_qa)
        manifests = [eval_public.build("dev", base / out, targets=TARGETS, hold_out=ONE, cut=ONE) for out in ("a", "b")]
    return base, manifests


def test_every_kind_in_every_language_with_answers_absent_or_present_as_claimed(built):
    from ingest.load import load_file

    base, (manifest, again) = built
    out = base / "a"
    questions = [json.loads(line) for line in (out / "questions.jsonl").read_text(encoding="utf-8").splitlines()]
    kinds = {(q["lang"], q["kind"]) for q in questions}
    assert kinds == {("en", "answerable"), ("en", "adversarial"), ("en", "held-out"), ("en", "cut"),
                     ("ja", "answerable"), ("ja", "held-out"), ("ja", "cut"),
                     ("zh", "answerable"), ("zh", "held-out"), ("zh", "cut")}
    assert all(q["split"] == "dev" for q in questions) and {q["set"] for q in questions} == {"squad2", "jsquad", "cmrc2018"}
    texts = {}
    for path in sorted((out / "docs").rglob("*.*")):
        texts[path.relative_to(out / "docs").as_posix()] = "\n".join(e.text for e in load_file(path, ocr=False).elements)
    assert {Path(p).suffix for p in texts} == {".md", ".html", ".txt", ".docx", ".pdf"}
    assert len(texts) == manifest["documents"] == 8  # 1 + 1 + 7 articles, one Chinese one left out
    removed = {"held-out": 0, "cut": 0}
    for q in questions:
        if q["kind"] in removed:
            assert q["answer"] == "" and "source" not in q
            answer = q["notes"].rsplit("; answer: ", 1)[1]
            assert not any(answer_in_text([answer], t) for t in texts.values()), q
            removed[q["kind"]] += 1
        elif q["kind"] == "answerable":
            assert answer_in_text([q["answer"]], texts[q["source"]]), q
    assert removed == {"held-out": 3, "cut": 3}
    cut = {c["question"] for c in manifest["cut"]}
    assert {q["id"].split("-")[-1] for q in questions if q["kind"] == "cut"} == cut
    # Deterministic: a second build into another folder gives the same files.
    for path in (base / "a").rglob("*"):
        if path.is_file():
            assert path.read_bytes() == (base / "b" / path.relative_to(base / "a")).read_bytes(), path


def test_eval_reports_the_packed_context_and_each_language_and_kind(built, tmp_path, subprocess_env):
    base, _ = built
    env = {**subprocess_env, "LOCALGPT_DATA_DIR": str(tmp_path / "data")}
    done = subprocess.run([sys.executable, "-m", "localgpt.cli", "eval", str(base / "a" / "questions.jsonl"), "--split", "dev",
                           "--corpus", str(base / "a" / "docs"), "--retrieval-only", "--json"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["counts"]["questions"] == 11  # --split dev takes the file's own split: every question
    overall = report["overall"]
    assert overall["answer_in_context"] is not None and overall["answer_in_context"] <= overall["answer_in_top10"]
    assert 1 <= overall["context_chunks"] <= report["config"]["k"] and overall["context_tokens"] > 10
    assert "SmolLM2" in report["config"]["context_packed_for"]
    assert all("context" in q for q in report["questions"])
    groups = [tuple(row["group"].items()) for row in report["breakdown"]]
    assert (("lang", "en"),) in groups and (("kind", "held-out"),) in groups
    assert (("lang", "zh"), ("kind", "cut")) in groups
    zh_answerable = next(r for r in report["breakdown"] if r["group"] == {"lang": "zh", "kind": "answerable"})
    assert zh_answerable["counts"]["answerable"] == 2 and "answer_in_context" in zh_answerable
    assert zh_answerable["retrieve_p50"] > 0


def _case(qid: str, lang: str, kind: str, answer: str = "") -> EvalCase:
    return EvalCase(question=f"q {qid}", answer=answer, sources=["a.txt"] if answer else [], lang=lang, kind=kind, id=qid)


def test_breakdown_counts_each_group_and_renders():
    hit = [RetrievedChunk("a.txt", None, 1.0, "the answer is 42")]
    results = [
        QuestionResult(_case("1", "en", "answerable", "42"), hit, context=hit, timings={"retrieve": 0.1}),
        QuestionResult(_case("2", "en", "answerable", "42"), hit, context=[], timings={"retrieve": 0.3}),
        QuestionResult(_case("3", "zh", "cut"), hit, abstained=True, timings={"retrieve": 0.2}),
        QuestionResult(_case("4", "zh", "answerable", "42"), [], context=[], abstained=True, timings={"retrieve": 0.2}),
    ]
    report = evaluate(results, name="run")
    assert report.overall["answer_in_top1"] == 2 / 3 and report.overall["answer_in_context"] == 1 / 3
    rows = {tuple(r["group"].values()): r for r in report.breakdown}
    assert list(rows) == [("en",), ("zh",), ("answerable",), ("cut",), ("en", "answerable"), ("zh", "answerable"), ("zh", "cut")]
    assert rows[("en",)]["answer_in_context"] == 0.5 and rows[("en",)]["retrieve_p50"] == pytest.approx(0.2)
    assert rows[("zh", "cut")]["abstention_rate"] == 1.0 and rows[("zh", "answerable")]["false_abstention_rate"] == 1.0
    from rich.console import Console

    out = io.StringIO()
    render_report(report, Console(file=out, width=200, color_system=None))
    text = out.getvalue()
    assert "per group" in text and "zh / cut" in text and "answer in packed context" in text
    data = json.loads(report.to_json())
    assert data["breakdown"][0]["group"] == {"lang": "en"} and data["questions"][0]["kind"] == "answerable"


def test_a_file_that_names_its_split_is_split_by_it():
    cases = [EvalCase(question="a", id="a", split="dev"), EvalCase(question="b", id="b", split="test")]
    assert [c.id for c in split_cases(cases, "dev")] == ["a"] and [c.id for c in split_cases(cases, "test")] == ["b"]
    with pytest.raises(QAFileError, match="name their split"):
        split_cases(cases + [EvalCase(question="c", id="c")], "dev")
