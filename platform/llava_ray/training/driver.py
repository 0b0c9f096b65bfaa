"""The driver side of a stage job: schedule the data, launch Ray Train, return the result.

``run_train(config)`` indexes the prepared shards' light columns (length, modality, supervised
count; :func:`llava_ray.training.stream.index_prepared`) to build the schedule
(:mod:`llava_ray.training.schedule`), gives each worker rank the list of its reads through the
object store, and runs :func:`llava_ray.training.worker.train_loop_per_worker` on a
``TorchTrainer``; each rank streams its rows from the shards itself
(:class:`llava_ray.training.stream.RankStream`). Rerunning with the same ``run.name`` and
``run.storage_path`` resumes from the latest complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import ray.data
import ray.train
from ray.train.torch import TorchTrainer
from safetensors import SafetensorError

from llava_ray.config.loader import ConfigError
from llava_ray.config.model_sources import build_vision_config
from llava_ray.config.schema import LlavaRayConfig, ModelConfig
from llava_ray.data.prepare import REPORT_FILE, build_prepare_pipeline, load_report
from llava_ray.model.export import HF_PROJECTOR, is_hf_llava_dir
from llava_ray.model.presets import build_lm_config
from llava_ray.model.projector import build_projector
from llava_ray.model.weights import CONFIG_FILE, load_weights, read_llava_ray_config, read_weights
from llava_ray.tracking.mlflow_tracking import (
    Tracker,
    best_effort,
    close_interrupted_attempt,
    replay_unsent_metrics,
    tracked_run,
)
from llava_ray.training.checkpoint import prepare_resume
from llava_ray.training.final_model import HF_DIR, final_model_uri
from llava_ray.training.schedule import Schedule, build_schedule
from llava_ray.training.stream import PreparedIndex, Reads, index_blocks, index_prepared
from llava_ray.training.validation import split_validation, validation_plan
from llava_ray.training.worker import train_loop_per_worker
from llava_ray.utils.logging import ensure_logging, verbose_logging
from llava_ray.utils.storage import filesystem, is_remote, local_copy, ray_storage

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_name: str
    steps: int
    final_model: str
    metrics: dict[str, Any]
    checkpoint: str | None
    dropped_per_epoch: int


def train_problems(config: LlavaRayConfig) -> list[str]:
    """Problems a stage job can see before starting anything."""
    problems = []
    prepared = config.data.prepared_path
    if not prepared and not config.data.sources:
        problems.append(
            "neither data.prepared_path (shards written by `llava-ray prepare`) nor data.sources (prepared "
            "on the fly, streamed into training) is set; set one"
        )
    elif prepared:
        fs, path = filesystem(prepared)
        if not fs.exists(f"{path.rstrip('/')}/{REPORT_FILE}"):
            problems.append(
                f"data.prepared_path = {prepared!r} holds no prepared data (no report.json); "
                "run `llava-ray prepare --config ...` first"
            )
    if config.train.stage == "finetune" and not (config.model.init_from or config.model.projector_weights):
        problems.append(
            "train.stage='finetune' without model.init_from or model.projector_weights: stage 2 starts from "
            "stage 1's projector; set model.init_from to the pretrain run's final folder"
        )
    if config.model.projector_weights:
        problems += _projector_weights_problems(config.model)
    return problems


def _projector_weights_problems(model_config: ModelConfig) -> list[str]:
    """``model.projector_weights`` read on the driver as the workers will, and fitted to the projector.

    The same loader as the workers' (:func:`llava_ray.model.weights.read_weights`: safetensors, or a
    ``.bin`` with ``weights_only=True``), so a missing, refused (pickled code) or mismatched file is
    a problem before any data work, not an error in every worker minutes later.
    """
    path = model_config.projector_weights
    key = f"model.projector_weights = {path!r}"
    try:
        state = read_weights(local_copy(path))
    except FileNotFoundError:
        return [f"{key}: no such file; point it at the reference's stage-1 mm_projector.bin"]
    except (pickle.UnpicklingError, SafetensorError, RuntimeError, EOFError, OSError, ValueError) as error:
        # weights_only refuses a pickle that holds code (UnpicklingError); a truncated or corrupt file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return [
            f"{key}: refused or unreadable ({type(error).__name__}: {reason[:200]}); it must be safetensors or a "
            "tensors-only .bin (loaded with weights_only=True); re-save it with torch.save(state_dict) or as safetensors"
        ]
    marker = "mm_projector."
    projector_state = {name.split(marker, 1)[1]: value for name, value in state.items() if marker in name}
    if not projector_state:
        found = ", ".join(sorted(state)[:8])
        return [f"{key}: holds no '{marker}*' keys (found: {found}); point it at stage 1's mm_projector.bin"]
    widths = _projector_widths(model_config)
    if widths is None:  # init_from or pretrained parts this driver cannot read: the workers check the shapes
        return []
    projector_name, vision_width, lm_width = widths
    try:
        load_weights(build_projector(projector_name, vision_width, lm_width), projector_state, source=path)
    except ValueError as error:
        return [f"{key}: {error}"]
    return []


def _projector_widths(model_config: ModelConfig) -> tuple[str, int, int] | None:
    """(projector, vision width, LM width) of the model the workers will build, when readable here."""
    try:
        if model_config.init_from:
            folder = Path(local_copy(model_config.init_from))
            if (folder / CONFIG_FILE).is_file():
                record = read_llava_ray_config(folder)
                vision, lm = record["vision_config"], record["lm_config"]
                return record["projector"], vision["hidden_size"], lm["hidden_size"]
            if is_hf_llava_dir(folder):
                record = json.loads((folder / "config.json").read_text())
                vision, lm = record["vision_config"], record["text_config"]
                return HF_PROJECTOR, vision["hidden_size"], lm["hidden_size"]
            return None
        vision_width = build_vision_config(model_config).hidden_size
        lm_width = build_lm_config(model_config, vocab_size=1).hidden_size
    except (OSError, ValueError, KeyError):
        return None
    return model_config.projector, vision_width, lm_width


def training_input(config: LlavaRayConfig) -> tuple[PreparedIndex, dict[str, Any], Any]:
    """The prepared rows' index, their data report, and what must stay alive while training reads them.

    Without ``data.prepared_path`` the prepare pipeline runs into the object store (materialized
    once: the schedule needs every length first) and its blocks are the units the ranks read.
    """
    if config.data.prepared_path:
        return index_prepared(config.data.prepared_path), load_report(config.data.prepared_path), None
    started = time.perf_counter()
    pipeline = build_prepare_pipeline(config)
    dataset = pipeline.dataset.materialize()
    return index_blocks(dataset), pipeline.finish(time.perf_counter() - started), dataset


def schedule_for(config: LlavaRayConfig, index: pd.DataFrame) -> Schedule:
    """The run's schedule; rows are addressed by their position in ``index``."""
    return build_schedule(
        index["length"].to_numpy(),
        index["is_image"].to_numpy(),
        index["num_supervised"].to_numpy(),
        global_batch_size=config.train.global_batch_size,
        micro_batch_size=config.train.micro_batch_size,
        world_size=config.scaling.num_workers,
        epochs=config.train.epochs,
        seed=config.run.seed,
        group_by_modality_length=config.train.group_by_modality_length,
        max_steps=config.train.max_steps,
        units=index["unit"].to_numpy(),
        window=config.train.shuffle_window,
    )


