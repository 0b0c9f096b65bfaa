"""Autoscaling rehearsed on one machine: cluster/aws.yaml's node types under Ray's fake multi-node autoscaler.

tests/cluster/autoscaling_scenario.py starts its own head (free ports, its own RAY_TMPDIR), runs
the tiny prepare job and the tiny stage job pinned to H100 nodes, waits for the scale-down and
stops that head; it runs in a subprocess, so this process's Ray (the session's ``ray_cluster``
fixture) is never touched. Both jobs run unpatched, as the product runs on CPU: the stage job asks
for ``scaling.use_gpu=false`` and ``scaling.resources_per_worker={"accelerator_type:H100": 0.001}``,
a resource only the ``gpu-h100-p5`` type has, so the autoscaler must launch that type and the
workers train there with gloo. The tests below read what it saw: the autoscaler's own report of
node types and launches, ``ray.nodes()`` and per-node resource use sampled every 0.5 s, the GCS
actor table's record of where each Ray Train worker ran, and the autoscaler's messages in
monitor.log. 1.5-3.5 minutes on 2 cores (the head alone takes 20-40 s to start on a busy machine).

    python -m pytest tests/cluster/test_autoscaling.py -q
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

SCENARIO = Path(__file__).with_name("autoscaling_scenario.py")
MARKER = "AUTOSCALING_OBSERVATIONS "
IDLE_TIMEOUT_S = 10
DEADLINE_S = 480  # the scenario stops its head and gives up after this
CPU_TYPE, GPU_TYPE, OTHER_GPU_TYPE = "cpu-m6i-8xlarge", "gpu-h100-p5", "gpu-a100-p4d"
SAMPLING_S = 1.0  # sampling period (0.5 s) plus the autoscaler's loop (1 s) blur each time a bit
LAUNCH_WITHIN_S = 30  # from a job asking for resources to a fake node of the right type being up
REMOVAL_SLACK_S = 30  # past the idle timeout, for an idle node to be gone
TRAIN_WORKERS = 2  # jobs/configs/tiny/pretrain.yaml: scaling.num_workers, 0.5 CPU each


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    workdir = tmp_path_factory.mktemp("autoscaling")
    command = [
        sys.executable,
        str(SCENARIO),
        "--workdir",
        str(workdir),
        "--idle-timeout-s",
        str(IDLE_TIMEOUT_S),
        "--deadline-s",
        str(DEADLINE_S),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=DEADLINE_S + 120)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # the scenario stops its head on SIGTERM
        stdout, stderr = process.communicate(timeout=120)
    line = next((line for line in stdout.splitlines() if line.startswith(MARKER)), None)
    assert process.returncode == 0 and line, (
        f"the scenario failed ({process.returncode}); Ray logs in {workdir}/ray-logs\n{stderr[-8000:]}"
    )
    observations = json.loads(line.removeprefix(MARKER))
    print(json.dumps(summary(observations), indent=1))  # the figures docs/scale.md quotes (pytest -s)
    return observations


def summary(observed: dict[str, Any]) -> dict[str, Any]:
    """Per node: type, seconds from its job's start to up, from its last busy moment to gone."""
    phases = observed["phases"]
    nodes = []
    for node in worker_nodes(observed):
        job = "prepare" if node["type"] == CPU_TYPE else "train"
        nodes.append(
            {
                "type": node["type"],
                "up_after_job_start_s": round(node["up"] - phases[job][0], 1),
                "gone_after_idle_s": round(node["down"] - node["busy"][-1][1], 1)
                if node["down"] is not None and node["busy"]
                else None,
            }
        )
    workers = [{"type": w["type"], "start": w["start"], "end": w["end"]} for w in observed["train_workers"]]
    return {"phases": phases, "nodes": nodes, "train_workers": workers, "wall_s": observed["wall_s"]}


def worker_nodes(observed: dict[str, Any], node_type: str | None = None) -> list[dict[str, Any]]:
    nodes = [
        {"id": node_id, **node} for node_id, node in observed["nodes"].items() if node_id != observed["head"]
    ]
    return [n for n in nodes if node_type is None or n["type"] == node_type]


def test_the_rehearsal_cluster_starts_with_the_head_only(observed: dict[str, Any]) -> None:
    head = observed["nodes"][observed["head"]]
    assert head["type"] == "ray.head.default"
    assert "CPU" not in head["resources"] and "GPU" not in head["resources"], head["resources"]
    # min_workers 0 everywhere: no worker node before the first job asked for resources.
    assert all(node["up"] >= observed["phases"]["prepare"][0] for node in worker_nodes(observed))
    assert {name for name, t in observed["node_types"].items() if t.get("min_workers", 0)} == set()


