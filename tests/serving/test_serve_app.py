"""``llava-ray serve``'s app on a local Ray, driven by the real ``openai`` client: answers, streams, batches, refusals.

The served model is the tiny one trained on the synthetic held-out questions (tests/conftest.py), so
its greedy answers are known: the endpoint must give exactly what the evaluation's own generation gives.
"""

from __future__ import annotations

import base64
import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from llava_ray.config.evaluation import JudgeConfig
from llava_ray.evaluation.judge import ReviewRequest, review_answers
from llava_ray.evaluation.loaded_model import load_inference_model, load_pixels
from llava_ray.model.generate import generate

MODEL_NAME = "tiny-llava"  # tests/serving/conftest.py serves the model under this name

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.api, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def questions(trained_model_dir, synthetic_eval_dir) -> list[dict]:
    """Held-out questions with their image as a data URL and the evaluation's greedy answer (16 tokens)."""
    loaded = load_inference_model(str(trained_model_dir))
    items = json.loads((synthetic_eval_dir / "eval.json").read_text())[:6]
    out = []
    for item in items:
        path = synthetic_eval_dir / item["image"]
        question = item["conversations"][0]["value"].replace("<image>", "").strip()
        pixels = load_pixels(str(path), loaded.tower_input)
        (expected,) = generate(
            loaded.model, loaded.tokenizer, loaded.template, [(item["conversations"][:1], pixels)], 16
        )
        out.append({"question": question, "image": data_url(path), "expected": expected})
    return out


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def user_message(question: dict) -> dict:
    return {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": question["image"]}},
            {"type": "text", "text": question["question"]},
        ],
    }


def ask(client: openai.OpenAI, question: dict, **options):
    return client.chat.completions.create(
        model=MODEL_NAME, messages=[user_message(question)], **{"temperature": 0, **options}
    )


def test_models_lists_the_served_model(client):
    assert [model.id for model in client.models.list()] == [MODEL_NAME]


def test_answers_are_the_evaluations_answers(client, questions):
    for question in questions[:3]:
        reply = ask(client, question)
        assert reply.choices[0].message.content == question["expected"]
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.model == MODEL_NAME
        assert reply.usage.prompt_tokens > 16 and reply.usage.completion_tokens > 0
    assert all(q["expected"].strip() for q in questions), "the trained model answers something"


def streamed_text(chunks) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_streamed_answer_is_the_same_text_in_chunks(client, questions):
    question = questions[0]
    chunks = list(ask(client, question, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert streamed_text(chunks) == question["expected"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    # (That answers arrive a decoding step at a time is tests/serving/test_engine.py's: this model answers in one token.)


def test_concurrent_callers_are_all_answered_in_shared_batches(client, served, questions):
    before = served.get("/stats")
    answers: dict[int, str] = {}

    def call(index: int) -> None:
        question = questions[index % len(questions)]
        if index % 2:
            stream = ask(client, question, stream=True)
            answers[index] = streamed_text(stream)
        else:
            answers[index] = ask(client, question).choices[0].message.content

    threads = [threading.Thread(target=call, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    after = served.get("/stats")
    assert {i: answers.get(i) for i in range(8)} == {
        i: questions[i % len(questions)]["expected"] for i in range(8)
    }
    batches = after["batches"] - before["batches"]
    assert after["largest_batch"] >= 2 and batches < 8, f"8 requests in {batches} batches: {after}"


def tiny_png() -> str:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (0, 90, 200)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_and(text: str, url: str) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]


BAD_REQUESTS = {
    "unknown_model": ({"model": "gpt-4o"}, 404, "model_not_found"),
    "no_text": (
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "  "}]}]},
        400,
        "missing_text",
    ),
    "undecodable_image": (
        {"messages": [{"role": "user", "content": image_and("What?", "data:image/png;base64,aGVsbG8=")}]},
        400,
        "invalid_image",
    ),
    "oversized_image": (
        {
            "messages": [
                {"role": "user", "content": image_and("What?", "data:image/png;base64," + "A" * 90_000)}
            ]
        },
        400,
        "image_too_large",
    ),
    "too_many_images": (
        {
            "messages": [
                {"role": "user", "content": image_and("What?", "IMAGE")},
                {"role": "assistant", "content": "A circle."},
                {"role": "user", "content": image_and("And here?", "IMAGE")},
            ]
        },
        400,
        "too_many_images",
    ),
    "context_too_long": (
        {"messages": [{"role": "user", "content": "shape " * 1500}]},
        400,
        "context_length_exceeded",
    ),
    "max_tokens_past_the_context": ({"max_tokens": 5000}, 400, "context_length_exceeded"),
    "remote_image": (
        {"messages": [{"role": "user", "content": image_and("What?", "https://example.com/cat.png")}]},
        400,
        "remote_image_refused",
    ),
    "bad_temperature": ({"temperature": 5}, 400, "invalid_request"),
    "two_choices": ({"n": 2}, 400, "unsupported"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_gets_its_status_and_code_and_the_replica_keeps_serving(client, served, questions, case):
    replica = served.get("/health")["replica"]
    fields, status, code = BAD_REQUESTS[case]
    request = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "What?"}], **fields}
    request["messages"] = json.loads(
        json.dumps(request["messages"]).replace('"IMAGE"', json.dumps(tiny_png()))
    )
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(**request)
    assert raised.value.status_code == status
    error = raised.value.body
    assert error["code"] == code, error
    assert error["message"]
    assert ask(client, questions[0]).choices[0].message.content == questions[0]["expected"]
    assert served.get("/health")["replica"] == replica, "the same replica answers: none was restarted"


def post_raw(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_malformed_and_oversized_bodies_are_refused(served):
    status, body = post_raw(f"{served.api}/chat/completions", b"{not json")
    assert (status, body["error"]["code"]) == (400, "invalid_request")
    status, body = post_raw(f"{served.api}/chat/completions", b" " * (served.config.max_request_bytes + 1))
    assert (status, body["error"]["code"]) == (413, "request_too_large")
    assert "serve.max_request_bytes" in body["error"]["message"]


def test_the_judge_points_at_the_endpoint_with_no_code_change(served, tmp_path):
    """LLaVA-Bench's judge (llava_ray.evaluation.judge), configured only: a self-hosted judge endpoint."""
    judge = JudgeConfig(base_url=served.api, model=MODEL_NAME, api_key="unused", max_tokens=8, max_retries=0)
    requests = [
        ReviewRequest(
            str(i), "conversation", "A red circle.", "What shape?", "A circle.", answer, "Rate them."
        )
        for i, answer in enumerate(["circle", "square"])
    ]
    run = review_answers(requests, judge, tmp_path / "reviews.jsonl")
    assert (run.requests, run.failed) == (2, {})
    reviews = [json.loads(line) for line in (tmp_path / "reviews.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in reviews) == ["0", "1"]
    assert all(isinstance(r["review"], str) for r in reviews)
