"""AnswerGuard: what a generator writes that continues the prompt instead of answering it never reaches the
reader (a copied passage header, a citation of a passage it was not shown, the prompt's next "Question:", a
loop), whatever sizes the pieces stream in; everything else streams through unchanged."""

from __future__ import annotations

import pytest

from localgpt.answer_text import AnswerGuard


def stream(text: str, passages: int = 4, size: int = 3) -> tuple[str, AnswerGuard]:
    guard = AnswerGuard(passages)
    shown = []
    for i in range(0, len(text), size):
        shown.append(guard.feed(text[i:i + size]))
        if guard.stopped:
            break
    shown.append(guard.finish())
    assert "".join(shown) == guard.text  # what streamed is what the guard reports
    return guard.answer, guard


SIZES = [1, 2, 3, 5, 8, 13, 1000]


@pytest.mark.parametrize("size", SIZES)
def test_the_135m_models_prompt_echo_is_cut_to_the_answer(size):
    # what SmolLM2-135M wrote for the README's question: a header of a passage that does not exist, the answer,
    # then the prompt's next question
    text = ("[5] (retrieval.md, page 2)\nWhere localgpt keeps the database it builds\nThe command stores its "
            "embeddings in a local Chroma database under local_data/ [3].\n\nQuestion: Where does localgpt keep "
            "the database it builds?\nAnswer: nowhere")
    answer, guard = stream(text, size=size)
    assert answer == ("Where localgpt keeps the database it builds\nThe command stores its embeddings in a local "
                      "Chroma database under local_data/ [3].")
    assert guard.stopped == "label" and guard.dropped[0] == "[5] (retrieval.md, page 2)"


@pytest.mark.parametrize("size", SIZES)
def test_a_repeated_line_ends_the_answer(size):
    text = "".join(f"{i}. Ask a follow-up question with localgpt chat\n" for i in range(1, 15))
    answer, guard = stream(text, size=size)
    assert answer == "1. Ask a follow-up question with localgpt chat" and guard.stopped == "repeat"


@pytest.mark.parametrize("size", SIZES)
def test_a_loop_inside_one_line_is_cut_to_one_copy(size):
    ja = "モデルは、モデルでは、モデルとモデルを使います。"
    answer, guard = stream("回答：" + ja * 6, size=size)
    assert answer == "回答：" + ja and guard.stopped == "repeat"
    en = "No, localgpt does not send documents anywhere. "
    answer, _ = stream("Intro.\n" + en * 5 + "No", size=size)
    assert answer == "Intro.\n" + en.strip()


@pytest.mark.parametrize("size", SIZES)
def test_loops_of_digits_and_in_code_blocks_end_the_answer(size):
    # what the 135M model wrote for two questions of the own dev half
    answer, guard = stream("1. " * 60, size=size)
    assert answer in ("1.", "1. 1.") and guard.stopped == "repeat"  # cut where the loop was seen: one copy or two
    text = "The command is:\n\n```\n# /usr/sbin/dhclient-script\n" + "# /usr/sbin/dhclient-script\n" * 12 + "```"
    answer, guard = stream(text, size=size)
    assert answer == "The command is:\n\n```\n# /usr/sbin/dhclient-script\n# /usr/sbin/dhclient-script"
    assert guard.stopped == "repeat"


@pytest.mark.parametrize("size", SIZES)
def test_citations_of_passages_not_shown_are_dropped_and_the_rest_kept(size):
    answer, guard = stream("It is kept in local_data/ [2][7], see [4] and [12]. In code x[10] = 1.", size=size)
    assert answer == "It is kept in local_data/ [2], see [4] and . In code x[10] = 1."
    assert guard.dropped == ["[7]", "[12]"] and guard.stopped is None


@pytest.mark.parametrize("size", SIZES)
def test_headers_go_and_the_text_after_them_stays(size):
    answer, _ = stream("1. [1] (faq-zh.md)\nlocalgpt 常见问题\n\n[2] (faq-zh.md, page 3) localgpt 可以离线回答。", size=size)
    assert answer == "localgpt 常见问题\n\nlocalgpt 可以离线回答。"


@pytest.mark.parametrize("size", SIZES)
def test_ordinary_answers_stream_through_unchanged(size):
    texts = [
        "The database is in local_data/ [1].",
        "Yes.\nYes.\nThe answer is 42 [3].",  # short repeats are not loops
        "| a | b |\n|---|---|---|---|---|---|---|---|\n| 1 | 2 |",  # a table's rule is not a loop
        "```\n    return None\n    return None\n```\nDone [2].",  # code may repeat lines
        "- first\n- second\n\n1) Question marks? Yes: Context matters.",
        "Answer: 東京の天気は晴れです。[1]",
    ]
    for text in texts:
        answer, guard = stream(text, size=size)
        assert answer == text and guard.stopped is None and not guard.dropped


def test_the_answer_streams_before_the_line_ends():
    guard = AnswerGuard(4)
    assert guard.feed("The database ") == "The database "  # not held: it cannot be a header, label or repeat
    assert guard.feed("is in [") == "is in "  # an open citation waits for its number
    assert guard.feed("1]") == "[1]"
    assert guard.feed("\n[") == "\n"  # a line that may be a header waits
    assert guard.feed("2] says so") == "[2] says so"


def test_turned_off_every_piece_passes_as_it_is():
    text = "[5] (retrieval.md, page 2)\nSame line here\nSame line here\nQuestion: next?"
    guard = AnswerGuard(1, enabled=False)  # setting answer_guard = false
    shown = "".join(guard.feed(text[i:i + 4]) for i in range(0, len(text), 4)) + guard.finish()
    assert shown == text and guard.answer == text and guard.stopped is None
