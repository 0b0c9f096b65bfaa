"""MLflow tracking for every job: one run per job, nested under a pipeline or sweep run.

With no ``tracking.uri`` and no ``MLFLOW_TRACKING_URI``, runs go to a local store in the working
directory (``mlflow.db``, artifacts under ``mlruns/``); open it with::

    mlflow ui --backend-store-uri sqlite:///mlflow.db

On clusters point ``tracking.uri`` (or ``MLFLOW_TRACKING_URI``) at an ``mlflow server`` whose
artifacts live on S3 (see cluster/README.md). A tracking server that cannot be reached is
reported once, before any work: the job fails with a clear message unless
``tracking.required=false``, in which case it runs without tracking.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llava_ray.config.loader import dump_config, flatten_config
from llava_ray.config.schema import LlavaRayConfig

logger = logging.getLogger(__name__)

# A key is secret when its last word is one of these: "hf_token" and "api_key" are, "tokenizer" is not.
SECRET_KEY = re.compile(
    r"(^|[_\-.])(api_?key|access_?key|secret(_?key)?|token|password|passwd|credentials?|auth)$", re.IGNORECASE
)
REDACTED = "***"
PARAM_VALUE_LIMIT = 6000  # MLflow's limit on a param value


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be reached and the config requires tracking."""


def tracking_uri(config: LlavaRayConfig) -> str:
    """The config's URI, else ``$MLFLOW_TRACKING_URI``, else the local store in the working directory."""
    if config.tracking.uri:
        return config.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def local_artifact_root(uri: str) -> str | None:
    """Artifacts of a local sqlite store live beside the database (``mlruns/``); servers decide their own."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlruns").as_uri()


def server_problem(uri: str, timeout_s: float = 5.0) -> str | None:
    """Why an HTTP tracking server cannot be used, or None; local stores always can."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
            if response.status == 200:
                return None
            return f"{uri}/health answered HTTP {response.status}"
    except (urllib.error.URLError, OSError) as error:
        return f"cannot reach the MLflow server at {uri}: {getattr(error, 'reason', error)}"


def redact(params: Mapping[str, Any]) -> dict[str, str]:
    """Flattened params as MLflow strings; values of secret-looking keys become ``***``."""
    redacted = {}
    for key, value in params.items():
        if SECRET_KEY.search(key.rsplit(".", 1)[-1]) and value not in (None, ""):
            text = REDACTED
        else:
            text = value if isinstance(value, str) else json.dumps(value)
        redacted[key] = text[:PARAM_VALUE_LIMIT]
    return redacted


def git_commit() -> str | None:
    """The commit of the code being run, or None when unknown.

    ``$LLAVA_RAY_GIT_COMMIT`` when set: deployment metadata, for ``ray job submit``, whose working
    directory copy has no git history. Else the HEAD of the git checkout holding the current working
    directory (the job is launched from the repository root), not of wherever the package is
    installed: an installed llava-ray has no checkout of its own.
    """
    if os.environ.get("LLAVA_RAY_GIT_COMMIT"):
        return os.environ["LLAVA_RAY_GIT_COMMIT"]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path.cwd(),
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit or None


def ray_job_submission_id() -> str | None:
    """The ``ray job submit`` id of this driver, when it runs as a Ray job."""
    job_config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not job_config:
        return None
    return json.loads(job_config).get("metadata", {}).get("job_submission_id")


