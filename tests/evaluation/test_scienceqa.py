"""ScienceQA: conversion of the release layout, LLaVA-1.5's answer extraction, scoring, a whole run.

The fine-tuning protocol (QCM-LEA training data through prepare) and the LLM-judge ensemble are in
``test_scienceqa_protocols.py``.
"""

from __future__ import annotations

import json

import pytest
from PIL import Image

from llava_ray.config.evaluation import EvaluateConfig
from llava_ray.evaluation.items import Outcome, load_eval_items
from llava_ray.evaluation.job import run_evaluate
from llava_ray.evaluation.scienceqa import convert_scienceqa, extract_choice, scienceqa_prompt, score

SUFFIX = "\nAnswer with the option's letter from the given choices directly."
PROBLEMS = {
    "1": {
        "question": "Which color is the square?",
        "choices": ["red", "blue", "green"],
        "answer": 0,
        "hint": "",
        "image": "image.png",
        "subject": "natural science",
        "grade": "grade3",
        "split": "test",
    },
    "2": {
        "question": "Which word is a noun?",
        "choices": ["run", "table"],
        "answer": 1,
        "hint": "Nouns name things.",
        "image": None,
        "subject": "language science",
        "grade": "grade2",
        "split": "test",
    },
    "3": {
        "question": "Which state is highlighted?",
        "choices": ["Ohio", "Utah", "Iowa", "Maine"],
        "answer": 3,
        "hint": "  ",
        "image": "image.png",
        "subject": "social science",
        "grade": "grade4",
        "split": "test",
    },
    "4": {  # its image file is absent: skipped and counted
        "question": "What is shown?",
        "choices": ["a cat", "a dog"],
        "answer": 0,
        "hint": "",
        "image": "image.png",
        "subject": "natural science",
        "grade": "grade1",
        "split": "test",
    },
    "5": {  # another split
        "question": "Which is heavier?",
        "choices": ["a feather", "a brick"],
        "answer": 1,
        "hint": "",
        "image": None,
        "subject": "natural science",
        "grade": "grade1",
        "split": "train",
    },
}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """problems.json, pid_splits.json and images/{split}/{pid}/image.png (small and not square)."""
    root = tmp_path_factory.mktemp("scienceqa")
    (root / "problems.json").write_text(json.dumps(PROBLEMS))
    (root / "pid_splits.json").write_text(json.dumps({"test": ["1", "2", "3", "4"], "train": ["5"]}))
    for pid, color in (("1", (220, 30, 30)), ("3", (30, 70, 220))):
        folder = root / "images" / "test" / pid
        folder.mkdir(parents=True)
        Image.new("RGB", (40, 24), color).save(folder / "image.png")
    return root


@pytest.fixture(scope="module")
def converted(release):
    return convert_scienceqa(
        str(release / "problems.json"),
        str(release / "pid_splits.json"),
        str(release / "images"),
        "test",
        release / "out" / "scienceqa_test.json",
    )


def test_conversion_writes_the_reference_prompt(converted):
    """llava_test_CQM-A.json as model_vqa_science --single-pred-prompt sees it: context, question, options."""
    items = json.loads(converted.read_text())
    assert [item["id"] for item in items] == ["1", "2", "3"]
    first, second, third = items
    assert first["image"] == "test/1/image.png" and "image" not in second
    assert first["conversations"] == [
        {
            "from": "human",
            "value": "<image>\nContext: N/A\nQuestion: Which color is the square?\nOptions: (A) red (B) blue (C) green"
            + SUFFIX,
        },
        {"from": "gpt", "value": "The answer is A."},
    ]
    assert second["conversations"][0]["value"] == (
        "Context: Nouns name things.\nQuestion: Which word is a noun?\nOptions: (A) run (B) table" + SUFFIX
    )
    assert third["conversations"][0]["value"] == (
        "<image>\nContext: N/A\nQuestion: Which state is highlighted?\nOptions: (A) Ohio (B) Utah (C) Iowa (D) Maine"
        + SUFFIX
    )
    assert [item["answer"] for item in items] == ["A", "B", "D"]
    assert second["subject"] == "language science" and third["choices"] == ["Ohio", "Utah", "Iowa", "Maine"]


def test_double_spaces_collapse_in_one_pass_as_the_reference_does():
    problem = {
        "question": "Which  word is   a noun?",  # two spaces become one; three become two (one pass)
        "choices": ["run ", "table"],  # "(A) run  (B) table" collapses too
        "answer": 1,
        "hint": " Nouns  name things. ",
    }
    assert scienceqa_prompt(problem, has_image=False) == (
        "Context: Nouns name things.\nQuestion: Which word is  a noun?\nOptions: (A) run (B) table" + SUFFIX
    )
    assert scienceqa_prompt(problem, has_image=True).startswith("<image>\nContext: Nouns name things.\n")


def test_problems_without_their_image_are_skipped_and_counted(converted):
    report = json.loads(converted.with_name("scienceqa_test.report.json").read_text())
    assert report["input"] == 4 and report["written"] == 3
    assert report["skipped"] == {"image_missing": 1}
    assert report["examples"]["image_missing"][0].startswith("4: no test/4/image.png under")


