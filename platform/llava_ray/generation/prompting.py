"""Prompt data files -> chat messages for one image's context.

Each response type has a YAML file (``prompts/{type}.yaml`` in this package, or the same names
in ``generate.prompts_dir``) holding::

    system: the system message
    examples: [{context: ..., response: ...}, ...]   hand-written few-shot pairs
    instructions: [...]                              detail only: human turns, one sampled per sample

:func:`build_messages` sends them the way LLaVA did: the system message, then each example as a
user turn (its context) and an assistant turn (its response), then the image's own context as
the last user turn.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llava_ray.config.generation import ResponseType
from llava_ray.utils.safe_yaml import load_yaml

SHIPPED_PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
# Which types see the object lines; conversation sees the captions only (as in the paper).
USES_BOXES: dict[str, bool] = {"conversation": False, "detail": True, "complex": True}


class PromptError(ValueError):
    """A prompt file that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class PromptSet:
    """Everything sent to the LLM for one response type, besides the image's context."""

    response_type: ResponseType
    system: str
    examples: tuple[tuple[str, str], ...]  # (context, expected response)
    instructions: tuple[str, ...] = ()  # detail only


def load_prompts(
    types: Iterable[ResponseType], prompts_dir: str | Path | None = None
) -> dict[str, PromptSet]:
    """The prompt set of each type, read and checked; raises one :class:`PromptError` listing every problem."""
    folder = Path(prompts_dir) if prompts_dir is not None else SHIPPED_PROMPTS_DIR
    prompts, problems = {}, []
    for response_type in types:
        try:
            prompts[response_type] = _load_prompt_file(folder / f"{response_type}.yaml", response_type)
        except PromptError as error:
            problems.append(str(error))
    if problems:
        raise PromptError("; ".join(problems))
    return prompts


def build_messages(prompt: PromptSet, context: str) -> list[dict[str, str]]:
    """System message, few-shot user/assistant turns, then ``context`` as the final user turn."""
    messages = [{"role": "system", "content": prompt.system}]
    for example_context, response in prompt.examples:
        messages += [
            {"role": "user", "content": example_context},
            {"role": "assistant", "content": response},
        ]
    messages.append({"role": "user", "content": context})
    return messages


def _load_prompt_file(path: Path, response_type: ResponseType) -> PromptSet:
    if not path.is_file():
        raise PromptError(f"{path} does not exist; copy the shipped {SHIPPED_PROMPTS_DIR / path.name}")
    try:
        raw: Any = load_yaml(path.read_text())  # no aliases, bounded size (a yaml.YAMLError)
    except yaml.YAMLError as error:
        raise PromptError(f"{path} is not valid YAML: {error}") from None
    expected = "a mapping with 'system', 'examples' (context/response pairs)" + (
        " and 'instructions'" if response_type == "detail" else ""
    )
    if not isinstance(raw, dict):
        raise PromptError(f"{path}: expected {expected}")
    unknown = set(raw) - {"system", "examples", "instructions"}
    system = raw.get("system")
    examples = raw.get("examples")
    instructions = raw.get("instructions") or []
    valid_examples = isinstance(examples, list) and all(
        isinstance(e, dict) and set(e) == {"context", "response"} and all(_text(v) for v in e.values())
        for e in examples
    )
    if (
        unknown
        or not _text(system)
        or not valid_examples
        or not examples
        or not isinstance(instructions, list)
        or not all(_text(i) for i in instructions)
        or (response_type == "detail" and not instructions)
    ):
        extra = f" (unknown keys {sorted(unknown)})" if unknown else ""
        raise PromptError(f"{path}: expected {expected}, each a non-empty text{extra}")
    return PromptSet(
        response_type=response_type,
        system=system.strip(),
        examples=tuple((e["context"].strip(), e["response"].strip()) for e in examples),
        instructions=tuple(i.strip() for i in instructions),
    )


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())