class Tracker:
    """One MLflow run of one job (a no-op when tracking is off). Log from the driver or rank 0 only."""

    def __init__(self, uri: str | None, run_id: str | None):
        self.uri = uri
        self.run_id = run_id
        self._client = None

    @property
    def enabled(self) -> bool:
        return self.run_id is not None

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self.uri)
        return self._client

    def log_metrics(self, metrics: Mapping[str, float | int | None], step: int | None = None) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [
            Metric(key, float(value), now, step or 0)
            for key, value in metrics.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        ]
        if entries:
            self.client.log_batch(self.run_id, metrics=entries)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        if self.enabled:
            self.client.log_dict(self.run_id, data, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            self.client.log_text(self.run_id, text, artifact_file)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.enabled:
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, value)

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        if not self.enabled:
            return []
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]

    def log_loss_curve(self, artifact_file: str = "loss_curve.png") -> None:
        """A PNG of the per-step loss, drawn from the run's own metric history."""
        history = sorted(self.metric_history("loss"))
        if not history:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(6, 3.5))
        axis.plot([s for s, _ in history], [v for _, v in history])
        axis.set_xlabel("step")
        axis.set_ylabel("loss (mean over supervised tokens)")
        axis.grid(alpha=0.3)
        figure.tight_layout()
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / artifact_file
            figure.savefig(path, dpi=100)
            plt.close(figure)
            self.log_artifact(path)

    def log_model_dir(
        self, config: LlavaRayConfig, local_dir: Path, uri: str, size_limit_mb: float = 500
    ) -> None:
        """Log an exported model folder as artifacts, or only a pointer to it when it is large."""
        if not self.enabled:
            return
        self.set_tags({"llava_ray.final_model": uri})
        size_mb = sum(f.stat().st_size for f in local_dir.rglob("*") if f.is_file()) / 2**20
        if size_mb > size_limit_mb:
            self.set_tags({"llava_ray.final_model_logged": f"pointer only ({size_mb:.0f} MB)"})
            return
        self.log_artifacts(local_dir, "model")
        name = config.tracking.register_model
        if name:
            if not _registered(self.client, name):
                self.client.create_registered_model(name)
            source = f"{self.client.get_run(self.run_id).info.artifact_uri}/model"
            self.client.create_model_version(name, source, self.run_id)


def _registered(client: Any, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        return False
    return True


def check_tracking(config: LlavaRayConfig) -> str | None:
    """Before any work: the URI to track to, or None to run untracked (said once, loudly)."""
    uri = tracking_uri(config)
    problem = server_problem(uri)
    if problem is None:
        return uri
    if config.tracking.required:
        raise TrackingUnavailable(
            f"{problem}. Start the server, fix tracking.uri / MLFLOW_TRACKING_URI, or set "
            "tracking.required=false to run without tracking"
        )
    logger.warning(
        f"[tracking] WARNING: {problem}; running WITHOUT MLflow tracking (tracking.required=false)"
    )
    return None


@contextmanager
def tracked_run(
    config: LlavaRayConfig,
    job: str,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    extra_tags: Mapping[str, str] | None = None,
    resume_run_id: str | None = None,
) -> Iterator[Tracker]:
    """Start the MLflow run of one job: params (redacted), tags, the resolved config as an artifact.

    The run ends FINISHED, or FAILED when the job raises. Untracked runs yield a no-op tracker.
    ``resume_run_id`` reopens that run (a resumed sweep) when the store still has it.
    """
    uri = check_tracking(config)
    if uri is None:
        yield Tracker(None, None)
        return
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment(config.tracking.experiment, artifact_location=local_artifact_root(uri))
    )
    tags = {
        "llava_ray.job": job,
        "llava_ray.stage": config.train.stage if job == "train" else job,
        "llava_ray.model_preset": config.model.preset,
        **({"mlflow.source.git.commit": commit} if (commit := git_commit()) else {}),
        "mlflow.runName": run_name or f"{config.run.name}-{job}",
        **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {}),
        **({"ray.job_submission_id": ray_job_submission_id()} if ray_job_submission_id() else {}),
        **(extra_tags or {}),
    }
    resumed = _existing_run(client, resume_run_id)
    if resumed:
        client.update_run(resumed, status="RUNNING")
        tracker = Tracker(uri, resumed)
        tracker.set_tags({"llava_ray.resumed": "true"})
    else:
        run = client.create_run(experiment_id, tags=tags, run_name=tags["mlflow.runName"])
        tracker = Tracker(uri, run.info.run_id)
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in redact(flatten_config(config)).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(tracker.run_id, params=params[start : start + 100])
        tracker.log_text(redact_yaml(config), "config.yaml")
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    finally:
        client.set_terminated(tracker.run_id, status=status)


def _existing_run(client: Any, run_id: str | None) -> str | None:
    if not run_id:
        return None
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.run_id
    except MlflowException:
        return None  # the store was reset: start afresh


def redact_yaml(config: LlavaRayConfig) -> str:
    """The resolved config YAML with secret-looking values replaced."""
    lines = []
    for line in dump_config(config).splitlines():
        key, sep, value = line.partition(":")
        if (
            sep
            and value.strip() not in ("", "null", "''")
            and SECRET_KEY.search(key.strip().lstrip("- ").strip())
        ):
            line = f"{key}: {REDACTED}"
        lines.append(line)
    return "\n".join(lines) + "\n"
