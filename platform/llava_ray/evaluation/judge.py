"""LLaVA-Bench: an LLM judge scores the model's answers against reference answers.

Input (LLaVA-Bench's official layouts, :mod:`.llava_bench`)::

    evaluate.data_path          questions.jsonl  {"question_id": 0, "image": "001.jpg", "text": "...", "category": "conv"}
    evaluate.context            context.jsonl {image, caption} (In-the-Wild) or
                                caps_boxes_coco2014_val_80.jsonl {image, captions, instances} (COCO)
    evaluate.reference_answers  answers_gpt4.jsonl {"question_id": 0, "text": "..."}
                                (or ``llava-ray reference-answers``' output, :mod:`.llava_bench_reference`)

``image`` is relative to ``evaluate.image_root``; ``category`` is ``conv`` (or ``conversation``),
``detail`` or ``complex``, reported as conversation, detail, complex. Every question needs its
image's description in the context file; one without it stops the run before any model is
loaded (never a silent ``[Context] N/A``).

For each question the judge (any OpenAI-compatible chat-completions endpoint, temperature 0.2 by
default as the reference) gets the system message ``You are a helpful and precise assistant for
checking the quality of the answer.`` and, as the reference's ``eval_gpt_review_bench.py`` /
``eval_gpt_review_visual.py`` build it::

    [Context]\n{context}\n\n[Question]\n{question}\n\n[Assistant 1]\n{reference}\n\n[End of Assistant 1]\n\n
    [Assistant 2]\n{answer}\n\n[End of Assistant 2]\n\n[System]\n{rule.json's text for the layout}\n\n

and is asked for two scores from 1 to 10 on its FIRST line (``"8 7"`` or ``"8, 7"``), then an
explanation. Relative score = mean(model) / mean(reference) x 100, per category and overall.
A review whose first line is not two scores in 1-10 is *unparsable*: counted and excluded (the
reference code averaged it in as -1). A request that fails after its retries is counted as
``review_failed``, excluded, and asked again by the next run.

Requests run ``max_concurrency`` at a time with retries and exponential backoff on 429, 5xx and
timeouts (:class:`llava_ray.endpoints.client.ChatClient`). Every review is appended to
``reviews.jsonl`` (one JSON line, flushed) as it arrives; a rerun reuses a review only when the
judge model and everything it read (context, question, both answers, rule) are unchanged, so an
interrupted run resumes where it stopped and a review made from other inputs is never reused.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_ray.config.evaluation import JudgeConfig
from llava_ray.endpoints.client import ChatClient, ClientSettings, Completion, failed_examples, request_all
from llava_ray.endpoints.journal import Journal
from llava_ray.evaluation.items import (
    EvalItem,
    Outcome,
    base_row,
    default_image_root,
    locate_image,
    read_records,
    with_image_placeholder,
)
from llava_ray.evaluation.llava_bench import JUDGE_ROLE, load_questions

REVIEWS_FILE = "reviews.jsonl"
SCORE_RANGE = (1.0, 10.0)
SECTION = "evaluate.judge"

JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."


@dataclass(frozen=True)
class ReviewRequest:
    """What the judge sees for one question."""

    id: str
    category: str  # as reported: conversation, detail, complex
    context: str
    question: str
    reference: str
    answer: str
    rule: str  # rule.json's judge text for the question's layout and category
    rule_key: str = ""  # its key in rule.json (llava_bench_conv, conv, ...), kept in the review


@dataclass(frozen=True)
class ReviewRun:
    """All reviews known after a run (journal included), and what this run did."""

    records: dict[str, dict[str, Any]]  # id -> review record, for the requests asked for
    requests: int  # reviews requested by this run
    from_journal: int  # reviews found in reviews.jsonl and not asked again
    failed: dict[str, str]  # id -> why the request failed (asked again next run)


# ---- input ---------------------------------------------------------------------------------------


def load_items(
    questions_path: str, context_path: str, image_root: str | None = None, limit: int | None = None
) -> list[EvalItem]:
    """LLaVA-Bench questions with their contexts (layouts in the module docstring) as evaluation items."""
    root = image_root or default_image_root(questions_path)
    items = []
    for question in load_questions(questions_path, context_path, limit):
        location, refused = locate_image(question.image, root)  # the image-root guard
        turns = with_image_placeholder([{"from": "human", "value": question.text}], True)
        fields = {
            "category": question.category_name,
            "context": question.context,
            "rule": question.judge_rule,
            "rule_key": question.rule_key,
            "text": question.text,  # what the judge reads: the question without the model's <image>
        }
        items.append(EvalItem(question.id, turns, location, fields, refused))
    return items


def load_references(path: str) -> dict[str, str]:
    """Reference answers by question id, from ``{question_id, text}`` lines."""
    references = {}
    for index, record in enumerate(read_records(path)):
        if "question_id" not in record or not isinstance(record.get("text"), str):
            raise ValueError(
                f"{path} item {index} has no 'question_id' or no 'text'; expected {{question_id, text}}"
            )
        references[str(record["question_id"])] = record["text"]
    return references


def missing_references(items: Sequence[EvalItem], references: Mapping[str, str]) -> list[str]:
    return [item.id for item in items if item.id not in references]


# ---- the judge -----------------------------------------------------------------------------------


def judge_messages(request: ReviewRequest) -> list[dict[str, str]]:
    """The chat messages of one review: context, question, Assistant 1 = reference, 2 = the model."""
    if not request.context.strip():
        raise ValueError(
            f"question {request.id} has no context; the judge must read the image's description "
            "(load questions with llava_ray.evaluation.llava_bench.load_questions)"
        )
    role = JUDGE_ROLE
    content = (
        f"[Context]\n{request.context}\n\n"
        f"[Question]\n{request.question}\n\n"
        f"[{role} 1]\n{request.reference}\n\n[End of {role} 1]\n\n"
        f"[{role} 2]\n{request.answer}\n\n[End of {role} 2]\n\n"
        f"[System]\n{request.rule}\n\n"
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": content}]


def parse_scores(review: str) -> tuple[float, float] | None:
    """``(reference score, model score)`` from the review's first line, or None when unparsable."""
    first_line = review.strip().split("\n", 1)[0]
    values = first_line.replace(",", " ").split()
    if len(values) != 2:
        return None
    try:
        scores = float(values[0]), float(values[1])
    except ValueError:
        return None
    low, high = SCORE_RANGE
    return scores if all(low <= score <= high for score in scores) else None


