"""The OpenAI chat-completions protocol as llava-ray serves it: requests checked into :class:`Job` s, replies built.

What a request may hold (anything else is a 4xx :class:`RequestError` in OpenAI's error shape, never a
crash of the replica):

- ``messages``: an optional first ``system`` message (replaces the template's system prompt), then
  ``user`` and ``assistant`` messages alternating, ending with a ``user`` one. Content is a string or
  a list of parts: ``{"type": "text", "text"}`` and, in user messages, ``{"type": "image_url",
  "image_url": {"url"}}``, where the URL is a base64 ``data:image/...`` URL (remote http(s) URLs only
  when ``serve.allow_remote_images``, from ``serve.remote_image_hosts`` when set). An image goes
  with its message as LLaVA's ``<image>\\n`` at the message's start: one image per message, at most
  ``serve.max_images_per_request`` per conversation. Every user message needs text.
- ``max_tokens`` / ``max_completion_tokens`` (default: what fits, at most ``serve.max_tokens``),
  ``temperature`` (default ``serve.temperature``), ``top_p``, ``seed``, ``stream``,
  ``stream_options.include_usage``. ``n`` > 1, ``stop``, ``tools``, ``logprobs`` and
  ``response_format`` are refused (400) rather than silently ignored.

Status codes: 400 bad input (``code`` says which: ``invalid_image``, ``image_too_large``,
``too_many_images``, ``remote_image_refused``, ``context_length_exceeded``, ``missing_text``, ...),
404 an unknown model, 413 a body over ``serve.max_request_bytes``.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from llava_ray.config.serve import ServeConfig
from llava_ray.conversation.templates import conform_turns
from llava_ray.conversation.tokenizer import IMAGE_TOKEN
from llava_ray.utils.skips import Skipped

DATA_URL = re.compile(r"^data:image/[A-Za-z0-9.+-]+;base64,(?P<data>.*)$", re.DOTALL)
UNSUPPORTED_FIELDS = (
    "stop",
    "tools",
    "tool_choice",
    "functions",
    "logprobs",
    "top_logprobs",
    "response_format",
)


class RequestError(Exception):
    """A request the server refuses: HTTP status, a message that says what to change, an error code."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict[str, Any]:
        kind = "not_found_error" if self.status == 404 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class ChatRequest(BaseModel):
    """The body of ``POST /v1/chat/completions``; fields a client may send and llava-ray ignores are allowed."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[Any] = Field(min_length=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    n: int | None = None

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


@dataclass
class ParsedChat:
    """A request's messages as LLaVA turns (``<image>`` placeholders in place) and its images' URLs in order."""

    conversation: list[dict[str, str]]
    image_urls: list[str] = field(default_factory=list)
    system: str | None = None


def check_request(request: ChatRequest, served_model: str) -> None:
    """Refuse what this server cannot honour, before anything is decoded."""
    if request.model != served_model:
        raise RequestError(
            404,
            f"The model {request.model!r} does not exist; this server serves {served_model!r}",
            "model_not_found",
            "model",
        )
    if request.n not in (None, 1):
        raise RequestError(
            400, f"n={request.n}: this server returns one choice per request", "unsupported", "n"
        )
    extra = request.model_extra or {}
    for name in UNSUPPORTED_FIELDS:
        if extra.get(name) not in (None, [], False):
            raise RequestError(
                400, f"{name!r} is not supported by this server; leave it out", "unsupported", name
            )


def parse_messages(messages: list[Any], config: ServeConfig) -> ParsedChat:
    """``messages`` as LLaVA turns (see the module docstring); raises :class:`RequestError`."""
    system = None
    if messages and isinstance(messages[0], dict) and messages[0].get("role") in ("system", "developer"):
        system = _text_of(messages[0], 0, images_allowed=False)[0]
        messages = messages[1:]
    conversation, urls = [], []
    for index, message in enumerate(messages, start=0 if system is None else 1):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            role = message.get("role") if isinstance(message, dict) else type(message).__name__
            raise RequestError(
                400,
                f"messages[{index}] has role {role!r}; use 'user' and 'assistant' (and 'system' first only)",
                "invalid_message",
                f"messages[{index}]",
            )
        user = message["role"] == "user"
        text, images = _text_of(message, index, images_allowed=user)
        if not text.strip():
            raise RequestError(
                400,
                f"messages[{index}] ({message['role']}) has no text; every message needs text",
                "missing_text",
                f"messages[{index}].content",
            )
        if len(images) > 1:
            raise RequestError(
                400,
                f"messages[{index}] holds {len(images)} images; LLaVA takes one image per message",
                "too_many_images",
                f"messages[{index}].content",
            )
        urls += images
        value = f"{IMAGE_TOKEN}\n{text.strip()}" if images else text
        conversation.append({"from": "human" if user else "gpt", "value": value})
    if len(urls) > config.max_images_per_request:
        raise RequestError(
            400,
            f"the conversation holds {len(urls)} images; this server takes at most "
            f"{config.max_images_per_request} per request (serve.max_images_per_request)",
            "too_many_images",
            "messages",
        )
    try:
        conform_turns(conversation, require_answer=False)
    except Skipped as error:
        raise RequestError(
            400,
            f"{error} (messages after an optional system message must alternate user/assistant, "
            "starting and ending with user)",
            error.reason,
            "messages",
        ) from None
    return ParsedChat(conversation, urls, system)


def _text_of(message: dict[str, Any], index: int, images_allowed: bool) -> tuple[str, list[str]]:
    content = message.get("content")
    if isinstance(content, str):
        if IMAGE_TOKEN in content:
            raise RequestError(
                400,
                f"messages[{index}] contains {IMAGE_TOKEN}; send images as image_url parts",
                "invalid_message",
                f"messages[{index}].content",
            )
        return content, []
    if not isinstance(content, list):
        raise RequestError(
            400,
            f"messages[{index}].content must be a string or a list of parts",
            "invalid_message",
            f"messages[{index}].content",
        )
    texts, urls = [], []
    for part_index, part in enumerate(content):
        param = f"messages[{index}].content[{part_index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if IMAGE_TOKEN in part["text"]:
                raise RequestError(
                    400,
                    f"{param} contains {IMAGE_TOKEN}; send images as image_url parts",
                    "invalid_message",
                    param,
                )
            texts.append(part["text"])
        elif kind == "image_url" and images_allowed:
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            if not isinstance(url, str) or not url:
                raise RequestError(400, f"{param}.image_url.url is missing", "invalid_image", param)
            urls.append(url)
        elif kind == "image_url":
            raise RequestError(400, f"{param}: only user messages may carry images", "invalid_message", param)
        else:
            raise RequestError(
                400, f"{param} has type {kind!r}; use 'text' or 'image_url' parts", "invalid_message", param
            )
    return "\n".join(texts), urls


def image_bytes(url: str, config: ServeConfig, param: str = "messages") -> bytes:
    """The bytes of an image URL: a base64 data URL, or a permitted remote URL (see the module docstring)."""
    match = DATA_URL.match(url)
    if match:
        encoded = match.group("data")
        if len(encoded) * 3 // 4 > config.max_image_bytes + 3:
            raise _too_large(len(encoded) * 3 // 4, config, param)
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(
                400, "the image's data URL is not valid base64", "invalid_image", param
            ) from None
        if len(data) > config.max_image_bytes:
            raise _too_large(len(data), config, param)
        return data
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise RequestError(
            400,
            "an image URL must be a base64 data URL (data:image/png;base64,...) or http(s)",
            "invalid_image",
            param,
        )
    if not config.allow_remote_images:
        raise RequestError(
            400,
            "remote image URLs are refused by this server (serve.allow_remote_images is false); "
            "send the image inline as a base64 data URL",
            "remote_image_refused",
            param,
        )
    host = urllib.parse.urlsplit(url).hostname or ""
    if config.remote_image_hosts and host not in config.remote_image_hosts:
        raise RequestError(
            400,
            f"images from {host!r} are refused; allowed hosts: {config.remote_image_hosts} "
            "(serve.remote_image_hosts)",
            "remote_image_refused",
            param,
        )
    try:
        with urllib.request.urlopen(url, timeout=config.remote_image_timeout_s) as response:
            data = response.read(config.max_image_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise RequestError(
            400, f"the image at {url} could not be fetched: {error}", "invalid_image", param
        ) from None
    if len(data) > config.max_image_bytes:
        raise _too_large(len(data), config, param)
    return data


def _too_large(size: int, config: ServeConfig, param: str) -> RequestError:
    return RequestError(
        400,
        f"the image is {size} bytes, over this server's {config.max_image_bytes} (serve.max_image_bytes)",
        "image_too_large",
        param,
    )


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def completion_body(
    id_: str, model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """A non-streamed ``chat.completion`` object."""
    return {
        "id": id_,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk_body(
    id_: str, model: str, delta: dict[str, str], finish_reason: str | None = None
) -> dict[str, Any]:
    """One streamed ``chat.completion.chunk`` object."""
    return {
        "id": id_,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
