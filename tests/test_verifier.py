"""The answer verifier: the shipped weights load offline and read a question and a passage together."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import ingested_collection
from localgpt.retrieval import Retriever

# question, a passage that states the answer, the same topic without the answer, an unrelated passage
CASES = {
    "en": (
        "How often are the pressure valves of the boiler tested?",
        "The boiler room holds two pressure valves on the main steam line. Each pressure valve is tested "
        "every week by the shift engineer, who records the opening pressure in the log book. A valve that "
        "leaks or opens late is replaced the same day.",
        "The boiler room holds two pressure valves on the main steam line. The valves are made of forged "
        "brass and steel and were supplied by the original manufacturer of the boiler. A valve that leaks "
        "is replaced the same day.",
        "The company canteen opens at half past eleven and serves a hot meal, soup and salads. Vegetarian "
        "dishes are marked on the menu board, and the coffee machine on the second floor is free of charge.",
    ),
    "zh": (
        "锅炉的压力阀多久测试一次？",
        "锅炉房的主蒸汽管道上装有两个压力阀。值班工程师每周测试一次每个压力阀，并把开启压力记录在日志中。"
        "如果阀门漏气或开启太晚，当天就会更换。",
        "锅炉房的主蒸汽管道上装有两个压力阀。这些阀门由锻造黄铜和钢制成，由锅炉的原厂商提供。"
        "如果阀门漏气，当天就会更换。",
        "公司食堂上午十一点半开门，提供热菜、汤和沙拉。素食菜品在菜单板上有标注，二楼的咖啡机可以免费使用。",
    ),
    "ja": (
        "ボイラーの圧力弁はどのくらいの頻度で試験されますか？",
        "ボイラー室の主蒸気配管には圧力弁が二つ設置されています。各圧力弁は当直のエンジニアが毎週試験し、"
        "開弁圧力を日誌に記録します。漏れがある弁や開くのが遅い弁はその日のうちに交換されます。",
        "ボイラー室の主蒸気配管には圧力弁が二つ設置されています。これらの弁は鍛造の真鍮と鋼でできており、"
        "ボイラーの製造元から納入されたものです。漏れがある弁はその日のうちに交換されます。",
        "社員食堂は十一時半に開き、温かい定食、スープ、サラダを提供しています。ベジタリアン向けの料理は"
        "メニューボードに表示され、二階のコーヒーマシンは無料で使えます。",
    ),
}


@pytest.fixture(scope="module")
def verifier():
    from localgpt.verifier import get_verifier

    return get_verifier()


@pytest.mark.parametrize("lang", sorted(CASES))
def test_the_passage_that_states_the_answer_scores_above_the_same_topic_and_an_unrelated_one(verifier, lang):
    question, answer, same_topic, unrelated = CASES[lang]
    scores = verifier.score(question, [answer, same_topic, unrelated])
    assert scores[0] > scores[1] > scores[2], scores
    assert scores[0] > 0.1 and scores[2] < 0.01, scores


def test_scores_are_probabilities_one_per_passage_in_order(verifier):
    question, *passages = CASES["en"]
    batched = verifier.score(question, passages)
    one_by_one = [verifier.score(question, [p])[0] for p in passages]
    assert batched.shape == (3,) and ((batched >= 0) & (batched <= 1)).all()
    assert batched == pytest.approx(one_by_one, abs=1e-3)
    assert verifier.score(question, []).shape == (0,)


def test_float_scores_do_not_depend_on_how_the_passages_are_batched(verifier):
    # Runs batch ~512 tokens at a time (less padding, faster); any batching gives the same scores.
    from localgpt.verifier import get_verifier

    question, *passages = CASES["en"]
    fp32 = get_verifier(dtype="fp32")
    small = fp32.logits(question, passages * 4, batch_tokens=64)  # a batch per passage or two
    large = fp32.logits(question, passages * 4, batch_tokens=4096)
    assert small == pytest.approx(large, abs=1e-3)
    assert fp32.logits(question, passages * 4) == pytest.approx(large, abs=1e-3)


def test_bf16_and_fp32_runs_agree_and_other_types_are_refused(verifier):
    """'auto' picks bf16 where the CPU multiplies it natively and fp32 elsewhere: the two give one ranking and
    probabilities within bf16's rounding of each other."""
    from localgpt.verifier import get_verifier

    question, *passages = CASES["zh"]
    exact = get_verifier(dtype="fp32").score(question, passages)
    bf16 = get_verifier(dtype="bf16").score(question, passages)
    assert np.abs(exact - bf16).max() < 0.05
    assert int(np.argmax(bf16)) == int(np.argmax(exact)) == 0
    assert verifier.dtype in ("bf16", "fp32")
    with pytest.raises(ValueError, match="bf16 or fp32"):
        get_verifier(dtype="int8")


DOCS = {
    "boiler.txt": CASES["en"][2] + "\n\nThe boiler burns natural gas and heats the whole plant in winter.",
    "valves.txt": "Maintenance schedule.\n\n" + CASES["en"][1],
    "canteen.txt": CASES["en"][3],
}


def test_retrieval_with_the_verifier_puts_the_answer_first_and_keeps_its_score(tmp_path):
    settings = ingested_collection(tmp_path, DOCS, "verifier", verifier="rerank")
    result = Retriever.from_settings(settings).search(CASES["en"][0], k=3)
    assert result.hits[0].source.endswith("valves.txt")
    assert all(h.verifier_score is not None and 0 <= h.verifier_score <= 1 for h in result.hits)
    assert result.best_verifier_score == max(h.verifier_score for h in result.hits)
    off = Retriever.from_settings(settings.with_overrides(verifier="off")).search(CASES["en"][0], k=3)
    assert off.best_verifier_score is None
    scored = Retriever.from_settings(settings.with_overrides(verifier="score")).search(CASES["en"][0], k=3)
    assert [h.chunk_id for h in scored.hits] == [h.chunk_id for h in off.hits]  # scores only, same order
    # The verifier read each sentence of these hits (evidence = "verifier"): a hit's score is its best sentence's.
    assert all(h.verifier_score == pytest.approx(scored.evidence[h.chunk_id].best) for h in scored.hits)
    # With the embedder's sentence evidence it reads the whole passages, as rerank does.
    whole = Retriever.from_settings(settings.with_overrides(verifier="score", evidence="embedder")).search(CASES["en"][0], k=3)
    assert whole.best_verifier_score == pytest.approx(result.best_verifier_score)
