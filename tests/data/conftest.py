"""Fixtures for the data tests.

The real local Ray cluster (``ray_cluster``) and the real S3 API (``s3_endpoint``: moto on
loopback, with AWS_ENDPOINT_URL and dummy credentials for the driver and the Ray workers) are
session fixtures of ``tests/conftest.py``, shared with the other suites: one of each per session.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from llava_ray.config import LlavaRayConfig, validate_config
from llava_ray.data.report import Skip
from llava_ray.data.samples import PreparedSample, SamplePreparer
from llava_ray.data.sources import WorkItem


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


def prepare_in_process(
    preparer: SamplePreparer, records: list[dict[str, Any]]
) -> list[PreparedSample | Skip]:
    """Parsed LLaVA records (of the first source) prepared in this process, as a pipeline worker does."""
    items = [
        WorkItem(row, 0, str(record.get("id", "")), f"test[{row}]", json.dumps(record), copies=1)
        for row, record in enumerate(records)
    ]
    return preparer.prepare(items)


@pytest.fixture(scope="session")
def prepare_records() -> Callable[[SamplePreparer, list[dict[str, Any]]], list[PreparedSample | Skip]]:
    """:func:`prepare_in_process`, for tests."""
    return prepare_in_process
