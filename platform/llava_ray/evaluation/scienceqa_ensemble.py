"""ScienceQA with a text-only LLM as second answerer and judge: the paper's "GPT-4 as the judge" (92.53%).

The reference's ``eval_science_qa_gpt4_requery.py`` combines three answers per problem: the
model's (its ``results.jsonl`` from ``llava-ray evaluate``), a text-only LLM's, and -- where the
two disagree -- the LLM's again, asked with both answers; that last one is final. This module
makes the two LLM passes against any OpenAI-compatible endpoint (``evaluate.scienceqa_ensemble``)
and scores all three side by side. Run it after a ``scienceqa`` evaluation::

    llava-ray scienceqa-ensemble --config jobs/configs/scienceqa/evaluate.yaml

1. **Text-only answer.** The reference's GPT-4 prompt (``build_prompt_gpt4``)::

       system     You are a helpful assistant.
       user       Can you explain Question: {question}\\nContext: {hint or N/A}\\nOptions: (A) x (B) y?
       assistant  Answer: {lecture} {solution} The answer is B.          (``shots`` train problems, QCM-LEA)
       ...
       user       Can you explain Question: ...?                         (the problem)
       assistant  Answer:                                               (the reply continues it)

   Lecture and solution line breaks are written as the two characters ``\\n``, as the reference
   does. The shots are drawn from the train split with ``random.Random(shot_seed).sample``, as
   ScienceQA's own GPT-3 script draws them.
2. **Agreement.** Both answers are parsed: the model's with the evaluation's rules
   (:func:`~llava_ray.evaluation.scienceqa.extract_choice`), the LLM's with the reference's
   ``The answer is ([A-Z]).`` alone. The ensemble's answer is:

   - the shared letter when they agree (no request);
   - the model's when the LLM gave none (failed or unparsable: the reference falls back to it too);
   - the LLM's when the model gave no answer at all (no results row, or a failed generation);
   - otherwise the **requery**'s: the question and both replies go back to the LLM, which is asked
     to end with ``The answer is X.``; when that reply has no letter (or the request fails) the
     model's letter stands, as in the reference, or the LLM's when the model's is unparsable.
3. **Scores**, over every problem of the split (no answer is wrong, never a random guess):
   model-only, text-LLM-only and ensemble accuracy, overall and on questions with an image, the
   reference's "text LLM, the model's answer where it has none" and the upper bound (either right),
   with the unparsable, failed and missing counts of each.

Every reply is appended to ``ensemble_requests.jsonl`` (the :class:`~llava_ray.endpoints.journal.Journal`)
as it arrives, keyed by problem and by a hash of the request (model, temperature, max tokens,
messages): a rerun asks only what it lacks or what changed. A request that fails after its
retries is counted, left out of the journal and asked again by the next run; a 401/403/404 stops
the run. ``output_dir`` receives ``ensemble.jsonl`` (one line per problem) and
``ensemble_summary.json``.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_ray.config.evaluation import EvaluateConfig, ScienceQAEnsembleConfig
from llava_ray.config.loader import ConfigError
from llava_ray.endpoints.client import ChatClient, ClientSettings, Completion, failed_examples, request_all
from llava_ray.endpoints.journal import Journal
from llava_ray.evaluation.items import accuracy, read_records
from llava_ray.evaluation.job import RESULTS_FILE, staged_output
from llava_ray.evaluation.scienceqa import (
    LETTERS,
    check_problem,
    extract_choice,
    load_release,
    render_input,
    render_output,
    the_answer_is,
)
from llava_ray.utils.skips import SkipCounter, Skipped
from llava_ray.utils.storage import filesystem, local_copy

ROWS_FILE = "ensemble.jsonl"
SUMMARY_FILE = "ensemble_summary.json"
JOURNAL_FILE = "ensemble_requests.jsonl"
SYSTEM = "You are a helpful assistant."
SHOT_FORMAT = "LEA"  # lecture and solution, then "The answer is X."
REQUERY_INSTRUCTION = (
    "Two assistants answered this multiple-choice question. Assistant 1 saw the question's image, "
    "when it has one; Assistant 2 read only the text. Their answers disagree. Decide which option is "
    'correct: explain briefly, then end with "The answer is X." where X is the letter of that option.'
)
SECTION = "evaluate.scienceqa_ensemble"


# ---- prompts -------------------------------------------------------------------------------------


def text_messages(problem: Mapping[str, Any], shots: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """The reference's GPT-4 messages for one problem (step 1 of the module docstring)."""
    messages = [{"role": "system", "content": SYSTEM}]
    for shot in shots:
        messages.append({"role": "user", "content": f"Can you explain {render_input(shot, 'QCM')}?"})
        messages.append({"role": "assistant", "content": render_output(shot, SHOT_FORMAT, newline="\\n")})
    messages.append({"role": "user", "content": f"Can you explain {render_input(problem, 'QCM')}?"})
    messages.append({"role": "assistant", "content": "Answer:"})
    return messages


