"""LLaVA-Bench's official file layouts, the symbolic context of each question, and the judge's rules.

LLaVA-Bench comes in two layouts; both keep the questions in ``questions.jsonl`` and the image
descriptions in a separate *context file* keyed by image::

    questions.jsonl    {"question_id": 0, "image": "001.jpg", "text": "What is unusual ...?", "category": "conv"}

    In-the-Wild        context.jsonl: {"id": "001", "image": "001.jpg", "caption": "A man irons ..."}
                       (``caption``: one string, or a list of strings joined by newlines)
    COCO               caps_boxes_coco2014_val_80.jsonl:
                       {"id": "000000441147", "image": "000000441147.jpg",
                        "captions": ["Two suitcases ...", ...],
                        "instances": [{"category": "suitcase", "bbox": [0.3, 0.2, 0.7, 0.9]}, ...]}

The layout is told by the context file's records (``caption`` vs ``captions`` + ``instances``).
A question's context is what the reference's review scripts build: In-the-Wild, the caption
lines (``eval_gpt_review_bench.py``); COCO, the captions, a blank line, then one line per object
``category: [x1, y1, x2, y2]`` as the file stores the box (``eval_gpt_review_visual.py``). The
judge's instruction is ``rule.json``'s text for the layout, byte for byte: ``llava_bench_{conv,
detail, complex}`` for In-the-Wild, ``{conv, detail, complex}`` for COCO (within a layout the
three categories share one text).

Every question must have a context: a question without an image, whose image the context file
lacks, or whose description is empty, a category outside conv/detail/complex, and a repeated
``question_id`` are :class:`~llava_ray.config.ConfigError` problems (each reason counted, with
examples) raised before any model or endpoint is used, never a judge reading ``N/A`` (the
reference code stops on the first such question with a ``KeyError`` or an assertion).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from llava_ray.config.loader import ConfigError
from llava_ray.evaluation.items import read_records
from llava_ray.utils.skips import SkipCounter

Layout = Literal["in_the_wild", "coco"]
# LLaVA-Bench's category keys (questions.jsonl); "conversation" is accepted for "conv".
RULE_CATEGORIES = {"conv": "conv", "conversation": "conv", "detail": "detail", "complex": "complex"}
CATEGORY_NAMES = {"conv": "conversation", "detail": "detail", "complex": "complex"}  # as reported

# rule.json's judge texts. The space before the first "\n" is the reference's; it is kept.
_RULE_OPENING = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user "
    "question displayed above. The user asks the question on observing an image. For your reference, the "
    "visual content in the image is represented with "
)
_RULE_CLOSING = (
    " \nPlease rate the helpfulness, relevance, accuracy, level of details of their responses. Each assistant "
    "receives an overall score on a scale of 1 to 10, where a higher score indicates better overall "
    "performance.\nPlease first output a single line containing only two values indicating the scores for "
    "Assistant 1 and 2, respectively. The two scores are separated by a space.\nIn the subsequent line, please "
    "provide a comprehensive explanation of your evaluation, avoiding any potential bias and ensuring that the "
    "order in which the responses were presented does not affect your judgment."
)
CONTEXT_DESCRIPTIONS: dict[Layout, str] = {
    "in_the_wild": "a few sentences describing the image.",
    "coco": (
        "five descriptive sentences describing the same image and the bounding box coordinates of each object "
        "in the scene. These coordinates are in the form of bounding boxes, represented as (x1, y1, x2, y2) "
        "with floating numbers ranging from 0 to 1. These values correspond to the top left x, top left y, "
        "bottom right x, and bottom right y."
    ),
}
JUDGE_RULES: dict[Layout, str] = {
    layout: _RULE_OPENING + description + _RULE_CLOSING
    for layout, description in CONTEXT_DESCRIPTIONS.items()
}
# The rule.json key the reference looks the text up under, kept in each review for the record.
RULE_KEYS: dict[Layout, str] = {"in_the_wild": "llava_bench_{category}", "coco": "{category}"}
JUDGE_ROLE = "Assistant"


@dataclass(frozen=True)
class BenchQuestion:
    """One LLaVA-Bench question with the symbolic context the text-only LLMs read for its image."""

    question_id: Any  # as in questions.jsonl (written back unchanged)
    image: str
    text: str
    category: str  # rule category: conv, detail or complex
    context: str
    layout: Layout

    @property
    def id(self) -> str:
        return str(self.question_id)

    @property
    def category_name(self) -> str:
        """The category as reported: conversation, detail, complex."""
        return CATEGORY_NAMES[self.category]

    @property
    def rule_key(self) -> str:
        return RULE_KEYS[self.layout].format(category=self.category)

    @property
    def judge_rule(self) -> str:
        return JUDGE_RULES[self.layout]


# ---- context files -------------------------------------------------------------------------------


def context_layout(record: Mapping[str, Any]) -> Layout | None:
    """``coco`` for ``{captions, instances: [{category, bbox}]}``, ``in_the_wild`` for ``{caption}``, else None."""
    instances = record.get("instances")
    if isinstance(record.get("captions"), list) and isinstance(instances, list):
        boxed = all(isinstance(i, dict) and "category" in i and "bbox" in i for i in instances)
        return "coco" if boxed else None
    if isinstance(record.get("caption"), str | list):
        return "in_the_wild"
    return None


def render_context(record: Mapping[str, Any], layout: Layout) -> str:
    """The ``[Context]`` text of one context record, as the reference's review scripts build it."""
    if layout == "coco":
        captions = "\n".join(str(caption) for caption in record["captions"])
        # The reference writes the box as Python prints the parsed list: [0.37, 0.584, 0.504, 0.709].
        boxes = "\n".join(f"{instance['category']}: {instance['bbox']}" for instance in record["instances"])
        return f"{captions}\n\n{boxes}"
    caption = record["caption"]
    return "\n".join(str(line) for line in caption) if isinstance(caption, list) else str(caption)