def client_settings(config: JudgeConfig) -> ClientSettings:
    """Endpoint, model and key of the judge; the key falls back to ``$OPENAI_API_KEY``."""
    if not config.model:
        raise ValueError(
            "evaluate.judge.model is not set; name the judge model (e.g. gpt-4o) for llava_bench"
        )
    return ClientSettings.from_config(config, config.temperature)


def review_fingerprint(model: str, request: ReviewRequest) -> str:
    """What a review judged: the judge model and its messages; any change asks again."""
    key = json.dumps([model, judge_messages(request)], ensure_ascii=False)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def review_answers(
    requests: Sequence[ReviewRequest], config: JudgeConfig, reviews_path: str | Path
) -> ReviewRun:
    """Review every request not already in ``reviews_path`` (see the module docstring)."""
    settings = client_settings(config)
    fingerprints = {request.id: review_fingerprint(settings.model, request) for request in requests}
    journal = Journal(reviews_path)
    known = journal.load()
    done = {
        request.id: known[request.id]
        for request in requests
        if known.get(request.id, {}).get("fingerprint") == fingerprints[request.id]
    }
    todo = {request.id: request for request in requests if request.id not in done}
    records = dict(done)
    with journal.appender() as append:

        def record(key: str, completion: Completion) -> None:
            records[key] = review_record(todo[key], completion.text, fingerprints[key])
            append(records[key])

        failed = request_all(
            ChatClient(settings),
            {key: judge_messages(request) for key, request in todo.items()},
            config.max_concurrency,
            record,
            SECTION,
        )
    return ReviewRun(records, requests=len(todo), from_journal=len(done), failed=failed)


