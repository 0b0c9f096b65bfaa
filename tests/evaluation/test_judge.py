"""The LLaVA-Bench judge against a real OpenAI-compatible server on loopback.

:class:`FakeJudge` serves ``POST /v1/chat/completions`` from a ``ThreadingHTTPServer`` in a
background thread on a free port. It checks each request's shape (system message, the
``[Context]``/``[Question]``/``[Assistant 1]``/``[Assistant 2]``/``[System]`` layout, the key in
the ``Authorization`` header), recognises the question by its text, and answers by a per-question
plan: fixed scores, a malformed first line, a 429 before a good reply, or 500 on every attempt.
It counts requests per question, so resume is checked by what the server saw.
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from llava_ray.config.evaluation import EvaluateConfig, JudgeConfig
from llava_ray.endpoints.client import EndpointError
from llava_ray.evaluation.items import Outcome
from llava_ray.evaluation.job import run_evaluate
from llava_ray.evaluation.judge import (
    JUDGE_INSTRUCTION,
    JUDGE_SYSTEM,
    ReviewRequest,
    judge_messages,
    load_items,
    load_references,
    parse_scores,
    score,
)

API_KEY = "sk-judge-test-secret"
QUESTION = re.compile(
    r"^\[Context\]\n(?P<context>.*)\n\n\[Question\]\n(?P<question>.*)\n\n"
    r"\[Assistant 1\]\n(?P<reference>.*)\n\n\[End of Assistant 1\]\n\n"
    r"\[Assistant 2\]\n(?P<answer>.*)\n\n\[End of Assistant 2\]\n\n\[System\]\n(?P<instruction>.*)\n\n$",
    re.DOTALL,
)


class FakeJudge:
    """The server described in the module docstring; ``plan`` maps question text -> reply or behaviour."""

    def __init__(self) -> None:
        self.plan: dict[str, str] = {}
        self.requests: Counter[str] = Counter()
        self.shape_errors: list[str] = []
        self.lock = threading.Lock()

    def reply(self, body: dict, authorization: str | None) -> tuple[int, dict]:
        if authorization != f"Bearer {API_KEY}":
            return 401, {"error": {"message": "invalid api key"}}
        messages = body["messages"]
        if messages[0] != {"role": "system", "content": JUDGE_SYSTEM} or len(messages) != 2:
            self.shape_errors.append(f"messages: {messages}")
        match = QUESTION.match(messages[-1]["content"])
        if match is None or match["instruction"] != JUDGE_INSTRUCTION:
            self.shape_errors.append(f"content: {messages[-1]['content']!r}")
            return 400, {"error": {"message": "bad request"}}
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
        if behaviour == "malformed":
            text = "Assistant 2 answers well.\n8 7"
        else:
            text = f"{behaviour}\nAssistant 1 is thorough; Assistant 2 is brief."
        return 200, {
            "choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]
        }


@pytest.fixture
def judge_server(get_free_port) -> Iterator[tuple[FakeJudge, str]]:
    fake = FakeJudge()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status, payload = fake.reply(body, self.headers.get("Authorization"))
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 429:
                self.send_header("Retry-After", "0")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:  # keep test output quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", get_free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake, f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)  # the judge's key comes from the environment


def judge_config(base_url: str) -> JudgeConfig:
    return JudgeConfig(
        base_url=base_url, model="judge-1", max_concurrency=3, max_retries=2, backoff_initial_s=0.01
    )


# ---- parsing and prompt --------------------------------------------------------------------------


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


def test_judge_prompt_layout():
    request = ReviewRequest(
        "1", "detail", "a red square: [0.1, 0.1, 0.5, 0.5]", "What is it?", "A square.", "Red."
    )
    system, user = judge_messages(request)
    assert system == {"role": "system", "content": JUDGE_SYSTEM}
    match = QUESTION.match(user["content"])
    assert match is not None
    assert (match["context"], match["question"], match["reference"], match["answer"]) == (
        "a red square: [0.1, 0.1, 0.5, 0.5]",
        "What is it?",
        "A square.",
        "Red.",
    )
    assert "first output a single line containing only two values" in JUDGE_INSTRUCTION


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
def bench_files(tmp_path) -> tuple[Path, Path]:
    questions = tmp_path / "questions.jsonl"
    answers = tmp_path / "answers.jsonl"
    questions.write_text(
        "".join(
            json.dumps(
                {"question_id": int(qid), "text": text, "category": category, "context": f"context {qid}"}
            )
            + "\n"
            for qid, category, text, _ in QUESTIONS
        )
    )
    answers.write_text(
        "".join(
            json.dumps({"question_id": int(qid), "text": f"reference {qid}"}) + "\n" for qid, *_ in QUESTIONS
        )
    )
    return questions, answers


def test_relative_scores_by_hand_and_resume(judge_server, api_key, bench_files, tmp_path):
    fake, base_url = judge_server
    fake.plan = {text: behaviour for _, _, text, behaviour in QUESTIONS}
    questions, answers = bench_files
    items = load_items(str(questions))
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


def test_a_refused_key_stops_the_run_with_the_judge_settings_named(
    judge_server, monkeypatch, bench_files, tmp_path
):
    _, base_url = judge_server
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    questions, answers = bench_files
    items = load_items(str(questions))
    outcomes = {item.id: Outcome("answer") for item in items}
    with pytest.raises(
        EndpointError,
        match=r"judge endpoint refuses requests: HTTP 401 .* Check evaluate.judge.base_url .*evaluate.judge.api_key",
    ):
        score(items, outcomes, load_references(str(answers)), judge_config(base_url), tmp_path / "r.jsonl")


def test_llava_bench_end_to_end_resumes(
    judge_server, api_key, trained_model_dir, synthetic_eval_dir, tmp_path
):
    fake, base_url = judge_server
    questions, answers = tmp_path / "questions.jsonl", tmp_path / "answers.jsonl"
    bench = [
        (0, "images/eval_000000.png", "What color is the shape?", "detail", "7 5"),
        (1, "images/eval_000001.png", "How many shapes are there?", "conv", "8 8"),
        (2, None, "What is 2 plus 3?", "complex", "malformed"),
    ]
    questions.write_text(
        "".join(
            json.dumps(
                {
                    "question_id": qid,
                    "text": text,
                    "category": category,
                    **({"image": image} if image else {}),
                }
            )
            + "\n"
            for qid, image, text, category, _ in bench
        )
    )
    answers.write_text(
        "".join(json.dumps({"question_id": qid, "text": f"reference {qid}"}) + "\n" for qid, *_ in bench)
    )
    fake.plan = {text: behaviour for _, _, text, _, behaviour in bench}
    config = EvaluateConfig(
        model=str(trained_model_dir),
        benchmark="llava_bench",
        data_path=str(questions),
        reference_answers=str(answers),
        image_root=str(synthetic_eval_dir),
        output_dir=str(tmp_path / "out"),
        max_new_tokens=12,
        num_actors=0,
        judge=judge_config(base_url),
    )
    summary = run_evaluate(config)

    assert fake.shape_errors == []
    assert summary["counts"]["answered"] == 3
    assert summary["by_category"]["detail"]["relative"] == pytest.approx(100 * 5 / 7)
    assert summary["by_category"]["overall"]["relative"] == pytest.approx(100 * (5 + 8) / (7 + 8))
    assert summary["metrics"]["unparsable_reviews"] == 1
    out = tmp_path / "out"
    assert {path.name for path in out.iterdir()} == {"results.jsonl", "summary.json", "reviews.jsonl"}
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [row["category"] for row in rows] == ["detail", "conversation", "complex"]
    assert rows[0]["question"] == "<image>\nWhat color is the shape?"
    assert rows[2]["question"] == "What is 2 plus 3?"  # text-only: no placeholder added
    for path in out.iterdir():
        assert API_KEY not in path.read_text()

    # Greedy answers are the same on a rerun: every review comes from the journal.
    before = sum(fake.requests.values())
    again = run_evaluate(config)
    assert sum(fake.requests.values()) == before
    assert again["judge"]["from_journal"] == 3 and again["judge"]["requests"] == 0
    assert again["by_category"] == summary["by_category"]
