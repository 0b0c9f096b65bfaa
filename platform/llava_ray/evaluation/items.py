"""The evaluation format, and the bookkeeping every benchmark's scoring shares.

An *evaluation file* is a JSON array (or JSON lines) of LLaVA samples with the expected answer
beside them; ``llava-ray synth`` writes one (``eval.json``) and
:func:`llava_ray.evaluation.scienceqa.convert_scienceqa` converts ScienceQA to one::

    {"id": "eval-000003-color",
     "image": "images/eval_000003.png",          # relative to the image root; absent: text only
     "conversations": [{"from": "human", "value": "<image>\\nWhat color is the shape?..."},
                       {"from": "gpt", "value": "red"}],   # trailing answers are not prompted
     "answer": "red",
     "choices": ["red", "green", ...],            # optional
     ...}                                         # anything else is kept as a field (question_type, subject)

:func:`load_eval_items` turns it into :class:`EvalItem` (prompt conversation, resolved image
location, fields). Image paths stay inside the image root, as in ``prepare``: an absolute path, a
URL or ``..`` out of the root is never opened (``image_path_outside_root``). Items the model could
not be asked (such an image, a missing one, a prompt too long) are reported by :func:`skip_report`,
never dropped silently, and excluded from accuracies.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava_ray.conversation.tokenizer import IMAGE_TOKEN
from llava_ray.data.samples import resolve_image_path
from llava_ray.utils.skips import SkipCounter, Skipped
from llava_ray.utils.storage import is_remote, local_copy

ITEM_KEYS = ("id", "image", "conversations")


@dataclass(frozen=True)
class Outcome:
    """The model's answer to one item, or the reason it has none."""

    prediction: str | None
    error: str | None = None
    detail: str | None = None


@dataclass(frozen=True)
class EvalItem:
    """One question: ``conversation`` ends with the user's turn; ``fields`` are the benchmark's own."""

    id: str
    conversation: list[dict[str, Any]]
    image: str | None = None  # a path or URL, already resolved against the image root
    fields: dict[str, Any] = field(default_factory=dict)
    refused: Outcome | None = (
        None  # known when loading: the item cannot be asked (its image is outside the root)
    )

    @property
    def question(self) -> str:
        """The last user turn's text, as shown in results."""
        return str(self.conversation[-1].get("value", ""))


def read_records(path: str) -> list[dict[str, Any]]:
    """A JSON array or JSON lines file (local or remote) as a list of objects."""
    text = Path(local_copy(path)).read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        records = json.loads(stripped)
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(
                        f"{path} line {number} is not JSON ({error}); fix or remove that line"
                    ) from None
    bad = [index for index, record in enumerate(records) if not isinstance(record, dict)]
    if bad:
        raise ValueError(f"{path}: records {bad[:5]} are not JSON objects; each item must be an object")
    return records


def default_image_root(data_path: str) -> str:
    """The data file's folder: image paths in LLaVA files are relative to it unless told otherwise."""
    if is_remote(data_path):
        return data_path.rstrip("/").rsplit("/", 1)[0]
    return str(Path(data_path).resolve().parent)


def image_location(image: str, image_root: str) -> str:
    """Where an item's image is: ``image`` under ``image_root``.

    The same guard as ``prepare``: an absolute path, a URL or a path climbing out of the root
    raises :class:`Skipped` (``image_path_outside_root``); an evaluation file cannot make the job
    read files it was not given.
    """
    return resolve_image_path(image_root.rstrip("/") if is_remote(image_root) else image_root, image)


def locate_image(image: str, image_root: str) -> tuple[str, Outcome | None]:
    """(:func:`image_location`, None), or (``image`` as given, the refusal) for an image outside the root."""
    try:
        return image_location(image, image_root), None
    except Skipped as error:
        return image, Outcome(None, error.reason, str(error))


def prompt_turns(conversation: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A LLaVA conversation without its trailing answer(s): the prompt that asks for the last one."""
    turns = [dict(turn) for turn in conversation]
    while turns and str(turns[-1].get("from", "")).lower() in ("gpt", "assistant"):
        turns.pop()
    return turns


def with_image_placeholder(turns: list[dict[str, Any]], has_image: bool) -> list[dict[str, Any]]:
    """The image's ``<image>`` placeholder put first in the first user turn when the text lacks it.

    LLaVA's evaluation scripts do the same for questions written without one (LLaVA-Bench).
    """
    if has_image and turns and not any(IMAGE_TOKEN in str(turn.get("value", "")) for turn in turns):
        turns = [{**turns[0], "value": f"{IMAGE_TOKEN}\n{turns[0]['value']}"}, *turns[1:]]
    return turns


def load_eval_items(
    data_path: str, image_root: str | None = None, limit: int | None = None
) -> list[EvalItem]:
    """The evaluation file's items (format in the module docstring), the first ``limit`` of them."""
    records = read_records(data_path)[:limit]
    root = image_root or default_image_root(data_path)
    items = []
    for index, record in enumerate(records):
        if "id" not in record or not isinstance(record.get("conversations"), list):
            raise ValueError(
                f"{data_path} item {index} has no 'id' or no 'conversations' list; expected the evaluation "
                "format (llava_ray.evaluation.items)"
            )
        image = record.get("image")
        location, refused = locate_image(str(image), root) if image else (None, None)
        turns = with_image_placeholder(prompt_turns(record["conversations"]), location is not None)
        fields = {key: value for key, value in record.items() if key not in ITEM_KEYS}
        items.append(EvalItem(str(record["id"]), turns, location, fields, refused))
    return items


def skip_report(items: Sequence[EvalItem], outcomes: Mapping[str, Outcome]) -> dict[str, Any]:
    """``{"items", "answered", "skipped": {reason: n}, "examples": {reason: ["id: detail", ...]}}``."""
    skips = SkipCounter()
    for item in items:
        outcome = outcomes[item.id]
        if outcome.error:
            skips.add(outcome.error, f"{item.id}: {outcome.detail}")
    return {"items": len(items), "answered": len(items) - skips.total, **skips.to_dict()}


def base_row(item: EvalItem, outcome: Outcome) -> dict[str, Any]:
    """The results.jsonl fields every benchmark writes; errors only when there is one."""
    row: dict[str, Any] = {"id": item.id, "question": item.question, "prediction": outcome.prediction}
    if outcome.error:
        row["error"] = outcome.error
        row["detail"] = outcome.detail
    return row


def accuracy(correct: int, total: int) -> float | None:
    """correct / total, or None for an empty group (never a misleading 0)."""
    return correct / total if total else None