def requery_messages(problem: Mapping[str, Any], model_reply: str, text_reply: str) -> list[dict[str, str]]:
    """The question with both replies, for the LLM's final say (the reference's prompt is not published)."""
    content = (
        f"{render_input(problem, 'QCM')}\n\n"
        f"[Assistant 1]\n{model_reply}\n[End of Assistant 1]\n\n"
        f"[Assistant 2]\n{text_reply}\n[End of Assistant 2]\n\n"
        f"{REQUERY_INSTRUCTION}"
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]


# ---- deciding ------------------------------------------------------------------------------------


def needs_requery(model_answered: bool, model_choice: str | None, text_choice: str | None) -> bool:
    """Whether the two answers disagree in a way the LLM must settle (step 2 of the module docstring)."""
    return model_answered and text_choice is not None and model_choice != text_choice


def ensemble_choice(
    model_answered: bool, model_choice: str | None, text_choice: str | None, requery_choice: str | None
) -> tuple[str | None, str]:
    """The ensemble's letter and where it came from (step 2 of the module docstring)."""
    if text_choice is None:
        return model_choice, "model"
    if not model_answered:
        return text_choice, "text_llm"
    if model_choice == text_choice:
        return model_choice, "agree"
    if requery_choice is not None:
        return requery_choice, "requery"
    return (model_choice, "model") if model_choice is not None else (text_choice, "text_llm")


# ---- requests ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ask:
    """One request: journal id (``text/{pid}``, ``requery/{pid}``), its messages and their hash."""

    id: str
    messages: list[dict[str, str]]
    key: str


@dataclass
class Asked:
    """Replies by journal id, failures by journal id, and what the run requested."""

    replies: dict[str, str]
    failed: dict[str, str]
    requested: int
    from_journal: int