def test_prepare_gets_cpu_worker_nodes_launched(observed: dict[str, Any]) -> None:
    start, end = observed["phases"]["prepare"]
    cpu_nodes = [n for n in worker_nodes(observed, CPU_TYPE) if start <= n["up"] <= end]
    assert cpu_nodes, observed["events"]
    first = min(cpu_nodes, key=lambda n: n["up"])
    assert first["up"] - start <= LAUNCH_WITHIN_S, (first, start)
    assert first["resources"]["CPU"] == 1 and "GPU" not in first["resources"]
    # Busy during prepare: its CPU did the work.
    assert any(busy_start <= end for busy_start, _ in first["busy"]), first
    # No GPU node for a CPU-only job.
    assert all(n["up"] > end for n in worker_nodes(observed) if n["type"] != CPU_TYPE)
    assert observed["prepared"] == {"input": 24, "written": 24}
    assert any(
        m["message"].startswith(f"Adding 1 node(s) of type {CPU_TYPE}")
        for m in observed["autoscaler_messages"]
    ), observed["autoscaler_messages"]


def test_the_stage_job_gets_the_pinned_gpu_node_type_launched(observed: dict[str, Any]) -> None:
    start, end = observed["phases"]["train"]
    gpu_nodes = worker_nodes(observed, GPU_TYPE)
    assert len(gpu_nodes) == 1, observed["events"]
    (node,) = gpu_nodes
    assert start <= node["up"] <= start + LAUNCH_WITHIN_S + 30, (node, start)  # + the driver's own set-up
    assert node["resources"]["GPU"] == 2 and node["resources"]["accelerator_type:H100"] == 1
    # accelerator_type:H100 in scaling.resources_per_worker: never the A100 type, though it fits too.
    assert worker_nodes(observed, OTHER_GPU_TYPE) == []
    assert any(
        e["event"] == "pending_launches" and e["type"] == GPU_TYPE and e["count"] == 1 and e["t"] >= start
        for e in observed["events"]
    )
    assert observed["train"]["steps"] == 2
    assert any(busy_start <= end for busy_start, _ in node["busy"]), node


def test_the_training_workers_ran_on_the_h100_node(observed: dict[str, Any]) -> None:
    """The GCS actor table: every Ray Train worker on that one node, started after the node came up."""
    start, end = observed["phases"]["train"]
    (node,) = worker_nodes(observed, GPU_TYPE)
    workers = observed.get("train_workers")
    assert workers and len(workers) == TRAIN_WORKERS, observed.get("train_workers_error", workers)
    assert {(w["node"], w["type"]) for w in workers} == {(node["id"], GPU_TYPE)}, workers
    for worker in workers:
        assert worker["state"] == "DEAD", worker  # the job ended them
        assert node["up"] - SAMPLING_S <= worker["start"] and start <= worker["start"], (worker, node)
        assert worker["end"] <= end + SAMPLING_S, (worker, end)
    # What they held there: 0.5 CPU and 0.001 accelerator_type:H100 each, and no GPU (CPU training).
    assert node["peak_in_use"]["accelerator_type:H100"] == pytest.approx(TRAIN_WORKERS * 0.001)
    assert node["peak_in_use"]["CPU"] == pytest.approx(TRAIN_WORKERS * 0.5)
    assert "GPU" not in node["peak_in_use"], node["peak_in_use"]


def test_idle_nodes_are_removed_after_the_idle_timeout(observed: dict[str, Any]) -> None:
    nodes = worker_nodes(observed)
    assert {n["type"] for n in nodes} == {CPU_TYPE, GPU_TYPE}
    terminations = {
        m["terminated"]: m["reason"] for m in observed["autoscaler_messages"] if "terminated" in m
    }
    for node in nodes:
        assert node["down"] is not None, f"{node['type']} node {node['id']} was never removed"
        idle_for = node["down"] - node["busy"][-1][1]
        # Not before the timeout (less the sampling blur), and not long after it: 10.4-19 s seen.
        # Ray counts a node holding objects as busy, so it can outlive its last task a little.
        assert IDLE_TIMEOUT_S - SAMPLING_S <= idle_for <= IDLE_TIMEOUT_S + REMOVAL_SLACK_S, (node, idle_for)
        assert terminations.get(node["id"]) == "idle", (node["id"], observed["autoscaler_messages"])
    # After the stage job the cluster shrank back to the head alone.
    assert observed["nodes"][observed["head"]]["down"] is None
    train_end = observed["phases"]["train"][1]
    assert all(n["down"] <= train_end + IDLE_TIMEOUT_S + REMOVAL_SLACK_S for n in nodes)


def test_the_scenario_stopped_everything_it_started(observed: dict[str, Any]) -> None:
    assert observed["left_running"] == []
    assert observed["sampler_errors"] == []
    assert observed["wall_s"] < DEADLINE_S
