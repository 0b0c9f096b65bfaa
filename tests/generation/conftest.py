"""Fixtures for the generation tests: synthetic COCO files, one local Ray, and a real chat server.

:class:`FakeChatServer` is an OpenAI-compatible ``/v1/chat/completions`` endpoint on a free
loopback port (``http.server.ThreadingHTTPServer`` in a background thread). It checks every
request's shape against the shipped prompt files and the annotations (system message first,
few-shot turns alternating user/assistant, the image's context last, in the paper's format),
recognises the image by its first caption and the response type by the system message, and
answers by a per-image ``plan`` (see :data:`BEHAVIOURS`). It counts requests per (image, type),
the most requests in flight at once, and every shape problem.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from llava_ray.data.synthetic import generate

PROMPTS_DIR = Path(__file__).resolve().parents[2] / "platform" / "llava_ray" / "generation" / "prompts"
TYPES = ("conversation", "detail", "complex")
API_KEY = "sk-test-secret"
SLOW_S = 1.5
BOX_LINE = re.compile(r"^[a-z ]+: \[\d\.\d{3}, \d\.\d{3}, \d\.\d{3}, \d\.\d{3}\]$")
# What the server does for an image: good replies, or one failure mode (all three types).
BEHAVIOURS = (
    "good",
    "malformed",  # no Question/Answer lines: conversation and complex unparsable, detail usable
    "leaking",  # mentions captions, a bounding box, coordinates
    "empty",  # "", whitespace, null content
    "rate_limited_once",  # 429 with Retry-After: 0, then good
    "server_error",  # 500 on every attempt
    "slow_once",  # first answer comes after SLOW_S (past the client's timeout), then good
    "same_conversation",  # a conversation identical for every image with this behaviour
    "truncated_detail",  # detail stops at max_tokens
    "unauthorized",  # 401: a wrong key, the run stops
)


def good_reply(image_id: int, response_type: str) -> str:
    if response_type == "conversation":
        return (
            f"Question: What is in picture {image_id}?\nAnswer: Flat shapes on a grey background.\n"
            f"Question: Do the shapes touch?\nAnswer: No, they stand apart\nfrom each other."
        )
    if response_type == "detail":
        return f"Picture {image_id} shows flat shapes on a plain grey background. They stand apart."
    return (
        f"Question: Why might someone draw picture {image_id}?\n"
        "Answer: First, the shapes are simple. Second, they are easy to count, so it is likely a counting exercise."
    )


class FakeChatServer:
    """The endpoint described in the module docstring; ``plan`` maps image id -> behaviour."""

    def __init__(self, coco_dir: Path):
        self.prompts = {t: yaml.safe_load((PROMPTS_DIR / f"{t}.yaml").read_text()) for t in TYPES}
        self.type_of_system = {p["system"].strip(): t for t, p in self.prompts.items()}
        instances = json.loads((coco_dir / "coco" / "instances.json").read_text())
        captions = json.loads((coco_dir / "coco" / "captions.json").read_text())
        self.captions: dict[int, list[str]] = defaultdict(list)
        for annotation in captions["annotations"]:
            self.captions[annotation["image_id"]].append(annotation["caption"])
        self.objects = Counter(annotation["image_id"] for annotation in instances["annotations"])
        self.image_of_caption = {lines[0]: image_id for image_id, lines in self.captions.items()}
        self.plan: dict[int, str] = {}
        self.unauthorized_after: int | None = None  # answer 401 once this many requests were served
        self.requests: Counter[tuple[int, str]] = Counter()
        self.shape_errors: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    def start(self) -> FakeChatServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def reset_counters(self) -> None:
        with self._lock:
            self.requests.clear()
            self.shape_errors.clear()
            self.max_in_flight = 0

    def requested(self) -> set[str]:
        return {f"{image_id}-{kind}" for image_id, kind in self.requests}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:
                with server._lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    status, body, headers, delay = server._answer(self)
                    if delay:
                        time.sleep(delay)
                    payload = json.dumps(body).encode()
                    self.send_response(status)
                    for key, value in {**headers, "Content-Type": "application/json"}.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out first
                    pass
                finally:
                    with server._lock:
                        server.in_flight -= 1

        return Handler

    def _answer(self, handler: BaseHTTPRequestHandler) -> tuple[int, dict[str, Any], dict[str, str], float]:
        if handler.path != "/v1/chat/completions":
            return self._bad(f"path {handler.path}")
        if handler.headers.get("Authorization") != f"Bearer {API_KEY}":
            return self._bad("missing or wrong Authorization header")
        request = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))
        problem, image_id, kind = self._check_shape(request)
        if problem:
            return self._bad(problem)
        with self._lock:
            self.requests[(image_id, kind)] += 1
            attempt = self.requests[(image_id, kind)]
            served = sum(self.requests.values())
        behaviour = self.plan.get(image_id, "good")
        if behaviour == "unauthorized" or (
            self.unauthorized_after is not None and served > self.unauthorized_after
        ):
            return 401, {"error": {"message": "invalid api key"}}, {}, 0.0
        if behaviour == "server_error":
            return 500, {"error": {"message": "internal error"}}, {}, 0.0
        if behaviour == "rate_limited_once" and attempt == 1:
            return 429, {"error": {"message": "slow down"}}, {"Retry-After": "0"}, 0.0
        delay = SLOW_S if behaviour == "slow_once" and attempt == 1 else 0.0
        content: str | None = good_reply(image_id, kind)
        finish_reason = "stop"
        if behaviour == "malformed":
            content = "Sure! The picture is nice and calm."
        elif behaviour == "leaking":
            content = {
                "conversation": "Question: What is shown?\nAnswer: According to the captions, shapes.",
                "detail": "The shape's bounding box is [0.120, 0.300, 0.500, 0.700].",
                "complex": "Question: Where is it?\nAnswer: At the coordinates 0.125 and 0.333.",
            }[kind]
        elif behaviour == "empty":
            content = {"conversation": "", "detail": "   \n", "complex": None}[kind]
        elif behaviour == "same_conversation" and kind == "conversation":
            content = "Question: What is this?\nAnswer: Shapes."
        elif behaviour == "truncated_detail" and kind == "detail":
            finish_reason = "length"
        body = {
            "id": f"chatcmpl-{image_id}-{kind}-{attempt}",
            "object": "chat.completion",
            "model": request["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": finish_reason,
                }
            ],
        }
        return 200, body, {}, delay

    def _bad(self, problem: str) -> tuple[int, dict[str, Any], dict[str, str], float]:
        with self._lock:
            self.shape_errors.append(problem)
        return 400, {"error": {"message": problem}}, {}, 0.0

    def _check_shape(self, request: dict[str, Any]) -> tuple[str | None, int, str]:
        """(problem or None, image id, type) for one request body."""
        if set(request) != {"model", "messages", "temperature", "max_tokens"}:
            return f"body keys {sorted(request)}", 0, ""
        messages = request["messages"]
        if messages[0]["role"] != "system" or messages[0]["content"] not in self.type_of_system:
            return "the first message is not a shipped system message", 0, ""
        kind = self.type_of_system[messages[0]["content"]]
        examples = self.prompts[kind]["examples"]
        expected_turns = [
            (role, example[key].strip())
            for example in examples
            for role, key in (("user", "context"), ("assistant", "response"))
        ]
        turns = [(m["role"], m["content"]) for m in messages[1:-1]]
        if turns != expected_turns:
            return f"{kind}: few-shot turns are not the prompt file's, alternating user/assistant", 0, kind
        if messages[-1]["role"] != "user":
            return f"{kind}: the last message is not the user's query", 0, kind
        lines = messages[-1]["content"].split("\n")
        image_id = self.image_of_caption.get(lines[0])
        if image_id is None or lines[:5] != self.captions[image_id]:
            return f"{kind}: the query does not start with an image's five captions", 0, kind
        boxes = lines[5:]
        want = 0 if kind == "conversation" else self.objects[image_id]
        if len(boxes) != want or not all(BOX_LINE.match(line) for line in boxes):
            return (
                f"{kind}: image {image_id} has {len(boxes)} box lines, expected {want} well-formed",
                image_id,
                kind,
            )
        return None, image_id, kind


@pytest.fixture(scope="session")
def coco_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 synthetic training images with COCO 2017 instances and captions files.

    The fake server tells images apart by their first caption, so the seed is one whose 12
    images all have different labels (seed 0's have a repeat).
    """
    out = tmp_path_factory.mktemp("synthetic")
    generate(out, samples=12, eval_samples=1, seed=1)
    captions = json.loads((out / "coco" / "captions.json").read_text())["annotations"]
    first_captions = {a["image_id"]: a["caption"] for a in reversed(captions)}
    assert len(set(first_captions.values())) == 12, "two synthetic images share a label: pick another seed"
    return out


@pytest.fixture
def chat_server(coco_dir: Path) -> Iterator[FakeChatServer]:
    server = FakeChatServer(coco_dir).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One small local Ray for the whole session."""
    if ray.is_initialized():  # another test package's session already started one
        yield
        return
    # address="local": a private cluster even when someone's `ray start` head runs on this machine.
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=300 * 2**20,
        log_to_driver=False,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()
