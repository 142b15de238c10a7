"""The answer check: before answering, the generator is asked whether the passages state the answer
(its P(yes) for the next token), and the chain abstains when it says no. Real store, real embedder,
the embedded SmolLM2 through llama.cpp and a tiny random Llama through transformers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import ingested_collection
from localgpt.chain import CHECK_SUFFIX, QAChain
from localgpt.config import Settings
from localgpt.generation import clear_generator_cache, get_generator
from localgpt.generation.base import NO_WORDS, YES_WORDS, single_token_ids, yes_share
from tiny_models import YES_NO_CORPUS, build_tiny_model

DOCS = {
    "pumps.txt": "The feed pump must be inspected every month. Its seals are replaced every two years.",
    "valves.txt": "Pressure valves are tested every week. A valve that leaks is replaced the same day.",
    "水泵.txt": "给水泵每个月必须检查一次。密封件每两年更换一次。",
}
QUESTION = "How often must the feed pump be inspected?"


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> Settings:
    return ingested_collection(tmp_path_factory.mktemp("check"), DOCS, "check", max_new_tokens=24)


@pytest.fixture(autouse=True)
def _fresh_cache():
    yield
    clear_generator_cache()


def test_yes_share_is_the_yes_words_share_of_the_next_token_probability():
    logits = np.log(np.array([0.1, 0.3, 0.2, 0.4]))
    assert yes_share(logits, [1], [2, 3]) == pytest.approx(0.3 / 0.9)
    assert yes_share(logits, [], [2]) is None  # a vocabulary without the word: no judgment


def test_the_embedded_model_reads_its_own_cache_right(settings):
    """The check reuses the tokens llama.cpp already holds: the probability after another prompt
    equals the one a freshly loaded model gives, and the answer after a check is the answer without one."""
    chain = QAChain(settings.with_overrides(answer_check="off"))
    prepared = chain.prepare.invoke({"question": QUESTION, "history": [], "filters": None})
    answer_msgs = chain.messages(QUESTION, prepared["context"])
    check_msgs = chain.check_messages(QUESTION, prepared["context"])
    assert check_msgs[-1]["content"].endswith(CHECK_SUFFIX) and check_msgs[:-1] == answer_msgs[:-1]

    gen = chain.generator
    fresh = gen.yes_probability(check_msgs)
    assert 0.0 < fresh < 1.0
    plain = "".join(gen.stream(answer_msgs))
    again = gen.yes_probability(check_msgs)  # the cache now holds the answer's prompt and its tokens
    assert again == pytest.approx(fresh, abs=1e-4)
    assert "".join(gen.stream(answer_msgs)) == plain  # and the answer after a check is unchanged
    other = gen.yes_probability([{"role": "user", "content": "Is the sky green? Reply yes or no."}])
    assert other != pytest.approx(fresh, abs=1e-4)
    assert 1e8 < gen.n_params < 2e8  # SmolLM2-135M


def test_auto_skips_the_check_for_a_generator_too_small_to_judge(settings):
    answer = QAChain(settings).ask(QUESTION)  # auto, the 135M embedded model
    assert answer.answer_check is None and "answer_check" not in answer.timings
    assert not answer.abstained and answer.text


def test_a_no_from_the_generator_makes_the_chain_abstain_and_say_why(settings):
    chain = QAChain(settings.with_overrides(answer_check="on", answer_check_threshold=1.0))
    answer = chain.ask(QUESTION)
    assert answer.abstained and answer.citations == []
    assert 0.0 < answer.answer_check < 1.0
    assert answer.text == "I don't know: the model judged that the passages found do not state the answer."
    assert answer.abstain_reason == "the model judged that the passages found do not state the answer"
    assert answer.generator_stats == {}  # nothing was generated
    zh = chain.ask("给水泵多久检查一次？")
    assert zh.abstained and zh.text.startswith("我不知道") and "模型判断" in zh.text


def test_a_yes_lets_the_answer_through_unchanged(settings):
    checked = QAChain(settings.with_overrides(answer_check="on", answer_check_threshold=0.0)).ask(QUESTION)
    unchecked = QAChain(settings.with_overrides(answer_check="off")).ask(QUESTION)
    assert not checked.abstained and checked.text == unchecked.text
    assert checked.answer_check is not None and checked.timings["answer_check"] > 0
    assert checked.as_dict()["answer_check"] == checked.answer_check
    assert unchecked.answer_check is None


def test_transformers_models_give_the_same_probability_as_their_logits(tmp_path):
    import torch

    path = build_tiny_model("llama2", tmp_path / "tiny-llama2", extra_corpus=YES_NO_CORPUS)
    base = Settings.model_construct().model_dump()
    gen = get_generator(Settings.model_construct(**(base | dict(
        model=str(path), backend="auto", family=None, device="cpu", engine="hf", quantization="none",
        max_new_tokens=4, temperature=0.0, top_p=0.95, context_window=None, openai_url=None))))
    msgs = [{"role": "user", "content": "Context: pumps.\n\nQuestion: pumps?" + CHECK_SUFFIX}]
    encode = lambda w: gen.tokenizer(w, add_special_tokens=False)["input_ids"]  # noqa: E731
    yes, no = single_token_ids(encode, YES_WORDS), single_token_ids(encode, NO_WORDS)
    assert yes and no, "the tiny tokenizer should hold 'yes' and 'no' as tokens"
    ids = gen._encode(gen.format(msgs), 1)
    with torch.no_grad():
        probs = torch.softmax(gen.model(input_ids=ids).logits[0, -1].double(), -1)
    expected = float(probs[yes].sum() / (probs[yes].sum() + probs[no].sum()))
    assert gen.yes_probability(msgs) == pytest.approx(expected, rel=1e-5)
    assert not math.isnan(expected) and gen.n_params > 0
