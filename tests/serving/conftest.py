"""The serving app deployed once for the serving tests: the tiny trained model on the session's local Ray."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from llava_ray.config.serve import ServeConfig

MODEL_NAME = "tiny-llava"
# Small limits so that each refusal is cheap to provoke; a large batch wait so concurrent callers share batches.
SETTINGS = {
    "model_name": MODEL_NAME,
    "max_tokens": 16,
    "max_batch_size": 4,
    "batch_wait_timeout_s": 0.25,
    "max_image_bytes": 64_000,
    "max_request_bytes": 200_000,
    "num_cpus_per_replica": 0,  # the session's Ray Train tests need both CPUs once this app is gone
}


@dataclass
class Served:
    url: str  # http://127.0.0.1:PORT
    config: ServeConfig

    @property
    def api(self) -> str:
        return f"{self.url}/v1"

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.load(response)


@pytest.fixture(scope="session")
def served(ray_cluster, trained_model_dir: Path, get_free_port) -> Iterator[Served]:
    """``llava-ray serve``'s app (build_app) on a free port; Serve is shut down afterwards."""
    from ray import serve

    from llava_ray.serving.app import build_app

    port = get_free_port()
    config = ServeConfig(model=str(trained_model_dir), port=port, **SETTINGS)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(config), name=config.app_name, route_prefix="/", blocking=False)
        yield Served(f"http://127.0.0.1:{port}", config)
    finally:
        serve.shutdown()
