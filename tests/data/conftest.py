"""Fixtures for the data tests.

The real local Ray cluster (``ray_cluster``) and the real S3 API (``s3_endpoint``: moto on
loopback, with AWS_ENDPOINT_URL and dummy credentials for the driver and the Ray workers) are
session fixtures of ``tests/conftest.py``, shared with the other suites: one of each per session.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from llava_ray.config import LlavaRayConfig, validate_config


def tiny_config(
    sources: list[dict[str, Any]], prepared_path: str | Path | None = None, **data: Any
) -> LlavaRayConfig:
    """A tiny-preset config over ``sources`` (dicts of DataSource fields); ``data`` sets DataConfig fields.

    ``model_max_length`` and ``seed`` are accepted here too. The stage follows the template
    (``plain`` is stage 1's).
    """
    stage = "pretrain" if data.get("template") == "plain" else "finetune"
    return validate_config(
        {
            "run": {"seed": data.pop("seed", 0)},
            "model": {
                "preset": "tiny",
                "init": "random",
                "model_max_length": data.pop("model_max_length", 256),
            },
            "train": {"stage": stage, "global_batch_size": 16, "micro_batch_size": 8},
            "data": {
                "sources": sources,
                "prepared_path": None if prepared_path is None else str(prepared_path),
                "image_format": "png",
                **data,
            },
        }
    )


@pytest.fixture(scope="session")
def make_config() -> Callable[..., LlavaRayConfig]:
    """:func:`tiny_config`, for tests (conftest modules are not importable under importlib mode)."""
    return tiny_config
