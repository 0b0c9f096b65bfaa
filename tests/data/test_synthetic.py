"""The synthetic dataset: LLaVA/COCO formats, determinism, and answers checked against the pixels.

The pixel checks read the PNGs with numpy and know nothing of how the generator draws: objects are
the connected non-grey components, a shape is told by how much of its bounding box it fills.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from llava_ray.config.schema import ModelConfig
from llava_ray.conversation.tokenizer import load_tokenizer
from llava_ray.data.synthetic import (
    COLORS,
    QUESTION_TYPES,
    SHAPES,
    SHORT_ANSWER_SUFFIX,
    Label,
    _question_conversation,
    corpus_texts,
    generate,
    normalize_answer,
)

SAMPLES = 200
COLOR_NAMES = {rgb: name for name, rgb in COLORS.items()}
COUNT_WORDS = ("one", "two", "three", "four")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    generate(out, samples=SAMPLES, seed=0)
    return out


def load(root: Path, name: str) -> Any:
    return json.loads((root / name).read_text())


def components(pixels: np.ndarray) -> list[np.ndarray]:
    """8-connected components of the non-grey pixels, each an (n, 2) array of (row, column)."""
    foreground = ~((pixels[..., 0] == pixels[..., 1]) & (pixels[..., 1] == pixels[..., 2]))
    seen = np.zeros(foreground.shape, dtype=bool)
    height, width = foreground.shape
    found = []
    for start in zip(*np.nonzero(foreground), strict=True):
        if seen[start]:
            continue
        seen[start] = True
        stack, members = [start], []
        while stack:
            row, col = stack.pop()
            members.append((row, col))
            for next_row in range(max(row - 1, 0), min(row + 2, height)):
                for next_col in range(max(col - 1, 0), min(col + 2, width)):
                    if foreground[next_row, next_col] and not seen[next_row, next_col]:
                        seen[next_row, next_col] = True
                        stack.append((next_row, next_col))
        found.append(np.array(members))
    return found


def shape_of(members: np.ndarray) -> str:
    rows, cols = members[:, 0], members[:, 1]
    height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
    fill = len(members) / (height * width)
    if fill > 0.93:
        return "square"
    if fill > 0.7:
        return "circle"
    row_widths = np.bincount(rows - rows.min())
    widest = np.flatnonzero(row_widths == row_widths.max()).mean() / (height - 1)
    # A triangle standing on its base is widest at the bottom, a diamond in the middle.
    return "triangle" if widest > 0.75 else "diamond"


def read_image(path: Path) -> dict[str, Any]:
    """What the pixels show: count, colour, shape, quadrant (one object) and the objects' boxes."""
    pixels = np.asarray(Image.open(path).convert("RGB"))
    height, width, _ = pixels.shape
    found = components(pixels)
    assert found, f"{path.name}: no objects"
    is_object = np.zeros((height, width), dtype=bool)
    for members in found:
        is_object[members[:, 0], members[:, 1]] = True
    assert len(np.unique(pixels[~is_object], axis=0)) == 1, f"{path.name}: background is not one colour"
    colors, shapes = set(), set()
    for members in found:
        # Solid fills without antialiasing: every pixel of an object has exactly its colour.
        assert len(np.unique(pixels[members[:, 0], members[:, 1]], axis=0)) == 1, (
            f"{path.name}: mixed colours"
        )
        row, col = np.round(members.mean(axis=0)).astype(int)
        colors.add(COLOR_NAMES.get(tuple(int(v) for v in pixels[row, col])))
        shapes.add(shape_of(members))
    assert len(colors) == 1 and len(shapes) == 1, f"{path.name}: colours {colors}, shapes {shapes}"
    position = None
    if len(found) == 1:
        row, col = found[0].mean(axis=0)
        position = f"{'top' if row < height / 2 else 'bottom'} {'left' if col < width / 2 else 'right'}"
    boxes = sorted(
        [int(m[:, 1].min()), int(m[:, 0].min()), int(m[:, 1].max()) + 1, int(m[:, 0].max()) + 1]
        for m in found
    )
    return {
        "count": str(len(found)),
        "color": colors.pop(),
        "shape": shapes.pop(),
        "position": position,
        "boxes": boxes,
        "size": (width, height),
    }


def question_type(question: str) -> str:
    """The type of a generated question, from its wording alone."""
    question = question.lower()
    for keyword, kind in (
        ("color", "color"),
        ("how many", "count"),
        ("number", "count"),
        ("where", "position"),
        ("position", "position"),
        ("shape", "shape"),
    ):
        if keyword in question:
            return kind
    raise AssertionError(f"unrecognised question {question!r}")


