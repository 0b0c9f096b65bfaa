"""The web chat page in a real headless Chromium (the OS package, driven by Playwright): upload, ask, stream, reset.

The screenshot of the answered conversation is kept as a test artifact: ``$LLAVA_RAY_TEST_ARTIFACTS``
(default ``test-artifacts/``) ``/chat_page.png``. ``make test`` installs Chromium when it is missing.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from llava_ray.evaluation.loaded_model import load_inference_model, load_pixels
from llava_ray.model.generate import generate

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("LLAVA_RAY_TEST_ARTIFACTS", REPO / "test-artifacts"))


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("no Chromium: `make test` installs it (apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def browser_page(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 720})
            yield page
        finally:
            browser.close()


def test_upload_ask_stream_and_reset(browser_page, served, trained_model_dir, synthetic_eval_dir):
    page = browser_page
    item = json.loads((synthetic_eval_dir / "eval.json").read_text())[0]
    image = synthetic_eval_dir / item["image"]
    question = item["conversations"][0]["value"].replace("<image>", "").strip()
    loaded = load_inference_model(str(trained_model_dir))
    (expected,) = generate(
        loaded.model,
        loaded.tokenizer,
        loaded.template,
        [(item["conversations"][:1], load_pixels(str(image), loaded.tower_input))],
        16,
    )
    assert expected.strip()

    page.goto(served.url + "/")
    assert page.title() == f"llava-ray chat: {served.config.model_name}"
    page.set_input_files("#image-input", str(image))
    page.wait_for_selector("#image-preview:not([hidden])")
    page.fill("#temperature", "0")  # greedy: the answer is the evaluation's
    page.fill("#message", question)
    with page.expect_response("**/v1/chat/completions") as answered:
        page.click("#send")
    response = answered.value
    assert response.status == 200 and response.headers["content-type"].startswith("text/event-stream")
    sent = response.request.post_data_json
    assert sent["stream"] is True and sent["temperature"] == 0
    assert sent["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    body = response.text()
    assert body.rstrip().endswith("data: [DONE]") and '"content": "' in body
    page.wait_for_selector(".msg.assistant.done")
    assert page.inner_text(".msg.assistant.done") == expected
    assert page.locator(".msg.user img").count() == 1, "the user's bubble shows the uploaded image"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chat_page.png"), full_page=True)
    assert (ARTIFACTS / "chat_page.png").stat().st_size > 10_000

    # A follow-up carries the history; after a reset the next question goes alone.
    page.fill("#message", "What shape is it?")
    with page.expect_response("**/v1/chat/completions") as followed:
        page.click("#send")
    assert [m["role"] for m in followed.value.request.post_data_json["messages"]] == [
        "user",
        "assistant",
        "user",
    ]
    page.wait_for_function("document.querySelectorAll('.msg.assistant.done').length == 2")
    page.click("#reset")
    assert page.locator(".msg.assistant").count() == 0
    assert page.inner_text("#messages") == "[conversation cleared]"
    page.fill("#message", "Hello?")
    with page.expect_response("**/v1/chat/completions") as alone:
        page.click("#send")
    assert [m["role"] for m in alone.value.request.post_data_json["messages"]] == ["user"]
    page.wait_for_selector(".msg.assistant.done, .msg.notice >> nth=1")


def test_a_refused_request_is_shown_and_the_page_keeps_working(browser_page, served):
    page = browser_page
    page.goto(served.url + "/")
    page.fill("#message", "shape " * 1500)  # longer than the model's context
    page.click("#send")
    page.wait_for_selector(".msg.notice")
    assert "maximum context length" in page.inner_text(".msg.notice")
    assert page.locator(".msg.assistant").count() == 0
    page.fill("#message", "Hello?")
    page.click("#send")
    page.wait_for_function(
        "document.querySelector('.msg.assistant.done') || document.querySelectorAll('.msg.notice').length > 1"
    )
    assert not page.is_disabled("#send")
