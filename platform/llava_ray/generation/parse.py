"""LLM replies -> LLaVA samples, or a :class:`~llava_ray.utils.skips.Skipped` with a counted reason.

The paper does not publish its parsing rules; these are ours, strict on purpose because a bad
sample teaches the model something wrong:

- ``empty_reply``: nothing but whitespace.
- ``truncated``: the reply stopped at ``max_tokens`` (``finish_reason == "length"``), so its last
  answer is cut mid-sentence.
- ``leaking``: the reply gives away that the LLM read text instead of seeing the image: it
  mentions captions, bounding boxes, coordinates, annotations, "the description", or quotes
  box-like numbers (``[0.123, ...``, ``0.481``). A model trained on these would talk about
  captions it never gets.
- ``unparsable``: conversation and complex replies must be ``Question:`` / ``Answer:`` lines
  (optionally bold, numbered or bulleted), alternating and starting with a question, every turn
  non-empty; complex must hold exactly one pair; no reply may contain the ``<image>`` placeholder.
  Text before the first ``Question:`` (a "Sure, here is ..." preamble) is dropped; an answer
  runs until the next marker and may span lines.

Detailed descriptions are used whole, after a human instruction sampled per sample from the
prompt file's list with a seed, so rebuilding the output from the journal gives the same text.
"""

from __future__ import annotations

import random
import re

from llava_ray.conversation.tokenizer import IMAGE_TOKEN
from llava_ray.utils.skips import Skipped

_MARKER = re.compile(
    r"^\s*(?:[-*>#]+\s+)?(?:\*\*|__)?(question|answer)(?:\s*\d+)?\s*(?:\*\*|__)?\s*:\s*(?:\*\*|__)?\s*(.*)$",
    re.IGNORECASE,
)
LEAK_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(pattern, re.IGNORECASE)
    for pattern in (
        r"\bcaptions?\b",
        r"\bcaptioned\b",
        r"\bbounding[- ]?box(?:es)?\b",
        r"\bcoordinates?\b",
        r"\bannotat(?:ion|ions|ed)\b",
        r"\bthe (?:given |provided |above |following )?descriptions?\b",
        r"\b(?:given|provided) (?:sentences|text|information)\b",
        r"\[\s*-?\d*\.\d+\s*,",  # a box-like list of decimals: "[0.123, ..."
        r"(?<![\d.])[01]\.\d{3}(?!\d)",  # a three-decimal fraction, the context's number format
    )
)


def find_leak(text: str) -> str | None:
    """The first phrase of ``text`` that betrays the symbolic context, or None."""
    for pattern in LEAK_PATTERNS:
        match = pattern.search(text)
        if match:
            return match.group(0)
    return None


def parse_qa_pairs(reply: str) -> list[tuple[str, str]]:
    """``Question:`` / ``Answer:`` blocks -> [(question, answer), ...]; raises Skipped('unparsable', ...)."""
    turns: list[list[str]] = []  # [role, line, line, ...]
    for line in reply.splitlines():
        match = _MARKER.match(line)
        if match:
            turns.append([match.group(1).lower(), match.group(2)])
        elif turns:
            turns[-1].append(line)
    if not turns:
        raise Skipped("unparsable", "no Question:/Answer: lines")
    pairs = []
    for index in range(0, len(turns), 2):
        question, answer = turns[index], turns[index + 1] if index + 1 < len(turns) else None
        if question[0] != "question" or answer is None or answer[0] != "answer":
            raise Skipped("unparsable", f"turn {index + 1} breaks the Question/Answer alternation")
        texts = ["\n".join(turn[1:]).strip() for turn in (question, answer)]
        if not all(texts):
            raise Skipped("unparsable", f"empty {'question' if not texts[0] else 'answer'}")
        pairs.append((texts[0], texts[1]))
    return pairs


def parse_reply(
    response_type: str, reply: str | None, finish_reason: str | None = None
) -> list[tuple[str, str]]:
    """The (question, answer) pairs of a reply; a detailed description is one pair with no question.

    Raises :class:`~llava_ray.utils.skips.Skipped` with the reasons of the module docstring, checked in
    that order.
    """
    text = (reply or "").strip()
    if not text:
        raise Skipped("empty_reply", "the reply is empty")
    if finish_reason == "length":
        raise Skipped("truncated", "stopped at max_tokens")
    leak = find_leak(text)
    if leak is not None:
        raise Skipped("leaking", repr(leak))
    if IMAGE_TOKEN in text:
        raise Skipped("unparsable", f"contains the {IMAGE_TOKEN} placeholder")
    if response_type == "detail":
        return [("", text)]
    pairs = parse_qa_pairs(text)
    if response_type == "complex" and len(pairs) != 1:
        raise Skipped("unparsable", f"{len(pairs)} questions, expected one")
    return pairs


def detail_instruction(instructions: tuple[str, ...] | list[str], seed: int, sample_id: str) -> str:
    """The human turn of a detailed description: a seeded choice per sample, independent of run order."""
    return random.Random(f"{seed}:{sample_id}").choice(list(instructions))


def llava_sample(
    sample_id: str, image: str, pairs: list[tuple[str, str]], instruction: str | None = None
) -> dict[str, object]:
    """LLaVA's format, ``<image>`` at the front of the first human turn.

    ``instruction`` replaces the (empty) question of a detailed description.
    """
    conversations = []
    for index, (question, answer) in enumerate(pairs):
        human = instruction if instruction is not None and index == 0 else question
        if index == 0:
            human = f"{IMAGE_TOKEN}\n{human}"
        conversations += [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]
    return {"id": sample_id, "image": image, "conversations": conversations}
