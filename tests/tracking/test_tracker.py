"""The tracker without Ray: metric groups, run names and roll-up, system metrics, outages, spill and replay,
resumed attempts."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from mlflow import MlflowClient

from llava_ray.config import load_config
from llava_ray.tracking.metric_sender import MetricPoint, MetricSender, SystemMetricsSampler, replay_spilled
from llava_ray.tracking.mlflow_tracking import (
    RUN_FILE,
    Tracker,
    close_interrupted_attempt,
    metric_key,
    tracked_run,
)

CONFIG = Path(__file__).resolve().parents[2] / "jobs/configs/tiny/pretrain.yaml"


def points(steps: range, key: str = "train/loss") -> list[MetricPoint]:
    now = int(time.time() * 1000)
    return [MetricPoint(key, float(step) / 10, now + step, step) for step in steps]


def history(client: MlflowClient, run_id: str, key: str = "train/loss") -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_metric_groups_keep_ray_keys_apart_from_mlflow_names():
    assert [metric_key(k) for k in ("loss", "grad_norm", "samples_per_s", "val_loss", "trials")] == [
        "train/loss",
        "train/grad_norm",
        "perf/samples_per_s",
        "eval/val_loss",
        "trials",  # a sweep's own summary keys stay as they are
    ]
    assert metric_key("accuracy/color", "evaluate") == "eval/accuracy/color"
    assert metric_key("skipped.image_missing", "prepare") == "data/skipped.image_missing"
    assert metric_key("system/cpu_utilization_percentage") == "system/cpu_utilization_percentage"


def test_run_names_lead_with_what_the_run_is_and_the_parent_rolls_up_headlines(local_mlflow_store):
    config = load_config(CONFIG, ["run.name=rollup"])
    with tracked_run(config, "pipeline", run_name="rollup-pipeline") as parent:
        with tracked_run(config, "train", parent.run_id) as train:
            train.remember({"loss": 1.5, "val_loss": 1.75, "step": 3})
        with tracked_run(config, "evaluate", parent.run_id, label="evaluate after_stage2") as evaluate:
            evaluate.log_metrics({"accuracy": 0.75, "accuracy/color": 1.0, "chance": 0.25})
    client = MlflowClient(local_mlflow_store)
    assert client.get_run(train.run_id).info.run_name == "pretrain rollup"
    child = client.get_run(evaluate.run_id)
    assert child.info.run_name == "evaluate after_stage2 rollup"
    assert child.data.metrics == {"eval/accuracy": 0.75, "eval/accuracy/color": 1.0, "eval/chance": 0.25}
    finished = client.get_run(parent.run_id)
    assert finished.info.run_name == "pipeline rollup-pipeline"
    assert finished.data.metrics == {
        "pretrain/train/loss": 1.5,
        "pretrain/eval/val_loss": 1.75,
        "evaluate-after_stage2/eval/accuracy": 0.75,
    }
    experiment = client.get_experiment(finished.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_rerun_marks_the_killed_attempts_run_killed(tmp_path, local_mlflow_store):
    config = load_config(CONFIG, ["run.name=resumed", f"run.storage_path={tmp_path}"])
    client = MlflowClient(local_mlflow_store)
    with tracked_run(config, "train") as first:
        assert close_interrupted_attempt(config, first) is None
    # The killed attempt: its process died with the run RUNNING (a hard kill runs no `finally`).
    client.update_run(first.run_id, status="RUNNING")
    with tracked_run(config, "train") as second:
        assert close_interrupted_attempt(config, second) == first.run_id
    killed = client.get_run(first.run_id)
    assert killed.info.status == "KILLED" and killed.data.tags["llava_ray.interrupted"] == "true"
    assert client.get_run(second.run_id).data.tags["llava_ray.resumes_run"] == first.run_id
    assert json.loads((tmp_path / "resumed" / RUN_FILE).read_text())["run_id"] == second.run_id


def test_system_metrics_are_sampled_into_the_run(local_mlflow_store):
    run = MlflowClient(local_mlflow_store).create_run("0")
    sender = MetricSender(local_mlflow_store, run.info.run_id)
    sampler = SystemMetricsSampler(sender, interval_s=0.2)
    deadline = time.monotonic() + 60
    while not sender.sent and time.monotonic() < deadline:
        time.sleep(0.2)
    sampler.stop()
    assert sender.close() == 0
    metrics = MlflowClient(local_mlflow_store).get_run(run.info.run_id).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics)


def test_untracked_tracker_is_a_no_op():
    tracker = Tracker(None, None)
    tracker.log_metrics({"loss": 1.0}, step=1)
    assert tracker.close() == 0


def test_an_outage_warns_once_keeps_memory_bounded_and_spills_what_it_could_not_send(
    tmp_path, get_free_port, local_mlflow_store, caplog
):
    """A server that never answers (the outage-and-return case, with a real server, is
    tests/tracking/test_mlflow.py's training run); the spilled points reach MLflow later."""
    run_id = MlflowClient(local_mlflow_store).create_run("0").info.run_id
    spill = tmp_path / "run" / "unsent.jsonl"
    dead = f"http://127.0.0.1:{get_free_port()}"  # nothing listens there
    sender = MetricSender(dead, run_id, spill_uri=str(spill), max_buffered=4, flush_timeout_s=1)
    with caplog.at_level(logging.WARNING, logger="llava_ray.tracking.metric_sender"):
        for step in range(1, 11):  # the steps keep coming; add() never blocks
            sender.add(points(range(step, step + 1)))
            assert len(sender._pending) <= 4  # older points went to the overflow file, not memory
        assert not sender.flush(timeout_s=3)
        assert sender.close() == 10
    warnings = [r.getMessage() for r in caplog.records if "does not answer" in r.getMessage()]
    assert len(warnings) == 1, warnings  # one warning per outage, not one per step
    assert "Training continues" in warnings[0]
    assert [json.loads(line)["step"] for line in spill.read_text().splitlines()] == list(range(1, 11))
    assert replay_spilled(local_mlflow_store, run_id, str(spill)) == 0
    assert not spill.exists()
    assert [step for step, _ in history(MlflowClient(local_mlflow_store), run_id)] == list(range(1, 11))
