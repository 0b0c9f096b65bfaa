"""A worker's job output reaches the driver once (Ray Train 2.60 sends a worker's print twice)."""

import json
import logging
import os
import uuid
from pathlib import Path

import pytest
import ray.train
from ray.train.torch import TorchTrainer

from llava_ray.utils.logging import setup_logging

pytestmark = pytest.mark.integration


def _worker_loop(config: dict) -> None:
    rank = ray.train.get_context().get_world_rank()
    setup_logging(rank=rank)
    logger = logging.getLogger("llava_ray.training.worker")
    logger.info(f"logged {config['tag']} by rank {rank}")
    logger.warning(f"warned {config['tag']} by rank {rank}")
    print(f"printed {config['tag']} by rank {rank}", flush=True)
    # Ray points the worker's stdout and stderr at its log files, which it streams to the driver.
    streams = {name: os.readlink(f"/proc/self/fd/{fd}") for name, fd in (("out", 1), ("err", 2))}
    with open(f"{config['streams_prefix']}{rank}.json", "w") as file:
        json.dump(streams, file)


def test_logged_lines_reach_the_worker_logs_once_from_rank_0_where_print_doubles(tmp_path, ray_cluster):
    tag = uuid.uuid4().hex
    TorchTrainer(
        _worker_loop,
        train_loop_config={"tag": tag, "streams_prefix": str(tmp_path / "streams")},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(name=f"console-{tag}", storage_path=str(tmp_path / "runs")),
    ).fit()
    logged = ""
    for rank in (0, 1):
        streams = json.loads((tmp_path / f"streams{rank}.json").read_text())
        logged += "".join(Path(path).read_text(errors="replace") for path in {streams["out"], streams["err"]})
    assert logged.count(f"printed {tag} by rank 0") == 2  # the trap this guards against: print arrives twice
    assert logged.count(f"logged {tag} by rank 0") == 1
    assert logged.count(f"logged {tag} by rank 1") == 0  # progress is rank 0's
    assert logged.count(f"warned {tag} by rank 1") == 1  # warnings come from every rank
    assert "Reporting training result" not in logged