def samples_of(root: Path) -> dict[str, list[dict[str, Any]]]:
    return {name: load(root, f"{name}.json") for name in ("stage1", "stage2", "eval")}


def words(text: str) -> set[str]:
    return set(re.findall(r"\w+|[^\w\s]", text.replace("<image>", "")))


def style(question: str) -> str:
    """How a question is asked: with the short-answer suffix, plainly, or conversationally."""
    question = question.replace("<image>\n", "").replace("\n<image>", "")
    if question.endswith(SHORT_ANSWER_SUFFIX):
        return "short_answer"
    return "conversational" if question.startswith(("And ", "What about ")) else "plain"


def test_layout_and_manifest(dataset: Path) -> None:
    manifest = load(dataset, "manifest.json")
    assert manifest["samples"] == SAMPLES and manifest["eval_samples"] == SAMPLES // 5
    for path in manifest["files"].values():
        assert (dataset / path).exists(), path
    splits = {"train": SAMPLES, "eval": SAMPLES // 5}
    images = {path.name for path in (dataset / "images").iterdir()}
    assert images == {f"{split}_{i:06d}.png" for split, size in splits.items() for i in range(size)}
    assert set(manifest["objects"]) == {
        f"{split}-{i:06d}" for split, size in splits.items() for i in range(size)
    }
    assert set(manifest["question_types"]) == set(QUESTION_TYPES)
    for kind, spec in manifest["question_types"].items():
        assert spec["chance"] == pytest.approx(1 / len(spec["choices"])) and spec["chance"] <= 0.25, kind
    assert len(load(dataset, "stage1.json")) == SAMPLES


def test_generate_returns_what_it_writes_and_defaults_eval_size(tmp_path: Path) -> None:
    manifest = generate(tmp_path, samples=10, seed=3)
    assert manifest == load(tmp_path, "manifest.json")
    assert manifest["eval_samples"] == 20
    assert len(list((tmp_path / "images").glob("eval_*.png"))) == 20


@pytest.mark.parametrize(("samples", "eval_samples", "bad"), [(0, None, "samples"), (5, 0, "eval_samples")])
def test_rejects_empty_splits(tmp_path: Path, samples: int, eval_samples: int | None, bad: str) -> None:
    with pytest.raises(ValueError, match=rf"^{bad} must be at least 1, got 0; ask for one or more images"):
        generate(tmp_path, samples=samples, eval_samples=eval_samples)


def test_samples_follow_llava_format(dataset: Path) -> None:
    for name, samples in samples_of(dataset).items():
        ids = [sample["id"] for sample in samples]
        assert len(ids) == len(set(ids)), f"{name}: duplicate ids"
        for sample in samples:
            turns = sample["conversations"]
            assert turns and len(turns) % 2 == 0, sample["id"]
            assert [turn["from"] for turn in turns] == ["human", "gpt"] * (len(turns) // 2), sample["id"]
            assert all(isinstance(turn["value"], str) and turn["value"].strip() for turn in turns), sample[
                "id"
            ]
            placeholders = [turn["value"].count("<image>") for turn in turns]
            if "image" in sample:
                assert placeholders[0] == 1 and sum(placeholders) == 1, sample["id"]
                first = turns[0]["value"]
                assert first.startswith("<image>\n") or first.endswith("\n<image>"), sample["id"]
                assert not Path(sample["image"]).is_absolute() and (dataset / sample["image"]).is_file()
            else:
                assert sum(placeholders) == 0, sample["id"]
    stage1, stage2 = load(dataset, "stage1.json"), load(dataset, "stage2.json")
    assert all(len(sample["conversations"]) == 2 for sample in stage1)
    image_samples = [sample for sample in stage2 if "image" in sample]
    text_only = [sample for sample in stage2 if "image" not in sample]
    assert len(image_samples) == SAMPLES
    assert 0.08 <= len(text_only) / len(image_samples) <= 0.12
    assert all(sample["id"].startswith("text-") for sample in text_only)
    # Every question that applies: colour, shape and count, and position for a single object.
    objects = load(dataset, "manifest.json")["objects"]
    for sample in image_samples:
        expected = 4 if objects[sample["id"]]["count"] == 1 else 3
        assert len(sample["conversations"]) // 2 == expected, sample["id"]
    first_types = Counter(question_type(sample["conversations"][0]["value"]) for sample in image_samples)
    assert set(first_types) == set(QUESTION_TYPES)  # asked in random order
    at_end = sum(sample["conversations"][0]["value"].endswith("\n<image>") for sample in image_samples)
    assert 0.05 <= at_end / len(image_samples) <= 0.15
    later_styles: Counter[str] = Counter()
    for sample in stage2:
        questions = [turn["value"] for turn in sample["conversations"][::2]]
        assert style(questions[0]) == "short_answer", sample["id"]
        if "image" in sample:  # distinct question types per conversation
            kinds = [question_type(question) for question in questions]
            assert len(kinds) == len(set(kinds)), sample["id"]
            later_styles.update(style(question) for question in questions[1:])
        else:  # arithmetic keeps the suffix on every turn
            assert all(style(question) == "short_answer" for question in questions), sample["id"]
    # Later turns in every style, none rare: about a third each.
    shares = {name: count / later_styles.total() for name, count in later_styles.items()}
    assert set(shares) == {"short_answer", "plain", "conversational"} and min(shares.values()) >= 0.2, shares


def test_eval_first_turn_items_use_one_canonical_phrasing_per_type(dataset: Path) -> None:
    items = [item for item in load(dataset, "eval.json") if len(item["conversations"]) == 2]
    manifest = load(dataset, "manifest.json")
    phrasings: dict[str, set[str]] = {}
    for item in items:
        assert item["answer"] == item["conversations"][1]["value"]
        assert (
            item["answer"] in item["choices"] == manifest["question_types"][item["question_type"]]["choices"]
        )
        assert item["id"] == f"{Path(item['image']).stem.replace('_', '-')}-{item['question_type']}"
        assert question_type(item["conversations"][0]["value"]) == item["question_type"]
        phrasings.setdefault(item["question_type"], set()).add(item["conversations"][0]["value"])
    # Colour questions agree in number with the count ("is the shape" / "are the shapes").
    assert {kind: len(texts) for kind, texts in phrasings.items()} == {
        "color": 2,
        "shape": 1,
        "count": 1,
        "position": 1,
    }
    # Every applicable question type of every held-out image, asked first.
    objects = manifest["objects"]
    asked = Counter(item["image"] for item in items)
    assert asked == {
        f"images/eval_{i:06d}.png": 4 if objects[f"eval-{i:06d}"]["count"] == 1 else 3
        for i in range(SAMPLES // 5)
    }


def test_eval_follow_up_items_come_after_answered_turns(dataset: Path) -> None:
    """One per image: earlier questions with their correct answers, then a naturally asked new question."""
    items = load(dataset, "eval.json")
    objects = load(dataset, "manifest.json")["objects"]
    follow_ups = [item for item in items if len(item["conversations"]) > 2]
    assert [item["image"] for item in follow_ups] == [f"images/eval_{i:06d}.png" for i in range(SAMPLES // 5)]
    earlier_counts, scored_styles, scored_types = Counter(), Counter(), Counter()
    for item in follow_ups:
        turns = item["conversations"]
        truth = objects[Path(item["image"]).stem.replace("_", "-")]
        assert item["id"] == f"{Path(item['image']).stem.replace('_', '-')}-follow-up-{item['question_type']}"
        assert turns[-1]["value"] == item["answer"] == str(truth[item["question_type"]]), item["id"]
        questions, answers = turns[::2], turns[1::2]
        kinds = [question_type(question["value"]) for question in questions]
        assert kinds[-1] == item["question_type"] and len(set(kinds)) == len(kinds), item["id"]
        # The earlier turns hold the correct answers, as the model would have given them.
        assert [answer["value"] for answer in answers] == [str(truth[kind]) for kind in kinds], item["id"]
        assert style(questions[0]["value"]) == "short_answer", item["id"]
        assert all(style(question["value"]) != "short_answer" for question in questions[1:]), item["id"]
        earlier_counts[len(questions) - 1] += 1
        scored_styles[style(questions[-1]["value"])] += 1
        scored_types[item["question_type"]] += 1
    assert set(earlier_counts) >= {1, 2} and set(scored_styles) == {"plain", "conversational"}
    assert set(scored_types) == set(QUESTION_TYPES)
    # Follow-ups are scored separately: the id tells them from first turns, and none repeats.
    assert len({item["id"] for item in items}) == len(items)


def test_follow_up_turns_do_not_change_first_turns_or_the_tokenizer_corpus() -> None:
    """Later turns are restyled from their own stream: the rest of the data and the corpus stay as they were."""
    label = Label("circle", "red", 1, "top left")
    plain = _question_conversation(random.Random(5), label, placeholder_at_end=False)
    restyled = _question_conversation(random.Random(5), label, False, follow_up_rng=random.Random(1))
    assert plain[0] == restyled[0] and plain[1::2] == restyled[1::2]  # first question, all answers
    assert [question_type(t["value"]) for t in plain[::2]] == [
        question_type(t["value"]) for t in restyled[::2]
    ]
    assert all(style(turn["value"]) == "short_answer" for turn in plain[::2])
    assert any(style(turn["value"]) != "short_answer" for turn in restyled[2::2])
    assert not any(style(text) == "conversational" for text in corpus_texts())


def test_images_are_square_and_vary_in_size(dataset: Path) -> None:
    sizes = {Image.open(path).size for path in (dataset / "images").glob("*.png")}
    assert all(width == height for width, height in sizes)
    assert len(sizes) >= 4


def test_coco_files_are_valid(dataset: Path) -> None:
    instances, captions = load(dataset, "coco/instances.json"), load(dataset, "coco/captions.json")
    for coco in (instances, captions):
        assert {"info", "images", "annotations"} <= set(coco)
        assert len(coco["images"]) == SAMPLES
        assert coco["images"] == instances["images"]
    images = {image["id"]: image for image in instances["images"]}
    assert len(images) == SAMPLES
    for image in images.values():
        assert isinstance(image["id"], int)
        assert Image.open(dataset / "images" / image["file_name"]).size == (image["width"], image["height"])
    categories = {category["id"]: category["name"] for category in instances["categories"]}
    assert sorted(categories.values()) == sorted(SHAPES)
    annotation_ids = [annotation["id"] for annotation in instances["annotations"]]
    assert len(annotation_ids) == len(set(annotation_ids))
    objects = load(dataset, "manifest.json")["objects"]
    per_image: Counter[int] = Counter()
    for annotation in instances["annotations"]:
        image = images[annotation["image_id"]]
        x, y, w, h = annotation["bbox"]
        assert all(isinstance(v, float) for v in annotation["bbox"])
        assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= image["width"] and y + h <= image["height"]
        assert 0 < annotation["area"] <= w * h and annotation["iscrowd"] == 0
        truth = objects[f"train-{Path(image['file_name']).stem.split('_')[1]}"]
        assert categories[annotation["category_id"]] == truth["shape"]
        per_image[annotation["image_id"]] += 1
    assert all(per_image[i] == int(objects[f"train-{i - 1:06d}"]["count"]) for i in images)
    texts: dict[int, list[str]] = {}
    for annotation in captions["annotations"]:
        texts.setdefault(annotation["image_id"], []).append(annotation["caption"])
    assert set(texts) == set(images)
    assert all(len(set(caption_list)) == len(caption_list) == 5 for caption_list in texts.values())


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path: Path) -> None:
    runs = {name: tmp_path / name for name in ("a", "b", "other")}
    for name, out in runs.items():
        generate(out, samples=30, eval_samples=10, seed=7 if name != "other" else 8)

    def contents(root: Path) -> dict[str, bytes]:
        return {
            str(path.relative_to(root)): path.read_bytes()
            for path in sorted(root.rglob("*"))
            if path.is_file()
        }

    first, second, other = (contents(root) for root in runs.values())
    assert len(first) == 30 + 10 + 6 and first == second
    assert set(other) == set(first)
    differing = [name for name in first if first[name] != other[name]]
    assert "stage2.json" in differing and "eval.json" in differing
    assert sum(name.endswith(".png") for name in differing) >= 35


def test_eval_answers_match_pixels(dataset: Path) -> None:
    seen = {}
    for item in load(dataset, "eval.json"):
        if item["image"] not in seen:
            seen[item["image"]] = read_image(dataset / item["image"])
        assert seen[item["image"]][item["question_type"]] == item["answer"], item["id"]
        turns = item["conversations"]
        for question, answer in zip(turns[::2], turns[1::2], strict=True):
            assert seen[item["image"]][question_type(question["value"])] == answer["value"], item["id"]
    # Position is asked exactly when one object is shown.
    asked = {item["image"] for item in load(dataset, "eval.json") if item["question_type"] == "position"}
    assert asked == {image for image, truth in seen.items() if truth["count"] == "1"}


def test_stage2_and_caption_answers_match_pixels(dataset: Path) -> None:
    stage1 = {sample["id"]: sample for sample in load(dataset, "stage1.json")}
    image_samples = [sample for sample in load(dataset, "stage2.json") if "image" in sample]
    for sample in image_samples[:60]:
        truth = read_image(dataset / sample["image"])
        turns = sample["conversations"]
        for question, answer in zip(turns[::2], turns[1::2], strict=True):
            assert truth[question_type(question["value"])] == answer["value"], sample["id"]
        caption = stage1[sample["id"]]["conversations"][1]["value"].lower()
        assert COUNT_WORDS[int(truth["count"]) - 1] in caption.split(), sample["id"]
        assert truth["color"] in caption and truth["shape"] in caption, sample["id"]
        if truth["position"]:
            assert caption.endswith(f"in the {truth['position']}."), sample["id"]


def test_manifest_ground_truth_matches_pixels(dataset: Path) -> None:
    objects = load(dataset, "manifest.json")["objects"]
    for image_id in [
        *(f"train-{i:06d}" for i in range(0, SAMPLES, 5)),
        *(f"eval-{i:06d}" for i in range(40)),
    ]:
        split, index = image_id.split("-")
        truth = read_image(dataset / "images" / f"{split}_{index}.png")
        recorded = objects[image_id]
        assert (str(recorded["count"]), recorded["color"], recorded["shape"], recorded["position"]) == (
            truth["count"],
            truth["color"],
            truth["shape"],
            truth["position"],
        ), image_id
        assert sorted(recorded["boxes"]) == truth["boxes"], image_id
        width, height = truth["size"]
        shorter = min(width, height)
        quadrants = set()
        for x0, y0, x1, y1 in recorded["boxes"]:
            assert x1 - x0 == y1 - y0 and 0.35 * shorter <= x1 - x0 <= 0.45 * shorter, image_id
            # Each object lies wholly inside its own quadrant.
            left, top = x1 <= width // 2, y1 <= height // 2
            assert left or x0 >= width // 2, image_id
            assert top or y0 >= height // 2, image_id
            quadrants.add((left, top))
        assert len(quadrants) == len(recorded["boxes"]), image_id


def test_answers_are_balanced(dataset: Path) -> None:
    """No answer dominates, so the chance level the manifest reports is what guessing scores."""
    manifest = load(dataset, "manifest.json")
    objects = [truth for key, truth in manifest["objects"].items() if key.startswith("train-")]
    for kind, spec in manifest["question_types"].items():
        answers = Counter(str(truth[kind]) for truth in objects if truth[kind] is not None)
        assert set(answers) == set(spec["choices"]), kind
        assert max(answers.values()) / sum(answers.values()) <= 2 * spec["chance"], (kind, answers)


def test_arithmetic_answers_are_correct(dataset: Path) -> None:
    text_only = [sample for sample in load(dataset, "stage2.json") if "image" not in sample]
    pattern = re.compile(rf"What is (\d) (plus|minus) (\d)\?{re.escape(SHORT_ANSWER_SUFFIX)}")
    for sample in text_only:
        turns = sample["conversations"]
        for question, answer in zip(turns[::2], turns[1::2], strict=True):
            match = pattern.fullmatch(question["value"])
            assert match, question["value"]
            a, op, b = int(match[1]), match[2], int(match[3])
            expected = a + b if op == "plus" else a - b
            assert expected >= 0 and answer["value"] == str(expected), sample["id"]


def test_corpus_covers_every_generated_word_but_the_follow_up_phrasings(dataset: Path) -> None:
    corpus = set().union(*(words(text) for text in corpus_texts()))
    assert "<image>" not in " ".join(corpus_texts())
    generated, follow_up_texts = set(), set()
    for samples in samples_of(dataset).values():
        for sample in samples:
            for index, turn in enumerate(sample["conversations"]):
                generated |= words(turn["value"])
                if index and turn["from"] == "human":
                    follow_up_texts.add(turn["value"])
    for caption in load(dataset, "coco/captions.json")["annotations"]:
        generated |= words(caption["caption"])
    # Only conversational follow-ups bring new words (the corpus is frozen with the shipped tokenizer).
    new_words = generated - corpus
    conversational = [text for text in follow_up_texts if style(text) == "conversational"]
    assert new_words and new_words <= set().union(*(words(text) for text in conversational))
    tokenizer = load_tokenizer(ModelConfig(preset="tiny"))
    for text in sorted(follow_up_texts):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == text
    assert corpus_texts(seed=1) == corpus_texts(seed=1) and corpus_texts(seed=1) != corpus_texts(seed=2)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("red", "red"), ("  Red. ", "red"), ("Top  Left!", "top left"), ("4\n", "4"), ("circle .", "circle")],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected
