"""ScienceQA: the official release converted to LLaVA data (evaluation items or training data), and scoring.

The release layout (``lupantech/ScienceQA``, ``data/scienceqa/``)::

    problems.json     {pid: {"question", "choices": [...], "answer": <index>, "hint", "image": "image.png" | null,
                             "lecture", "solution", "subject", "grade", "split", ...}}
    pid_splits.json   {"train": [pid, ...], "val": [...], "test": [...], "minitest": [...], ...}
    images/{split}/{pid}/image.png

:func:`convert_scienceqa` writes one LLaVA sample per problem of a split, in one of the
reference's prompt formats (``scripts/convert_sqa_to_llava.py``, ``build_prompt_chatbot``): an
input part and an output part joined by ``-``.

Inputs (``CQM``, ``QCM``)::

    CQM   Context: {hint or "N/A"}\\nQuestion: {question}\\nOptions: (A) x (B) y ...
    QCM   {question}\\nContext: {hint or "N/A"}\\nOptions: (A) x (B) y ...      ("Question: " prefix removed)

Outputs (``A``, ``LEA``, ``LEPA``; lecture and solution come from the problem)::

    A     The answer is B.
    LEA   {lecture} {solution} The answer is B.
    LEPA  LECTURE: {lecture}\\nSOLUTION: {solution}\\n###\\nANSWER: B.  (each part only when non-empty)

Double spaces are collapsed as the reference does (one ``replace("  ", " ")`` pass, then strip).
A problem with an image gets ``<image>\\n`` first (the reference writes ``\\n<image>`` last and its
data loader and ``model_vqa_science`` both move it to the front: the same tokens).

- ``CQM-A`` is LLaVA-1.5's zero-shot evaluation file (``llava_test_CQM-A.json``); evaluated with
  ``model_vqa_science --single-pred-prompt``, which appends
  ``\\nAnswer with the option's letter from the given choices directly.``; so does this converter for
  ``-A`` formats (``answer_instruction``).
- ``QCM-LEA`` is the paper's ScienceQA fine-tuning (``finetune_sqa.sh``: lecture and explanation
  before the answer, 12 epochs from the stage-1 projector); its test split, in the same format and
  without the instruction, is what the fine-tuned model is evaluated on (``sqa_eval_batch.sh``).
- ``QCM-LEPA`` is the reference's labelled variant (``convert_to_jsonl``'s default). Its answer line
  ``ANSWER: B.`` does not match the reference's answer pattern, so a model fine-tuned on it scores 0
  under the reference's scoring: use ``QCM-LEA`` unless you score it another way.

Every written sample also carries ``answer`` (the letter), ``choices``, ``subject`` and ``grade``;
the data preparation ignores them, the ScienceQA scoring reads them. A problem
whose image file is missing, or whose choices or answer are malformed, is skipped and counted by
reason in ``{out_path stem}.report.json``, never silently dropped.

Scoring follows the reference's ``eval_science_qa.py`` (:func:`extract_choice`): the answer is
exactly one option letter; or it starts with ``"X. "``; or it contains exactly one match of
``The answer is ([A-Z]).`` -- the reference's pattern, whose unescaped dot matches any character,
so "The answer is B," and "The answer is B because ..." count. Anything else, and a letter past
the problem's last option, is *unparsable* and wrong (the reference marks it ``FAILED``: wrong;
its random-option fallback sits after a ``return`` and never runs). A question the model gave no
answer to (a failed generation, a prompt too long) is wrong too: accuracy is over every item, as
the reference's is over every problem of the split. Unparsable and failed answers are counted
beside it. Accuracy is reported overall, on questions with and without an image (LLaVA-1.5's
"ScienceQA-IMG") and per subject.

Run it with ``llava-ray scienceqa-convert --scienceqa-dir DIR --split test --out FILE``, then
``llava-ray evaluate --config FILE evaluate.benchmark=scienceqa evaluate.data_path=FILE
evaluate.image_root=DIR/images`` (``jobs/configs/scienceqa/``).
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llava_ray.conversation.tokenizer import IMAGE_TOKEN
from llava_ray.evaluation.items import EvalItem, Outcome, accuracy, base_row, load_eval_items
from llava_ray.utils.skips import SkipCounter, Skipped
from llava_ray.utils.storage import filesystem, local_copy

logger = logging.getLogger(__name__)

__all__ = [
    "PROMPT_FORMATS",
    "convert_scienceqa",
    "extract_choice",
    "llava_example",
    "load_items",
    "load_release",
    "scienceqa_prompt",
    "score",
]

LETTERS = "ABCDE"  # ScienceQA problems have two to five options
ANSWER_INSTRUCTION = "\nAnswer with the option's letter from the given choices directly."
INPUT_FORMATS = ("CQM", "QCM")
OUTPUT_FORMATS = ("A", "LEA", "LEPA")
PROMPT_FORMATS = tuple(f"{i}-{o}" for i in INPUT_FORMATS for o in OUTPUT_FORMATS)
# The reference's pattern, dot unescaped on purpose: "The answer is B," and "... is B because" count.
THE_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")

load_items = load_eval_items  # convert_scienceqa writes the evaluation format


# ---- the release ---------------------------------------------------------------------------------


def load_release(problems_json: str, pid_splits_json: str, split: str) -> tuple[dict[str, Any], list[str]]:
    """``problems.json`` and the pids of ``split``; errors name the file and the fix."""
    problems = json.loads(Path(local_copy(problems_json)).read_text())
    splits = json.loads(Path(local_copy(pid_splits_json)).read_text())
    if split not in splits:
        raise ValueError(f"split {split!r} is not in {pid_splits_json}; it has {sorted(splits)}")
    unknown = [pid for pid in splits[split] if pid not in problems]
    if unknown:
        raise ValueError(
            f"{len(unknown)} pid(s) of split {split!r} are not in {problems_json}, e.g. {unknown[:5]}; "
            "use the problems.json of the same release"
        )
    return problems, [str(pid) for pid in splits[split]]


def check_problem(problem: Mapping[str, Any]) -> None:
    """Raise :class:`Skipped` when the problem's choices or answer index cannot be rendered."""
    choices = problem.get("choices")
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
        raise Skipped("bad_choices", f"{len(LETTERS)} options at most and 2 at least, got {choices!r}")
    answer = problem.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise Skipped("bad_answer", f"answer index {answer!r} for {len(choices)} options")