def rank_reads(index: pd.DataFrame, schedule: Schedule) -> list[Reads]:
    """Each rank's reads in the order it trains on them (step-major)."""
    unit, offset, row = (index[name].to_numpy() for name in ("unit", "offset", "row"))
    return [
        Reads(unit[positions], offset[positions], row[positions])
        for positions in map(schedule.rank_rows, range(schedule.order.shape[1]))
    ]


def run_train(
    config: LlavaRayConfig,
    parent_run_id: str | None = None,
    callbacks: list[Any] | None = None,
    extra_tags: dict[str, str] | None = None,
) -> TrainResult:
    """Train one stage on Ray Train, tracked as one MLflow run (a child of ``parent_run_id``).

    ``callbacks`` go to Ray Train's ``RunConfig`` (a Tune sweep passes its report callback).
    """
    problems = train_problems(config)
    if problems:
        raise ConfigError(problems)
    with tracked_run(config, "train", parent_run_id, extra_tags=extra_tags) as tracker:
        if not ray.is_initialized():
            ray.init()
        ensure_logging()
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False  # per-worker bars flood job logs; the progress line says it all
        close_interrupted_attempt(config, tracker)  # a rerun resumes: the killed attempt's run ends KILLED
        prepared, report, keep_alive = training_input(config)
        tracker.log_dataset(report, config.data.prepared_path)
        tracker.log_dict(report, "data_report.json")  # the driver's last MLflow call until training ends
        result = _fit(config, tracker, prepared, callbacks or [])
        del keep_alive  # the blocks of data prepared on the fly, read by the workers until here
        # Rank 0 logged every step; these are for the parent run's roll-up and what an outage held back.
        last = result.metrics
        tracker.remember({"loss": last.get("loss_last"), "val_loss": last.get("val_loss")})
        replay_unsent_metrics(config, tracker)
        if not config.train.save_final_model:
            return result
        with best_effort("log the final model to MLflow"):
            tracker.set_tags({"llava_ray.final_model": result.final_model})
            hf_export = Path(result.final_model) / HF_DIR
            if not is_remote(result.final_model) and hf_export.exists():
                tracker.log_model_dir(config, hf_export, result.final_model)
        return result


