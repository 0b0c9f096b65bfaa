"""The shipped prompt files carry the paper's instructions, and their examples follow them (no Ray).

The examples teach the LLM more than the system message, so besides the instructions being
there, each example is checked to do what the instructions ask.
"""

from __future__ import annotations

import re

import pytest

from llava_ray.generation.parse import parse_reply
from llava_ray.generation.prompting import load_prompts

PROMPTS = load_prompts(["conversation", "detail", "complex"])


def words(text: str, shortest: int = 1) -> set[str]:
    return {word for word in re.findall(r"[a-z]+", text.lower()) if len(word) >= shortest}


def sentences(text: str) -> int:
    return len(re.findall(r"[.!?](?:\s|$)", text))


@pytest.mark.parametrize("kind", ["conversation", "detail", "complex"])
def test_every_example_reply_is_one_the_parser_accepts(kind):
    for _, response in PROMPTS[kind].examples:
        parse_reply(kind, response, "stop")  # raises Skipped if an example would be rejected


def test_conversation_asks_for_complex_questions_with_detailed_answers_and_shows_them():
    system = PROMPTS["conversation"].system.lower()
    assert "background knowledge" in system and "event" in system  # the paper's two examples of depth
    assert "several paragraphs" in system and "step by step" in system
    for _, response in PROMPTS["conversation"].examples:
        answers = [answer for _, answer in parse_reply("conversation", response, "stop")]
        # Most answers are short facts; at least one is a reasoned, multi-sentence answer.
        detailed = [a for a in answers if sentences(a) >= 4 and len(a.split()) >= 60]
        short = [a for a in answers if sentences(a) <= 2]
        assert detailed and len(short) >= 2, answers


def test_complex_questions_keep_the_visual_details_out():
    system = PROMPTS["complex"].system
    assert "Keep the visual details out of the question" in system
    for context, response in PROMPTS["complex"].examples:
        [(question, answer)] = parse_reply("complex", response, "stop")
        # No content word of the captions or object names is given away by the question ...
        assert not words(question, shortest=5) & words(context, shortest=5), question
        # ... the answer is what names them.
        assert len(words(answer, shortest=5) & words(context, shortest=5)) >= 3, answer
