"""The synthetic benchmark: exact-match accuracy on ``llava-ray synth``'s held-out ``eval.json``.

Each item asks one question of one held-out image (``question_type``: color, shape, count or
position) and has a one-word ``answer`` and its ``choices``. An answer is correct when it equals
the expected one after :func:`llava_ray.data.synthetic.normalize_answer` (case, spaces, trailing
punctuation). Reported per question type and overall, each with the chance level beside it
(the mean of ``1 / len(choices)`` over the items: guessing uniformly among the choices) and the
number of answers that are not among the choices at all (the model answering off-format).

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

__all__ = ["load_items", "score"]

load_items = load_eval_items  # eval.json is already in the evaluation format


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
    overall = _Tally()
    for item in items:
        outcome = outcomes[item.id]
        question_type = str(item.fields.get("question_type", "untyped"))
        row = {**base_row(item, outcome), "answer": item.fields.get("answer"), "type": question_type}
        if outcome.error is None:
            choices = [normalize_answer(str(choice)) for choice in item.fields.get("choices") or []]
            predicted = normalize_answer(outcome.prediction or "")
            correct = predicted == normalize_answer(str(item.fields.get("answer", "")))
            in_choices = predicted in choices
            row.update(correct=correct, in_choices=in_choices if choices else None)
            for tally in (tallies[question_type], overall):
                tally.add(correct, len(choices), in_choices)
        rows.append(row)
    by_type = {name: tallies[name].table() for name in sorted(tallies)}
    by_type["overall"] = overall.table()
    metrics: dict[str, Any] = {}
    for name, table in by_type.items():
        suffix = "" if name == "overall" else f"/{name}"
        for key in ("accuracy", "chance", "not_in_choices"):
            metrics[f"{key}{suffix}"] = table[key]
    return rows, {"metrics": metrics, "by_type": by_type}
