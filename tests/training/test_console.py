"""A worker's job output reaches the driver once (Ray Train 2.60 sends a worker's print twice)."""

import json
import os
import uuid
from pathlib import Path

import pytest
import ray.train
from ray.train.torch import TorchTrainer

from llava_ray.utils.logging import say

pytestmark = pytest.mark.integration


def _worker_loop(config: dict) -> None:
    say(f"said {config['tag']}")
    print(f"printed {config['tag']}", flush=True)
    # Ray points the worker's stdout and stderr at its log files, which it streams to the driver.
    streams = {name: os.readlink(f"/proc/self/fd/{fd}") for name, fd in (("out", 1), ("err", 2))}
    with open(config["streams_file"], "w") as file:
        json.dump(streams, file)


def test_said_lines_reach_the_worker_logs_once_where_print_doubles(tmp_path, ray_cluster):
    tag = uuid.uuid4().hex
    streams_file = tmp_path / "streams.json"
    TorchTrainer(
        _worker_loop,
        train_loop_config={"tag": tag, "streams_file": str(streams_file)},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(name=f"console-{tag}", storage_path=str(tmp_path / "runs")),
    ).fit()
    streams = json.loads(streams_file.read_text())
    logged = "".join(Path(path).read_text(errors="replace") for path in {streams["out"], streams["err"]})
    assert logged.count(f"printed {tag}") == 2  # the trap this guards against: print arrives twice
    assert logged.count(f"said {tag}") == 1
