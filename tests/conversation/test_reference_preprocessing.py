"""Conversations are conformed as the reference's preprocessing does, and every change is recorded.

The reference (``preprocess_multimodal``, ``preprocess_v1``, ``preprocess_plain``) drops a turn
that opens the conversation from the assistant, moves ``<image>`` to the front of whichever turn
holds it as ``"<image>\\n"`` (then strips the turn) and takes a stage-1 instruction that is
exactly ``<image>``; llava-ray used to skip the first two kinds of sample and leave a later
turn's ``<image>`` where it stood.
"""

from __future__ import annotations

import pytest

from llava_ray.conversation.chat_template import jinja_chat_template
from llava_ray.conversation.templates import (
    IMAGE_MOVED_TO_FRONT,
    LEADING_ANSWER_DROPPED,
    TEMPLATES,
    Turn,
    conform_turns,
    get_template,
)
from llava_ray.utils.skips import Skipped


def conversation(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"from": role, "value": text} for role, text in pairs]


def test_an_opening_answer_is_dropped_and_the_rest_trains() -> None:
    normalized = conform_turns(conversation(("gpt", "Hello!"), ("human", "Hi?"), ("gpt", "Hi.")))
    assert normalized.turns == [Turn("user", "Hi?"), Turn("assistant", "Hi.")]
    assert normalized.changes == (LEADING_ANSWER_DROPPED,)


def test_only_one_opening_answer_is_dropped() -> None:
    with pytest.raises(Skipped, match="turns must alternate") as caught:
        conform_turns(conversation(("gpt", "a"), ("gpt", "b"), ("human", "c"), ("gpt", "d")))
    assert caught.value.reason == "roles_not_alternating"


def test_an_image_in_a_later_turn_moves_to_the_front_of_that_turn() -> None:
    normalized = conform_turns(
        conversation(
            ("human", "Hi?"), ("gpt", "Hi."), ("human", " What is this?\n<image> "), ("gpt", "A cat.")
        )
    )
    assert normalized.turns[2] == Turn("user", "<image>\nWhat is this?")
    assert normalized.changes == (IMAGE_MOVED_TO_FRONT,)


def test_an_image_already_in_front_is_no_change() -> None:
    normalized = conform_turns(conversation(("human", "<image>\nWhat is this?"), ("gpt", "A cat.")))
    assert normalized.turns[0].text == "<image>\nWhat is this?" and normalized.changes == ()


def test_a_turn_that_is_only_the_image_stays_the_image() -> None:
    normalized = conform_turns(conversation(("human", "<image>"), ("gpt", "A red square.")))
    assert normalized.turns[0] == Turn("user", "<image>") and normalized.changes == ()
    spans = get_template("plain").render(normalized.turns)
    assert [span.text for span in spans] == ["<image>", "A red square.\n"]


def test_plain_keeps_the_caption_as_written() -> None:
    # preprocess_plain joins <image>, the caption and "\n" with no stripping.
    turns = conform_turns(conversation(("human", "<image>\nDescribe."), ("gpt", " A cat. "))).turns
    assert "".join(span.text for span in get_template("plain").render(turns)) == "<image> A cat. \n"


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_the_jinja_chat_template_moves_a_later_image_too(name: str) -> None:
    from jinja2 import Template as Jinja

    messages = [
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": " What is this?\n<image> "},
        {"role": "assistant", "content": "A cat."},
    ]
    template = get_template(name)
    if template.caption_only:
        messages = messages[2:]
    turns = conform_turns([{"from": m["role"], "value": m["content"]} for m in messages]).turns
    expected = "".join(span.text for span in template.render(turns))
    assert Jinja(jinja_chat_template(template)).render(messages=messages) == expected
