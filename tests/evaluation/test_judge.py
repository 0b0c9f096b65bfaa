"""LLaVA-Bench, reference answers and the judge, against a real OpenAI-compatible server on loopback.

:class:`FakeLLM` serves ``POST /v1/chat/completions`` from a ``ThreadingHTTPServer`` in a
background thread on a free port. It stands in for both text-only LLMs:

- the *reference* LLM (``llava-ray reference-answers``): it checks the model name, temperature,
  the layout's system message and that the user message is ``[Context]`` + ``[Question]`` with
  the image's real context lines, and answers ``Reference answer to: {question}``;
- the *judge*: it checks the system message, model name, temperature, the
  ``[Context]``/``[Question]``/``[Assistant 1]``/``[Assistant 2]``/``[System]`` layout, that the
  context is the image's description as the reference scripts build it (never ``N/A``), that the
  instruction is ``rule.json``'s text for the layout byte for byte, and that Assistant 1 is the
  reference LLM's answer when it wrote one; it answers by a per-question plan (scores, a
  malformed first line, a 429 before a good reply, 500 on every attempt).

A request of the wrong shape gets HTTP 400 and is recorded in ``shape_errors``. Requests are
counted per question, so resume is checked by what the server saw. ``tests/assets/llava_bench/
rule.json`` holds the LLaVA-Bench entries of the reference's ``llava/eval/table/rule.json``,
copied verbatim.
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from llava_ray.cli import main
from llava_ray.config.evaluation import EvaluateConfig, JudgeConfig, ReferenceConfig
from llava_ray.config.loader import ConfigError
from llava_ray.endpoints.client import EndpointError
from llava_ray.evaluation.items import Outcome
from llava_ray.evaluation.job import evaluate_problems, run_evaluate
from llava_ray.evaluation.judge import (
    JUDGE_SYSTEM,
    ReviewRequest,
    judge_messages,
    load_items,
    load_references,
    parse_scores,
    score,
)
from llava_ray.evaluation.llava_bench import load_questions
from llava_ray.evaluation.llava_bench_reference import REFERENCE_SYSTEM, answer_references

API_KEY = "sk-judge-test-secret"
JUDGE_MODEL, REFERENCE_MODEL = "judge-1", "reference-1"
JUDGE_TEMPERATURE, REFERENCE_TEMPERATURE = 0.2, 0.3
RULES = json.loads((Path(__file__).parents[1] / "assets" / "llava_bench" / "rule.json").read_text())
REVIEW = re.compile(
    r"^\[Context\]\n(?P<context>.*)\n\n\[Question\]\n(?P<question>.*)\n\n"
    r"\[Assistant 1\]\n(?P<reference>.*)\n\n\[End of Assistant 1\]\n\n"
    r"\[Assistant 2\]\n(?P<answer>.*)\n\n\[End of Assistant 2\]\n\n\[System\]\n(?P<instruction>.*)\n\n$",
    re.DOTALL,
)
REFERENCE_QUERY = re.compile(r"^\[Context\]\n(?P<context>.*)\n\n\[Question\]\n(?P<question>.*)$", re.DOTALL)

# ---- LLaVA-Bench in its official layouts, and what the reference scripts make of it ----------------

# In-the-Wild: context.jsonl keyed by image, "caption" a string or a list joined by newlines.
WILD_CONTEXT = [
    {
        "id": "001",
        "image": "001.jpg",
        "caption": "A man irons clothes on a board on the roof of a yellow taxi.",
    },
    {
        "id": "002",
        "image": "002.jpg",
        "caption": ["A bowl of ramen with two eggs.", "Chopsticks lie on the right."],
    },
]
WILD_TEXT = {
    "001.jpg": "A man irons clothes on a board on the roof of a yellow taxi.",
    "002.jpg": "A bowl of ramen with two eggs.\nChopsticks lie on the right.",
}
# COCO: caps_boxes keyed by image; captions, a blank line, then "category: [box as Python prints it]".
COCO_CONTEXT = [
    {
        "id": "000000441147",
        "image": "000000441147.jpg",
        "captions": ["Two old suitcases stacked on each other.", "A black suitcase on a brown one."],
        "instances": [
            {"category": "suitcase", "bbox": [0.0, 0.188, 0.5, 0.9]},
            {"category": "suitcase", "bbox": [0.45, 0.2, 1, 0.95]},
        ],
    },
]
COCO_TEXT = {
    "000000441147.jpg": "Two old suitcases stacked on each other.\nA black suitcase on a brown one.\n\n"
    "suitcase: [0.0, 0.188, 0.5, 0.9]\nsuitcase: [0.45, 0.2, 1, 0.95]",
}


class FakeLLM:
    """The server described in the module docstring."""

    def __init__(self) -> None:
        self.plan: dict[str, str] = {}  # judge: question text -> "8 7", "malformed", "server_error", ...
        self.reference_plan: dict[str, str] = {}  # reference: question text -> "empty", "truncated", ...
        self.contexts: dict[str, str] = {}  # question text -> the context both LLMs must read
        self.rules: dict[str, str] = {}  # question text -> rule.json's judge text
        self.layouts: dict[str, str] = {}  # question text -> in_the_wild | coco
        self.references_given: dict[str, str] = {}
        self.requests: Counter[str] = Counter()  # judge requests per question
        self.reference_requests: Counter[str] = Counter()
        self.shape_errors: list[str] = []
        self.lock = threading.Lock()

    def expect(self, questions: list[dict[str, Any]], contexts: dict[str, str], layout: str) -> None:
        """What the requests about ``questions`` (official questions.jsonl records) must carry."""
        prefix = "llava_bench_" if layout == "in_the_wild" else ""
        for question in questions:
            self.contexts[question["text"]] = contexts[question["image"]]
            self.rules[question["text"]] = RULES[prefix + question["category"]]["prompt"]
            self.layouts[question["text"]] = layout

    def reply(self, body: dict[str, Any], authorization: str | None) -> tuple[int, dict[str, Any]]:
        if authorization != f"Bearer {API_KEY}":
            return 401, {"error": {"message": "invalid api key"}}
        problem = self._body_problem(body)
        if problem:
            with self.lock:
                self.shape_errors.append(problem)
            return 400, {"error": {"message": problem}}
        if body["messages"][0]["content"] == JUDGE_SYSTEM:
            return self._review(REVIEW.match(body["messages"][1]["content"]))
        return self._reference(REFERENCE_QUERY.match(body["messages"][1]["content"]))

    def _body_problem(self, body: dict[str, Any]) -> str | None:
        if set(body) != {"model", "messages", "temperature", "max_tokens"} or body["max_tokens"] != 1024:
            return f"body {sorted(body)}, max_tokens {body.get('max_tokens')}"
        messages = body["messages"]
        if [m["role"] for m in messages] != ["system", "user"]:
            return f"roles {[m['role'] for m in messages]}"
        system, content = messages[0]["content"], messages[1]["content"]
        judging = system == JUDGE_SYSTEM
        model, temperature = (
            (JUDGE_MODEL, JUDGE_TEMPERATURE) if judging else (REFERENCE_MODEL, REFERENCE_TEMPERATURE)
        )
        if (body["model"], body["temperature"]) != (model, temperature):
            return f"model {body['model']} at temperature {body['temperature']}"
        match = (REVIEW if judging else REFERENCE_QUERY).match(content)
        if match is None or match["question"] not in self.contexts:
            return f"content {content!r}"
        question = match["question"]
        if match["context"] != self.contexts[question]:
            return f"{question}: context {match['context']!r}, expected {self.contexts[question]!r}"
        if judging:
            if match["instruction"] != self.rules[question]:
                return f"{question}: instruction {match['instruction']!r} is not rule.json's"
            given = self.references_given.get(question)
            if given is not None and match["reference"] != given:
                return f"{question}: Assistant 1 {match['reference']!r} is not the reference LLM's answer"
        else:
            # The reference LLM is told the context the way rule.json tells the judge, per layout.
            described = {
                "coco": "five descriptive sentences describing the same image and the bounding box",
                "in_the_wild": "a few sentences describing the image.",
            }[self.layouts[question]]
            if system != REFERENCE_SYSTEM[self.layouts[question]] or described not in system:
                return f"{question}: reference system message {system!r}"
        return None

    def _review(self, match: re.Match[str]) -> tuple[int, dict[str, Any]]:
        question = match["question"]
        with self.lock:
            self.requests[question] += 1
            seen = self.requests[question]
        behaviour = self.plan.get(question, "5 5")
        if behaviour == "server_error":
            return 500, {"error": {"message": "overloaded"}}
        if behaviour.startswith("rate_limited_once:"):
            if seen == 1:
                return 429, {"error": {"message": "slow down"}}
            behaviour = behaviour.split(":", 1)[1]
        text = (
            "Assistant 2 answers well.\n8 7"
            if behaviour == "malformed"
            else f"{behaviour}\nAssistant 1 is thorough; Assistant 2 is brief."
        )
        return 200, completion(text)

    def _reference(self, match: re.Match[str]) -> tuple[int, dict[str, Any]]:
        question = match["question"]
        with self.lock:
            self.reference_requests[question] += 1
        behaviour = self.reference_plan.get(question, "good")
        text = f"Reference answer to: {question}"
        if behaviour == "server_error":
            return 500, {"error": {"message": "overloaded"}}
        if behaviour == "empty":
            return 200, completion("  ")
        if behaviour == "truncated":
            return 200, completion(text, finish_reason="length")
        with self.lock:
            self.references_given[question] = text
        return 200, completion(text)


def completion(text: str, finish_reason: str = "stop") -> dict[str, Any]:
    return {"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}]}


@pytest.fixture
def llm_server(serve_chat_completions) -> Iterator[tuple[FakeLLM, str]]:
    fake = FakeLLM()
    with serve_chat_completions(fake.reply) as base_url:
        yield fake, base_url


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)  # both LLMs' key comes from the environment


def judge_config(base_url: str) -> JudgeConfig:
    return JudgeConfig(
        base_url=base_url, model=JUDGE_MODEL, max_concurrency=3, max_retries=2, backoff_initial_s=0.01
    )


def reference_config(base_url: str) -> ReferenceConfig:
    return ReferenceConfig(
        base_url=base_url,
        model=REFERENCE_MODEL,
        temperature=REFERENCE_TEMPERATURE,
        max_concurrency=3,
        max_retries=1,
        backoff_initial_s=0.01,
    )


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


# ---- parsing, prompt and rules -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("review", "expected"),
    [
        ("8 7\nBoth are good.", (8.0, 7.0)),
        ("8, 7\nBoth are good.", (8.0, 7.0)),
        ("8,7", (8.0, 7.0)),
        ("  \n9 3\nwhy", (9.0, 3.0)),  # leading blank lines are not the first line of text
        ("8.5 7", (8.5, 7.0)),
        ("Scores: 8 7", None),
        ("Assistant 1: 8\nAssistant 2: 7", None),
        ("8\n7", None),
        ("8 7 6", None),
        ("11 7", None),  # outside 1-10
        ("0 7", None),
        ("", None),
    ],
)
def test_scores_come_from_the_first_line(review, expected):
    assert parse_scores(review) == expected


@pytest.mark.parametrize("layout", ["in_the_wild", "coco"])
@pytest.mark.parametrize("category", ["conv", "detail", "complex"])
def test_judge_instruction_is_rule_json_byte_for_byte(tmp_path, layout, category):
    contexts = WILD_CONTEXT if layout == "in_the_wild" else COCO_CONTEXT
    image = contexts[0]["image"]
    questions = write_jsonl(
        tmp_path / "questions.jsonl", [{"question_id": 0, "image": image, "text": "Q?", "category": category}]
    )
    (question,) = load_questions(str(questions), str(write_jsonl(tmp_path / "context.jsonl", contexts)))
    key = f"llava_bench_{category}" if layout == "in_the_wild" else category
    assert question.rule_key == key
    assert question.judge_rule == RULES[key]["prompt"]
    # The reference's text has a space before its first line break; the old instruction had none.
    assert "image. \nPlease rate" in question.judge_rule or "right y. \nPlease rate" in question.judge_rule


def test_judge_prompt_layout():
    rule = RULES["conv"]["prompt"]
    request = ReviewRequest("1", "detail", "a red square", "What is it?", "A square.", "Red.", rule)
    system, user = judge_messages(request)
    assert system == {"role": "system", "content": JUDGE_SYSTEM}
    match = REVIEW.match(user["content"])
    assert match is not None
    assert (
        match["context"],
        match["question"],
        match["reference"],
        match["answer"],
        match["instruction"],
    ) == (
        "a red square",
        "What is it?",
        "A square.",
        "Red.",
        rule,
    )
    with pytest.raises(
        ValueError, match="question 1 has no context; the judge must read the image's description"
    ):
        judge_messages(ReviewRequest("1", "detail", " ", "What is it?", "A square.", "Red.", rule))


# ---- the bug: the judge reads the official context files -----------------------------------------

WILD_QUESTIONS = [  # official In-the-Wild questions.jsonl: no context of their own
    {
        "question_id": 0,
        "image": "001.jpg",
        "text": "What is unusual about this image?",
        "category": "complex",
    },
    {"question_id": 1, "image": "002.jpg", "text": "What is in the bowl?", "category": "conv"},
    {"question_id": 2, "image": "002.jpg", "text": "Describe this photo in detail.", "category": "detail"},
]
COCO_QUESTIONS = [  # official COCO qa90_questions.jsonl
    {
        "question_id": 0,
        "image": "000000441147.jpg",
        "text": "What color are the suitcases?",
        "category": "conv",
    },
    {"question_id": 1, "image": "000000441147.jpg", "text": "Describe the image.", "category": "detail"},
]


@pytest.mark.parametrize(
    ("layout", "questions", "contexts", "texts"),
    [
        ("in_the_wild", WILD_QUESTIONS, WILD_CONTEXT, WILD_TEXT),
        ("coco", COCO_QUESTIONS, COCO_CONTEXT, COCO_TEXT),
    ],
)
def test_the_judge_reads_each_images_context_from_the_official_layout(
    llm_server, api_key, tmp_path, layout, questions, contexts, texts
):
    fake, base_url = llm_server
    fake.expect(questions, texts, layout)
    fake.plan = {question["text"]: "8 6" for question in questions}
    questions_path = write_jsonl(tmp_path / "questions.jsonl", questions)
    context_path = write_jsonl(tmp_path / "context.jsonl", contexts)
    answers = write_jsonl(
        tmp_path / "answers.jsonl", [{"question_id": q["question_id"], "text": "ref"} for q in questions]
    )
    items = load_items(str(questions_path), str(context_path))
    outcomes = {item.id: Outcome(f"answer {item.id}") for item in items}

    _, summary = score(
        items, outcomes, load_references(str(answers)), judge_config(base_url), tmp_path / "r.jsonl"
    )

    assert fake.shape_errors == []  # every request carried its image's context and rule.json's text
    assert sum(fake.requests.values()) == len(questions)
    assert summary["metrics"]["relative_score"] == pytest.approx(75.0)
    reviews = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert {review["context"] for review in reviews} == {texts[q["image"]] for q in questions}
    assert all("N/A" not in review["context"] for review in reviews)


def test_a_question_without_its_images_context_stops_before_any_request(tmp_path):
    context = write_jsonl(
        tmp_path / "context.jsonl", [*WILD_CONTEXT, {"id": "003", "image": "003.jpg", "caption": ["", " "]}]
    )
    questions = write_jsonl(
        tmp_path / "questions.jsonl",
        [
            {"question_id": 0, "image": "001.jpg", "text": "Fine?", "category": "conv"},
            # The old layout: a context inside the question, an image the context file lacks.
            {"question_id": 1, "image": "009.jpg", "text": "A?", "category": "conv", "context": "a cat"},
            {"question_id": 2, "image": "009.jpg", "text": "B?", "category": "detail"},
            {"question_id": 3, "text": "No image?", "category": "complex"},
            {"question_id": 4, "image": "003.jpg", "text": "Empty?", "category": "detail"},
            {"question_id": 5, "image": "001.jpg", "text": "Math?", "category": "math"},
            {"question_id": 0, "image": "001.jpg", "text": "Again?", "category": "conv"},
        ],
    )
    with pytest.raises(ConfigError) as raised:
        load_items(str(questions), str(context))
    message = str(raised.value)
    assert re.search(
        r"2 question\(s\) no_context \(name an image the context file does not describe\), "
        r"e.g. \['1: 009.jpg \(its own `context` field is not read\)', '2: 009.jpg'\]",
        message,
    )
    assert "1 question(s) no_image" in message and "['3']" in message
    assert "1 question(s) empty_context" in message and "['4: 003.jpg']" in message
    assert "1 question(s) unknown_category" in message and "['5: math']" in message
    assert "1 question(s) duplicate_id" in message and "['0']" in message
    assert "(in_the_wild layout); fix the files so each question has one" in message

    boxless = {**COCO_CONTEXT[0], "instances": [{"category": "suitcase"}]}
    bad = write_jsonl(tmp_path / "bad.jsonl", [WILD_CONTEXT[0], {"image": "x"}, boxless])
    with pytest.raises(ConfigError, match=r"records \[1, 2\] \(2 of 3\) are not LLaVA-Bench context records"):
        load_items(str(questions), str(bad))
    with pytest.raises(ConfigError, match=r"mixes In-the-Wild \(1\) and COCO \(1\) records"):
        load_items(
            str(questions), str(write_jsonl(tmp_path / "mixed.jsonl", [WILD_CONTEXT[0], *COCO_CONTEXT]))
        )
    unset = EvaluateConfig(
        benchmark="llava_bench", data_path=str(questions), reference_answers=str(questions)
    )
    assert any(
        problem.startswith("evaluate.context is not set; llava_bench's judge reads each image's description")
        for problem in evaluate_problems(unset, check_model=False)
    )


# ---- reviews, scores and resume ------------------------------------------------------------------

QUESTIONS = [  # (id, category as LLaVA-Bench spells it, question, what the judge does)
    ("1", "conv", "What is on the table?", "8 6"),
    ("2", "conv", "What color is the car?", "6, 3"),
    ("3", "detail", "Describe the image.", "10,5"),
    ("4", "detail", "Describe the scene in detail.", "malformed"),
    ("5", "complex", "Why is this funny?", "4 4"),
    ("6", "complex", "What might happen next?", "rate_limited_once:6 9"),
    ("7", "complex", "What is unusual here?", "server_error"),
    ("8", "conv", "How many people are there?", "9 9"),  # no answer (image missing): never reviewed
]


@pytest.fixture
def bench_files(tmp_path) -> tuple[Path, Path, Path, list[dict[str, Any]]]:
    """questions.jsonl, context.jsonl (In-the-Wild layout), answers.jsonl and the question records."""
    records = [
        {"question_id": int(qid), "image": f"{int(qid) % 2 + 1:03d}.jpg", "text": text, "category": category}
        for qid, category, text, _ in QUESTIONS
    ]
    questions = write_jsonl(tmp_path / "questions.jsonl", records)
    context = write_jsonl(tmp_path / "context.jsonl", WILD_CONTEXT)
    answers = write_jsonl(
        tmp_path / "answers.jsonl",
        [{"question_id": int(qid), "text": f"reference {qid}"} for qid, *_ in QUESTIONS],
    )
    return questions, context, answers, records


def test_relative_scores_by_hand_and_resume(llm_server, api_key, bench_files, tmp_path):
    fake, base_url = llm_server
    questions, context, answers, records = bench_files
    fake.expect(records, WILD_TEXT, "in_the_wild")
    fake.plan = {text: behaviour for _, _, text, behaviour in QUESTIONS}
    items = load_items(str(questions), str(context))
    assert [item.fields["category"] for item in items[:3]] == ["conversation", "conversation", "detail"]
    references = load_references(str(answers))
    outcomes = {item.id: Outcome(f"answer {item.id}") for item in items}
    outcomes["8"] = Outcome(None, "image_missing", "no image file at x.jpg")
    reviews = tmp_path / "out" / "reviews.jsonl"

    rows, summary = score(items, outcomes, references, judge_config(base_url), reviews)

    assert fake.shape_errors == []
    table = summary["by_category"]
    # conversation: reference (8 + 6) / 2 = 7, model (6 + 3) / 2 = 4.5 -> 64.29
    assert table["conversation"]["relative"] == pytest.approx(100 * 4.5 / 7)
    assert (table["conversation"]["reference_mean"], table["conversation"]["model_mean"]) == (7.0, 4.5)
    # detail: the malformed review is counted and excluded, not averaged as -1: 5 / 10 -> 50
    assert table["detail"] == {
        "reviews": 2,
        "unparsable": 1,
        "scored": 1,
        "reference_mean": 10.0,
        "model_mean": 5.0,
        "relative": 50.0,
    }
    # complex: 429 then "6 9"; the 500 fails after its retries and is left out: (4 + 9) / (4 + 6) -> 130
    assert table["complex"]["relative"] == pytest.approx(130.0)
    assert table["complex"]["reviews"] == 2
    # overall over the five scored reviews: 27 / 34
    assert table["overall"]["relative"] == pytest.approx(100 * (6 + 3 + 5 + 4 + 9) / (8 + 6 + 10 + 4 + 6))
    assert table["overall"]["unparsable"] == 1
    metrics = summary["metrics"]
    assert metrics["relative_score"] == table["overall"]["relative"]
    assert metrics["unparsable_reviews/detail"] == 1 and metrics["review_failed"] == 1
    assert summary["judge"]["requests"] == 7 and summary["judge"]["from_journal"] == 0
    assert summary["judge"]["failed_examples"] == ["7: HTTP 500 after 3 attempts"]
    assert fake.requests["What might happen next?"] == 2  # the 429, then the retry
    assert fake.requests["What is unusual here?"] == 3
    assert "How many people are there?" not in fake.requests
    by_id = {row["id"]: row for row in rows}
    assert by_id["1"]["scores"] == [8.0, 6.0] and by_id["4"]["scores"] is None
    assert (
        by_id["7"]["review_error"] == "HTTP 500 after 3 attempts" and by_id["8"]["error"] == "image_missing"
    )
    assert len(reviews.read_text().splitlines()) == 6  # one line per review received, appended

    # A rerun asks only for what has no review yet (the failed one) and for a changed answer.
    before = Counter(fake.requests)
    outcomes["2"] = Outcome("a different answer")
    fake.plan["What color is the car?"] = "6 6"
    _, again = score(items, outcomes, references, judge_config(base_url), reviews)
    new = fake.requests - before
    assert dict(new) == {"What is unusual here?": 3, "What color is the car?": 1}
    assert again["judge"]["requests"] == 2 and again["judge"]["from_journal"] == 5
    assert again["by_category"]["conversation"]["model_mean"] == 6.0
    assert again["by_category"]["detail"] == table["detail"]

    # Another judge model's reviews are its own: nothing is reused (the server refuses the name: 400s).
    other = judge_config(base_url).model_copy(update={"model": "judge-2"})
    _, third = score(items, outcomes, references, other, reviews)
    assert third["judge"]["from_journal"] == 0 and third["judge"]["review_failed"] == 7
    assert len(fake.shape_errors) == 7 and all("model judge-2" in error for error in fake.shape_errors)


def test_reviews_judged_without_the_context_are_asked_again(llm_server, api_key, bench_files, tmp_path):
    """A journal line of the old judge (``[Context] N/A``, no fingerprint) must not be reused."""
    fake, base_url = llm_server
    questions, context, answers, records = bench_files
    fake.expect(records, WILD_TEXT, "in_the_wild")
    items = load_items(str(questions), str(context), limit=2)
    outcomes = {item.id: Outcome(f"answer {item.id}") for item in items}
    reviews = write_jsonl(
        tmp_path / "reviews.jsonl",
        [
            {
                "id": "1",
                "category": "conversation",
                "question": QUESTIONS[0][2],
                "reference": "reference 1",
                "answer": "answer 1",
                "review": "10 1\nN/A context",
                "scores": [10.0, 1.0],
            },
        ],
    )
    _, summary = score(items, outcomes, load_references(str(answers)), judge_config(base_url), reviews)
    assert fake.shape_errors == []
    assert summary["judge"]["requests"] == 2 and summary["judge"]["from_journal"] == 0
    assert summary["by_category"]["overall"]["model_mean"] == 5.0


def test_a_refused_key_stops_the_run_with_the_judge_settings_named(
    llm_server, monkeypatch, bench_files, tmp_path
):
    _, base_url = llm_server
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    questions, context, answers, _ = bench_files
    items = load_items(str(questions), str(context))
    outcomes = {item.id: Outcome("answer") for item in items}
    with pytest.raises(
        EndpointError,
        match=r"judge endpoint refuses requests: HTTP 401 .* Check evaluate.judge.base_url .*evaluate.judge.api_key",
    ):
        score(items, outcomes, load_references(str(answers)), judge_config(base_url), tmp_path / "r.jsonl")


# ---- reference answers ---------------------------------------------------------------------------


def test_reference_answers_count_what_is_missing_and_resume(llm_server, api_key, bench_files, tmp_path):
    fake, base_url = llm_server
    questions, context, _, records = bench_files
    fake.expect(records, WILD_TEXT, "in_the_wild")
    fake.reference_plan = {
        "What color is the car?": "empty",
        "Describe the image.": "truncated",
        "Why is this funny?": "server_error",
    }
    output = tmp_path / "refs" / "answers_reference.jsonl"
    config = EvaluateConfig(
        benchmark="llava_bench",
        data_path=str(questions),
        context=str(context),
        reference_answers=str(output),
        reference=reference_config(base_url),
    )

    report = answer_references(config)

    assert fake.shape_errors == []
    assert (report["questions"], report["written"]) == (8, 5)
    assert report["skipped"] == {"empty_reply": 1, "truncated": 1, "request_failed": 1}
    assert report["examples"]["request_failed"] == ["5: HTTP 500 after 2 attempts"]
    assert report["examples"]["truncated"] == ["3: the reply stopped at evaluate.reference.max_tokens"]
    assert report["requests"] == {"this_run": 8, "from_journal": 0}
    written = [json.loads(line) for line in output.read_text().splitlines()]
    assert written[0] == {
        "question_id": 1,
        "text": "Reference answer to: What is on the table?",
        "category": "conv",
        "model_id": REFERENCE_MODEL,
    }
    assert [answer["question_id"] for answer in written] == [1, 4, 6, 7, 8]
    assert json.loads(Path(f"{output}.report.json").read_text())["skipped"] == report["skipped"]

    # The rerun, through the CLI, asks only for the three missing answers; all are good now.
    fake.reference_plan = {}
    before = Counter(fake.reference_requests)
    config_file = tmp_path / "bench.yaml"
    config_file.write_text(
        yaml.safe_dump({"evaluate": config.model_dump(mode="json", exclude={"reference"})})
    )
    overrides = [
        f"evaluate.reference.{key}={value}"
        for key, value in reference_config(base_url).model_dump().items()
        if value is not None and key != "api_key"
    ]
    assert main(["reference-answers", "--config", str(config_file), *overrides]) == 0
    assert dict(fake.reference_requests - before) == {
        "What color is the car?": 1,
        "Describe the image.": 1,
        "Why is this funny?": 1,
    }
    assert [json.loads(line)["question_id"] for line in output.read_text().splitlines()] == list(range(1, 9))

    # A context that changes is asked again: the journaled answer read the old one.
    changed = [dict(WILD_CONTEXT[0]), WILD_CONTEXT[1]]
    changed[0]["caption"] = "A man irons clothes."
    write_jsonl(context, changed)
    fake.contexts.update({r["text"]: "A man irons clothes." for r in records if r["image"] == "001.jpg"})
    before = Counter(fake.reference_requests)
    report = answer_references(config)
    assert report["requests"] == {"this_run": 4, "from_journal": 4}  # ids 2, 4, 6, 8 show 001.jpg
    assert fake.shape_errors == []


def test_reference_answers_stop_on_a_refused_key_and_name_the_section(
    llm_server, monkeypatch, bench_files, tmp_path
):
    _, base_url = llm_server
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    questions, context, _, _ = bench_files
    config = EvaluateConfig(
        data_path=str(questions),
        context=str(context),
        reference_answers=str(tmp_path / "refs.jsonl"),
        reference=reference_config(base_url),
    )
    with pytest.raises(
        ConfigError,
        match=r"reference endpoint refuses requests: HTTP 401 .*evaluate.reference.api_key.*rerun to resume",
    ):
        answer_references(config)
    with pytest.raises(ConfigError, match=r"evaluate.reference.model is not set; name the text-only LLM"):
        answer_references(config.model_copy(update={"reference": ReferenceConfig()}))


def test_llava_bench_end_to_end_from_reference_answers(
    llm_server, api_key, trained_model_dir, synthetic_eval_dir, tmp_path
):
    """LLaVA-Bench (COCO) on one's own images: reference LLM -> the model -> judge -> relative score."""
    fake, base_url = llm_server
    images = synthetic_eval_dir / "images"
    contexts = [
        {
            "id": f"eval_{n:06d}",
            "image": f"eval_{n:06d}.png",
            "captions": [f"Shapes on a grey background, picture {n}.", "Flat coloured shapes."],
            "instances": [{"category": "shape", "bbox": [0.1, 0.2, 0.5, 0.6]}],
        }
        for n in range(2)
    ]
    texts = {
        f"eval_{n:06d}.png": f"Shapes on a grey background, picture {n}.\nFlat coloured shapes.\n\n"
        "shape: [0.1, 0.2, 0.5, 0.6]"
        for n in range(2)
    }
    bench = [
        {
            "question_id": 0,
            "image": "eval_000000.png",
            "text": "What color is the shape?",
            "category": "detail",
        },
        {
            "question_id": 1,
            "image": "eval_000001.png",
            "text": "How many shapes are there?",
            "category": "conv",
        },
        {"question_id": 2, "image": "eval_000001.png", "text": "Why draw shapes?", "category": "complex"},
    ]
    fake.expect(bench, texts, "coco")
    fake.plan = {
        "What color is the shape?": "7 5",
        "How many shapes are there?": "8 8",
        "Why draw shapes?": "malformed",
    }
    config = EvaluateConfig(
        model=str(trained_model_dir),
        benchmark="llava_bench",
        data_path=str(write_jsonl(tmp_path / "qa_questions.jsonl", bench)),
        context=str(write_jsonl(tmp_path / "caps_boxes.jsonl", contexts)),
        reference_answers=str(tmp_path / "answers_reference.jsonl"),
        image_root=str(images),
        output_dir=str(tmp_path / "out"),
        max_new_tokens=12,
        num_actors=0,
        judge=judge_config(base_url),
        reference=reference_config(base_url),
    )

    assert answer_references(config)["written"] == 3
    summary = run_evaluate(config)

    assert fake.shape_errors == []  # the judge saw the reference LLM's answers as Assistant 1
    assert set(fake.references_given) == {question["text"] for question in bench}
    assert sum(fake.requests.values()) == 3
    assert summary["counts"]["answered"] == 3
    assert summary["by_category"]["detail"]["relative"] == pytest.approx(100 * 5 / 7)
    assert summary["by_category"]["overall"]["relative"] == pytest.approx(100 * (5 + 8) / (7 + 8))
    assert summary["metrics"]["unparsable_reviews"] == 1
    out = tmp_path / "out"
    assert {path.name for path in out.iterdir()} == {"results.jsonl", "summary.json", "reviews.jsonl"}
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [row["category"] for row in rows] == ["detail", "conversation", "complex"]
    assert rows[0]["question"] == "<image>\nWhat color is the shape?"
    assert rows[1]["reference"] == "Reference answer to: How many shapes are there?"
    for path in [*out.iterdir(), *tmp_path.glob("answers_reference*")]:
        assert API_KEY not in path.read_text()

    # Greedy answers are the same on a rerun: every review comes from the journal.
    before = sum(fake.requests.values())
    again = run_evaluate(config)
    assert sum(fake.requests.values()) == before
    assert again["judge"]["from_journal"] == 3 and again["judge"]["requests"] == 0
    assert again["by_category"] == summary["by_category"]
