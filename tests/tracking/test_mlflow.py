"""MLflow tracking against a real `mlflow server` (sqlite backend; local and S3 artifacts) and the local store."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import s3fs
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from llava_ray.config import load_config
from llava_ray.data.synthetic import generate
from llava_ray.tracking.mlflow_tracking import TrackingUnavailable, redact, tracked_run
from llava_ray.training.driver import run_train
from llava_ray.workflows.pipeline import prepare_job

SECRET = "planted-secret-123"
MLFLOW = Path(sys.executable).with_name("mlflow")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking")
    generate(root / "data", samples=24, seed=0)
    return root


def tiny_pretrain(root: Path, name: str, *overrides: str):
    return load_config(
        "jobs/configs/tiny/pretrain.yaml",
        [
            f"data.sources.0.path={root / 'data' / 'stage1.json'}",
            f"data.prepared_path={root / 'prepared'}",
            f"run.storage_path={root / 'runs'}",
            f"run.name={name}",
            "train.global_batch_size=8",
            "train.micro_batch_size=8",
            "scaling.num_workers=1",
            "train.max_steps=3",
            f"model.lm_config_overrides.hf_token={SECRET}",
            *overrides,
        ],
    )


def test_redaction_hides_secret_looking_keys_only():
    params = redact(
        {"generate.api_key": "sk-123", "a.token": "t", "a.tokenizer": "x", "b.lr": 0.1, "c.api_key": None}
    )
    assert params == {
        "generate.api_key": "***",
        "a.token": "***",
        "a.tokenizer": "x",
        "b.lr": "0.1",
        "c.api_key": "null",
    }


def check_training_run(client: MlflowClient, name: str) -> str:
    """The run of job ``name`` exists with grouped metric history, redacted params, tags, artifacts,
    its prepared dataset as input and its final model as an MLflow model."""
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], f"attributes.run_name = 'pretrain {name}'"
    )
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3]
    assert {
        "train/learning_rate",
        "train/grad_norm",
        "perf/samples_per_s",
        "perf/supervised_tokens_per_s",
        "perf/padding_fraction",
    } <= set(run.data.metrics)
    assert not {"step", "loss"} & set(run.data.metrics)  # no pointless step chart, no ungrouped keys
    params = run.data.params
    assert params["model.lm_config_overrides.hf_token"] == "***" and params["train.max_steps"] == "3"
    assert not any(SECRET in value for value in params.values())
    tags = run.data.tags
    assert tags["llava_ray.stage"] == "pretrain" and tags["llava_ray.model_preset"] == "tiny"
    assert len(tags["mlflow.source.git.commit"]) >= 7
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "data_report.json"} <= artifacts and "loss_curve.png" not in artifacts, artifacts
    config_text = client.download_artifacts(run.info.run_id, "config.yaml")
    assert SECRET not in Path(config_text).read_text()
    (dataset_input,) = run.inputs.dataset_inputs
    assert json.loads(dataset_input.dataset.profile)["written"] > 0
    models = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
    )
    assert len(models) == 1 and tags["llava_ray.mlflow_model"] == models[0].model_uri
    model_files = {Path(a.path).name for a in client.list_logged_model_artifacts(models[0].model_id)}
    assert "MLmodel" in model_files, model_files
    return run.info.run_id


@pytest.mark.integration
def test_prepare_run_on_a_real_server_with_local_artifacts(
    tmp_path, synthetic, ray_cluster, get_free_port, mlflow_server_control
):
    """A real server storing artifacts on its local disk; a training job on one is tested with S3 below."""
    start_mlflow_server, stop_server = mlflow_server_control
    port = get_free_port()
    server = start_mlflow_server(tmp_path, port, str(tmp_path / "artifacts"))
    try:
        uri = f"http://127.0.0.1:{port}"
        config = tiny_pretrain(synthetic, "tracked-local", f"tracking.uri={uri}")
        report = prepare_job(config)
        client = MlflowClient(uri)
        runs = client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            "attributes.run_name = 'prepare pretrain tracked-local'",
        )
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        run = runs[0]
        assert (
            run.data.metrics["data/written"] == report["written"] > 0
            and run.data.metrics["data/input"] == report["input"]
        )
        assert run.data.params["model.lm_config_overrides.hf_token"] == "***"
        assert run.data.tags["llava_ray.job"] == "prepare"
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.yaml", "data_report.json"}
        assert {path.name for path in (tmp_path / "artifacts").rglob("*.json")} == {"data_report.json"}
        assert SECRET not in next((tmp_path / "artifacts").rglob("config.yaml")).read_text()
    finally:
        stop_server(server)


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory, synthetic, ray_cluster, s3_endpoint, get_free_port, mlflow_server_control):
    """A tiny tracked training run on a real server with S3 artifacts, its final model registered."""
    start_mlflow_server, stop_server = mlflow_server_control
    tmp_path = tmp_path_factory.mktemp("s3-server")
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    fs.mkdir("mlflow-artifacts")
    port = get_free_port()
    server = start_mlflow_server(
        tmp_path, port, "s3://mlflow-artifacts/store", env={"MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    )
    try:
        uri = f"http://127.0.0.1:{port}"
        config = tiny_pretrain(synthetic, "tracked-s3", f"tracking.uri={uri}", *REGISTERED)
        prepare_job(config, reuse=True)
        result = run_train(config)
        yield {"uri": uri, "final": Path(result.final_model), "fs": fs}
    finally:
        stop_server(server)


REGISTERED = ("tracking.register_model=tiny-llava", "checkpoint.every_n_steps=2")


@pytest.mark.integration
def test_training_run_on_a_real_server_with_s3_artifacts(undisturbed, local_mlflow_store):
    check_training_run(MlflowClient(undisturbed["uri"]), "tracked-s3")
    # Logging the model went through MLflow's fluent API; the process's own setting is as it was.
    assert os.environ["MLFLOW_TRACKING_URI"] == local_mlflow_store
    stored = undisturbed["fs"].find("mlflow-artifacts/store")
    assert any(path.endswith("/MLmodel") for path in stored) and not any("loss_curve" in p for p in stored)


@pytest.mark.integration
def test_the_registered_model_loads_with_mlflows_loaders_and_serves(
    undisturbed, tmp_path, get_free_port, monkeypatch
):
    """``models:/tiny-llava/1`` through MLflow's own loaders, and answered by ``mlflow models serve``."""
    import mlflow
    import pandas as pd
    from transformers import LlavaForConditionalGeneration

    model_uri = "models:/tiny-llava/1"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", undisturbed["uri"])  # what the loaders read
    components = mlflow.transformers.load_model(model_uri, return_type="components")
    assert isinstance(components["model"], LlavaForConditionalGeneration)
    assert components["task"] == "image-text-to-text" and components["processor"] is not None
    exported = load_file(undisturbed["final"] / "hf" / "model.safetensors")
    loaded = components["model"].state_dict()
    projector = "model.multi_modal_projector.linear_1.weight"
    assert torch.equal(loaded[projector], exported["multi_modal_projector.linear_1.weight"])
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    rows = pd.DataFrame([{"prompt": "What color is the shape?", "image": red_square_base64()}])
    (answer,) = pyfunc.predict(rows, params={"max_new_tokens": 4})
    assert isinstance(answer, str)

    port = get_free_port()
    log = (tmp_path / "serve.log").open("w")
    serving = subprocess.Popen(
        [
            str(MLFLOW),
            "models",
            "serve",
            "-m",
            model_uri,
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        # The scoring server is started as `uvicorn` from PATH: the venv's bin first.
        env={
            **os.environ,
            "MLFLOW_TRACKING_URI": undisturbed["uri"],
            "PATH": f"{MLFLOW.parent}:{os.environ['PATH']}",
        },
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert serving.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                time.sleep(1)
        body = {
            "dataframe_records": [{"prompt": "What shape is it?", "image": red_square_base64()}],
            "params": {"max_new_tokens": 4},
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            predictions = json.loads(response.read())["predictions"]
        assert len(predictions) == 1 and isinstance(predictions[0], str)
    finally:
        os.killpg(serving.pid, signal.SIGTERM)
        try:
            serving.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(serving.pid, signal.SIGKILL)
            serving.wait()


def red_square_base64() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.integration
def test_training_survives_a_tracking_server_outage_and_mlflow_gets_every_step(
    tmp_path, synthetic, ray_cluster, get_free_port, mlflow_server_control, undisturbed
):
    """The server is stopped once the driver has logged its last pre-training artifact (before step 1)
    and started again, on the same port and store, once step 2's checkpoint exists: steps 1 and 2 are
    logged during the outage. The run finishes with the undisturbed run's weights and every metric."""
    start_mlflow_server, stop_server = mlflow_server_control
    port = get_free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path, port, str(tmp_path / "artifacts"))
    config = tiny_pretrain(synthetic, "outage", f"tracking.uri={uri}", *REGISTERED[1:])
    run_dir = synthetic / "runs" / "outage"
    outcome: dict = {}

    def train() -> None:
        try:
            outcome["result"] = run_train(config)
        except BaseException as error:  # reported by the assertion below
            outcome["error"] = error

    trainer = threading.Thread(target=train, daemon=True)
    trainer.start()
    try:
        wait_for(lambda: any((tmp_path / "artifacts").rglob("data_report.json")), trainer)
        stop_server(server)
        stopped_ms = int(time.time() * 1000)
        wait_for(lambda: any(run_dir.glob("checkpoint_*")), trainer)
        server = start_mlflow_server(tmp_path, port, str(tmp_path / "artifacts"))
        restarted_ms = int(time.time() * 1000)
        trainer.join(timeout=1200)
        assert not trainer.is_alive() and "error" not in outcome, outcome.get("error")
        client = MlflowClient(uri)
        (run,) = client.search_runs(
            [e.experiment_id for e in client.search_experiments()], "attributes.run_name = 'pretrain outage'"
        )
        assert run.info.status == "FINISHED"
        losses = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
        assert [m.step for m in losses] == [1, 2, 3]  # every step, each once
        assert all(stopped_ms < m.timestamp < restarted_ms for m in losses[:2])  # logged during the outage
        for key in ("train/learning_rate", "perf/samples_per_s"):
            assert len(client.get_metric_history(run.info.run_id, key)) == 3, key
        assert not (run_dir / "mlflow_unsent_metrics.jsonl").exists()  # all sent, nothing left behind
    finally:
        stop_server(server)
    outage_weights = load_file(Path(outcome["result"].final_model) / "model.safetensors")
    reference = load_file(undisturbed["final"] / "model.safetensors")
    assert outage_weights.keys() == reference.keys()
    assert all(torch.equal(outage_weights[name], reference[name]) for name in reference)


def wait_for(condition, trainer: threading.Thread, timeout_s: float = 900) -> None:
    """Poll ``condition`` while the training thread runs (a bound only against hanging forever)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert trainer.is_alive(), "the training run ended before the condition"
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.2)


def test_unreachable_server_fails_before_work_unless_optional(synthetic, get_free_port):
    uri = f"http://127.0.0.1:{get_free_port()}"
    config = tiny_pretrain(synthetic, "unreachable", f"tracking.uri={uri}")
    with (
        pytest.raises(
            TrackingUnavailable,
            match=r"cannot reach the MLflow server at http://127.0.0.1:\d+.*"
            r"set tracking.required=false to run without tracking",
        ),
        tracked_run(config, "prepare"),
    ):
        pytest.fail("the job body must not run")
    optional = tiny_pretrain(synthetic, "unreachable", f"tracking.uri={uri}", "tracking.required=false")
    with tracked_run(optional, "prepare") as tracker:
        assert not tracker.enabled
        tracker.log_metrics({"loss": 1.0}, step=1)  # a no-op, never an error


def test_embedded_default_store_in_the_working_directory(tmp_path, synthetic, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    config = load_config(
        str(Path(__file__).resolve().parents[2] / "jobs/configs/tiny/pretrain.yaml"),
        ["run.name=embedded", "model.lm_config_overrides.hf_token=" + SECRET],
    )
    with tracked_run(config, "prepare") as tracker:
        tracker.log_metrics({"written": 5}, step=0)
    assert (tmp_path / "mlflow.db").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(tracker.run_id)
    assert run.data.metrics["data/written"] == 5 and run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith((tmp_path / "mlruns").as_uri())
    assert (tmp_path / "mlruns").exists()