# ---- prompts (the reference's build_prompt_chatbot) ------------------------------------------------


def _parts(problem: Mapping[str, Any]) -> tuple[str, str, str]:
    """question, context (hint, or "N/A"), options ("(A) x (B) y")."""
    context = str(problem.get("hint") or "").strip() or "N/A"
    options = " ".join(
        f"({letter}) {choice}" for letter, choice in zip(LETTERS, problem["choices"], strict=False)
    )
    return str(problem["question"]), context, options


def render_input(problem: Mapping[str, Any], input_format: str) -> str:
    """The reference's input text (``Question: `` prefix still on for QCM), collapsed and stripped."""
    question, context, options = _parts(problem)
    if input_format == "CQM":
        text = f"Context: {context}\nQuestion: {question}\nOptions: {options}\n"
    elif input_format == "QCM":
        text = f"Question: {question}\nContext: {context}\nOptions: {options}\n"
    else:
        raise ValueError(f"input format {input_format!r} is not one of {INPUT_FORMATS}")
    return text.replace("  ", " ").strip()


def render_output(problem: Mapping[str, Any], output_format: str, newline: str = "\n") -> str:
    """The reference's output text (``Answer: `` prefix still on for A and LEA), collapsed and stripped.

    ``newline`` is what line breaks inside the lecture and solution become: the fine-tuning data
    keeps them (``"\\n"``); the reference's GPT-4 prompts write them as the two characters ``\\n``.
    """
    answer = LETTERS[problem["answer"]]
    # The reference writes newlines as "\\n" and turns every "\\n" back into one: both become breaks.
    lecture = str(problem.get("lecture") or "").replace("\n", "\\n").replace("\\n", newline)
    solution = str(problem.get("solution") or "").replace("\n", "\\n").replace("\\n", newline)
    if output_format == "A":
        text = f"Answer: The answer is {answer}."
    elif output_format == "LEA":
        text = f"Answer: {lecture} {solution} The answer is {answer}."
    elif output_format == "LEPA":
        text = ""
        if lecture.strip():
            text += f"LECTURE: {lecture}\n"
        if solution.strip():
            text += f"SOLUTION: {solution}\n"
        text += f"###\nANSWER: {answer}."
    else:
        raise ValueError(f"output format {output_format!r} is not one of {OUTPUT_FORMATS}")
    return text.replace("  ", " ").strip()


