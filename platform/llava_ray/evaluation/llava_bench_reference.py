"""LLaVA-Bench reference answers: a text-only LLM answers each question from the image's symbolic context.

The paper's LLaVA-Bench (COCO) score is relative to "a reference prediction based on the question
and the ground-truth textual descriptions, using the text-only GPT-4" (In-the-Wild's
``answers_gpt4.jsonl`` was made the same way). This step makes that file for any LLaVA-Bench
layout (:mod:`.llava_bench`), so the relative score can be computed end to end on one's own
images and questions::

    llava-ray reference-answers --config FILE evaluate.data_path=questions.jsonl \\
        evaluate.context=context.jsonl evaluate.reference_answers=answers_reference.jsonl \\
        evaluate.reference.model=gpt-4o
    llava-ray evaluate --config FILE evaluate.benchmark=llava_bench ... evaluate.judge.model=gpt-4o

The reference's prompt for this step is not published; :data:`REFERENCE_SYSTEM` is llava-ray's
own: the context is described as ``rule.json`` describes it to the judge, and the LLM is asked
to answer as if it saw the image, never mentioning the descriptions or coordinates (as the
paper's data-generation prompts ask). The user message is the judge's ``[Context]`` and
``[Question]`` blocks, so the reference and the judge read the same context.

Requests go through :class:`~llava_ray.endpoints.client.ChatClient` (retries, backoff), up to
``evaluate.reference.max_concurrency`` at a time; every reply is appended to the journal
``{reference_answers}.partial.jsonl`` (:mod:`llava_ray.endpoints.journal`) as it arrives. The
answers file is rebuilt from the journal, in question order, as JSON lines like the official
``answers_gpt4.jsonl``: ``{question_id, text, category, model_id}``. A question without a
usable answer is left out and counted by reason (``request_failed``, ``empty_reply``,
``truncated``: the reply hit ``max_tokens``), with examples, in the returned report and in
``{reference_answers}.report.json``; a rerun asks for exactly those again (and for any question
whose context, text or model changed), so ``llava-ray evaluate`` never judges a partial file
silently: it refuses references that lack a question.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llava_ray.config.evaluation import EvaluateConfig
from llava_ray.config.loader import ConfigError
from llava_ray.endpoints.client import ChatClient, ClientSettings, Completion, EndpointError, request_all
from llava_ray.endpoints.journal import JOURNAL_SUFFIX, Journal
from llava_ray.evaluation.llava_bench import (
    CONTEXT_DESCRIPTIONS,
    BenchQuestion,
    Layout,
    load_questions,
)
from llava_ray.utils.skips import SkipCounter
from llava_ray.utils.storage import filesystem, is_remote

logger = logging.getLogger(__name__)

SECTION = "evaluate.reference"
REPORT_SUFFIX = ".report.json"

_REFERENCE_SYSTEM = (
    "You are an AI visual assistant answering a user's question about an image. You cannot see the image; "
    "instead, its visual content is represented with {description} Answer the question as if you were "
    "looking at the image yourself: be helpful, relevant, accurate and as detailed as the question calls "
    "for, and reason step by step when the question needs it. Never mention the descriptions, captions, "
    "bounding boxes or coordinates; speak only of what is in the image."
)
REFERENCE_SYSTEM: dict[Layout, str] = {
    layout: _REFERENCE_SYSTEM.format(description=description)
    for layout, description in CONTEXT_DESCRIPTIONS.items()
}


def reference_messages(question: BenchQuestion) -> list[dict[str, str]]:
    """System message for the layout, then the ``[Context]`` and ``[Question]`` blocks the judge reads too."""
    content = f"[Context]\n{question.context}\n\n[Question]\n{question.text}"
    return [
        {"role": "system", "content": REFERENCE_SYSTEM[question.layout]},
        {"role": "user", "content": content},
    ]


def reference_problems(config: EvaluateConfig) -> list[str]:
    """Every reason the step cannot run, each naming the key, its value and the fix."""
    problems = []
    for key, what in (
        ("data_path", "LLaVA-Bench questions.jsonl"),
        ("context", "context.jsonl (In-the-Wild) or caps_boxes_coco2014_val_80.jsonl (COCO)"),
    ):
        value = getattr(config, key)
        if not value:
            problems.append(f"evaluate.{key} is not set; name the {what}")
        elif not _exists(value):
            problems.append(f"evaluate.{key}={value!r} does not exist")
    if not config.reference_answers:
        problems.append("evaluate.reference_answers is not set; name the answers file to write (JSON lines)")
    elif is_remote(config.reference_answers):
        problems.append(
            f"evaluate.reference_answers={config.reference_answers!r} is remote, but its resume journal is "
            "appended line by line; write it to a local path and copy it after"
        )
    if not config.reference.model:
        problems.append(f"{SECTION}.model is not set; name the text-only LLM (e.g. gpt-4o)")
    return problems


def answer_references(config: EvaluateConfig) -> dict[str, Any]:
    """Write ``config.reference_answers`` (see the module docstring); returns the report."""
    problems = reference_problems(config)
    if problems:
        raise ConfigError(problems)
    questions = load_questions(str(config.data_path), str(config.context), config.limit)
    output = Path(str(config.reference_answers))
    journal = Journal(f"{output}{JOURNAL_SUFFIX}")
    settings = ClientSettings.from_config(config.reference, config.reference.temperature)
    fingerprints = {question.id: _fingerprint(settings.model, question) for question in questions}
    known = journal.load()
    todo = [q for q in questions if _skip_reason(known.get(q.id), fingerprints[q.id]) is not None]

    with journal.appender() as append:

        def record(key: str, completion: Completion) -> None:
            append(
                {
                    "id": key,
                    "reply": completion.text,
                    "finish_reason": completion.finish_reason,
                    "attempts": completion.attempts,
                    "fingerprint": fingerprints[key],
                }
            )

        try:
            failed = request_all(
                ChatClient(settings),
                {question.id: reference_messages(question) for question in todo},
                config.reference.max_concurrency,
                record,
                SECTION,
            )
        except EndpointError as refusal:
            raise ConfigError(
                [f"{refusal}. The answers received so far are in {journal.path}; rerun to resume."]
            ) from None
    report = _write_answers(questions, journal.load(), fingerprints, failed, settings.model, output)
    report["requests"] = {"this_run": len(todo), "from_journal": len(questions) - len(todo)}
    report["journal"] = str(journal.path)
    Path(f"{output}{REPORT_SUFFIX}").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    logger.info(f"[reference-answers] {format_reference_summary(report)}")
    return report


def format_reference_summary(report: dict[str, Any]) -> str:
    skipped = report["skipped"]
    line = (
        f"{report['written']}/{report['questions']} reference answers by {report['model']} in {report['output']} "
        f"({report['requests']['this_run']} requested, {report['requests']['from_journal']} from the journal)"
    )
    if skipped:
        line += f"; missing: {skipped}, e.g. {report['examples']}; rerun to ask for them again"
    return line


def _fingerprint(model: str, question: BenchQuestion) -> str:
    """What a journaled reply answered: a changed model, context or question asks again."""
    key = json.dumps([model, reference_messages(question)], ensure_ascii=False)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _skip_reason(record: dict[str, Any] | None, fingerprint: str) -> str | None:
    """Why a journal record gives no usable answer (None: it does)."""
    if record is None or record.get("fingerprint") != fingerprint:
        return "request_failed"
    if not str(record.get("reply") or "").strip():
        return "empty_reply"
    if record.get("finish_reason") == "length":
        return "truncated"
    return None


_SKIP_DETAILS = {
    "request_failed": "no reply",
    "empty_reply": "the reply is empty",
    "truncated": "the reply stopped at evaluate.reference.max_tokens",
}


def _write_answers(
    questions: Sequence[BenchQuestion],
    records: dict[str, dict[str, Any]],
    fingerprints: dict[str, str],
    failed: dict[str, str],
    model: str,
    output: Path,
) -> dict[str, Any]:
    skips = SkipCounter()
    lines = []
    for question in questions:
        record = records.get(question.id)
        reason = _skip_reason(record, fingerprints[question.id])
        if reason is not None:
            skips.add(reason, f"{question.id}: {failed.get(question.id) or _SKIP_DETAILS[reason]}")
            continue
        answer = {
            "question_id": question.question_id,
            "text": str(record["reply"]).strip(),  # type: ignore[index]
            "category": question.category,
            "model_id": model,
        }
        lines.append(json.dumps(answer, ensure_ascii=False) + "\n")
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".tmp")
    partial.write_text("".join(lines), encoding="utf-8")
    os.replace(partial, output)
    return {
        "questions": len(questions),
        "written": len(lines),
        **skips.to_dict(),
        "model": model,
        "layout": questions[0].layout if questions else None,
        "output": str(output),
    }


def _exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)
