"""ScienceQA: converting the official release to the evaluation format, and LLaVA-1.5's scoring.

The release layout::

    problems.json     {pid: {"question", "choices": [...], "answer": <index>, "hint", "image": "image.png" | null,
                             "subject", "grade", "split", ...}}
    pid_splits.json   {"train": [pid, ...], "val": [...], "test": [...], "minitest": [...], ...}
    {image_root}/{split}/{pid}/image.png

:func:`convert_scienceqa` writes one evaluation item per problem of a split (format in
:mod:`llava_ray.evaluation.items`) with LLaVA-1.5's zero-shot prompt::

    <image>\\n                        (only when the problem has an image)
    {question}\\nContext: {hint or "N/A"}\\nOptions: (A) x (B) y ...
    \\nAnswer with the option's letter from the given choices directly.

and the answer as its letter. A problem whose image file is missing is skipped and counted in
``{out_path stem}.report.json``, never silently dropped.

Scoring follows the reference's answer extraction (:func:`extract_choice`): the answer is exactly
one option letter; or it starts with ``"X. "``; or it contains exactly one ``"The answer is X."``.
Anything else, and a letter past the problem's last option, is *unparsable* and counts as wrong
(the reference silently replaced it with a random option); unparsable answers are counted and
reported. Accuracy is reported overall, on questions with and without an image (LLaVA-1.5
reports "ScienceQA-IMG"), and per subject.

Run it with ``llava-ray evaluate --config FILE evaluate.benchmark=scienceqa
evaluate.data_path=scienceqa_test.json evaluate.image_root=ScienceQA/images`` after
``convert_scienceqa(...)``.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llava_ray.conversation.tokenizer import IMAGE_TOKEN
from llava_ray.evaluation.items import EvalItem, Outcome, accuracy, base_row, load_eval_items
from llava_ray.utils.skips import SkipCounter
from llava_ray.utils.storage import filesystem, local_copy

logger = logging.getLogger(__name__)

__all__ = ["convert_scienceqa", "extract_choice", "load_items", "scienceqa_prompt", "score"]

LETTERS = "ABCDE"  # ScienceQA problems have two to five options
ANSWER_INSTRUCTION = "\nAnswer with the option's letter from the given choices directly."
IMAGE_FILE = "image.png"
_THE_ANSWER_IS = re.compile(r"The answer is ([A-Z])\.")

load_items = load_eval_items  # convert_scienceqa writes the evaluation format


def scienceqa_prompt(problem: Mapping[str, Any], has_image: bool) -> str:
    """LLaVA-1.5's zero-shot ScienceQA prompt for one problem (see the module docstring)."""
    choices = list(problem["choices"])
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(
            f"a ScienceQA problem has 2 to {len(LETTERS)} choices, this one {len(choices)}: {choices}"
        )
    options = " ".join(f"({letter}) {choice}" for letter, choice in zip(LETTERS, choices, strict=False))
    hint = str(problem.get("hint") or "").strip()
    text = f"{problem['question']}\nContext: {hint or 'N/A'}\nOptions: {options}{ANSWER_INSTRUCTION}"
    return f"{IMAGE_TOKEN}\n{text}" if has_image else text


