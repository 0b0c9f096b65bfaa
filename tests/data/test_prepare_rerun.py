"""Rerunning prepare into a finished folder: real ``llava-ray prepare`` processes, one of them SIGKILLed.

The previous run's data stays whole and readable until the new run's data replaces it in one
step (``prepare.publish``) (issue #21, item 5). The first run is standalone, as a user runs it (its
own Ray instance, started and stopped by the CLI).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import ray

from llava_ray.config import LlavaRayConfig, dump_config
from llava_ray.data.prepare import REPORT_FILE, load_report, run_prepare, shards_location
from llava_ray.data.synthetic import generate
from llava_ray.training.stream import index_prepared

pytestmark = pytest.mark.integration

CLI = Path(sys.executable).with_name("llava-ray")
FIRST, SECOND = 6, 12  # samples of the first run and of the rerun: the row counts tell them apart
WAIT_S = 600  # a bound on waiting for the rerun to start writing, not a timing assertion


def write_lines(synthetic: Path, out: Path, count: int) -> Path:
    samples = json.loads((synthetic / "stage1.json").read_text())[:count]
    out.write_text("".join(json.dumps(sample) + "\n" for sample in samples))
    return out


def prepare_command(config: LlavaRayConfig, folder: Path) -> list[str]:
    config_file = folder / "prepare.yaml"
    config_file.write_text(dump_config(config))
    return [str(CLI), "prepare", "--config", str(config_file)]


def staging_folders(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f"{out.name}.partial-*")) + sorted(out.parent.glob(f"{out.name}.old-*"))


def test_a_killed_rerun_leaves_the_previous_data_whole_and_readable(
    ray_cluster: None, tmp_path: Path, make_config: Callable[..., LlavaRayConfig]
) -> None:
    synthetic = tmp_path / "synthetic"
    generate(synthetic, samples=SECOND, eval_samples=1, seed=3)
    image_root = {"image_root": str(synthetic)}
    first = [{"path": str(write_lines(synthetic, tmp_path / "first.jsonl", FIRST)), **image_root}]
    second = [{"path": str(write_lines(synthetic, tmp_path / "second.jsonl", SECOND)), **image_root}]
    out = tmp_path / "prepared"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}

    # 1. A standalone run, as a user types it: its own Ray instance, started and stopped by the CLI.
    standalone = subprocess.run(
        prepare_command(make_config(first, out, template="plain"), tmp_path),
        env={**environment, "RAY_ADDRESS": "local"},
        capture_output=True,
        text=True,
    )
    assert standalone.returncode == 0, standalone.stderr[-4000:]
    report_bytes = (out / REPORT_FILE).read_bytes()
    assert json.loads(report_bytes)["written"] == FIRST == len(index_prepared(str(out)).rows)

    # 2. A rerun into the finished folder, SIGKILLed once it has started writing its shards.
    rerun = subprocess.Popen(
        prepare_command(make_config(second, out, template="plain"), tmp_path),
        # The session's cluster: a killed driver's actors and tasks end with it, no Ray of its own is left.
        env={**environment, "RAY_ADDRESS": ray.get_runtime_context().gcs_address},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + WAIT_S
    while not staging_folders(out) and rerun.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    killed_while_writing = bool(staging_folders(out)) and rerun.poll() is None
    rerun.kill()
    _, stderr = rerun.communicate()
    assert killed_while_writing, f"the rerun ended (rc {rerun.returncode}) before writing:\n{stderr[-4000:]}"
    assert rerun.returncode == -signal.SIGKILL

    assert (out / REPORT_FILE).read_bytes() == report_bytes
    assert load_report(str(out))["written"] == FIRST
    index = index_prepared(str(out))  # the training reader: shards and report agree
    assert len(index.rows) == FIRST and shards_location(str(out)) == str(out)

    # 3. The next run replaces the data in one step and removes the killed run's staging folder.
    report = run_prepare(make_config(second, out, template="plain"))
    assert report["written"] == SECOND == len(index_prepared(str(out)).rows)
    assert load_report(str(out)) == report
    assert staging_folders(out) == []
