"""``llava-ray tune``: Ray Tune sweeps of a stage job over any config keys.

Each trial is an ordinary stage job (:func:`llava_ray.training.driver.run_train`: Ray Train,
DeepSpeed, checkpoints) on its sampled config, launched from a Tune function trainable, the Ray
2.60 pattern for Train V2. Trials hold out ``val_fraction`` of the data and report the validation
loss every ``eval_every_steps`` steps; only those results reach Tune, so ASHA compares trials on
fresh validation figures. The sweep is one MLflow parent run with a child run per trial.

Output in ``{storage_path}/{name}/``: Tune's experiment state (a rerun with the same name resumes
an interrupted sweep), ``results.csv`` / ``results.json`` (one line per trial) and
``best_config.yaml``, the best trial's full stage config, ready for ``llava-ray train``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any

import pandas as pd

from llava_ray.config.loader import apply_overrides, dump_config, validate_config
from llava_ray.config.schema import LlavaRayConfig
from llava_ray.config.sweep import SweepConfig, override
from llava_ray.tracking.mlflow_tracking import tracked_run
from llava_ray.training.driver import run_train
from llava_ray.utils.logging import ensure_logging, setup_logging, verbose_logging
from llava_ray.utils.storage import filesystem, is_remote, join_uri, ray_storage

logger = logging.getLogger(__name__)

SWEEP_STATE = "llava_ray_sweep.json"
RESULTS_CSV = "results.csv"
RESULTS_JSON = "results.json"
BEST_CONFIG = "best_config.yaml"
TRIALS_DIR = "trials"
# The trial function only waits on its Ray Train run, whose workers hold the real resources
# (Tune refuses an empty request).
TRIAL_DRIVER_CPUS = 0.01
STOPPED_RUN_WAIT_S = 30  # how long a stopped trial's job may take to end its MLflow run


@dataclass
class SweepResult:
    path: str
    table: pd.DataFrame
    best_config: LlavaRayConfig
    best_config_path: str
    parent_run_id: str | None
    resumed: bool


def trial_config(
    base: dict[str, Any],
    params: dict[str, Any],
    trial_id: str,
    sweep: SweepConfig,
    storage: str,
    uri: str | None,
) -> LlavaRayConfig:
    """The stage config one trial trains: the base with the trial's values, its own name and folder."""
    overrides = [override(key, value) for key, value in params.items()]
    overrides += [
        f"run.name={sweep.name}-{trial_id}",
        f"run.storage_path={join_uri(storage, sweep.name, TRIALS_DIR)}",
    ]
    if uri:
        overrides.append(f"tracking.uri={uri}")
    raw, problems = apply_overrides(base, overrides)
    return validate_config(raw, f"trial {trial_id}", problems)


def run_trial(
    params: dict[str, Any],
    *,
    base: dict[str, Any],
    sweep: SweepConfig,
    storage: str,
    uri: str | None,
    parent: str | None,
    verbose: bool = False,
) -> None:
    """One trial (a Tune function trainable): train the sampled config, forwarding validation results.

    The stage job runs in a task scheduled outside the trial's placement group: Tune's group
    captures child tasks, and the tasks the stage job's driver starts (Ray Data preparing data on
    the fly, indexing its blocks) would inherit that capture into a group they do not fit. The task shares the trial's
    fate: when ASHA stops the trial, the task and the training run it started end with it.
    """
    import ray
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    config = trial_config(base, params, trial_id, sweep, storage, uri)
    callback = metric_report_callback(sweep.metric)  # made here, in the Tune session it reports to
    train = ray.remote(num_cpus=0, max_retries=0)(_train_trial).options(scheduling_strategy="DEFAULT")
    ray.get(
        train.remote(
            config,
            parent,
            callback,
            {"llava_ray.sweep": sweep.name, "llava_ray.trial_id": trial_id},
            verbose,
        )
    )


def _train_trial(
    config: LlavaRayConfig, parent: str | None, callback: Any, tags: dict[str, str], verbose: bool
) -> None:
    setup_logging(verbose)
    run_train(config, parent, callbacks=[callback], extra_tags=tags)


def metric_report_callback(metric: str) -> Any:
    """A Ray Train callback passing to Tune only the results that carry ``metric`` (validation steps)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class MetricReportCallback(TuneReportCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return MetricReportCallback()


def scheduler(sweep: SweepConfig, base: LlavaRayConfig) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if sweep.scheduler.type == "none":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="step",
        max_t=sweep.scheduler.max_t or full_trial_steps(base),
        grace_period=sweep.scheduler.grace_period,
        reduction_factor=sweep.scheduler.reduction_factor,
        stop_last_trials=False,  # a trial reaching max_t finishes its run (final checkpoint, MLflow status)
    )


def full_trial_steps(base: LlavaRayConfig) -> int:
    """ASHA's horizon when the sweep does not give one: max_steps, else a generous bound (epochs unknown)."""
    return base.train.max_steps or 10**9


