"""MLflow tracking for every job: one run per job, nested under a pipeline or sweep run.

With no ``tracking.uri`` and no ``MLFLOW_TRACKING_URI``, runs go to a local store in the working
directory (``mlflow.db``, artifacts under ``mlruns/``); open it with::

    mlflow ui --backend-store-uri sqlite:///mlflow.db

On clusters point ``tracking.uri`` (or ``MLFLOW_TRACKING_URI``) at an ``mlflow server`` whose
artifacts live on S3 (see cluster/README.md). A tracking server that cannot be reached is
reported once, before any work: the job fails with a clear message unless
``tracking.required=false``, in which case it runs without tracking. A server that stops answering
later never stops a job: metrics are buffered and sent from a background thread
(:mod:`llava_ray.tracking.metric_sender`).

Run names lead with what the run is (``finetune NAME``, ``evaluate after_stage2 NAME``); metric
keys are grouped (``train/``, ``perf/``, ``eval/``, ``data/``, ``system/``); a child run's headline
metrics are rolled up into its parent run (``finetune/train/loss``). Credentials in URLs never
reach MLflow, logs or errors (:mod:`llava_ray.utils.redact`); those in ``tracking.uri`` go to
MLflow as ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llava_ray.config.loader import dump_config, flatten_config
from llava_ray.config.schema import LlavaRayConfig
from llava_ray.tracking.metric_sender import (
    REQUEST_TIMEOUT_S,
    MetricPoint,
    MetricSender,
    SystemMetricsSampler,
    replay_spilled,
)
from llava_ray.utils.redact import redact_url, redact_urls, split_credentials
from llava_ray.utils.storage import filesystem, join_uri

logger = logging.getLogger(__name__)

# A key is secret when its last word is one of these: "hf_token" and "api_key" are, "tokenizer" is not.
SECRET_KEY = re.compile(
    r"(^|[_\-.])(api_?key|access_?key|secret(_?key)?|token|password|passwd|credentials?|auth)$", re.IGNORECASE
)
REDACTED = "***"
PARAM_VALUE_LIMIT = 6000  # MLflow's limit on a param value
PROFILE_LIMIT = 1_000_000  # characters of a dataset profile (the data report) stored with the run
MODEL_SIZE_LIMIT_MB = 500  # larger final models are logged by reference to their storage URI
RUN_FILE = "mlflow_run.json"  # beside a run's checkpoints: the MLflow run of its latest attempt
UNSENT_METRICS_FILE = "mlflow_unsent_metrics.jsonl"  # beside a run's checkpoints (see metric_sender)
# The experiment's kind in MLflow 3's UI: machine-learning training, not GenAI development.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}

# Metric groups: keys a stage job logs -> their MLflow name. Ray Train's own reports keep the bare
# keys (Tune sweeps schedule on ``val_loss``); only what MLflow shows is grouped.
TRAIN_KEYS = {"loss", "learning_rate", "projector_learning_rate", "grad_norm", "loss_first", "loss_last"}
PERF_KEYS = {
    "samples_per_s",
    "tokens_per_s",
    "supervised_tokens_per_s",
    "padding_fraction",
    "peak_memory_gib",
    "mfu",
    "seconds",
}
GROUPS = ("train/", "perf/", "eval/", "data/", "system/")
DROPPED_KEYS = {"step"}  # MLflow already has each point's step
JOB_GROUP = {"evaluate": "eval/", "prepare": "data/", "generate-data": "data/"}
# What a child run reports up to its parent run (as ``<child label>/<key>``).
HEADLINE_KEYS = ("train/loss", "eval/val_loss", "eval/accuracy", "data/written")


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be reached and the config requires tracking."""


def tracking_uri(config: LlavaRayConfig) -> str:
    """The config's URI, else ``$MLFLOW_TRACKING_URI``, else the local store in the working directory.

    Credentials in it (``http://user:pass@host``) are taken out of the URI and handed to MLflow the
    supported way, as ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` in this process.
    """
    uri = config.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    clean, username, password = split_credentials(uri)
    if username:
        os.environ["MLFLOW_TRACKING_USERNAME"] = username
    if password:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = password
    return clean


def metric_key(key: str, job: str = "train") -> str:
    """The MLflow name of a metric: grouped under ``train/``, ``perf/``, ``eval/`` or ``data/``."""
    if key.startswith(GROUPS):
        return key
    if job in JOB_GROUP:
        return JOB_GROUP[job] + key
    if key in TRAIN_KEYS:
        return f"train/{key}"
    if key in PERF_KEYS:
        return f"perf/{key}"
    if key.startswith("val_"):
        return f"eval/{key}"
    return key


