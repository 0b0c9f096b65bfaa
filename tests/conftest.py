"""Shared test set-up: nothing downloads, everything runs on the CPU."""

import os

# Tests build tiny models from configs and a tokenizer shipped in the package; any hub access is a bug.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads, and on 2 cores shared with Ray workers spinning
# OpenMP threads make a step 20-50x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def local_mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Jobs in tests track to a private local store, never to the repository's working directory."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


MOTO_SERVER = Path(sys.executable).with_name("moto_server")
SERVER_START_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_http(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto_server exited with {process.returncode}:\n{log.read_text()}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(
        f"moto_server did not answer at {url} within {SERVER_START_TIMEOUT_S} s:\n{log.read_text()}"
    )


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server on a free loopback port; the environment points s3fs at it."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)], stdout=output, stderr=subprocess.STDOUT
        )
    try:
        _wait_for_http(endpoint, process, log)
        with pytest.MonkeyPatch.context() as patch:
            for key, value in aws_environment(endpoint).items():
                patch.setenv(key, value)
            yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def aws_environment(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint: str) -> Iterator[None]:
    """A small local Ray cluster for the whole session (2 CPUs, 500 MB object store)."""
    if ray.is_initialized():  # another test module's session already started one
        yield
        return
    ray.init(
        address="local",  # a private instance, even when someone's `ray start` cluster runs here
        num_cpus=2,
        object_store_memory=500 * 2**20,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": aws_environment(s3_endpoint)},
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def get_free_port():
    """A function returning a free loopback port (conftest modules are not importable)."""
    return free_port
