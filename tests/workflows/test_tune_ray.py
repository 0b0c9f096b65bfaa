"""A real 4-trial sweep on a local Ray: Ray Tune + ASHA over Ray Train stage jobs, tracked in MLflow.

The shipped tiny sweep (2 projectors x 2 learning rates, one of them far too small) runs on
prepared synthetic data; ASHA must stop at least one weak trial, the best trial's config must
validate and train, and MLflow must hold the sweep's parent run with one child per trial. A rerun
of the same sweep resumes it from Tune's saved state instead of starting again. About 4-6 minutes
on 2 idle cores.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mlflow import MlflowClient

from llava_ray.config import load_config
from llava_ray.config.sweep import load_sweep
from llava_ray.data.prepare import run_prepare
from llava_ray.data.synthetic import generate
from llava_ray.training.driver import run_train
from llava_ray.workflows.tune import BEST_CONFIG, run_sweep

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SWEEP = REPO / "jobs/sweeps/tiny/projector_lr.yaml"


@pytest.fixture(scope="module")
def sweep_inputs(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("tune")
    generate(root / "data", samples=60, seed=0)
    overrides = [
        f"data.sources.0.path={root / 'data' / 'stage1.json'}",
        f"data.prepared_path={root / 'prepared'}",
        f"run.storage_path={root / 'runs'}",
        "train.warmup_ratio=0",
    ]
    run_prepare(load_config(REPO / "jobs/configs/tiny/pretrain.yaml", overrides))
    return root, overrides


@pytest.fixture(scope="module")
def swept(sweep_inputs):
    _, overrides = sweep_inputs
    return run_sweep(*load_sweep(SWEEP, overrides))


def test_asha_stops_a_weak_trial_and_the_table_says_so(swept):
    table = swept.table
    assert len(table) == 4 and set(table["status"]) <= {"DONE", "STOPPED"}, table[
        ["trial_id", "status", "step", "error"]
    ].to_string()
    assert table["stopped_early"].sum() >= 1, table.to_string()
    assert set(zip(table["model.projector"], table["train.learning_rate"], strict=True)) == {
        (projector, lr) for projector in ("linear", "mlp2x_gelu") for lr in (1e-3, 1e-6)
    }
    stopped = table[table["stopped_early"]]
    assert (stopped["step"] < stopped["total_steps"]).all()
    best = table.iloc[0]
    assert best["train.learning_rate"] == 1e-3 and best["status"] == "DONE"
    assert best["best_val_loss"] == table["best_val_loss"].min()
    for name in ("results.csv", "results.json", BEST_CONFIG):
        assert (Path(swept.path) / name).exists()


def test_best_config_validates_and_trains(swept):
    config = load_config(swept.best_config_path, ["train.max_steps=2", "checkpoint.every_n_steps=null"])
    best = swept.table.iloc[0]
    assert config.model.projector == best["model.projector"]
    assert config.train.learning_rate == best["train.learning_rate"]
    assert config.train.val_fraction == 0 and config.train.save_final_model
    result = run_train(config)
    assert result.steps == 2 and os.path.isdir(result.final_model)


def test_mlflow_has_the_sweep_with_one_child_run_per_trial(swept, local_mlflow_store):
    client = MlflowClient(local_mlflow_store)
    parent = client.get_run(swept.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["llava_ray.job"] == "tune"
    assert parent.data.metrics["trials"] == 4
    assert parent.data.metrics["trials_stopped_early"] == swept.table["stopped_early"].sum()
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{swept.parent_run_id}'"
    )
    assert len(children) == 4
    assert {child.data.tags["llava_ray.trial_id"] for child in children} == set(swept.table["trial_id"])
    for child in children:
        row = swept.table.set_index("trial_id").loc[child.data.tags["llava_ray.trial_id"]]
        assert child.info.status == ("KILLED" if row["stopped_early"] else "FINISHED")
        # A stopped trial may log a little past the result Tune stopped it on; that result is in its history.
        history = [metric.value for metric in client.get_metric_history(child.info.run_id, "eval/val_loss")]
        if row["status"] == "DONE":
            assert history[-1] == pytest.approx(row["last_val_loss"])
        else:
            assert any(value == pytest.approx(row["last_val_loss"]) for value in history)
        assert child.data.params["model.projector"] == row["model.projector"]


def test_rerunning_the_sweep_resumes_it(swept, sweep_inputs):
    _, overrides = sweep_inputs
    again = run_sweep(*load_sweep(SWEEP, overrides))
    assert again.resumed and again.parent_run_id == swept.parent_run_id
    assert list(again.table["trial_id"]) == list(swept.table["trial_id"])  # no trial ran again
    assert list(again.table["best_val_loss"]) == list(swept.table["best_val_loss"])