def _fit(
    config: LlavaRayConfig, tracker: Tracker, prepared: PreparedIndex, callbacks: list[Any]
) -> TrainResult:
    started = time.perf_counter()
    index, validation = split_validation(prepared.rows, config)
    schedule = schedule_for(config, index)
    world_size = config.scaling.num_workers
    reads = rank_reads(index, schedule)
    val_reads = validation_plan(validation, world_size) if len(validation) else None
    logger.info(
        f"[train] {len(index)} prepared samples -> {schedule.steps} steps of {config.train.global_batch_size} "
        f"({schedule.dropped_per_epoch} per epoch left out of incomplete global batches)"
        + (f"; {len(validation)} held out for validation" if len(validation) else "")
        + f"; scheduled in {time.perf_counter() - started:.1f} s"
    )
    storage_path, storage_filesystem = ray_storage(config.run.storage_path)
    use_gpu = config.scaling.use_gpu
    if use_gpu == "auto":
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "step_tokens": schedule.step_tokens,
            "steps_per_epoch": schedule.steps_per_epoch,
            "units": ray.put(prepared.units),
            "reads": [ray.put(rank) for rank in reads],
            "val_reads": [ray.put(rank) for rank in val_reads] if val_reads else None,
            "tracking_uri": tracker.uri,
            "mlflow_run_id": tracker.run_id,
            "verbose": verbose_logging(),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=world_size,
            use_gpu=use_gpu,
            resources_per_worker={
                "CPU": config.scaling.cpus_per_worker,
                **config.scaling.resources_per_worker,
            },
        ),
        run_config=ray.train.RunConfig(
            name=config.run.name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=ray.train.FailureConfig(max_failures=config.scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.checkpoint.keep_last),
            callbacks=callbacks,
            # Ray Train's own lines (worker group start, placement) at WARNING unless --verbose
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose_logging() else "WARNING"),
        ),
    )
    resume = prepare_resume(config.run.storage_path, config.run.name)
    if note := resume.describe():
        logger.log(
            logging.WARNING if resume.corrupt or resume.snapshot_problem else logging.INFO, f"[train] {note}"
        )
    result = trainer.fit()
    return TrainResult(
        run_name=config.run.name,
        steps=schedule.steps,
        final_model=final_model_uri(config),
        metrics=dict(result.metrics or {}),
        checkpoint=result.checkpoint.path if result.checkpoint else None,
        dropped_per_epoch=schedule.dropped_per_epoch,
    )
