"""MLflow tracking against a real `mlflow server` (sqlite backend; local and S3 artifacts) and the local store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import s3fs
from mlflow import MlflowClient

from llava_ray.config import load_config
from llava_ray.data.synthetic import generate
from llava_ray.tracking.mlflow_tracking import TrackingUnavailable, redact, tracked_run
from llava_ray.training.driver import run_train
from llava_ray.workflows.pipeline import prepare_job

SECRET = "planted-secret-123"
MLFLOW = Path(sys.executable).with_name("mlflow")


def start_mlflow_server(
    tmp: Path, port: int, artifacts: str, env: dict[str, str] | None = None
) -> subprocess.Popen:
    log = (tmp / "mlflow-server.log").open("w")
    process = subprocess.Popen(
        [
            str(MLFLOW),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp / 'server.db'}",
            "--artifacts-destination",
            artifacts,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        start_new_session=True,  # its own process group, so we stop exactly the server and its workers
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert process.poll() is None, (tmp / "mlflow-server.log").read_text()
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
            return process
        except OSError:
            time.sleep(0.5)
    stop_server(process)
    raise RuntimeError("mlflow server did not start:\n" + (tmp / "mlflow-server.log").read_text())


def stop_server(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


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
    """The run of job ``name`` exists with metric history, redacted params, tags and artifacts."""
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], f"attributes.run_name = '{name}'"
    )
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3]
    assert {
        "learning_rate",
        "grad_norm",
        "samples_per_s",
        "supervised_tokens_per_s",
        "padding_fraction",
    } <= set(run.data.metrics)
    params = run.data.params
    assert params["model.lm_config_overrides.hf_token"] == "***" and params["train.max_steps"] == "3"
    assert not any(SECRET in value for value in params.values())
    tags = run.data.tags
    assert tags["llava_ray.stage"] == "pretrain" and tags["llava_ray.model_preset"] == "tiny"
    assert len(tags["mlflow.source.git.commit"]) >= 7
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "data_report.json", "loss_curve.png", "model"} <= artifacts, artifacts
    config_text = client.download_artifacts(run.info.run_id, "config.yaml")
    assert SECRET not in Path(config_text).read_text()
    model_files = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"config.json", "model.safetensors"} <= model_files, model_files
    return run.info.run_id


@pytest.mark.integration
def test_prepare_run_on_a_real_server_with_local_artifacts(tmp_path, synthetic, ray_cluster, get_free_port):
    """A real server storing artifacts on its local disk; a training job on one is tested with S3 below."""
    port = get_free_port()
    server = start_mlflow_server(tmp_path, port, str(tmp_path / "artifacts"))
    try:
        uri = f"http://127.0.0.1:{port}"
        config = tiny_pretrain(synthetic, "tracked-local", f"tracking.uri={uri}")
        report = prepare_job(config)
        client = MlflowClient(uri)
        runs = client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            "attributes.run_name = 'tracked-local-prepare'",
        )
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        run = runs[0]
        assert (
            run.data.metrics["written"] == report["written"] > 0
            and run.data.metrics["input"] == report["input"]
        )
        assert run.data.params["model.lm_config_overrides.hf_token"] == "***"
        assert run.data.tags["llava_ray.job"] == "prepare"
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.yaml", "data_report.json"}
        assert {path.name for path in (tmp_path / "artifacts").rglob("*.json")} == {"data_report.json"}
        assert SECRET not in next((tmp_path / "artifacts").rglob("config.yaml")).read_text()
    finally:
        stop_server(server)


@pytest.mark.integration
def test_training_run_on_a_real_server_with_s3_artifacts(
    tmp_path, synthetic, ray_cluster, s3_endpoint, get_free_port
):
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    fs.mkdir("mlflow-artifacts")
    port = get_free_port()
    server = start_mlflow_server(
        tmp_path, port, "s3://mlflow-artifacts/store", env={"MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    )
    try:
        uri = f"http://127.0.0.1:{port}"
        config = tiny_pretrain(synthetic, "tracked-s3", f"tracking.uri={uri}")
        prepare_job(config, reuse=True)
        run_train(config)
        check_training_run(MlflowClient(uri), "tracked-s3")
        assert any(path.endswith("loss_curve.png") for path in fs.find("mlflow-artifacts/store"))
    finally:
        stop_server(server)


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
    assert run.data.metrics["written"] == 5 and run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith((tmp_path / "mlruns").as_uri())
    assert (tmp_path / "mlruns").exists()