def run_label(config: LlavaRayConfig, job: str) -> str:
    """What a run is, the start of its name: the stage for training (``finetune``), else the job."""
    return config.train.stage if job == "train" else job


def run_folder(config: LlavaRayConfig) -> str:
    """The folder of the run's checkpoints (``{run.storage_path}/{run.name}``)."""
    storage = config.run.storage_path
    if "://" not in storage:
        storage = os.path.abspath(storage)
    return join_uri(storage, config.run.name)


def unsent_metrics_uri(config: LlavaRayConfig) -> str:
    """Where rank 0 writes the metrics it could not send (see :class:`MetricSender`)."""
    return join_uri(run_folder(config), UNSENT_METRICS_FILE)


def local_artifact_root(uri: str) -> str | None:
    """Artifacts of a local sqlite store live beside the database (``mlruns/``); servers decide their own."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlruns").as_uri()


def server_problem(uri: str, timeout_s: float = 5.0) -> str | None:
    """Why an HTTP tracking server cannot be used, or None; local stores always can.

    Credentials (in the URI or ``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD``) go in a Basic
    ``Authorization`` header; the message never contains them.
    """
    if not uri.startswith(("http://", "https://")):
        return None
    clean, username, password = split_credentials(uri)
    username = username or os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = password or os.environ.get("MLFLOW_TRACKING_PASSWORD")
    request = urllib.request.Request(f"{clean.rstrip('/')}/health")
    if username and password:
        token = base64.b64encode(f"{username}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    shown = redact_url(uri)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            if response.status == 200:
                return None
            return f"{shown}/health answered HTTP {response.status}"
    except urllib.error.HTTPError as error:
        return f"{shown}/health answered HTTP {error.code}"
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = redact_urls(str(getattr(error, "reason", error)))
        return f"cannot reach the MLflow server at {shown}: {reason}"


def redact(params: Mapping[str, Any]) -> dict[str, str]:
    """Flattened params as MLflow strings; values of secret-looking keys become ``***``, and so do
    credentials inside any URL (``http://user:***@host``, ``?token=***``)."""
    redacted = {}
    for key, value in params.items():
        if SECRET_KEY.search(key.rsplit(".", 1)[-1]) and value not in (None, ""):
            text = REDACTED
        else:
            text = redact_urls(value if isinstance(value, str) else json.dumps(value))
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
    """One MLflow run of one job (a no-op when tracking is off). Log from the driver or rank 0 only.

    Metrics go through a :class:`MetricSender` (asynchronous, buffered through outages); call
    :meth:`close` at the end to flush them (``tracked_run`` does). ``job`` picks the metric groups
    (:func:`metric_key`); ``spill_uri`` is where unsendable metrics are written at the end;
    ``system_metrics`` samples this machine's usage into ``system/...`` metrics.
    """

    def __init__(
        self,
        uri: str | None,
        run_id: str | None,
        job: str = "train",
        spill_uri: str | None = None,
        system_metrics: bool = False,
    ):
        self.uri = uri
        self.run_id = run_id
        self.job = job
        self.spill_uri = spill_uri
        self.latest: dict[str, float] = {}  # the last value of each metric, for the parent's roll-up
        self._client = None
        self._sender: MetricSender | None = None
        self._sampler: SystemMetricsSampler | None = None
        if system_metrics and self.enabled:
            try:
                self._sampler = SystemMetricsSampler(self.sender)
            except Exception as error:  # e.g. psutil missing: worth a line, not a job
                logger.warning(f"[tracking] WARNING: no system metrics: {error}")

    @property
    def enabled(self) -> bool:
        return self.run_id is not None

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self.uri)
        return self._client

    @property
    def sender(self) -> MetricSender:
        if self._sender is None:
            self._sender = MetricSender(self.uri, self.run_id, spill_uri=self.spill_uri)
        return self._sender

    def log_metrics(
        self, metrics: Mapping[str, float | int | None], step: int | None = None, flush: bool = False
    ) -> None:
        """Queue numeric metrics (grouped by :func:`metric_key`) for sending; never raises.

        Never blocks, unless ``flush``: then it waits (at most one request's timeout, and not at all
        while the server is down) until they are sent, e.g. validation results a Tune scheduler may
        stop the trial on, killing the worker before its queue is sent.
        """
        if not self.enabled:
            return
        now = int(time.time() * 1000)
        points = [
            MetricPoint(metric_key(key, self.job), float(value), now, step or 0)
            for key, value in metrics.items()
            if isinstance(value, int | float) and not isinstance(value, bool) and key not in DROPPED_KEYS
        ]
        self.latest.update({point.key: point.value for point in points})
        if points:
            self.sender.add(points)
            if flush and self.sender.down_since is None:
                self.sender.flush(REQUEST_TIMEOUT_S)

    def remember(self, metrics: Mapping[str, Any]) -> None:
        """Final values another process logged (rank 0), for the roll-up into the parent run."""
        self.latest.update(
            {
                metric_key(key, self.job): float(value)
                for key, value in metrics.items()
                if isinstance(value, int | float) and not isinstance(value, bool)
            }
        )

    def close(self) -> int:
        """Stop sampling and flush the metrics (bounded wait); returns how many could not be sent."""
        if self._sampler is not None:
            self._sampler.stop()
            self._sampler = None
        return self._sender.close() if self._sender is not None else 0

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
                self.client.set_tag(self.run_id, key, redact_urls(str(value)))

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        if not self.enabled:
            return []
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]

    def log_dataset(self, report: Mapping[str, Any], source: str | None, context: str = "training") -> None:
        """The prepared data as the run's dataset input (MLflow's lineage); its report is the profile."""
        if not self.enabled:
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        profile = json.dumps(report, sort_keys=True, default=str)
        if len(profile) > PROFILE_LIMIT:  # keep the counts rather than cut the JSON mid-way
            counts = {key: report.get(key) for key in ("input", "written", "skipped")}
            profile = json.dumps(counts, sort_keys=True, default=str)
        source_uri = redact_url(source) if source else "prepared in memory (data.sources)"
        dataset = Dataset(
            name=Path(source.rstrip("/")).name if source else "prepared-on-the-fly",
            digest=hashlib.sha256(profile.encode()).hexdigest()[:16],
            source_type="local" if source and "://" not in source else "uri" if source else "code",
            source=json.dumps({"uri": source_uri}),
            profile=profile,
        )
        self.client.log_inputs(
            self.run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])]
        )

    def log_model_dir(
        self, config: LlavaRayConfig, local_dir: Path, uri: str, size_limit_mb: float = MODEL_SIZE_LIMIT_MB
    ) -> None:
        """Log an exported Hugging Face folder as an MLflow model (registered with
        ``tracking.register_model``), or only a pointer to it when it is large."""
        if not self.enabled:
            return
        self.set_tags({"llava_ray.final_model": uri})
        size_mb = sum(f.stat().st_size for f in local_dir.rglob("*") if f.is_file()) / 2**20
        if size_mb > size_limit_mb:
            self.set_tags({"llava_ray.final_model_logged": f"pointer only ({size_mb:.0f} MB)"})
            return
        from llava_ray.tracking.mlflow_model import log_final_model

        info = log_final_model(
            self.uri, self.run_id, local_dir, registered_model_name=config.tracking.register_model
        )
        self.set_tags({"llava_ray.mlflow_model": info.model_uri})


