"""Multi-node behaviour rehearsed on one machine with Ray's own ``ray.cluster_utils.Cluster``.

Each scenario of ``multinode_scenarios.py`` runs in a process of its own, with a cluster of its
own (a head and 1-CPU worker nodes, each its own raylet and object store), so the session-wide
``ray_cluster`` of this pytest process is never touched; these tests assert on the JSON line it
prints. Covers: two Ray Train workers on two nodes train exactly as on one node; a training
node removed mid-run (raylet, object store and all) is survived from the latest checkpoint on a
replacement node, to the same weights; ``prepare`` survives a node removed mid-run with a
balanced report and exactly the reported rows in its shards. Placement and node loss share one
cluster and process; each scenario's JSON is kept in its workdir.

    python -m pytest tests/cluster/test_multinode.py -q
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from llava_ray.model.llava import LlavaModel

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).with_name("multinode_scenarios.py")
REPO = SCRIPT.parents[2]
SCENARIO_TIMEOUT_S = 900
RESULT_PREFIX = "RESULT "


def run_scenario(scenario: str, workdir: Path) -> dict[str, Any]:
    """Run one scenario in its own process and return the JSON it printed.

    On a timeout the scenario gets SIGTERM first: Ray's node objects in it then stop their
    cluster's processes, which a SIGKILL would leave behind.
    """
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    log = workdir / f"{scenario}.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, str(SCRIPT), scenario, str(workdir)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=output,
            text=True,
        )
        try:
            stdout, _ = process.communicate(timeout=SCENARIO_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)
            try:
                process.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
            pytest.fail(f"{scenario} ran past {SCENARIO_TIMEOUT_S} s; its log: {log}")
    results = [line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    assert process.returncode == 0 and results, (
        f"{scenario} exited with {process.returncode}; the end of its log ({log}):\n"
        + "\n".join(log.read_text().splitlines()[-40:])
    )
    (workdir / f"{scenario}.json").write_text(results[-1][len(RESULT_PREFIX) :])  # the figures, kept
    return json.loads(results[-1][len(RESULT_PREFIX) :])


def assert_same_weights(a_uri: str, b_uri: str) -> None:
    """As tests/training/test_train_ray.py compares runs."""
    a, b = LlavaModel.from_pretrained(a_uri).state_dict(), LlavaModel.from_pretrained(b_uri).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared by the training scenarios: the prepared data and the one-node baseline run."""
    return tmp_path_factory.mktemp("multinode")


@pytest.fixture(scope="module")
def training(workdir: Path) -> dict[str, Any]:
    """Placement, then node loss, on one cluster (one start of it saves about half a minute)."""
    return run_scenario("training", workdir)


def test_two_workers_on_two_nodes_train_as_on_one_node(training):
    one_node, two_nodes = training["placement"]["one_node"], training["placement"]["two_nodes"]
    assert one_node["worker_nodes"] == ["pair", "pair"]
    assert two_nodes["worker_nodes"] == ["a", "b"]
    for run in (one_node, two_nodes):
        assert run["metrics"]["step"] == 6
    assert two_nodes["metrics"]["loss_last"] == pytest.approx(one_node["metrics"]["loss_last"], rel=1e-5)
    assert_same_weights(two_nodes["final_model"], one_node["final_model"])


def test_removed_training_node_resumes_from_its_checkpoint_to_the_same_weights(training):
    run = training["node_loss"]
    assert "error" not in run, run["error"]
    # The node went after the step-2 checkpoint and before the end, with a worker on it.
    assert training["checkpoint_step_at_removal"] >= 2
    assert "b" in {worker["node"] for worker in training["workers_before"] if worker["state"] == "ALIVE"}
    # Ray Train restarted the worker group on the remaining node and the replacement.
    assert run["worker_nodes"].count("c") == 1
    assert run["metrics"]["step"] == 6
    assert 2 <= run["metrics"]["resumed_from_step"] < 6
    # Lost work: the steps done after that checkpoint, up to the loss (and at most the one step
    # rank 0 was finishing as the node went), were trained again; no other step was.
    resumed, redone = run["metrics"]["resumed_from_step"], training["steps_trained_twice"]
    assert redone == list(range(resumed + 1, resumed + 1 + len(redone)))
    assert max(redone, default=resumed) >= training["step_at_removal"]
    assert_same_weights(run["final_model"], training["placement"]["one_node"]["final_model"])


def test_prepare_survives_a_removed_node(tmp_path):
    observed = run_scenario("prepare-node-loss", tmp_path)
    report = observed["report"]
    assert report["error"] is None, report["error"]
    # The removal happened mid-run: node b had prepared rows, and far from all of them.
    before = observed["rows_by_node_at_removal"]
    assert before.get("b", 0) > 0 and sum(before.values()) < report["input"]
    assert observed["removed_after_s"] < observed["elapsed_s"]
    # The report lives on the driver's node, so it outlived node b ...
    assert observed["report_actor_node"] == ["head"]
    # ... and still balances, and the shards hold exactly the rows it counts, each once.
    assert report["input"] == report["written"] + sum(report["skipped"].values())
    assert observed["shard_rows"] == report["written"] == observed["distinct_row_keys"]
