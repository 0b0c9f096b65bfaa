"""The embedded demo, at a smaller size: the whole pipeline, its summary, and its MLflow runs."""

import json

import pytest
from mlflow import MlflowClient

from llava_ray.workflows.demo import run_demo, synthetic_data

pytestmark = pytest.mark.integration


def test_demo_runs_the_pipeline_and_tracks_a_parent_with_children(tmp_path, ray_cluster, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the demo's own store in its work dir
    summary = run_demo(
        tmp_path,
        samples=24,
        extra=("train.max_steps=3", "train.global_batch_size=8", "train.micro_batch_size=4"),
    )
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written == summary
    for key in (
        "eval_accuracy",
        "eval_chance",
        "eval_accuracy_before_stage2",
        "eval_accuracy_first_turn",
        "eval_accuracy_follow_up",
        "elapsed_s",
    ):
        assert isinstance(summary[key], float), key
    assert summary["eval_chance"] <= 0.25 and set(summary["eval_by_type"]) >= {
        "color",
        "shape",
        "count",
        "first_turn",
        "follow_up",
        "overall",
    }
    # First turns and follow-ups are scored apart: each is its own group of the held-out items.
    by_type = summary["eval_by_type"]
    assert summary["eval_accuracy_follow_up"] == by_type["follow_up"]["accuracy"]
    assert summary["eval_accuracy_first_turn"] == by_type["first_turn"]["accuracy"]
    assert isinstance(by_type["follow_up"]["before_stage2"], float)
    for stage in ("pretrain", "finetune"):
        assert {"loss_first", "loss_last", "seconds"} <= set(summary["stages"][stage])
    assert (tmp_path / "runs").exists() and any((tmp_path / "runs").glob("*/final/hf/config.json"))

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    parent = client.get_run(summary["parent_run_id"])
    assert parent.data.tags["llava_ray.job"] == "pipeline" and parent.info.status == "FINISHED"
    children = client.search_runs(experiments, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    jobs = sorted(child.data.tags["llava_ray.job"] for child in children)
    assert jobs == ["evaluate", "evaluate", "prepare", "prepare", "train", "train"], jobs
    assert all(child.info.status == "FINISHED" for child in children)

    rerun = run_demo(
        tmp_path,
        samples=24,
        extra=("train.max_steps=3", "train.global_batch_size=8", "train.micro_batch_size=4"),
    )
    assert rerun["parent_run_id"] != summary["parent_run_id"]  # a new run, reusing the prepared data
    reused = client.search_runs(experiments, f"tags.mlflow.parentRunId = '{rerun['parent_run_id']}'")
    assert {
        r.data.tags.get("llava_ray.reused_prepared_data")
        for r in reused
        if r.data.tags["llava_ray.job"] == "prepare"
    } == {"True"}


def test_synthetic_data_is_reused_only_for_the_same_size_and_seed(tmp_path):
    first = synthetic_data(tmp_path, samples=6, seed=0)
    stage1 = tmp_path / "data" / "stage1.json"
    assert len(json.loads(stage1.read_text())) == 6
    written = stage1.stat().st_mtime_ns
    assert synthetic_data(tmp_path, samples=6, seed=0) == first
    assert stage1.stat().st_mtime_ns == written  # reused, not written again
    (tmp_path / "prepared" / "pretrain").mkdir(parents=True)  # prepared from the old data
    resized = synthetic_data(tmp_path, samples=8, seed=0)
    assert resized["samples"] == 8 and len(json.loads(stage1.read_text())) == 8  # one caption per image
    assert not (tmp_path / "prepared").exists()
    assert synthetic_data(tmp_path, samples=8, seed=1)["seed"] == 1