def open_worker_tracker(config: LlavaRayConfig, uri: str | None, run_id: str | None) -> Tracker:
    """Rank 0's tracker inside a Ray Train worker (other ranks pass no run id and get a no-op):
    asynchronous metrics, system metrics of rank 0's machine, unsendable metrics spilled beside
    the checkpoints. Credentials in ``tracking.uri`` are applied in this process too."""
    if run_id is not None:
        tracking_uri(config)  # sets MLFLOW_TRACKING_USERNAME / _PASSWORD here when the URI has them
    return Tracker(uri, run_id, "train", spill_uri=unsent_metrics_uri(config), system_metrics=True)


def replay_unsent_metrics(config: LlavaRayConfig, tracker: Tracker) -> None:
    """At the end of a stage job: send what rank 0 could not send during the run, or say where it is."""
    if not tracker.enabled:
        return
    spill = unsent_metrics_uri(config)
    try:
        unsent = replay_spilled(tracker.uri, tracker.run_id, spill)
    except Exception as error:  # never fail a finished training over its metrics
        logger.warning(f"[tracking] WARNING: could not replay {redact_url(spill)}: {redact_urls(str(error))}")
        return
    if unsent:
        tracker.set_tags({"llava_ray.unsent_metrics": spill})


def close_interrupted_attempt(config: LlavaRayConfig, tracker: Tracker) -> str | None:
    """A rerun of a stage (same ``run.name`` and ``run.storage_path``) resumes its checkpoints; the
    MLflow run of the attempt it resumes from, still RUNNING because that attempt was killed, is
    marked KILLED (tag ``llava_ray.interrupted``) and named in the new run's ``llava_ray.resumes_run``
    tag. Then this attempt's run id is written to ``{storage_path}/{run.name}/mlflow_run.json``.
    Returns the previous attempt's run id, if any."""
    if not tracker.enabled:
        return None
    fs, path = filesystem(join_uri(run_folder(config), RUN_FILE))
    previous = None
    try:
        if fs.exists(path):
            previous = json.loads(fs.cat_file(path)).get("run_id")
    except (OSError, ValueError):
        previous = None
    if previous and previous != tracker.run_id:
        from mlflow.exceptions import MlflowException

        try:
            run = tracker.client.get_run(previous)
            if run.info.status == "RUNNING":
                tracker.client.set_tag(previous, "llava_ray.interrupted", "true")
                tracker.client.set_terminated(previous, status="KILLED")
                logger.info(f"[tracking] the interrupted attempt's MLflow run {previous} is marked KILLED")
            tracker.set_tags({"llava_ray.resumes_run": previous})
        except MlflowException:
            previous = None  # another store, or deleted: nothing to close
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(
        path, json.dumps({"run_id": tracker.run_id, "tracking_uri": redact_url(tracker.uri)}).encode()
    )
    return previous


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
    label: str | None = None,
) -> Iterator[Tracker]:
    """Start the MLflow run of one job: params (redacted), tags, the resolved config as an artifact.

    The run is named ``"<label> <run_name or run.name>"``: ``label`` says what the run is (default:
    the stage for training, else ``job``). The run ends FINISHED, or FAILED when the job raises;
    either way its queued metrics are flushed first, and on success its headline metrics
    (``HEADLINE_KEYS``) are rolled up into the parent run as ``<label>/<key>``. Untracked runs yield
    a no-op tracker. ``resume_run_id`` reopens that run (a resumed sweep) when the store still has it.
    """
    uri = check_tracking(config)
    if uri is None:
        yield Tracker(None, None, job)
        return
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    if experiment:
        experiment_id = experiment.experiment_id
        if "mlflow.experimentKind" not in experiment.tags:
            client.set_experiment_tag(experiment_id, *next(iter(EXPERIMENT_KIND.items())))
    else:
        experiment_id = client.create_experiment(
            config.tracking.experiment, artifact_location=local_artifact_root(uri), tags=EXPERIMENT_KIND
        )
    label = label or run_label(config, job)
    name = f"{label} {run_name or config.run.name}"
    tags = {
        "llava_ray.job": job,
        "llava_ray.stage": config.train.stage if job == "train" else job,
        "llava_ray.model_preset": config.model.preset,
        "llava_ray.run_label": label,
        **({"mlflow.source.git.commit": commit} if (commit := git_commit()) else {}),
        "mlflow.runName": name,
        **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {}),
        **({"ray.job_submission_id": ray_job_submission_id()} if ray_job_submission_id() else {}),
        **{key: redact_urls(str(value)) for key, value in (extra_tags or {}).items()},
    }
    resumed = _existing_run(client, resume_run_id)
    if resumed:
        client.update_run(resumed, status="RUNNING")
        tracker = Tracker(uri, resumed, job)
        tracker.set_tags({"llava_ray.resumed": "true"})
    else:
        run = client.create_run(experiment_id, tags=tags, run_name=name)
        tracker = Tracker(uri, run.info.run_id, job)
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
        with best_effort("end the MLflow run"):  # a finished job never fails over its tracking
            tracker.close()
            if status == "FINISHED" and parent_run_id:
                _roll_up(client, parent_run_id, label, tracker.latest)
            client.set_terminated(tracker.run_id, status=status)