def test_unknown_split_is_an_error(release, tmp_path):
    with pytest.raises(
        ValueError, match=r"split 'minival' is not in .*pid_splits.json; it has \['test', 'train'\]"
    ):
        convert_scienceqa(
            str(release / "problems.json"),
            str(release / "pid_splits.json"),
            str(release / "images"),
            "minival",
            tmp_path / "x.json",
        )


@pytest.mark.parametrize(
    ("prediction", "num_choices", "expected"),
    [
        ("A", 3, "A"),
        (" C\n", 3, "C"),  # surrounding whitespace is not part of the answer
        ("B. table", 2, "B"),
        ("The answer is D.", 4, "D"),
        ("I think so. The answer is B. It names a thing.", 2, "B"),
        # The reference's dot is unescaped: any character after the letter counts.
        ("The answer is B because a table is a thing.", 2, "B"),
        ("The answer is B, table.", 2, "B"),
        ("The answer is B\n", 2, None),  # stripped first: nothing follows the letter
        ("The answer is A. The answer is B.", 2, None),  # twice: wrong
        ("The answer is A. The answer is A.", 2, None),  # twice, even when they agree
        ("The answer is B", 2, None),  # no full stop
        ("A.", 3, None),  # neither a bare letter nor "X. "
        ("a", 3, None),
        ("(A) red", 3, None),
        ("red", 3, None),
        ("", 3, None),
        ("D", 3, None),  # past the last option
        ("E. maybe", 4, None),
    ],
)
def test_answer_extraction_follows_the_reference(prediction, num_choices, expected):
    assert extract_choice(prediction, num_choices) == expected


def test_scoring_by_hand(converted, release):
    items = load_eval_items(str(converted), str(release / "images"))
    assert items[0].image == str(release / "images" / "test" / "1" / "image.png") and items[1].image is None
    outcomes = {
        "1": Outcome("The answer is A, red."),  # correct, image, natural science
        "2": Outcome("The answer is A."),  # wrong (B), no image, language science
        "3": Outcome("Maine"),  # unparsable: wrong, image, social science
    }
    rows, summary = score(items, outcomes)
    metrics = summary["metrics"]
    assert metrics["accuracy"] == 1 / 3
    assert metrics["accuracy/image"] == 1 / 2 and metrics["accuracy/no_image"] == 0.0
    assert metrics["unparsable"] == 1 and metrics["unparsable_rate"] == 1 / 3 and metrics["failed"] == 0
    assert metrics["accuracy/subject/natural science"] == 1.0
    assert metrics["accuracy/subject/social science"] == 0.0
    assert summary["by_subject"]["language science"] == {"count": 1, "correct": 0, "accuracy": 0.0}
    assert [(row["parsed"], row["correct"], row["has_image"]) for row in rows] == [
        ("A", True, True),
        ("A", False, False),
        (None, False, True),
    ]


def test_a_failed_prediction_counts_as_wrong(converted, release):
    """The reference scores a problem without a prediction as FAILED: wrong, in the denominator."""
    items = load_eval_items(str(converted), str(release / "images"))
    outcomes = {
        "1": Outcome("A"),
        "2": Outcome("B"),
        "3": Outcome(None, error="prompt_too_long", detail="2100 tokens > 2048"),
    }
    rows, summary = score(items, outcomes)
    metrics = summary["metrics"]
    assert metrics["accuracy"] == 2 / 3 and metrics["accuracy/image"] == 1 / 2
    assert metrics["failed"] == 1 and metrics["unparsable"] == 0
    assert summary["by_subject"]["social science"] == {"count": 1, "correct": 0, "accuracy": 0.0}
    assert rows[2]["error"] == "prompt_too_long" and rows[2]["correct"] is False and rows[2]["parsed"] is None


def test_the_docstring_no_longer_claims_a_random_fallback():
    from llava_ray.evaluation import scienceqa

    assert "random option)" not in scienceqa.__doc__
    assert "never runs" in scienceqa.__doc__


def test_scienceqa_end_to_end(trained_model_dir, converted, release, tmp_path):
    config = EvaluateConfig(
        model=str(trained_model_dir),
        benchmark="scienceqa",
        data_path=str(converted),
        image_root=str(release / "images"),
        output_dir=str(tmp_path / "out"),
        max_new_tokens=8,
        num_actors=0,
    )
    summary = run_evaluate(config)
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows] == ["1", "2", "3"]
    assert summary["counts"] == {"items": 3, "answered": 3, "skipped": {}, "examples": {}}
    parsed = [row for row in rows if row["parsed"] is not None]
    assert summary["metrics"]["unparsable"] == 3 - len(parsed)
    assert summary["metrics"]["accuracy"] == sum(row["correct"] for row in rows) / 3
    assert set(summary["by_subject"]) == {"natural science", "language science", "social science"}
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["benchmark"] == "scienceqa"
