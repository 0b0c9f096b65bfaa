"""Credentials in URLs: redacted in params, the config artifact, errors and `validate`; passed to MLflow apart."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from llava_ray.config import load_config
from llava_ray.config.loader import flatten_config
from llava_ray.tracking.mlflow_tracking import (
    TrackingUnavailable,
    check_tracking,
    redact,
    redact_yaml,
    server_problem,
    tracking_uri,
)
from llava_ray.utils.redact import redact_url, redact_urls, split_credentials

CONFIG = Path(__file__).resolve().parents[2] / "jobs/configs/tiny/pretrain.yaml"
PASSWORD = "hunter2-planted"


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("http://user:pass@host:5000/v1", "http://user:***@host:5000/v1"),
        ("https://ghp_token@github.com/x.git", "https://***@github.com/x.git"),
        ("http://host/v1?token=abc&page=2", "http://host/v1?token=***&page=2"),
        ("https://h/v1?api_key=sk-1", "https://h/v1?api_key=***"),
        (
            "https://b.s3.amazonaws.com/k?X-Amz-Date=20250101&X-Amz-Credential=AKIA%2Fx&X-Amz-Signature=f00",
            "https://b.s3.amazonaws.com/k?X-Amz-Date=20250101&X-Amz-Credential=***&X-Amz-Signature=***",
        ),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("s3://bucket/prefix/model", "s3://bucket/prefix/model"),
    ],
)
def test_redact_url(url, redacted):
    assert redact_url(url) == redacted


def test_urls_inside_text_and_credentials_taken_apart():
    text = "judge at 'http://me:s3cret@judge/v1' failed; see https://x/y?token=t0k"
    assert redact_urls(text) == "judge at 'http://me:***@judge/v1' failed; see https://x/y?token=***"
    assert split_credentials("http://us%40r:p%3Ass@h:5000/api") == ("http://h:5000/api", "us@r", "p:ss")
    assert split_credentials("http://h:5000") == ("http://h:5000", None, None)


def test_params_and_config_artifact_never_hold_url_credentials():
    config = load_config(
        CONFIG,
        [
            f"evaluate.judge.base_url=http://judge:{PASSWORD}@judge.local/v1",
            f"generate.base_url=https://gen.local/v1?token={PASSWORD}",
        ],
    )
    params = redact(flatten_config(config))
    assert params["evaluate.judge.base_url"] == "http://judge:***@judge.local/v1"
    assert params["generate.base_url"] == "https://gen.local/v1?token=***"
    assert not any(PASSWORD in value for value in params.values())
    yaml_text = redact_yaml(config)
    assert "judge:***@judge.local" in yaml_text and PASSWORD not in yaml_text


def test_validate_prints_no_url_credentials():
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "llava_ray.cli",
            "validate",
            "--config",
            str(CONFIG),
            f"evaluate.judge.base_url=http://judge:{PASSWORD}@judge.local/v1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "http://judge:***@judge.local/v1" in done.stdout
    assert PASSWORD not in done.stdout + done.stderr


class _AuthHealth(BaseHTTPRequestHandler):
    """``/health`` answering 200 only to Basic auth ``mlflow-user`` / PASSWORD, like a server behind auth."""

    def do_GET(self) -> None:
        expected = "Basic " + base64.b64encode(f"mlflow-user:{PASSWORD}".encode()).decode()
        self.send_response(200 if self.headers.get("Authorization") == expected else 401)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def auth_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _AuthHealth)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_tracking_uri_credentials_reach_the_server_as_basic_auth_and_never_the_messages(
    auth_server, monkeypatch, get_free_port
):
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, "")  # restored (removed) after the test, whatever tracking_uri sets
        monkeypatch.delenv(name)
    config = load_config(CONFIG, [f"tracking.uri=http://mlflow-user:{PASSWORD}@127.0.0.1:{auth_server}"])
    assert check_tracking(config) == f"http://127.0.0.1:{auth_server}"  # up, and accepted
    assert tracking_uri(config) == f"http://127.0.0.1:{auth_server}"
    # The supported way to give MLflow's client credentials.
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "mlflow-user"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == PASSWORD
    wrong = server_problem(f"http://mlflow-user:wrong-{PASSWORD}@127.0.0.1:{auth_server}")
    assert wrong and "HTTP 401" in wrong and PASSWORD not in wrong
    down = load_config(CONFIG, [f"tracking.uri=http://mlflow-user:{PASSWORD}@127.0.0.1:{get_free_port()}"])
    with pytest.raises(
        TrackingUnavailable, match=r"cannot reach the MLflow server at http://127\.0\.0\.1:\d+"
    ) as raised:
        check_tracking(down)
    assert PASSWORD not in str(raised.value)
