"""A deterministic synthetic vision-language dataset: flat coloured shapes on a grey background.

The demo and every test train and evaluate on this data instead of downloading COCO. Each image
holds one to four objects of one shape and one colour, each object in its own quadrant of the
canvas; questions ask for the colour, the shape, the count, or (for a single object) its quadrant,
in a few fixed phrasings with one-word answers. That is easy enough for the tiny preset (a random
frozen 2-layer ViT seeing 4x4 patches, a 4-layer width-128 Llama) to reach >= 0.9 held-out
exact-match accuracy, where guessing scores at most 0.25, so a working pipeline and a broken one
are told apart in minutes on a CPU.

Stage-2 conversations ask every question that applies, one per turn. The first turn carries
LLaVA-1.5's short-answer suffix; later turns are asked in a mix of styles (with the suffix, plainly,
or conversationally: "And how many shapes are there?"), since a model that has only seen the
suffixed form answers a plainly asked follow-up with the previous turn's answer. ``eval.json``
scores both: first-turn items, and one follow-up item per image whose earlier turns (questions and
correct answers) come first.

Run it with ``llava-ray synth --out data/synthetic --samples 200``; :func:`generate` writes::

    images/train_000000.png ...    training images (square, sides 96-128 px)
    images/eval_000000.png ...     held-out images
    stage1.json                    caption samples, LLaVA's JSON list format (pretraining)
    stage2.json                    every question that applies per image, plus ~10% text-only arithmetic
    eval.json                      per held-out image: one first-turn item per question type (canonical
                                   phrasing) and one follow-up item (earlier turns answered, then a
                                   natural question)
    coco/instances.json            COCO 2017 instances (boxes) for the training images
    coco/captions.json             COCO 2017 captions, five per training image
    manifest.json                  seed, sizes, file names, answer choices and ground truth

Everything is a function of the seed: rerunning writes byte-identical files.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from llava_ray.conversation.tokenizer import TINY_TOKENIZER_EXTRA_TEXTS

IMAGE_PLACEHOLDER = "<image>"
# LLaVA-1.5 appends this to its short-answer VQA data (VQAv2, GQA), so the same prompt works here.
SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."

# Saturated and far apart in RGB, and never grey, so an object pixel is never mistaken for background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 0),
    "purple": (140, 40, 180),
    "orange": (250, 130, 0),
}
SHAPES = ("circle", "square", "triangle", "diamond")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
QUESTION_TYPES = ("color", "shape", "count", "position")
MAX_COUNT = 4
COUNT_WORDS = ("one", "two", "three", "four")
CHOICES: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "count": tuple(str(count) for count in range(1, MAX_COUNT + 1)),
    "position": POSITIONS,
}

# Square canvases of several sizes: padding a non-square one (as LLaVA-1.5 does) adds bands of the
# pad colour and shrinks the objects, which cost the tiny model a good part of the demo's budget.
_IMAGE_SIDES = (96, 104, 112, 120, 128)
_BACKGROUND_LEVELS = (235, 240, 245, 250)
# Of the image's shorter side: large enough for the tiny tower's 16 px patches (at 64 px) to show
# the outline, small enough to fit its quadrant with room to move.
_OBJECT_SCALE = (0.36, 0.44)
# Empty pixels around each object inside its quadrant: objects never touch, so each is one component.
_MARGIN = 2
_TEXT_ONLY_FRACTION = 0.1
_PLACEHOLDER_AT_END_FRACTION = 0.1

# The first phrasing of each type is the canonical one, the only one eval.json uses.
_QUESTIONS: dict[str, tuple[str, ...]] = {
    "color": ("What color are the shapes?", "What is the color of the shapes?"),
    "shape": ("What shape is shown?", "Which shape is in the image?"),
    "count": ("How many shapes are there?", "How many shapes are in the image?"),
    "position": ("Where is the shape?", "Where in the image is the shape?"),
}
_SINGULAR_QUESTIONS: dict[str, tuple[str, ...]] = {
    "color": ("What color is the shape?", "What is the color of the shape?"),
}
# Later turns only: a follow-up as a person asks it in a chat, still naming what it asks about.
_CONVERSATIONAL_QUESTIONS: dict[str, tuple[str, ...]] = {
    "color": ("And what color are they?", "What about their color?", "And the color?"),
    "shape": ("And what shape are they?", "What about their shape?", "And the shape?"),
    "count": (
        "And how many shapes are there?",
        "And how many are there?",
        "What about the number of shapes?",
    ),
    "position": ("And where is it?", "What about its position?", "And where is the shape?"),
}
_SINGULAR_CONVERSATIONAL_QUESTIONS: dict[str, tuple[str, ...]] = {
    "color": ("And what color is it?", "What about its color?", "And the color?"),
    "shape": ("And what shape is it?", "What about its shape?", "And the shape?"),
}
# How later stage-2 turns are asked, with relative weights: with the short-answer suffix (as every
# first turn is), as the plain question, or conversationally. Trained on the suffixed form alone, the
# model answered a plainly asked follow-up ("How many shapes are there?") with the previous answer.
_FOLLOW_UP_STYLES: dict[str, float] = {"short_answer": 1.0, "plain": 1.0, "conversational": 1.0}
_CAPTION_INSTRUCTIONS = (
    "Describe the image briefly.",
    "Give a short caption of the image.",
    "Summarize the image in a few words.",
)
# Five templates, so COCO's five distinct captions per image come from one description.
_CAPTION_TEMPLATES = (
    "{Count} {color} {shapes}{where}.",
    "A picture of {count} {color} {shapes}{where}.",
    "An image with {count} {color} {shapes}{where}.",
    "{Count} {color} {shapes} on a grey background{where}.",
    "There {verb} {count} {color} {shapes}{where}.",
)
_ARITHMETIC: tuple[tuple[str, str], ...] = tuple(
    [(f"What is {a} plus {b}?", str(a + b)) for a in range(10) for b in range(10)]
    + [(f"What is {a} minus {b}?", str(a - b)) for a in range(10) for b in range(a + 1)]
)

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels; x1 and y1 exclusive


@dataclass(frozen=True)
class Label:
    """What an image shows: the facts every question, answer and caption is made from."""

    shape: str
    color: str
    count: int
    position: str | None  # only for a single object


@dataclass(frozen=True)
class Scene:
    """One image: its label and the geometry that draws it."""

    label: Label
    width: int
    height: int
    background: int
    boxes: tuple[Box, ...]


def generate(
    out_dir: str | Path, samples: int = 200, eval_samples: int | None = None, seed: int = 0
) -> dict[str, Any]:
    """Write the dataset (layout in the module docstring) to ``out_dir`` and return its manifest.

    ``eval_samples`` defaults to ``max(20, samples // 5)``. Files already in ``out_dir`` with the
    same names are overwritten; others are left alone.
    """
    if eval_samples is None:
        eval_samples = max(20, samples // 5)
    for name, value in (("samples", samples), ("eval_samples", eval_samples)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}; ask for one or more images")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "coco").mkdir(exist_ok=True)

    # Independent streams per split: changing the training size leaves the held-out set unchanged.
    train = _sample_scenes(random.Random(f"{seed}:train"), samples)
    held_out = _sample_scenes(random.Random(f"{seed}:eval"), eval_samples)
    for split, scenes in (("train", train), ("eval", held_out)):
        for index, scene in enumerate(scenes):
            _render(scene).save(out / _image_path(split, index), format="PNG")

    text_rng = random.Random(f"{seed}:text")
    # Its own stream: the first turns, question orders and arithmetic stay those of text_rng.
    follow_up_rng = random.Random(f"{seed}:follow_up")
    placeholder_at_end = set(text_rng.sample(range(samples), round(samples * _PLACEHOLDER_AT_END_FRACTION)))
    stage1 = [
        {
            "id": _image_id("train", index),
            "image": _image_path("train", index),
            "conversations": _caption_conversation(text_rng, scene.label),
        }
        for index, scene in enumerate(train)
    ]
    stage2 = [
        {
            "id": _image_id("train", index),
            "image": _image_path("train", index),
            "conversations": _question_conversation(
                text_rng, scene.label, index in placeholder_at_end, follow_up_rng
            ),
        }
        for index, scene in enumerate(train)
    ]
    stage2 += [
        {"id": f"text-{index:06d}", "conversations": _arithmetic_conversation(text_rng)}
        for index in range(round(samples * _TEXT_ONLY_FRACTION))
    ]
    instances, captions = _coco_annotations(train)

    files = {
        "stage1": "stage1.json",
        "stage2": "stage2.json",
        "eval": "eval.json",
        "coco_instances": "coco/instances.json",
        "coco_captions": "coco/captions.json",
        "images": "images",
    }
    manifest = {
        "seed": seed,
        "samples": samples,
        "eval_samples": eval_samples,
        "files": files,
        "question_types": {
            question_type: {"choices": list(choices), "chance": 1 / len(choices)}
            for question_type, choices in CHOICES.items()
        },
        "objects": {
            _image_id(split, index): {**asdict(scene.label), "boxes": [list(box) for box in scene.boxes]}
            for split, scenes in (("train", train), ("eval", held_out))
            for index, scene in enumerate(scenes)
        },
    }
    for name, content in (
        ("stage1", stage1),
        ("stage2", stage2),
        ("eval", _eval_items(held_out, random.Random(f"{seed}:eval_follow_up"))),
        ("coco_instances", instances),
        ("coco_captions", captions),
    ):
        _write_json(out / files[name], content)
    _write_json(out / "manifest.json", manifest)
    return manifest


def corpus_texts(seed: int = 0, samples: int = 400) -> list[str]:
    """The tiny tokenizer's training corpus: the texts the generator emits, without writing images.

    All first-turn phrasings, answers, captions and arithmetic problems are enumerated exhaustively;
    ``samples`` sampled conversations follow so that frequent phrases weigh as they do in the data.
    The ``<image>`` placeholder is left out: tokenizers add it as a special token. Later turns appear
    here as they were when the shipped tokenizer was trained (all with the short-answer suffix), and
    the follow-up phrasings are left out: adding them would retrain the tokenizer and move its ids
    (see ``TINY_TOKENIZER_EXTRA_TEXTS``). Their few new words are split into smaller pieces, which
    byte-level BPE always can.
    """
    texts = [*_CAPTION_INSTRUCTIONS]
    texts += [
        question + SHORT_ANSWER_SUFFIX for phrasings in _all_question_phrasings() for question in phrasings
    ]
    texts += [answer for choices in CHOICES.values() for answer in choices]
    for shape, color, count in itertools.product(SHAPES, COLORS, range(1, MAX_COUNT + 1)):
        for position in POSITIONS if count == 1 else (None,):
            texts += _captions(Label(shape, color, count, position))
    texts += [text for question, answer in _ARITHMETIC for text in (question + SHORT_ANSWER_SUFFIX, answer)]

    rng = random.Random(f"{seed}:corpus")
    for _ in range(samples):
        label = _sample_scene(rng).label
        for conversation in (
            _caption_conversation(rng, label),
            _question_conversation(rng, label, placeholder_at_end=False),
            _arithmetic_conversation(rng),
        ):
            texts += [_strip_placeholder(turn["value"]) for turn in conversation]
    return texts


def normalize_answer(text: str) -> str:
    """Canonical form for exact-match scoring: lower case, single spaces, no trailing punctuation."""
    return " ".join(text.strip().lower().rstrip(".!?,;:").split())


def _image_id(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def _image_path(split: str, index: int) -> str:
    return f"images/{split}_{index:06d}.png"


def _write_json(path: Path, content: Any) -> None:
    path.write_text(json.dumps(content, indent=1) + "\n")


def _sample_scenes(rng: random.Random, count: int) -> list[Scene]:
    return [_sample_scene(rng) for _ in range(count)]


def _sample_scene(rng: random.Random) -> Scene:
    width = height = rng.choice(_IMAGE_SIDES)
    count = rng.randint(1, MAX_COUNT)
    position = rng.choice(POSITIONS) if count == 1 else None
    label = Label(shape=rng.choice(SHAPES), color=rng.choice(tuple(COLORS)), count=count, position=position)
    return Scene(
        label=label,
        width=width,
        height=height,
        background=rng.choice(_BACKGROUND_LEVELS),
        boxes=_place_boxes(rng, width, height, count, position),
    )


def _place_boxes(
    rng: random.Random, width: int, height: int, count: int, position: str | None
) -> tuple[Box, ...]:
    """One square box per object, each wholly inside its own quadrant (``position``'s for one object).

    Distinct quadrants keep objects ``2 * _MARGIN`` apart, and make the count a matter of which
    quadrants are occupied: a task a tiny model learns in minutes, whatever the objects' sizes.
    """
    quadrants = [position] if position is not None else rng.sample(POSITIONS, count)
    shorter = min(width, height)
    boxes = []
    for quadrant in quadrants:
        vertical, horizontal = quadrant.split()
        x_lo, x_hi = _half(width, first=horizontal == "left")
        y_lo, y_hi = _half(height, first=vertical == "top")
        side = min(round(shorter * rng.uniform(*_OBJECT_SCALE)), x_hi - x_lo, y_hi - y_lo)
        x0, y0 = rng.randint(x_lo, x_hi - side), rng.randint(y_lo, y_hi - side)
        boxes.append((x0, y0, x0 + side, y0 + side))
    return tuple(boxes)


def _half(length: int, first: bool) -> tuple[int, int]:
    """The first or second half of ``length`` pixels, ``_MARGIN`` in from both of its ends."""
    return (_MARGIN, length // 2 - _MARGIN) if first else (length // 2 + _MARGIN, length - _MARGIN)


def _render(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (scene.width, scene.height), (scene.background,) * 3)
    draw = ImageDraw.Draw(image)
    fill = COLORS[scene.label.color]
    for box in scene.boxes:
        if scene.label.shape == "circle":
            draw.ellipse(_inclusive(box), fill=fill)
        elif scene.label.shape == "square":
            draw.rectangle(_inclusive(box), fill=fill)
        else:
            draw.polygon(_outline(scene.label.shape, box), fill=fill)
    return image


def _inclusive(box: Box) -> Box:
    """Pillow's last-pixel coordinates for an exclusive box."""
    x0, y0, x1, y1 = box
    return x0, y0, x1 - 1, y1 - 1


def _outline(shape: str, box: Box) -> list[tuple[int, int]]:
    """Polygon vertices in pixel coordinates; also the COCO segmentation (circles as 16-gons)."""
    x0, y0, x1, y1 = _inclusive(box)
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    if shape == "triangle":  # apex up: the widest row is the bottom one
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "square":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    radius = (x1 - x0) / 2
    return [
        (round(x0 + radius + radius * math.cos(angle)), round(y0 + radius + radius * math.sin(angle)))
        for angle in (2 * math.pi * step / 16 for step in range(16))
    ]


def _all_question_phrasings() -> list[tuple[str, ...]]:
    return [*_QUESTIONS.values(), *_SINGULAR_QUESTIONS.values()]


def _question_phrasings(question_type: str, label: Label) -> tuple[str, ...]:
    if label.count == 1 and question_type in _SINGULAR_QUESTIONS:
        return _SINGULAR_QUESTIONS[question_type]
    return _QUESTIONS[question_type]


def _conversational_phrasings(question_type: str, label: Label) -> tuple[str, ...]:
    if label.count == 1 and question_type in _SINGULAR_CONVERSATIONAL_QUESTIONS:
        return _SINGULAR_CONVERSATIONAL_QUESTIONS[question_type]
    return _CONVERSATIONAL_QUESTIONS[question_type]


def _natural_phrasings(question_type: str, label: Label) -> tuple[str, ...]:
    """A later turn as a person asks it: the plain questions and the conversational ones, no suffix."""
    return (*_question_phrasings(question_type, label), *_conversational_phrasings(question_type, label))


def _follow_up_question(rng: random.Random, question_type: str, label: Label, phrasing: str) -> str:
    """A later turn asking ``phrasing``'s question in one of the :data:`_FOLLOW_UP_STYLES`."""
    (style,) = rng.choices(tuple(_FOLLOW_UP_STYLES), weights=tuple(_FOLLOW_UP_STYLES.values()))
    if style == "short_answer":
        return phrasing + SHORT_ANSWER_SUFFIX
    if style == "plain":
        return phrasing
    return rng.choice(_conversational_phrasings(question_type, label))


def _question_types(label: Label) -> tuple[str, ...]:
    return tuple(kind for kind in QUESTION_TYPES if kind != "position" or label.position is not None)


def _answer(question_type: str, label: Label) -> str:
    answers = {
        "color": label.color,
        "shape": label.shape,
        "count": str(label.count),
        "position": label.position,
    }
    answer = answers[question_type]
    if answer is None:
        raise ValueError(f"no {question_type!r} answer for {label}; ask only _question_types(label)")
    return answer


def _captions(label: Label) -> list[str]:
    count_word = COUNT_WORDS[label.count - 1]
    fields = {
        "count": count_word,
        "Count": count_word.capitalize(),
        "color": label.color,
        "shapes": label.shape if label.count == 1 else label.shape + "s",
        "verb": "is" if label.count == 1 else "are",
        "where": f" in the {label.position}" if label.position else "",
    }
    return [template.format(**fields) for template in _CAPTION_TEMPLATES]


def _conversation(turns: list[tuple[str, str]], placeholder: str | None) -> list[dict[str, str]]:
    """LLaVA's alternating human/gpt turns; ``placeholder`` ("start", "end" or None) places ``<image>``."""
    messages = []
    for index, (question, answer) in enumerate(turns):
        if index == 0 and placeholder == "start":
            question = f"{IMAGE_PLACEHOLDER}\n{question}"
        elif index == 0 and placeholder == "end":
            question = f"{question}\n{IMAGE_PLACEHOLDER}"
        messages += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return messages


def _strip_placeholder(text: str) -> str:
    return text.replace(f"{IMAGE_PLACEHOLDER}\n", "").replace(f"\n{IMAGE_PLACEHOLDER}", "")


def _caption_conversation(rng: random.Random, label: Label) -> list[dict[str, str]]:
    return _conversation([(rng.choice(_CAPTION_INSTRUCTIONS), rng.choice(_captions(label)))], "start")


def _question_conversation(
    rng: random.Random,
    label: Label,
    placeholder_at_end: bool,
    follow_up_rng: random.Random | None = None,
) -> list[dict[str, str]]:
    """Every question that applies, in random order: each image forward pass teaches all it can.

    ``follow_up_rng`` restyles the later turns (:func:`_follow_up_question`); without it every turn
    carries the short-answer suffix, as in the tokenizer's corpus. ``rng`` is drawn from alike
    either way.
    """
    chosen = list(_question_types(label))
    rng.shuffle(chosen)
    turns = []
    for index, kind in enumerate(chosen):
        phrasing = rng.choice(_question_phrasings(kind, label))
        if index and follow_up_rng is not None:
            question = _follow_up_question(follow_up_rng, kind, label, phrasing)
        else:
            question = phrasing + SHORT_ANSWER_SUFFIX
        turns.append((question, _answer(kind, label)))
    return _conversation(turns, "end" if placeholder_at_end else "start")


def _arithmetic_conversation(rng: random.Random) -> list[dict[str, str]]:
    problems = rng.sample(_ARITHMETIC, rng.randint(1, 2))
    return _conversation([(question + SHORT_ANSWER_SUFFIX, answer) for question, answer in problems], None)


def _eval_items(scenes: list[Scene], rng: random.Random) -> list[dict[str, Any]]:
    """Per image: a first-turn item per question type, then one follow-up item (:func:`_follow_up_turns`)."""
    items = []
    for index, scene in enumerate(scenes):
        label = scene.label
        first_turns = [
            (kind, [(_canonical_question(kind, label), _answer(kind, label))])
            for kind in _question_types(label)
        ]
        for kind, turns in [*first_turns, _follow_up_turns(rng, label)]:
            follow_up = "-follow-up" if len(turns) > 1 else ""
            items.append(
                {
                    "id": f"{_image_id('eval', index)}{follow_up}-{kind}",
                    "image": _image_path("eval", index),
                    "conversations": _conversation(turns, "start"),
                    "question_type": kind,
                    "answer": _answer(kind, label),
                    "choices": list(CHOICES[kind]),
                }
            )
    return items


def _canonical_question(question_type: str, label: Label) -> str:
    return _question_phrasings(question_type, label)[0] + SHORT_ANSWER_SUFFIX


def _follow_up_turns(rng: random.Random, label: Label) -> tuple[str, list[tuple[str, str]]]:
    """``(scored type, turns)``: one or more questions with their correct answers, the scored one last.

    The first turn is asked canonically, as in the first-turn items; the later ones, the scored one
    included, in a natural phrasing (plain or conversational, no suffix), as people ask in a chat.
    """
    order = list(_question_types(label))
    rng.shuffle(order)
    scored = rng.randint(1, len(order) - 1)  # its index: 1 to 3 earlier turns
    turns = [(_canonical_question(order[0], label), _answer(order[0], label))]
    turns += [
        (rng.choice(_natural_phrasings(kind, label)), _answer(kind, label)) for kind in order[1 : scored + 1]
    ]
    return order[scored], turns


def _coco_annotations(scenes: list[Scene]) -> tuple[dict[str, Any], dict[str, Any]]:
    """COCO 2017 ``instances`` and ``captions`` files for ``scenes`` (the training split)."""
    header = {
        "info": {
            "description": "llava-ray synthetic shapes",
            "version": "1.0",
            "year": 2025,
            "contributor": "llava_ray.data.synthetic",
            "url": "",
            "date_created": "2025/01/01",
        },
        "licenses": [],
        "images": [
            {
                "id": index + 1,
                "file_name": Path(_image_path("train", index)).name,
                "width": s.width,
                "height": s.height,
            }
            for index, s in enumerate(scenes)
        ],
    }
    # Area of the drawn shape relative to its box, as COCO's area is the object's, not the box's.
    fill_ratio = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5}
    boxes = [(index + 1, scene.label.shape, box) for index, scene in enumerate(scenes) for box in scene.boxes]
    instances = {
        **header,
        "annotations": [
            {
                "id": annotation_id,
                "image_id": image_id,
                "category_id": SHAPES.index(shape) + 1,
                "segmentation": [[float(c) for point in _outline(shape, box) for c in point]],
                "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])],
                "area": (box[2] - box[0]) * (box[3] - box[1]) * fill_ratio[shape],
                "iscrowd": 0,
            }
            for annotation_id, (image_id, shape, box) in enumerate(boxes, start=1)
        ],
        "categories": [
            {"id": index + 1, "name": shape, "supercategory": "shape"} for index, shape in enumerate(SHAPES)
        ],
    }
    texts = [(index + 1, text) for index, scene in enumerate(scenes) for text in _captions(scene.label)]
    captions = {
        **header,
        "annotations": [
            {"id": annotation_id, "image_id": image_id, "caption": text}
            for annotation_id, (image_id, text) in enumerate(texts, start=1)
        ],
    }
    return instances, captions


def tiny_corpus() -> list[str]:
    """The texts the tiny tokenizer is trained on: the synthetic data and a few frozen template texts."""
    return [*corpus_texts(), *TINY_TOKENIZER_EXTRA_TEXTS]