def search_algorithm(sweep: SweepConfig) -> Any:
    if sweep.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch()
    return None  # Tune's basic variant generator: grid and random sampling


def run_sweep(sweep: SweepConfig, base: LlavaRayConfig) -> SweepResult:
    """Run (or resume) the sweep; print and save the results table and the best trial's config."""
    import ray
    from ray import tune

    ensure_logging()
    storage = sweep.storage_path or base.run.storage_path
    if not is_remote(storage):
        storage = os.path.abspath(storage)
    path = join_uri(storage, sweep.name)
    fs, fs_path = filesystem(path)
    state_file = f"{fs_path}/{SWEEP_STATE}"
    previous = json.loads(fs.cat_file(state_file)) if fs.exists(state_file) else {}
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")  # trials see the job's working directory
    if not ray.is_initialized():
        ray.init()
    with tracked_run(
        base,
        "tune",
        run_name=sweep.name,
        label="sweep",
        extra_tags={"llava_ray.sweep": sweep.name},
        resume_run_id=previous.get("parent_run_id"),
    ) as parent:
        fs.makedirs(fs_path, exist_ok=True)
        fs.pipe_file(state_file, json.dumps({"parent_run_id": parent.run_id}).encode())
        parent.log_text(sweep.model_dump_json(indent=2), "sweep.json")
        uri = parent.uri if parent.enabled else None
        trainable = tune.with_resources(
            tune.with_parameters(
                run_trial,
                base=base.model_dump(mode="json"),
                sweep=sweep,
                storage=storage,
                uri=uri,
                parent=parent.run_id,
                verbose=verbose_logging(),
            ),
            {"CPU": TRIAL_DRIVER_CPUS},
        )

        tune_storage, tune_filesystem = ray_storage(storage)
        resumed = tune.Tuner.can_restore(
            join_uri(tune_storage, sweep.name), storage_filesystem=tune_filesystem
        )
        warn_if_data_starves(sweep)
        started = time.time()
        if resumed:
            logger.info(f"[tune] resuming sweep {sweep.name} from {path}")
            tuner = tune.Tuner.restore(
                join_uri(tune_storage, sweep.name),
                trainable,
                resume_unfinished=True,
                resume_errored=True,
                storage_filesystem=tune_filesystem,
            )
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={key: domain.to_tune() for key, domain in sweep.search_space.items()},
                tune_config=tune.TuneConfig(
                    metric=sweep.metric,
                    mode=sweep.mode,
                    scheduler=scheduler(sweep, base),
                    search_alg=search_algorithm(sweep),
                    num_samples=sweep.num_samples,
                    max_concurrent_trials=sweep.max_concurrent_trials,
                ),
                run_config=tune.RunConfig(
                    name=sweep.name, storage_path=tune_storage, storage_filesystem=tune_filesystem
                ),
            )
        grid = tuner.fit()
        table = results_table(grid, sweep)
        close_killed_trials(parent, table)
        best = grid.get_best_result(metric=sweep.metric, mode=sweep.mode, scope="all")
        best_config = best_config_for(base, best.config, sweep)
        best_path = f"{fs_path}/{BEST_CONFIG}"
        fs.pipe_file(best_path, dump_config(best_config).encode())
        fs.pipe_file(f"{fs_path}/{RESULTS_CSV}", table.to_csv(index=False).encode())
        fs.pipe_file(f"{fs_path}/{RESULTS_JSON}", table.to_json(orient="records", indent=2).encode())
        best_row = table.loc[table["trial_id"] == best.metrics.get("trial_id", "")]
        parent.log_text(table.to_csv(index=False), RESULTS_CSV)
        parent.log_text(dump_config(best_config), BEST_CONFIG)
        parent.log_metrics(
            {
                f"best_{sweep.metric}": float(
                    table[f"best_{sweep.metric}"].min()
                    if sweep.mode == "min"
                    else table[f"best_{sweep.metric}"].max()
                ),
                "trials": len(table),
                "trials_stopped_early": int(table["stopped_early"].sum()),
                "trials_errored": int((table["status"] == "ERROR").sum()),
            }
        )
        parent.set_tags({"llava_ray.best_trial": str(best_row["trial_id"].iloc[0]) if len(best_row) else ""})
        logger.info(format_table(table, sweep))
        logger.info(
            f"[tune] {len(table)} trials in {time.time() - started:.0f}s; best config: {join_uri(path, BEST_CONFIG)}"
            f"\n[tune] train it: llava-ray train --config {join_uri(path, BEST_CONFIG)}"
        )
        return SweepResult(path, table, best_config, join_uri(path, BEST_CONFIG), parent.run_id, resumed)


