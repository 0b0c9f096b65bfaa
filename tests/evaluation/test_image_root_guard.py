"""Evaluation keeps to its image root as prepare does: an item's image outside it is a counted skip, never read."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from llava_ray.evaluation import judge
from llava_ray.evaluation.batch_generate import GenerationSettings, predict
from llava_ray.evaluation.items import Outcome, load_eval_items, skip_report

OUTSIDE = "image_path_outside_root"


def item(item_id: str, image: str | None) -> dict:
    question = "<image>\nWhat color?" if image else "What color?"
    record = {"id": item_id, "conversations": [{"from": "human", "value": question}], "answer": "red"}
    return {**record, "image": image} if image else record


def test_images_outside_the_root_are_refused_and_never_opened(tmp_path: Path) -> None:
    root = tmp_path / "eval"
    (root / "images").mkdir(parents=True)
    for image in (root / "images" / "inside.png", tmp_path / "secret.png"):
        Image.new("RGB", (8, 8), "red").save(image)
    records = [
        item("inside", "images/inside.png"),
        item("dotdot", "../secret.png"),
        item("nested-dotdot", "images/../../secret.png"),
        item("absolute", str(tmp_path / "secret.png")),
        item("url", "s3://other-bucket/secret.png"),
        item("text", None),
    ]
    (root / "eval.json").write_text(json.dumps(records))
    items = {entry.id: entry for entry in load_eval_items(str(root / "eval.json"))}

    assert items["inside"].image == str(root / "images" / "inside.png") and items["inside"].refused is None
    assert items["text"].image is None and items["text"].refused is None
    refused = {key: entry.refused for key, entry in items.items() if entry.refused is not None}
    assert set(refused) == {"dotdot", "nested-dotdot", "absolute", "url"}
    assert all(isinstance(outcome, Outcome) and outcome.error == OUTSIDE for outcome in refused.values())
    assert "leaves the image root" in refused["dotdot"].detail

    # Refused items get their outcome without a model: this one does not exist and is never loaded.
    bad = [items[key] for key in refused]
    outcomes = predict(bad, GenerationSettings(model=str(tmp_path / "no-model")))
    assert outcomes == refused
    report = skip_report(bad, outcomes)
    assert (report["items"], report["answered"], report["skipped"]) == (4, 0, {OUTSIDE: 4})


def test_llava_bench_questions_get_the_same_guard(tmp_path: Path) -> None:
    questions = [
        {"question_id": 1, "image": "001.jpg", "text": "What is this?", "category": "conv"},
        {"question_id": 2, "image": "../secret.jpg", "text": "And this?", "category": "conv"},
    ]
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    contexts = [{"image": q["image"], "caption": "A red square."} for q in questions]
    (tmp_path / "context.jsonl").write_text("".join(json.dumps(c) + "\n" for c in contexts))
    items = judge.load_items(
        str(tmp_path / "questions.jsonl"), str(tmp_path / "context.jsonl"), str(tmp_path / "images")
    )
    assert (items[0].image, items[0].refused) == (str(tmp_path / "images" / "001.jpg"), None)
    assert items[1].refused is not None and items[1].refused.error == OUTSIDE