@contextmanager
def best_effort(what: str) -> Iterator[None]:
    """Tracking work after the real work is done: a failure is one warning, never the job's end."""
    try:
        yield
    except Exception as error:
        logger.warning(f"[tracking] WARNING: could not {what}: {redact_urls(str(error))[:500]}")


def _roll_up(client: Any, parent_run_id: str, label: str, latest: Mapping[str, float]) -> None:
    """A child's headline metrics into its parent run, as ``<label>/<key>`` (``finetune/train/loss``)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    prefix = re.sub(r"[^\w.\-/ ]", "_", label).replace(" ", "-")
    metrics = [
        Metric(f"{prefix}/{key}", value, now, 0) for key, value in latest.items() if key in HEADLINE_KEYS
    ]
    if metrics:
        client.log_batch(parent_run_id, metrics=metrics)


def _existing_run(client: Any, run_id: str | None) -> str | None:
    if not run_id:
        return None
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.run_id
    except MlflowException:
        return None  # the store was reset: start afresh


def redact_yaml(config: LlavaRayConfig) -> str:
    """The resolved config YAML with secret-looking values and credentials in URLs replaced."""
    lines = []
    for line in redact_urls(dump_config(config)).splitlines():
        key, sep, value = line.partition(":")
        if (
            sep
            and value.strip() not in ("", "null", "''")
            and SECRET_KEY.search(key.strip().lstrip("- ").strip())
        ):
            line = f"{key}: {REDACTED}"
        lines.append(line)
    return "\n".join(lines) + "\n"