def review_record(request: ReviewRequest, review: str, fingerprint: str) -> dict[str, Any]:
    """One reviews.jsonl line; ``scores`` is ``[reference, model]`` or None when unparsable."""
    scores = parse_scores(review)
    return {
        "id": request.id,
        "category": request.category,
        "rule": request.rule_key,
        "context": request.context,
        "question": request.question,
        "reference": request.reference,
        "answer": request.answer,
        "review": review,
        "scores": list(scores) if scores else None,
        "fingerprint": fingerprint,
    }


# ---- scores --------------------------------------------------------------------------------------


def relative_scores(reviews: Iterable[tuple[str, Sequence[float] | None]]) -> dict[str, dict[str, Any]]:
    """Per category and ``overall``, from ``(category, [reference, model] or None)`` pairs.

    Each entry: ``reviews``, ``unparsable``, ``scored``, ``reference_mean``, ``model_mean`` and
    ``relative`` (100 x model_mean / reference_mean); means over scored reviews only.
    """
    groups: dict[str, list[Sequence[float] | None]] = defaultdict(list)
    groups["overall"] = []  # reported even when nothing was scored
    for category, scores in reviews:
        groups[category].append(scores)
        groups["overall"].append(scores)
    table = {}
    for name in sorted(groups, key=lambda name: (name == "overall", name)):
        scored = [scores for scores in groups[name] if scores is not None]
        reference_mean = sum(s[0] for s in scored) / len(scored) if scored else None
        model_mean = sum(s[1] for s in scored) / len(scored) if scored else None
        table[name] = {
            "reviews": len(groups[name]),
            "unparsable": len(groups[name]) - len(scored),
            "scored": len(scored),
            "reference_mean": reference_mean,
            "model_mean": model_mean,
            "relative": 100 * model_mean / reference_mean if reference_mean else None,
        }
    return table


def score(
    items: Sequence[EvalItem],
    outcomes: Mapping[str, Outcome],
    references: Mapping[str, str],
    config: JudgeConfig,
    reviews_path: str | Path,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Review the answered items; results.jsonl rows and the summary's ``metrics``, ``by_category``, ``judge``."""
    requests = [
        ReviewRequest(
            id=item.id,
            category=item.fields["category"],
            context=item.fields["context"],
            question=item.fields["text"],
            reference=references[item.id],
            answer=outcomes[item.id].prediction or "",
            rule=item.fields["rule"],
            rule_key=item.fields["rule_key"],
        )
        for item in items
        if outcomes[item.id].error is None
    ]
    run = review_answers(requests, config, reviews_path)
    rows = []
    for item in items:
        outcome = outcomes[item.id]
        row = {
            **base_row(item, outcome),
            "category": item.fields["category"],
            "reference": references[item.id],
        }
        record = run.records.get(item.id)
        if record is not None:
            row.update(scores=record["scores"], review=record["review"])
        elif item.id in run.failed:
            row.update(review_error=run.failed[item.id])
        rows.append(row)
    table = relative_scores((record["category"], record["scores"]) for record in run.records.values())
    metrics: dict[str, Any] = {"review_failed": len(run.failed)}
    for name, entry in table.items():
        suffix = "" if name == "overall" else f"/{name}"
        metrics[f"relative_score{suffix}"] = entry["relative"]
        metrics[f"model_score{suffix}"] = entry["model_mean"]
        metrics[f"reference_score{suffix}"] = entry["reference_mean"]
        metrics[f"unparsable_reviews{suffix}"] = entry["unparsable"]
    judge = {
        "model": config.model,
        "requests": run.requests,
        "from_journal": run.from_journal,
        "review_failed": len(run.failed),
        "failed_examples": failed_examples(run.failed),
    }
    return rows, {"metrics": metrics, "by_category": table, "judge": judge}
