"""The synthetic benchmark: exact-match accuracy on ``llava-ray synth``'s held-out ``eval.json``.

Each item asks one question of one held-out image (``question_type``: color, shape, count or
position) and has a one-word ``answer`` and its ``choices``. The question is the conversation's
first turn, or a follow-up: a later turn after earlier questions and their correct answers. An
answer is correct when it equals the expected one after
:func:`llava_ray.data.synthetic.normalize_answer` (case, spaces, trailing punctuation). Reported
per question type, for first turns (``first_turn``) and follow-ups (``follow_up``) apart, and
overall, each with the chance level beside it (the mean of ``1 / len(choices)`` over the items:
guessing uniformly among the choices) and the number of answers that are not among the choices at
all (the model answering off-format). Results rows carry the scored question's ``turn`` (1 for a
first turn).

Run it with ``llava-ray evaluate --config FILE evaluate.benchmark=synthetic
evaluate.data_path=data/synthetic/eval.json evaluate.model=RUN/final``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llava_ray.data.synthetic import normalize_answer
from llava_ray.evaluation.items import EvalItem, Outcome, accuracy, base_row, load_eval_items

__all__ = ["TURN_GROUPS", "load_items", "score"]

load_items = load_eval_items  # eval.json is already in the evaluation format
TURN_GROUPS = ("first_turn", "follow_up")  # by_type rows beside the question types, always both


@dataclass
class _Tally:
    """Counts of one question type (or of all)."""

    count: int = 0
    correct: int = 0
    with_choices: int = 0
    chance_sum: float = 0.0
    not_in_choices: int = 0

    def add(self, correct: bool, choices: int, in_choices: bool) -> None:
        self.count += 1
        self.correct += correct
        if choices:
            self.with_choices += 1
            self.chance_sum += 1 / choices
            self.not_in_choices += not in_choices

    def table(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "correct": self.correct,
            "accuracy": accuracy(self.correct, self.count),
            "chance": self.chance_sum / self.with_choices if self.with_choices else None,
            "not_in_choices": self.not_in_choices,
        }


def score(
    items: Sequence[EvalItem], outcomes: Mapping[str, Outcome]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """results.jsonl rows and the summary's ``metrics`` and ``by_type`` (see the module docstring)."""
    rows = []
    tallies: dict[str, _Tally] = defaultdict(_Tally)
    turns = {group: _Tally() for group in TURN_GROUPS}
    overall = _Tally()
    for item in items:
        outcome = outcomes[item.id]
        question_type = str(item.fields.get("question_type", "untyped"))
        turn = _scored_turn(item)
        row = {
            **base_row(item, outcome),
            "answer": item.fields.get("answer"),
            "type": question_type,
            "turn": turn,
        }
        if outcome.error is None:
            choices = [normalize_answer(str(choice)) for choice in item.fields.get("choices") or []]
            predicted = normalize_answer(outcome.prediction or "")
            correct = predicted == normalize_answer(str(item.fields.get("answer", "")))
            in_choices = predicted in choices
            row.update(correct=correct, in_choices=in_choices if choices else None)
            turn_group = turns["first_turn" if turn <= 1 else "follow_up"]
            for tally in (tallies[question_type], turn_group, overall):
                tally.add(correct, len(choices), in_choices)
        rows.append(row)
    by_type = {name: tallies[name].table() for name in sorted(tallies)}
    by_type.update({group: tally.table() for group, tally in turns.items()})
    by_type["overall"] = overall.table()
    metrics: dict[str, Any] = {}
    for name, table in by_type.items():
        suffix = "" if name == "overall" else f"/{name}"
        for key in ("accuracy", "chance", "not_in_choices"):
            metrics[f"{key}{suffix}"] = table[key]
    return rows, {"metrics": metrics, "by_type": by_type}


def _scored_turn(item: EvalItem) -> int:
    """Which user turn the item's question is: 1 for a first turn, more for a follow-up."""
    return sum(str(turn.get("from", "")).lower() in ("human", "user") for turn in item.conversation)