def _has_description(record: Mapping[str, Any], layout: Layout) -> bool:
    lines = record["captions"] if layout == "coco" else record["caption"]
    lines = lines if isinstance(lines, list) else [lines]
    return any(str(line).strip() for line in lines)


def load_contexts(context_path: str) -> tuple[Layout, dict[str, tuple[str, bool]]]:
    """The file's layout, and ``image -> (context, has a description)``; problems raise ConfigError."""
    records = read_records(context_path)
    layouts = Counter(context_layout(record) for record in records)
    bad = [
        index
        for index, record in enumerate(records)
        if context_layout(record) is None or "image" not in record
    ]
    problems = []
    if bad or not records:
        problems.append(
            f"evaluate.context={context_path!r}: records {bad[:5]} ({len(bad)} of {len(records)}) are not LLaVA-Bench "
            "context records; expected In-the-Wild's {image, caption} (context.jsonl) or COCO's "
            "{image, captions, instances} (caps_boxes_coco2014_val_80.jsonl)"
        )
    elif len(layouts) > 1:
        problems.append(
            f"evaluate.context={context_path!r} mixes In-the-Wild ({layouts['in_the_wild']}) and COCO "
            f"({layouts['coco']}) records; use one benchmark's context file"
        )
    if problems:
        raise ConfigError(problems)
    layout: Layout = next(iter(layouts))  # type: ignore[assignment]
    contexts: dict[str, tuple[str, bool]] = {}
    conflicting = []
    for record in records:
        entry = (render_context(record, layout), _has_description(record, layout))
        image = str(record["image"])
        if image in contexts and contexts[image] != entry:
            conflicting.append(image)
        contexts[image] = entry
    if conflicting:
        raise ConfigError(
            [
                f"evaluate.context={context_path!r} describes {len(conflicting)} image(s) twice, differently, e.g. "
                f"{conflicting[:5]}; keep one record per image"
            ]
        )
    return layout, contexts


def load_questions(questions_path: str, context_path: str, limit: int | None = None) -> list[BenchQuestion]:
    """The first ``limit`` questions, each with its image's context (see the module docstring)."""
    layout, contexts = load_contexts(context_path)
    problems = SkipCounter()
    questions = []
    seen: set[str] = set()
    for index, record in enumerate(read_records(questions_path)[:limit]):
        if "question_id" not in record or not isinstance(record.get("text"), str):
            raise ConfigError(
                [
                    f"evaluate.data_path={questions_path!r} item {index} has no 'question_id' or no 'text'; expected "
                    "LLaVA-Bench's {question_id, image, text, category} lines"
                ]
            )
        qid = record["question_id"]
        if str(qid) in seen:
            problems.add("duplicate_id", str(qid))
            continue
        seen.add(str(qid))
        image = record.get("image")
        category = RULE_CATEGORIES.get(str(record.get("category", "")).strip().lower())
        if category is None:
            problems.add("unknown_category", f"{qid}: {record.get('category')}")
            continue
        inline = " (its own `context` field is not read)" if "context" in record else ""
        if not image:
            problems.add("no_image", f"{qid}{inline}")
            continue
        if str(image) not in contexts:
            problems.add("no_context", f"{qid}: {image}{inline}")
            continue
        context, described = contexts[str(image)]
        if not described:
            problems.add("empty_context", f"{qid}: {image}")
            continue
        questions.append(BenchQuestion(qid, str(image), record["text"], category, context, layout))
    if problems.total:
        raise ConfigError(
            [
                f"evaluate.data_path={questions_path!r}: {count} question(s) {reason} ({_WHY[reason]}), e.g. "
                f"{problems.examples[reason]}"
                for reason, count in problems.counts.items()
            ]
            + [
                f"every LLaVA-Bench question is judged against its image's description in evaluate.context="
                f"{context_path!r} ({layout} layout); fix the files so each question has one"
            ]
        )
    return questions


_WHY = {
    "unknown_category": "category is not conv, detail or complex, the categories rule.json has a judge text for",
    "no_image": "have no 'image', so no description in the context file",
    "no_context": "name an image the context file does not describe",
    "empty_context": "name an image whose description in the context file is empty",
    "duplicate_id": "repeat an earlier question's question_id; answers and reviews are matched by it",
}


# ---- requests ------------------------------------------------------------------------------------