def warn_if_data_starves(sweep: SweepConfig) -> None:
    """Say so when concurrent trials leave no whole CPU for Ray Data's tasks (they would wait forever)."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    resources = sweep.trial_resources
    per_trial = resources.num_workers * resources.cpus_per_worker + TRIAL_DRIVER_CPUS
    concurrent = min(sweep.max_concurrent_trials or 10**6, int(cpus // per_trial) or 1)
    if cpus - concurrent * per_trial < 1:
        logger.warning(
            f"[tune] WARNING: {concurrent} concurrent trials x {per_trial:g} CPUs leave less than one of the "
            f"cluster's {cpus:g} CPUs for Ray Data's tasks; trials may wait for data. Lower "
            "max_concurrent_trials or trial_resources.cpus_per_worker, or add CPU nodes."
        )


def best_config_for(base: LlavaRayConfig, params: dict[str, Any], sweep: SweepConfig) -> LlavaRayConfig:
    """The base stage config with the best trial's values: a full run (no held-out split, final model kept)."""
    raw, problems = apply_overrides(
        base.model_dump(mode="json"),
        [
            *(override(key, value) for key, value in params.items()),
            f"run.name={sweep.name}-best",
            "train.val_fraction=0",
            "train.eval_every_steps=null",
            "train.save_final_model=true",
        ],
    )
    return validate_config(raw, "best config", problems)


def results_table(grid: Any, sweep: SweepConfig) -> pd.DataFrame:
    """One line per trial: its values, status, steps reached, last and best metric."""
    rows = []
    for result in grid:
        history = result.metrics_dataframe
        metric = sweep.metric
        values = (
            history[metric].dropna() if history is not None and metric in history else pd.Series(dtype=float)
        )
        last = result.metrics or {}
        step, total = last.get("step"), last.get("total_steps")
        rows.append(
            {
                "trial_id": last.get("trial_id", ""),
                **{key: result.config.get(key) for key in sweep.search_space},
                "status": "ERROR"
                if result.error
                else ("STOPPED" if step and total and step < total else "DONE"),
                "stopped_early": bool(not result.error and step and total and step < total),
                "step": step,
                "total_steps": total,
                f"last_{metric}": float(values.iloc[-1]) if len(values) else None,
                f"best_{metric}": (
                    float(values.min() if sweep.mode == "min" else values.max()) if len(values) else None
                ),
                "error": error_summary(result.error) if result.error else "",
            }
        )
    table = pd.DataFrame(rows)
    return table.sort_values(f"best_{sweep.metric}", ascending=sweep.mode == "min", na_position="last")


def error_summary(error: BaseException) -> str:
    """The line of a trial's error that names what went wrong: a trial's error is Ray's wrapper
    (``ray::ImplicitFunc.train() (pid=..., ip=...)``, then the traceback), so the last exception line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt|Exit)\b", line)]
    return ((named or lines or [type(error).__name__])[-1])[:300]


def format_table(table: pd.DataFrame, sweep: SweepConfig) -> str:
    shown = table.drop(columns=["error"]) if not table["error"].any() else table
    return f"[tune] sweep {sweep.name} ({sweep.mode} {sweep.metric}):\n" + shown.to_string(index=False)


def close_killed_trials(parent: Any, table: pd.DataFrame) -> None:
    """Trial runs ended by a kill end KILLED in MLflow: tagged ``stopped_early`` when ASHA stopped the
    trial (its run ended RUNNING or FAILED as the kill reached it), ``interrupted`` when an earlier,
    interrupted sweep left them RUNNING (a resumed trial has a run of its own). A trial that failed
    on its own stays FAILED."""
    if not parent.enabled:
        return
    client = parent.client
    stopped = set(table.loc[table["stopped_early"], "trial_id"])
    run = client.get_run(parent.run_id)
    for child in client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'"
    ):
        if child.info.status not in ("RUNNING", "FAILED"):
            continue
        if child.data.tags.get("llava_ray.trial_id") in stopped:
            reason = "stopped_early"
            wait_until_ended(client, child.info.run_id)  # else its job could still mark it FAILED after us
        elif child.info.status == "RUNNING":
            reason = "interrupted"
        else:
            continue
        client.set_tag(child.info.run_id, f"llava_ray.{reason}", "true")
        client.set_terminated(child.info.run_id, status="KILLED")


def wait_until_ended(client: Any, run_id: str, timeout_s: float = STOPPED_RUN_WAIT_S) -> None:
    """Wait while a stopped trial's job winds down and ends its run (a hard kill never ends it)."""
    deadline = time.time() + timeout_s
    while client.get_run(run_id).info.status == "RUNNING" and time.time() < deadline:
        time.sleep(1)