def _split_format(prompt_format: str) -> tuple[str, str]:
    input_format, _, output_format = prompt_format.partition("-")
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt format {prompt_format!r} is not one of {', '.join(PROMPT_FORMATS)}")
    return input_format, output_format


def llava_example(problem: Mapping[str, Any], prompt_format: str) -> tuple[str, str]:
    """(human text, gpt text) as the reference's ``convert_to_llava`` writes them, without ``<image>``.

    It removes a leading ``Question: `` and ``Answer: `` (the reference replaces every occurrence,
    also inside a question or lecture that quotes one; this removes only the prefix).
    """
    input_format, output_format = _split_format(prompt_format)
    human = render_input(problem, input_format).removeprefix("Question: ")
    gpt = render_output(problem, output_format).removeprefix("Answer: ")
    return human, gpt


def scienceqa_prompt(
    problem: Mapping[str, Any],
    has_image: bool,
    prompt_format: str = "CQM-A",
    answer_instruction: bool | None = None,
) -> str:
    """The human turn of one problem: ``<image>\\n`` when it has one, the input, and for ``-A`` formats
    (or ``answer_instruction=True``) LLaVA-1.5's single-prediction instruction.

    The default is LLaVA-1.5's zero-shot prompt (see the module docstring).
    """
    check_problem(problem)
    text, _ = llava_example(problem, prompt_format)
    if answer_instruction if answer_instruction is not None else prompt_format.endswith("-A"):
        text += ANSWER_INSTRUCTION
    return f"{IMAGE_TOKEN}\n{text}" if has_image else text


# ---- conversion ----------------------------------------------------------------------------------


def convert_scienceqa(
    problems_json: str,
    pid_splits_json: str,
    image_root: str,
    split: str,
    out_path: str | Path,
    prompt_format: str = "CQM-A",
    answer_instruction: bool | None = None,
) -> Path:
    """Write ``split``'s problems as LLaVA samples to ``out_path`` (a local JSON array); return it.

    ``prompt_format``: ``CQM-A`` (LLaVA-1.5's zero-shot evaluation), ``QCM-LEA`` (the paper's
    fine-tuning data, and its evaluation file), ... (see the module docstring). The file is both an
    evaluation file (``evaluate.benchmark=scienceqa``) and training data (``data.sources``). Image
    paths are relative to ``image_root`` (``{split}/{pid}/image.png``): set ``evaluate.image_root``
    or the source's ``image_root`` to the same folder.
    """
    _split_format(prompt_format)
    problems, pids = load_release(problems_json, pid_splits_json, split)
    present = _image_files(image_root)
    samples, skips = [], SkipCounter()
    for pid in pids:
        problem = problems[pid]
        try:
            samples.append(
                _sample(pid, problem, split, prompt_format, answer_instruction, present, image_root)
            )
        except Skipped as skip:
            skips.add(skip.reason, f"{pid}: {skip.detail}")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(samples, indent=1, ensure_ascii=False) + "\n")
    report = {
        "split": split,
        "prompt_format": prompt_format,
        "input": len(pids),
        "written": len(samples),
        **skips.to_dict(),
    }
    out.with_name(f"{out.stem}.report.json").write_text(json.dumps(report, indent=1) + "\n")
    if skips.total:
        logger.warning(f"[scienceqa] skipped {skips.total} problem(s): {skips.counts}, e.g. {skips.examples}")
    return out


