"""The symbolic context, the prompt files and the messages built from them (no Ray, no server)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_ray.generation.context import (
    AnnotationError,
    ImageAnnotations,
    ObjectBox,
    box_line,
    build_context,
    load_coco,
)
from llava_ray.generation.parse import find_leak, parse_reply
from llava_ray.generation.prompting import USES_BOXES, PromptError, build_messages, load_prompts

TYPES = ("conversation", "detail", "complex")


def coco_images(coco_dir: Path) -> list[ImageAnnotations]:
    return load_coco(str(coco_dir / "coco" / "instances.json"), str(coco_dir / "coco" / "captions.json"))


def test_context_of_a_known_image_exactly(coco_dir):
    # Image 1 of the seed-1 synthetic set: 96 x 96 px, two squares, the first with COCO bbox
    # [7, 51, 36, 36]: 7/96 = 0.0729, 51/96 = 0.53125, 43/96 = 0.4479, 87/96 = 0.90625 (ties to even).
    image = coco_images(coco_dir)[0]
    assert (image.image_id, image.file_name, image.width, image.height) == (1, "train_000000.png", 96, 96)
    assert build_context(image, with_boxes=True) == (
        "Two purple squares.\n"
        "A picture of two purple squares.\n"
        "An image with two purple squares.\n"
        "Two purple squares on a grey background.\n"
        "There are two purple squares.\n"
        "square: [0.073, 0.531, 0.448, 0.906]\n"
        "square: [0.542, 0.052, 0.969, 0.479]"
    )
    assert build_context(image, with_boxes=False) == "\n".join(build_context(image, True).split("\n")[:5])


def test_boxes_are_corners_normalised_clamped_and_in_annotation_order():
    image = ImageAnnotations(
        image_id=7,
        file_name="x.jpg",
        width=200,
        height=100,
        captions=("A dog and a ball.",),
        objects=(
            ObjectBox("dog", (50.0, 25.0, 100.0, 50.0)),
            ObjectBox("sports ball", (190.0, -5.0, 30.0, 20.0)),  # overhangs the right and top edges
        ),
    )
    assert build_context(image, with_boxes=True) == (
        "A dog and a ball.\ndog: [0.250, 0.250, 0.750, 0.750]\nsports ball: [0.950, 0.000, 1.000, 0.150]"
    )
    assert box_line(ObjectBox("cat", (0, 0, 200, 100)), 200, 100) == "cat: [0.000, 0.000, 1.000, 1.000]"


def test_captions_stay_one_line_each_and_images_without_captions_are_kept(tmp_path):
    instances = {
        "images": [
            {"id": 3, "file_name": "a.jpg", "width": 10, "height": 10},
            {"id": 4, "file_name": "b.jpg", "width": 10, "height": 10},
        ],
        "annotations": [],
        "categories": [],
    }
    captions = {
        "annotations": [
            {"id": 1, "image_id": 3, "caption": "  A cat\non a mat.  \n"},
            {"id": 2, "image_id": 3, "caption": " "},
        ]
    }
    (tmp_path / "i.json").write_text(json.dumps(instances))
    (tmp_path / "c.json").write_text(json.dumps(captions))
    first, second = load_coco(str(tmp_path / "i.json"), str(tmp_path / "c.json"))
    assert first.captions == ("A cat on a mat.",)
    assert second.captions == () and second.objects == ()


def test_unreadable_annotations_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(AnnotationError, match=r"missing\.json does not exist; point the config"):
        load_coco(str(tmp_path / "missing.json"), str(tmp_path / "missing.json"))
    (tmp_path / "c.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(AnnotationError, match=r"lacks \['images', 'categories'\]"):
        load_coco(str(tmp_path / "c.json"), str(tmp_path / "c.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(AnnotationError, match="is not valid JSON"):
        load_coco(str(tmp_path / "bad.json"), str(tmp_path / "c.json"))


def test_shipped_prompts_have_two_examples_in_the_context_format_whose_replies_pass_the_parser():
    prompts = load_prompts(TYPES)
    for kind, prompt in prompts.items():
        assert len(prompt.examples) == 2, kind
        for context, response in prompt.examples:
            lines = context.split("\n")
            boxes = [line for line in lines[5:]]
            assert len(lines[:5]) == 5 and all(line.endswith(".") for line in lines[:5]), kind
            assert bool(boxes) == USES_BOXES[kind], kind
            # The examples show the LLM what a usable reply looks like: each must be one.
            pairs = parse_reply(kind, response)
            assert find_leak(response) is None
            assert (len(pairs) == 1) if kind != "conversation" else (len(pairs) >= 3)
        for word in ("captions", "bounding boxes", "coordinates"):
            assert word in prompt.system, (kind, word)  # each system message forbids mentioning them
    assert "Describe the following image in detail." in prompts["detail"].instructions
    assert "Question:" in prompts["conversation"].system and "Answer:" in prompts["complex"].system


def test_messages_are_system_then_alternating_examples_then_the_query():
    prompt = load_prompts(["complex"])["complex"]
    messages = build_messages(prompt, "ctx")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert messages[0]["content"] == prompt.system
    assert messages[1]["content"] == prompt.examples[0][0] and messages[2]["content"] == prompt.examples[0][1]
    assert messages[-1] == {"role": "user", "content": "ctx"}


def test_prompt_files_are_checked(tmp_path):
    (tmp_path / "conversation.yaml").write_text("system: hi\nexamples: []\n")
    (tmp_path / "detail.yaml").write_text(
        "system: hi\nexamples:\n  - {context: a, response: b}\n"  # detail without instructions
    )
    with pytest.raises(PromptError) as error:
        load_prompts(["conversation", "detail", "complex"], tmp_path)
    message = str(error.value)
    assert "conversation.yaml: expected a mapping with 'system', 'examples'" in message
    assert "detail.yaml: expected" in message and "'instructions'" in message
    assert "complex.yaml does not exist; copy the shipped" in message
