"""LLaVA-Bench-style evaluation: an LLM judge scores the model's answers against reference answers.

Input files (LLaVA-Bench's JSON lines layout; a JSON array works too)::

    questions.jsonl   {"question_id": 0, "image": "001.jpg", "text": "What is unusual about this image?",
                       "category": "complex", "context": "A man irons clothes on a board on a taxi's roof ..."}
    answers.jsonl     {"question_id": 0, "text": "<the reference answer, e.g. GPT-4's>"}

``image`` is relative to ``evaluate.image_root`` (absent: a text-only question); ``category`` is
``conversation`` (or LLaVA-Bench's ``conv``), ``detail`` or ``complex`` (others are reported
under their own name); ``context`` is the symbolic description of the image the text-only judge
reads instead of the image (captions, ``object: [x1, y1, x2, y2]`` boxes), ``N/A`` when absent.

For each question the judge (any OpenAI-compatible chat-completions endpoint) gets the context,
the question, the reference answer as Assistant 1 and the model's answer as Assistant 2, and is
asked for two scores from 1 to 10 on its FIRST line (``"8 7"`` or ``"8, 7"``), then an
explanation. Relative score = mean(model) / mean(reference) x 100, per category and overall.
A review whose first line is not two scores in 1-10 is *unparsable*: counted and excluded (the
reference code averaged it in as -1). A request that fails after its retries is counted as
``review_failed``, excluded, and asked again by the next run.

Requests run ``max_concurrency`` at a time with retries and exponential backoff on 429, 5xx and
timeouts (:class:`llava_ray.endpoints.client.ChatClient`). Every review is appended to
``reviews.jsonl`` (one JSON line, flushed) as it arrives; a rerun skips the ids already reviewed
for the same answer and reference, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_ray.config.evaluation import JudgeConfig
from llava_ray.endpoints.client import ChatClient, ClientSettings, EndpointError, RequestFailed
from llava_ray.endpoints.journal import Journal
from llava_ray.evaluation.items import (
    EvalItem,
    Outcome,
    base_row,
    default_image_root,
    image_location,
    read_records,
    with_image_placeholder,
)

CATEGORY_NAMES = {
    "conv": "conversation",
    "conversation": "conversation",
    "detail": "detail",
    "complex": "complex",
}
REVIEWS_FILE = "reviews.jsonl"
SCORE_RANGE = (1.0, 10.0)

JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
JUDGE_INSTRUCTION = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user "
    "question displayed above. The user asks the question on observing an image. For your reference, the visual "
    "content in the image is represented with a few sentences describing the image.\n"
    "Please rate the helpfulness, relevance, accuracy, level of details of their responses. Each assistant "
    "receives an overall score on a scale of 1 to 10, where a higher score indicates better overall performance.\n"
    "Please first output a single line containing only two values indicating the scores for Assistant 1 and 2, "
    "respectively. The two scores are separated by a space.\n"
    "In the subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any "
    "potential bias and ensuring that the order in which the responses were presented does not affect your "
    "judgment."
)


@dataclass(frozen=True)
class ReviewRequest:
    """What the judge sees for one question."""

    id: str
    category: str
    context: str
    question: str
    reference: str
    answer: str


@dataclass(frozen=True)
class ReviewRun:
    """All reviews known after a run (journal included), and what this run did."""

    records: dict[str, dict[str, Any]]  # id -> review record, for the requests asked for
    requests: int  # reviews requested by this run
    from_journal: int  # reviews found in reviews.jsonl and not asked again
    failed: dict[str, str]  # id -> why the request failed (asked again next run)


# ---- input ---------------------------------------------------------------------------------------


def category_name(raw: Any) -> str:
    return CATEGORY_NAMES.get(str(raw).strip().lower(), str(raw).strip().lower() or "uncategorized")


def load_items(
    questions_path: str, image_root: str | None = None, limit: int | None = None
) -> list[EvalItem]:
    """LLaVA-Bench questions (format in the module docstring) as evaluation items."""
    root = image_root or default_image_root(questions_path)
    items = []
    for index, record in enumerate(read_records(questions_path)[:limit]):
        if "question_id" not in record or not isinstance(record.get("text"), str):
            raise ValueError(
                f"{questions_path} item {index} has no 'question_id' or no 'text'; expected LLaVA-Bench's "
                "{question_id, image, text, category, context?} lines"
            )
        location = image_location(record["image"], root) if record.get("image") else None
        turns = with_image_placeholder([{"from": "human", "value": record["text"]}], location is not None)
        fields = {
            "category": category_name(record.get("category", "")),
            "context": record.get("context"),
            "text": record["text"],  # what the judge reads: the question without the model's <image>
        }
        items.append(EvalItem(str(record["question_id"]), turns, location, fields))
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
    content = (
        f"[Context]\n{request.context or 'N/A'}\n\n"
        f"[Question]\n{request.question}\n\n"
        f"[Assistant 1]\n{request.reference}\n\n[End of Assistant 1]\n\n"
        f"[Assistant 2]\n{request.answer}\n\n[End of Assistant 2]\n\n"
        f"[System]\n{JUDGE_INSTRUCTION}\n\n"
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


def review_answers(
    requests: Sequence[ReviewRequest], config: JudgeConfig, reviews_path: str | Path
) -> ReviewRun:
    """Review every request not already in ``reviews_path`` (see the module docstring)."""
    journal = Journal(reviews_path)
    known = journal.load()
    done = {
        request.id: known[request.id]
        for request in requests
        if request.id in known
        and known[request.id].get("answer") == request.answer
        and known[request.id].get("reference") == request.reference
    }
    todo = [request for request in requests if request.id not in done]
    records = dict(done)
    failed: dict[str, str] = {}
    if todo:
        client = ChatClient(client_settings(config))
        with journal.appender() as append, ThreadPoolExecutor(config.max_concurrency, "judge") as pool:
            futures = {pool.submit(client.complete, judge_messages(request)): request for request in todo}
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in finished:
                    request = futures[future]
                    try:
                        completion = future.result()
                    except RequestFailed as failure:
                        failed[request.id] = failure.detail
                        continue
                    except EndpointError as error:
                        for other in pending:
                            other.cancel()
                        raise EndpointError(_judge_hint(error)) from None
                    record = review_record(request, completion.text)
                    append(record)
                    records[request.id] = record
    return ReviewRun(records, requests=len(todo), from_journal=len(done), failed=failed)


def review_record(request: ReviewRequest, review: str) -> dict[str, Any]:
    """One reviews.jsonl line; ``scores`` is ``[reference, model]`` or None when unparsable."""
    scores = parse_scores(review)
    return {
        "id": request.id,
        "category": request.category,
        "question": request.question,
        "reference": request.reference,
        "answer": request.answer,
        "review": review,
        "scores": list(scores) if scores else None,
    }


def _judge_hint(error: EndpointError) -> str:
    """The client's message, pointing at the judge's settings instead of the generate section's."""
    problem = str(error).split(": every request would fail", 1)[0]
    return (
        f"the judge endpoint refuses requests: {problem}. Check evaluate.judge.base_url (or $OPENAI_BASE_URL), "
        "evaluate.judge.model and the API key (evaluate.judge.api_key or $OPENAI_API_KEY)"
    )


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
            context=str(item.fields.get("context") or ""),
            question=item.fields["text"],
            reference=references[item.id],
            answer=outcomes[item.id].prediction or "",
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
        "failed_examples": [f"{key}: {value}" for key, value in list(run.failed.items())[:5]],
    }
    return rows, {"metrics": metrics, "by_category": table, "judge": judge}
