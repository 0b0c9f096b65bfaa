"""A small client for OpenAI-compatible chat-completion endpoints (OpenAI, vLLM, SGLang, TGI, ...).

``POST {base_url}/chat/completions`` with ``{"model", "messages", "temperature", "max_tokens"}``,
stdlib only (``urllib.request``). One :class:`ChatClient` is shared by the threads of one Ray
actor; it is thread-safe. What it does for each request:

- waits for a token of the shared :class:`TokenBucket` before every attempt (retries count
  against the rate limit, as they do at the provider);
- retries 408, 409, 429, 5xx, timeouts and connection errors up to ``max_retries`` times, waiting
  ``backoff_initial_s * 2**n`` with jitter (half fixed, half random, so synchronised clients
  drift apart), or the server's ``Retry-After`` when it sends one, never longer than
  ``backoff_max_s``;
- turns other 4xx answers into :class:`RequestFailed` at once (that request is bad, retrying
  cannot help), except 401, 403 and 404, which raise :class:`EndpointError`: a wrong key, base
  URL or model fails every request alike, so the run stops instead of spending the whole dataset.

The API key goes only into the ``Authorization`` header; it is never part of a message or repr.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from llava_ray.config.endpoint import EndpointConfig

RETRYABLE_STATUSES = frozenset({408, 409, 429})
FATAL_STATUSES = frozenset({401, 403, 404})
_ERROR_SNIPPET_CHARS = 200


DEFAULT_BASE_URL = "https://api.openai.com/v1"


@dataclass(frozen=True)
class ClientSettings:
    """What one client needs; built from the ``generate`` config section by the pipeline."""

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    temperature: float = 0.7
    max_tokens: int = 1024
    timeout_s: float = 120.0
    max_retries: int = 5
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0

    @property
    def endpoint(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    @classmethod
    def from_config(cls, config: EndpointConfig, temperature: float) -> ClientSettings:
        """Settings of a config section; ``$OPENAI_BASE_URL`` / ``$OPENAI_API_KEY`` fill what it leaves unset."""
        api_key = config.api_key.get_secret_value() if config.api_key else os.environ.get("OPENAI_API_KEY")
        return cls(
            base_url=config.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL,
            model=config.model or "",
            api_key=api_key or None,
            temperature=temperature,
            max_tokens=config.max_tokens,
            timeout_s=config.request_timeout_s,
            max_retries=config.max_retries,
            backoff_initial_s=config.backoff_initial_s,
            backoff_max_s=config.backoff_max_s,
        )


@dataclass(frozen=True)
class Completion:
    """A reply: its text (empty when the server sent none), why it stopped, and the attempts it took."""

    text: str
    finish_reason: str | None
    attempts: int


class RequestFailed(Exception):
    """A request that produced no reply; ``detail`` is e.g. ``HTTP 500 after 6 attempts``."""

    def __init__(self, detail: str, status: int | None, attempts: int):
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.attempts = attempts


class EndpointError(RuntimeError):
    """The endpoint refuses every request (bad key, URL or model): the run stops."""


class _Retryable(Exception):
    def __init__(self, detail: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.retry_after = retry_after


class TokenBucket:
    """At most ``rate`` acquisitions per second on average, bursts of up to ``burst``; thread-safe.

    Each caller reserves a token under the lock and sleeps outside it, so waiting threads queue
    in order instead of all waking at once.
    """

    def __init__(self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic):
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        self.rate = rate
        self.capacity = max(1.0, burst if burst is not None else rate)
        self._tokens = self.capacity
        self._clock = clock
        self._updated = clock()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Take one token, sleeping until it is due; returns the seconds waited."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate)
            self._updated = now
            self._tokens -= 1
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait:
            time.sleep(wait)
        return wait


class ChatClient:
    """Sends chat requests with rate limiting and retries (see the module docstring)."""

    def __init__(
        self,
        settings: ClientSettings,
        rate_limit: TokenBucket | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ):
        self.settings = settings
        self.rate_limit = rate_limit
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._rng_lock = threading.Lock()

    def complete(self, messages: list[dict[str, str]]) -> Completion:
        """The reply to ``messages``; raises :class:`RequestFailed` or :class:`EndpointError`."""
        body = json.dumps(
            {
                "model": self.settings.model,
                "messages": messages,
                "temperature": self.settings.temperature,
                "max_tokens": self.settings.max_tokens,
            }
        ).encode()
        attempts = self.settings.max_retries + 1
        for attempt in range(attempts):
            if self.rate_limit is not None:
                self.rate_limit.acquire()
            try:
                text, finish_reason = self._post(body)
                return Completion(text, finish_reason, attempt + 1)
            except _Retryable as error:
                if attempt + 1 == attempts:
                    raise RequestFailed(
                        f"{error.detail} after {attempts} attempt{'s' if attempts > 1 else ''}",
                        error.status,
                        attempts,
                    ) from None
                self._sleep(self._retry_wait(attempt, error.retry_after))
            except RequestFailed as error:
                error.attempts = attempt + 1
                raise
        raise AssertionError("unreachable: the loop returns or raises")

    def _retry_wait(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.settings.backoff_max_s)
        delay = min(self.settings.backoff_initial_s * 2**attempt, self.settings.backoff_max_s)
        with self._rng_lock:
            return delay / 2 + self._rng.uniform(0, delay / 2)

    def _post(self, body: bytes) -> tuple[str, str | None]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.settings.api_key:
            headers["Authorization"] = f"Bearer {self.settings.api_key}"
        request = urllib.request.Request(self.settings.endpoint, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.settings.timeout_s) as response:
                payload = response.read()
        except urllib.error.HTTPError as error:
            raise self._http_error(error) from None
        except TimeoutError:
            raise _Retryable("timeout") from None
        except urllib.error.URLError as error:
            if isinstance(error.reason, TimeoutError):
                raise _Retryable("timeout") from None
            raise _Retryable(f"connection error ({error.reason})") from None
        except (ConnectionError, http.client.HTTPException) as error:
            raise _Retryable(f"connection error ({type(error).__name__})") from None
        return _parse_completion(payload)

    def _http_error(self, error: urllib.error.HTTPError) -> Exception:
        status = error.code
        snippet = _error_message(error)
        if status in RETRYABLE_STATUSES or status >= 500:
            return _Retryable(
                f"HTTP {status}", status, _retry_after_seconds(error.headers.get("Retry-After"))
            )
        if status in FATAL_STATUSES:
            return EndpointError(
                f"HTTP {status} from {self.settings.endpoint} ({snippet}): every request would fail; "
                "check generate.base_url (or $OPENAI_BASE_URL), generate.model and the API key "
                "(generate.api_key or $OPENAI_API_KEY)"
            )
        return RequestFailed(f"HTTP {status}: {snippet}", status, attempts=1)


def _parse_completion(payload: bytes) -> tuple[str, str | None]:
    try:
        choice = json.loads(payload)["choices"][0]
        content = choice["message"].get("content")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise RequestFailed(
            f"not a chat completion: {payload[:_ERROR_SNIPPET_CHARS]!r}", status=200, attempts=1
        ) from None
    # A missing content (a refusal, a tool call) is an empty reply, counted as such by the parser.
    return (content if isinstance(content, str) else ""), choice.get("finish_reason")


def _error_message(error: urllib.error.HTTPError) -> str:
    try:
        raw = error.read()
    except OSError:
        return error.reason or ""
    try:
        message: Any = json.loads(raw)["error"]
        message = message.get("message", message) if isinstance(message, dict) else message
    except (ValueError, KeyError, TypeError):
        message = raw.decode(errors="replace")
    return str(message)[:_ERROR_SNIPPET_CHARS]


def _retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds: a number, or an HTTP date; None when absent or unreadable."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def request_all(
    client: ChatClient,
    messages: Mapping[str, list[dict[str, str]]],
    max_concurrency: int,
    on_reply: Callable[[str, Completion], None],
    section: str,
    label: str | None = None,
) -> dict[str, str]:
    """Send every ``id -> messages`` request, ``max_concurrency`` at a time; ``on_reply`` each reply.

    Returns ``id -> why`` for requests that failed after their retries. An endpoint that refuses
    requests outright (401/403/404) stops the rest and raises :class:`EndpointError` naming the
    config ``section`` (``evaluate.judge``, ``evaluate.reference``); ``label`` names the endpoint in
    it (default: the section's last part).
    """
    failed: dict[str, str] = {}
    if not messages:
        return failed
    with ThreadPoolExecutor(max_concurrency, section.rsplit(".", 1)[-1]) as pool:
        futures = {pool.submit(client.complete, request): key for key, request in messages.items()}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in finished:
                key = futures[future]
                try:
                    completion = future.result()
                except RequestFailed as failure:
                    failed[key] = failure.detail
                    continue
                except EndpointError as error:
                    for other in pending:
                        other.cancel()
                    raise EndpointError(endpoint_hint(error, section, label)) from None
                on_reply(key, completion)
    return failed


def endpoint_hint(error: EndpointError, section: str, label: str | None = None) -> str:
    """The client's message, pointing at ``section``'s settings instead of the generate section's."""
    problem = str(error).split(": every request would fail", 1)[0]
    name = label or section.rsplit(".", 1)[-1]
    return (
        f"the {name} endpoint refuses requests: {problem}. Check {section}.base_url (or $OPENAI_BASE_URL), "
        f"{section}.model and the API key ({section}.api_key or $OPENAI_API_KEY)"
    )


def failed_examples(failed: Mapping[str, str], count: int = 5) -> list[str]:
    """Up to ``count`` ``"id: why"`` lines of :func:`request_all`'s failures, for reports."""
    return [f"{key}: {value}" for key, value in list(failed.items())[:count]]