def _sample(
    pid: str,
    problem: Mapping[str, Any],
    split: str,
    prompt_format: str,
    answer_instruction: bool | None,
    present: set[str],
    image_root: str,
) -> dict[str, Any]:
    check_problem(problem)
    image = None
    if problem.get("image"):
        # The problem's own split names its image folder ("minitest" problems live under test/).
        image = f"{problem.get('split', split)}/{pid}/{problem['image']}"
        if image not in present:
            raise Skipped("image_missing", f"no {image} under {image_root}")
    _, gpt = llava_example(problem, prompt_format)
    sample: dict[str, Any] = {"id": pid}
    if image:
        sample["image"] = image
    sample.update(
        conversations=[
            {
                "from": "human",
                "value": scienceqa_prompt(problem, image is not None, prompt_format, answer_instruction),
            },
            {"from": "gpt", "value": gpt},
        ],
        answer=LETTERS[problem["answer"]],
        choices=list(problem["choices"]),
        subject=problem.get("subject"),
        grade=problem.get("grade"),
    )
    return sample


def _image_files(image_root: str) -> set[str]:
    """Every file under ``image_root``, relative to it (one listing, not one request per problem)."""
    fs, root = filesystem(image_root)
    root = root.rstrip("/")
    return {path[len(root) + 1 :] for path in fs.find(root)} if fs.exists(root) else set()


# ---- scoring -------------------------------------------------------------------------------------


def the_answer_is(text: str, num_choices: int) -> str | None:
    """The letter of the reference's ``The answer is X.`` when it occurs exactly once, and is an option."""
    found = THE_ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 and found[0] in LETTERS[:num_choices] else None


def extract_choice(prediction: str, num_choices: int) -> str | None:
    """The option letter the answer picks, or None when it is unparsable (see the module docstring)."""
    text = prediction.strip()
    if len(text) == 1 and text in LETTERS:
        letter: str | None = text
    elif len(text) >= 3 and text[0] in LETTERS and text[1:3] == ". ":
        letter = text[0]
    else:
        return the_answer_is(text, num_choices)
    return letter if letter in LETTERS[:num_choices] else None


def score(
    items: Sequence[EvalItem], outcomes: Mapping[str, Outcome]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """results.jsonl rows and the summary's ``metrics`` and ``by_subject`` (see the module docstring)."""
    rows = []
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # name -> [correct, count]
    unparsable = failed = 0
    for item in items:
        outcome = outcomes[item.id]
        subject = str(item.fields.get("subject") or "unknown")
        row = {**base_row(item, outcome), "answer": item.fields.get("answer"), "subject": subject}
        row["has_image"] = item.image is not None
        choice = None
        if outcome.error is None:
            choice = extract_choice(outcome.prediction or "", len(item.fields.get("choices") or LETTERS))
            unparsable += choice is None
        else:
            failed += 1
        correct = choice is not None and choice == item.fields.get("answer")
        row.update(parsed=choice, correct=correct)
        for name in ("overall", "image" if item.image else "no_image", f"subject/{subject}"):
            groups[name][0] += correct
            groups[name][1] += 1
        rows.append(row)
    metrics: dict[str, Any] = {
        "accuracy": accuracy(*groups["overall"]),
        "accuracy/image": accuracy(*groups["image"]),
        "accuracy/no_image": accuracy(*groups["no_image"]),
        "unparsable": unparsable,
        "unparsable_rate": accuracy(unparsable, len(items)),
        "failed": failed,
    }
    by_subject = {}
    for name in sorted(name for name in groups if name.startswith("subject/")):
        correct, count = groups[name]
        metrics[f"accuracy/{name}"] = accuracy(correct, count)
        by_subject[name.removeprefix("subject/")] = {
            "count": count,
            "correct": correct,
            "accuracy": accuracy(correct, count),
        }
    return rows, {"metrics": metrics, "by_subject": by_subject}