def request_key(settings: ClientSettings, messages: list[dict[str, str]]) -> str:
    """A hash of everything that shapes the reply: a journalled reply is reused only when it matches."""
    payload = {
        "model": settings.model,
        "temperature": settings.temperature,
        "max_tokens": settings.max_tokens,
        "messages": messages,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def ask_all(
    asks: Sequence[Ask],
    known: Mapping[str, dict[str, Any]],
    chat: ChatClient,
    append: Callable[[dict[str, Any]], None],
    max_concurrency: int,
) -> Asked:
    """Replies to ``asks``: from the journal when it holds the same request, else from the endpoint."""
    result = Asked({}, {}, 0, 0)
    todo = []
    for ask in asks:
        record = known.get(ask.id)
        if record is not None and record.get("key") == ask.key and isinstance(record.get("reply"), str):
            result.replies[ask.id] = record["reply"]
            result.from_journal += 1
        else:
            todo.append(ask)
    if not todo:
        return result
    result.requested = len(todo)
    by_id = {ask.id: ask for ask in todo}

    def keep(ask_id: str, completion: Completion) -> None:
        ask = by_id[ask_id]
        append(
            {
                "id": ask.id,
                "key": ask.key,
                "reply": completion.text,
                "finish_reason": completion.finish_reason,
                "attempts": completion.attempts,
            }
        )
        result.replies[ask.id] = completion.text

    messages = {ask.id: ask.messages for ask in todo}
    result.failed.update(request_all(chat, messages, max_concurrency, keep, SECTION, "text-only LLM"))
    return result


# ---- the run -------------------------------------------------------------------------------------


def _join(folder: str, name: str) -> str:
    return f"{folder.rstrip('/')}/{name}"


def results_path(config: EvaluateConfig) -> str:
    """The model's results.jsonl: ``scienceqa_ensemble.results``, else ``output_dir``'s."""
    return config.scienceqa_ensemble.results or _join(config.output_dir, RESULTS_FILE)


def ensemble_problems(config: EvaluateConfig) -> list[str]:
    """Every reason the ensemble cannot run, each naming the key, its value and the fix."""
    section = config.scienceqa_ensemble
    problems = []
    if not section.model:
        problems.append(f"{SECTION}.model is not set; name the text-only LLM (the paper: gpt-4)")
    if not section.scienceqa_dir:
        problems.append(
            f"{SECTION}.scienceqa_dir is not set; point it at the ScienceQA folder with problems.json and "
            "pid_splits.json (data/scienceqa of lupantech/ScienceQA)"
        )
    else:
        for name in ("problems.json", "pid_splits.json"):
            unreadable = _unreadable(_join(section.scienceqa_dir, name))
            if unreadable:
                problems.append(f"{SECTION}.scienceqa_dir={section.scienceqa_dir!r}: {name} {unreadable}")
    results = results_path(config)
    unreadable = _unreadable(results)
    if unreadable:
        problems.append(
            f"the model's results {results!r}: {unreadable}; run `llava-ray evaluate` with "
            f"evaluate.benchmark=scienceqa first, or set {SECTION}.results"
        )
    return problems


def _unreadable(uri: str) -> str | None:
    """Why ``uri`` cannot be read (it does not exist, no credentials, ...), or None."""
    try:
        fs, path = filesystem(uri)
        return None if fs.exists(path) else "does not exist"
    except Exception as error:  # reported with the other problems, before any request
        return f"cannot be checked ({type(error).__name__}: {error})"


@dataclass(frozen=True)
class _Question:
    pid: str
    problem: dict[str, Any]
    truth: str
    model_prediction: str | None  # None: the model gave no answer
    model_error: str | None  # "missing" (no results row) or the results row's error


def run_ensemble(config: EvaluateConfig) -> dict[str, Any]:
    """Run the ensemble (see the module docstring) and return its summary."""
    problems = ensemble_problems(config)
    if problems:
        raise ConfigError(problems)
    section = config.scienceqa_ensemble
    base = str(section.scienceqa_dir)
    try:
        all_problems, pids = load_release(
            _join(base, "problems.json"), _join(base, "pid_splits.json"), section.split
        )
    except ValueError as error:  # an unknown split, pids missing from problems.json
        raise ConfigError([f"{SECTION}: {error}"]) from None
    shots = _shots(all_problems, _join(base, "pid_splits.json"), section)
    questions, skips, unmatched = _questions(all_problems, pids, results_path(config))
    settings = ClientSettings.from_config(section, section.temperature)
    chat = ChatClient(settings)

    with staged_output(config.output_dir, journals=(JOURNAL_FILE,)) as out_dir:
        journal = Journal(out_dir / JOURNAL_FILE)
        known = journal.load()
        with journal.appender() as append:
            text_asks = [_ask(f"text/{q.pid}", text_messages(q.problem, shots), settings) for q in questions]
            text = ask_all(text_asks, known, chat, append, section.max_concurrency)
            decided = []
            requery_asks = []
            for question in questions:
                num_choices = len(question.problem["choices"])
                answered = question.model_prediction is not None
                model_choice = extract_choice(question.model_prediction, num_choices) if answered else None
                text_reply = text.replies.get(f"text/{question.pid}")
                text_choice = the_answer_is(text_reply, num_choices) if text_reply is not None else None
                decided.append((question, model_choice, text_reply, text_choice))
                if needs_requery(answered, model_choice, text_choice):
                    messages = requery_messages(
                        question.problem, question.model_prediction or "", text_reply or ""
                    )
                    requery_asks.append(_ask(f"requery/{question.pid}", messages, settings))
            requery = ask_all(requery_asks, known, chat, append, section.max_concurrency)
        rows = [_row(*entry, text, requery) for entry in decided]
        summary = _summary(config, rows, text, requery, skips, unmatched, len(shots))
        with (out_dir / ROWS_FILE).open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    return summary


def _ask(ask_id: str, messages: list[dict[str, str]], settings: ClientSettings) -> Ask:
    return Ask(ask_id, messages, request_key(settings, messages))


def _shots(
    problems: Mapping[str, Any], pid_splits_json: str, section: ScienceQAEnsembleConfig
) -> list[dict[str, Any]]:
    """``shots`` usable train problems, drawn as ScienceQA's GPT-3 script draws them."""
    if not section.shots:
        return []
    train = json.loads(Path(local_copy(pid_splits_json)).read_text()).get("train", [])
    usable = []
    for pid in map(str, train):
        try:
            check_problem(problems.get(pid) or {})
        except Skipped:
            continue
        usable.append(pid)
    if len(usable) < section.shots:
        raise ConfigError(
            [
                f"{SECTION}.shots={section.shots} but the train split of {pid_splits_json} has {len(usable)} "
                "usable problems; lower it (0: no worked examples)"
            ]
        )
    return [problems[pid] for pid in random.Random(section.shot_seed).sample(usable, section.shots)]


def _questions(
    problems: Mapping[str, Any], pids: Sequence[str], results: str
) -> tuple[list[_Question], SkipCounter, SkipCounter]:
    """The split's problems with the model's answers; malformed problems and stray rows counted."""
    rows: dict[str, dict[str, Any]] = {}
    unmatched = SkipCounter()
    wanted = set(pids)
    for index, row in enumerate(read_records(results)):
        if "id" not in row:
            unmatched.add("no_id", f"line {index + 1}")
        elif str(row["id"]) not in wanted:
            unmatched.add("not_in_split", str(row["id"]))
        else:
            rows[str(row["id"])] = row
    questions, skips = [], SkipCounter()
    for pid in pids:
        problem = problems[pid]
        try:
            check_problem(problem)
        except Skipped as skip:
            skips.add(skip.reason, f"{pid}: {skip.detail}")
            continue
        row = rows.get(pid)
        if row is None:
            prediction, error = None, "missing"
        elif row.get("error") or not isinstance(row.get("prediction"), str):
            prediction, error = None, str(row.get("error") or "no_prediction")
        else:
            prediction, error = row["prediction"], None
        questions.append(_Question(pid, problem, LETTERS[problem["answer"]], prediction, error))
    return questions, skips, unmatched


def _row(
    question: _Question,
    model_choice: str | None,
    text_reply: str | None,
    text_choice: str | None,
    text: Asked,
    requery: Asked,
) -> dict[str, Any]:
    answered = question.model_prediction is not None
    requery_reply = requery.replies.get(f"requery/{question.pid}")
    num_choices = len(question.problem["choices"])
    requery_choice = the_answer_is(requery_reply, num_choices) if requery_reply is not None else None
    final, source = ensemble_choice(answered, model_choice, text_choice, requery_choice)
    row: dict[str, Any] = {
        "id": question.pid,
        "answer": question.truth,
        "has_image": bool(question.problem.get("image")),
        "model_prediction": question.model_prediction,
        "model_choice": model_choice,
        "text_reply": text_reply,
        "text_choice": text_choice,
        "ensemble_choice": final,
        "source": source,
        "correct": final is not None and final == question.truth,
    }
    if question.model_error:
        row["model_error"] = question.model_error
    if f"text/{question.pid}" in text.failed:
        row["text_error"] = text.failed[f"text/{question.pid}"]
    if needs_requery(answered, model_choice, text_choice):
        row["requery_reply"] = requery_reply
        row["requery_choice"] = requery_choice
        if f"requery/{question.pid}" in requery.failed:
            row["requery_error"] = requery.failed[f"requery/{question.pid}"]
    return row


def _summary(
    config: EvaluateConfig,
    rows: Sequence[dict[str, Any]],
    text: Asked,
    requery: Asked,
    skips: SkipCounter,
    unmatched: SkipCounter,
    shots: int,
) -> dict[str, Any]:
    section = config.scienceqa_ensemble

    def scores(choice: Callable[[dict[str, Any]], str | None]) -> dict[str, Any]:
        correct = [choice(row) == row["answer"] for row in rows]
        image = [hit for hit, row in zip(correct, rows, strict=True) if row["has_image"]]
        return {
            "accuracy": accuracy(sum(correct), len(rows)),
            "accuracy/image": accuracy(sum(image), len(image)),
        }

    def text_or_model(row: dict[str, Any]) -> str | None:
        return row["text_choice"] if row["text_choice"] is not None else row["model_choice"]

    def either(row: dict[str, Any]) -> str | None:
        return row["answer"] if row["answer"] in (row["model_choice"], row["text_choice"]) else None

    requeried = [row for row in rows if "requery_reply" in row]
    table = {
        "model": {
            **scores(lambda row: row["model_choice"]),
            "unparsable": sum(
                row["model_prediction"] is not None and row["model_choice"] is None for row in rows
            ),
            "no_answer": sum(row["model_prediction"] is None for row in rows),
        },
        "text_llm": {
            **scores(lambda row: row["text_choice"]),
            "unparsable": sum(row["text_reply"] is not None and row["text_choice"] is None for row in rows),
            "failed": len(text.failed),
        },
        "ensemble": {
            **scores(lambda row: row["ensemble_choice"]),
            "agreed": sum(row["source"] == "agree" for row in rows),
            "requeried": len(requeried),
            "requery_decided": sum(row["source"] == "requery" for row in rows),
            "requery_unparsable": sum(
                row["requery_reply"] is not None and row["requery_choice"] is None for row in requeried
            ),
            "requery_failed": len(requery.failed),
        },
        "text_llm_or_model": scores(text_or_model),
        "upper_bound": scores(either),
    }
    metrics = {f"{name}/{key}": value for name, entry in table.items() for key, value in entry.items()}
    failures = {**text.failed, **requery.failed}
    return {
        "benchmark": "scienceqa_ensemble",
        "split": section.split,
        "problems": len(rows),
        "results": results_path(config),
        "llm": section.model,
        "shots": shots,
        "metrics": metrics,
        "table": table,
        "model_errors": dict(
            Counter(row["model_error"] for row in rows if "model_error" in row).most_common()
        ),
        "skipped_problems": skips.to_dict(),
        "unmatched_results": unmatched.to_dict(),
        "requests": {
            "text": text.requested,
            "requery": requery.requested,
            "from_journal": text.from_journal + requery.from_journal,
            "failed": len(failures),
            "failed_examples": failed_examples(failures),
        },
        "output_dir": config.output_dir,
    }


def format_table(summary: Mapping[str, Any]) -> str:
    """Model-only, text-LLM-only and ensemble accuracy side by side, with what each stands on."""

    def percent(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.2f}%"

    table = summary["table"]
    lines = [f"ScienceQA {summary['split']}: {summary['problems']} problems, text-only LLM {summary['llm']}"]
    lines.append(f"{'':<20}{'accuracy':>10}{'image':>10}  notes")
    notes = {
        "model": f"{table['model']['unparsable']} unparsable, {table['model']['no_answer']} without an answer",
        "text_llm": f"{table['text_llm']['unparsable']} unparsable, {table['text_llm']['failed']} failed",
        "ensemble": (
            f"{table['ensemble']['agreed']} agreed, {table['ensemble']['requeried']} requeried "
            f"({table['ensemble']['requery_unparsable']} unparsable, {table['ensemble']['requery_failed']} failed)"
        ),
        "text_llm_or_model": "the text LLM, the model where it has no answer",
        "upper_bound": "either one right",
    }
    for name, note in notes.items():
        entry = table[name]
        lines.append(
            f"{name:<20}{percent(entry['accuracy']):>10}{percent(entry['accuracy/image']):>10}  {note}"
        )
    requests = summary["requests"]
    lines.append(
        f"requests: {requests['text']} text, {requests['requery']} requery, {requests['from_journal']} from the "
        f"journal, {requests['failed']} failed (asked again by the next run)"
    )
    return "\n".join(lines)
