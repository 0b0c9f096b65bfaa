"""Requests checked before they reach a model: messages -> LLaVA turns, images, and every refusal's status and code."""

from __future__ import annotations

import base64
import io
import re

import pytest
from PIL import Image

from llava_ray.config.serve import ServeConfig, serve_problems
from llava_ray.serving.protocol import ChatRequest, RequestError, check_request, image_bytes, parse_messages

CONFIG = ServeConfig(model="/models/run/final")


def png_data_url(size: tuple[int, int] = (8, 6)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_messages_become_llava_turns_with_the_image_at_its_messages_start():
    url = png_data_url()
    parsed = parse_messages(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "What colour?"}, image_part(url)]},
            {"role": "assistant", "content": "Red."},
            {"role": "user", "content": "And the shape?"},
        ],
        CONFIG,
    )
    assert parsed.system == "Be brief."
    assert parsed.conversation == [
        {"from": "human", "value": "<image>\nWhat colour?"},
        {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "And the shape?"},
    ]
    assert parsed.image_urls == [url]


def bad(messages, config=CONFIG):
    with pytest.raises(RequestError) as raised:
        parse_messages(messages, config)
    return raised.value


@pytest.mark.parametrize(
    ("messages", "code", "message"),
    [
        ([{"role": "user", "content": ""}], "missing_text", r"has no text"),
        (
            [{"role": "user", "content": [image_part("data:image/png;base64,AAAA")]}],
            "missing_text",
            "no text",
        ),
        ([{"role": "tool", "content": "x"}], "invalid_message", r"role 'tool'"),
        ([{"role": "user", "content": "a <image> b"}], "invalid_message", r"send images as image_url parts"),
        ([{"role": "user", "content": [{"type": "audio", "x": 1}]}], "invalid_message", r"type 'audio'"),
        ([{"role": "user", "content": 5}], "invalid_message", r"string or a list of parts"),
        (
            [{"role": "user", "content": [image_part("a"), image_part("b"), {"type": "text", "text": "x"}]}],
            "too_many_images",
            r"one image per message",
        ),
        (
            [
                {"role": "user", "content": [image_part("a"), {"type": "text", "text": "x"}]},
                {"role": "assistant", "content": "y"},
                {"role": "user", "content": [image_part("b"), {"type": "text", "text": "z"}]},
            ],
            "too_many_images",
            r"at most 1 per request \(serve.max_images_per_request\)",
        ),
        (
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
            "no_question",
            r"must end with the user's turn",
        ),
        (
            [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}],
            "roles_not_alternating",
            "alternate",
        ),
        (
            [{"role": "assistant", "content": [image_part("a"), {"type": "text", "text": "x"}]}],
            "invalid_message",
            r"only user messages may carry images",
        ),
    ],
)
def test_each_malformed_conversation_is_a_400_with_its_code(messages, code, message):
    error = bad(messages)
    assert (error.status, error.code) == (400, code)
    assert error.body()["error"]["type"] == "invalid_request_error"
    assert re.search(message, error.message), error.message


def test_images_decode_from_data_urls_within_the_size_limit():
    url = png_data_url()
    assert image_bytes(url, CONFIG).startswith(b"\x89PNG")
    small = CONFIG.model_copy(update={"max_image_bytes": 20})
    with pytest.raises(RequestError, match=r"over this server's 20 \(serve.max_image_bytes\)") as raised:
        image_bytes(url, small)
    assert raised.value.code == "image_too_large"
    with pytest.raises(RequestError, match="not valid base64") as raised:
        image_bytes("data:image/png;base64,@@@@", CONFIG)
    assert raised.value.code == "invalid_image"
    with pytest.raises(RequestError, match=r"base64 data URL .* or http") as raised:
        image_bytes("file:///etc/passwd", CONFIG)


def test_remote_images_are_refused_unless_allowed_and_from_an_allowed_host():
    with pytest.raises(RequestError, match=r"serve.allow_remote_images is false") as raised:
        image_bytes("https://example.com/cat.png", CONFIG)
    assert raised.value.code == "remote_image_refused"
    allowed = CONFIG.model_copy(
        update={"allow_remote_images": True, "remote_image_hosts": ["images.example.org"]}
    )
    with pytest.raises(RequestError, match=r"images from 'example.com' are refused") as raised:
        image_bytes("https://example.com/cat.png", allowed)
    assert raised.value.code == "remote_image_refused"
    # An allowed host that cannot be reached is the request's fault (400), not the server's.
    unreachable = allowed.model_copy(
        update={"remote_image_hosts": ["127.0.0.1"], "remote_image_timeout_s": 2}
    )
    with pytest.raises(RequestError, match="could not be fetched") as raised:
        image_bytes("http://127.0.0.1:9/cat.png", unreachable)
    assert raised.value.status == 400


def test_unknown_model_and_unsupported_options_are_refused_before_any_work():
    def request(**fields):
        return ChatRequest.model_validate(
            {"model": "tiny", "messages": [{"role": "user", "content": "x"}], **fields}
        )

    check_request(request(), "tiny")
    with pytest.raises(RequestError, match=r"'other' does not exist; this server serves 'tiny'") as raised:
        check_request(request(model="other"), "tiny")
    assert (raised.value.status, raised.value.code) == (404, "model_not_found")
    for fields, name in (
        ({"n": 2}, "n"),
        ({"stop": ["\n"]}, "stop"),
        ({"tools": [{"type": "function"}]}, "tools"),
    ):
        with pytest.raises(RequestError) as raised:
            check_request(request(**fields), "tiny")
        assert (raised.value.status, raised.value.param) == (400, name)
    check_request(request(user="someone", stop=None), "tiny")  # fields clients send and we may ignore


def test_serve_settings_problems_name_the_keys():
    assert serve_problems(CONFIG) == []
    problems = serve_problems(
        ServeConfig(remote_image_hosts=["a.org"], max_ongoing_requests=2, max_batch_size=8)
    )
    assert [p.split(" ")[0] for p in problems] == [
        "serve.model",
        "serve.remote_image_hosts",
        "serve.max_ongoing_requests=2",
    ]
    assert any(
        "serve.backend=vllm with serve.num_gpus_per_replica=0" in p
        for p in serve_problems(
            ServeConfig(model="s3://b/run/final/hf", backend="vllm", num_gpus_per_replica=0)
        )
    )
