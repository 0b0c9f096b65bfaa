"""A real `mlflow server` for the tracking tests: started on a free port, stopped exactly (its process group)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

MLFLOW = Path(sys.executable).with_name("mlflow")
SERVER_START_TIMEOUT_S = 120


def start_mlflow_server(
    tmp: Path, port: int, artifacts: str, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """``mlflow server`` on ``port`` with its sqlite store ``tmp/server.db``: started again with the same
    ``tmp`` and port it serves the same runs (an outage and its end)."""
    log = (tmp / "mlflow-server.log").open("a")
    process = subprocess.Popen(
        [
            str(MLFLOW),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp / 'server.db'}",
            "--artifacts-destination",
            artifacts,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        start_new_session=True,  # its own process group, so we stop exactly the server and its workers
    )
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, (tmp / "mlflow-server.log").read_text()
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
            return process
        except OSError:
            time.sleep(0.5)
    stop_server(process)
    raise RuntimeError("mlflow server did not start:\n" + (tmp / "mlflow-server.log").read_text())


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="session")
def mlflow_server_control() -> tuple[Callable[..., subprocess.Popen], Callable[[subprocess.Popen], None]]:
    """``(start_mlflow_server, stop_server)`` (conftest modules are not importable)."""
    return start_mlflow_server, stop_server