def convert_scienceqa(
    problems_json: str, pid_splits_json: str, image_root: str, split: str, out_path: str | Path
) -> Path:
    """Write ``split``'s problems as evaluation items to ``out_path`` (a local JSON array); return it.

    Image paths are written relative to ``image_root`` (``{split}/{pid}/image.png``), so evaluate
    with ``evaluate.image_root`` set to the same folder.
    """
    problems = json.loads(Path(local_copy(problems_json)).read_text())
    splits = json.loads(Path(local_copy(pid_splits_json)).read_text())
    if split not in splits:
        raise ValueError(f"split {split!r} is not in {pid_splits_json}; it has {sorted(splits)}")
    unknown = [pid for pid in splits[split] if pid not in problems]
    if unknown:
        raise ValueError(
            f"{len(unknown)} pid(s) of split {split!r} are not in {problems_json}, e.g. {unknown[:5]}; "
            "use the problems.json of the same release"
        )
    present = _image_files(image_root)
    items, skips = [], SkipCounter()
    for pid in splits[split]:
        problem = problems[pid]
        image = None
        if problem.get("image"):
            # The problem's own split names its image folder ("minitest" problems live under test/).
            image = f"{problem.get('split', split)}/{pid}/{problem['image']}"
            if image not in present:
                skips.add("image_missing", f"{pid}: no {image} under {image_root}")
                continue
        answer = problem["answer"]
        item: dict[str, Any] = {"id": str(pid)}
        if image:
            item["image"] = image
        item.update(
            conversations=[
                {"from": "human", "value": scienceqa_prompt(problem, image is not None)},
                {"from": "gpt", "value": LETTERS[answer]},
            ],
            answer=LETTERS[answer],
            choices=list(problem["choices"]),
            subject=problem.get("subject"),
            grade=problem.get("grade"),
        )
        items.append(item)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(items, indent=1) + "\n")
    report = {
        "split": split,
        "input": len(splits[split]),
        "written": len(items),
        **skips.to_dict(),
    }
    out.with_name(f"{out.stem}.report.json").write_text(json.dumps(report, indent=1) + "\n")
    if skips.total:
        example = skips.examples["image_missing"][0]
        logger.warning(f"[scienceqa] skipped {skips.total} problem(s) whose image is missing, e.g. {example}")
    return out


def _image_files(image_root: str) -> set[str]:
    """Every file under ``image_root``, relative to it (one listing, not one request per problem)."""
    fs, root = filesystem(image_root)
    root = root.rstrip("/")
    return {path[len(root) + 1 :] for path in fs.find(root)} if fs.exists(root) else set()


def extract_choice(prediction: str, num_choices: int) -> str | None:
    """The option letter the answer picks, or None when it is unparsable (see the module docstring)."""
    options = LETTERS[:num_choices]
    text = prediction.strip()
    if len(text) == 1 and text in LETTERS:
        letter: str | None = text
    elif len(text) >= 3 and text[0] in LETTERS and text[1:3] == ". ":
        letter = text[0]
    else:
        found = _THE_ANSWER_IS.findall(text)
        letter = found[0] if len(found) == 1 else None
    return letter if letter is not None and letter in options else None


def score(
    items: Sequence[EvalItem], outcomes: Mapping[str, Outcome]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """results.jsonl rows and the summary's ``metrics`` and ``by_subject`` (see the module docstring)."""
    rows = []
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # name -> [correct, count]
    unparsable = 0
    for item in items:
        outcome = outcomes[item.id]
        subject = str(item.fields.get("subject") or "unknown")
        row = {**base_row(item, outcome), "answer": item.fields.get("answer"), "subject": subject}
        row["has_image"] = item.image is not None
        if outcome.error is None:
            choice = extract_choice(outcome.prediction or "", len(item.fields.get("choices") or LETTERS))
            correct = choice is not None and choice == item.fields.get("answer")
            unparsable += choice is None
            row.update(parsed=choice, correct=correct)
            for name in ("overall", "image" if item.image else "no_image", f"subject/{subject}"):
                groups[name][0] += correct
                groups[name][1] += 1
        rows.append(row)
    answered = groups["overall"][1]
    metrics: dict[str, Any] = {
        "accuracy": accuracy(*groups["overall"]),
        "accuracy/image": accuracy(*groups["image"]),
        "accuracy/no_image": accuracy(*groups["no_image"]),
        "unparsable": unparsable,
        "unparsable_rate": accuracy(unparsable, answered),
    }
    by_subject = {}
    for name in sorted(name for name in groups if name.startswith("subject/")):
        correct, count = groups[name]
        metrics[f"accuracy/{name}"] = accuracy(correct, count)
        by_subject[name.removeprefix("subject/")] = {
            "count": count,
            "correct": correct,
            "accuracy": accuracy(correct, count),
        }
    return rows, {"metrics": metrics, "by_subject": by_subject}
