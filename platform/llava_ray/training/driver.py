"""The driver side of a stage job: schedule the data, launch Ray Train, return the result.

``run_train(config)`` reads the prepared shards' light columns (length, modality, supervised
count) to build the global schedule (:mod:`llava_ray.training.schedule`), gives each worker rank
its own Ray Data dataset holding exactly its rows sorted by schedule position, and runs
:func:`llava_ray.training.worker.train_loop_per_worker` on a ``TorchTrainer``. Rerunning with the
same ``run.name`` and ``run.storage_path`` resumes from the latest complete checkpoint.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
import ray.data
import ray.train
from ray.data.dataset import MaterializedDataset
from ray.train.torch import TorchTrainer

from llava_ray.config.loader import ConfigError
from llava_ray.config.schema import LlavaRayConfig
from llava_ray.data.prepare import REPORT_FILE, build_prepare_pipeline, load_report, read_prepared
from llava_ray.tracking.mlflow_tracking import Tracker, tracked_run
from llava_ray.training.final_model import HF_DIR, final_model_uri
from llava_ray.training.schedule import Schedule, build_schedule
from llava_ray.training.validation import VAL_DATASET_PREFIX, split_validation, validation_plan
from llava_ray.training.worker import train_loop_per_worker
from llava_ray.utils.logging import ensure_logging, verbose_logging
from llava_ray.utils.storage import filesystem, is_remote, ray_storage

logger = logging.getLogger(__name__)

INDEX_COLUMNS = ["row", "length", "modality", "num_supervised"]
SORT_RANGE_ROWS = 2048  # rows per sorted output block of a rank's dataset


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
    return problems


def training_dataset(config: LlavaRayConfig) -> tuple[ray.data.Dataset, dict[str, Any]]:
    """The prepared rows and their data report: from shards, or prepared on the fly from the sources.

    Without ``data.prepared_path`` the prepare pipeline streams into training without writing
    shards; it is materialized in the object store once, since the schedule needs every length first.
    """
    if config.data.prepared_path:
        return read_prepared(config.data.prepared_path), load_report(config.data.prepared_path)
    started = time.perf_counter()
    pipeline = build_prepare_pipeline(config)
    dataset = pipeline.dataset.materialize()
    return dataset, pipeline.finish(time.perf_counter() - started)


def schedule_for(config: LlavaRayConfig, index: pd.DataFrame) -> Schedule:
    """The run's schedule; rows are addressed by their position in ``index``."""
    return build_schedule(
        index["length"].to_numpy(),
        (index["modality"] == "image").to_numpy(),
        index["num_supervised"].to_numpy(),
        global_batch_size=config.train.global_batch_size,
        micro_batch_size=config.train.micro_batch_size,
        world_size=config.scaling.num_workers,
        epochs=config.train.epochs,
        seed=config.run.seed,
        group_by_modality_length=config.train.group_by_modality_length,
        max_steps=config.train.max_steps,
    )


def assignments(index: pd.DataFrame, schedule: Schedule) -> pd.DataFrame:
    """One line per scheduled read: the prepared ``row`` key, the reading rank and its position there."""
    frames = []
    for rank in range(schedule.order.shape[1]):
        positions = schedule.rank_rows(rank)
        frames.append(
            pd.DataFrame(
                {"row": index["row"].to_numpy()[positions], "rank": rank, "seq": np.arange(len(positions))}
            )
        )
    return pd.concat(frames, ignore_index=True)


def _attach_schedule(batch: pd.DataFrame, plan: pd.DataFrame) -> pd.DataFrame:
    return batch.merge(plan, on="row", how="inner")


def scheduled_datasets(
    dataset: ray.data.Dataset, plans: dict[str, pd.DataFrame]
) -> dict[str, MaterializedDataset]:
    """One dataset per named plan (``row``, ``seq``): its rows, repeated where it repeats them, by ``seq``.

    One pass over the prepared rows serves every plan (each rank's training rows, each rank's
    validation rows): the rows are tagged with a global ``order`` (plan after plan, ``seq`` within
    each), sorted once by it with fixed range boundaries (the positions are known, so the sort skips
    sampling), materialized, and cut at the plans' edges. Reading the shards once per plan instead
    would read the whole dataset once per worker. The driver builds this before any worker starts,
    so no Ray Data task runs inside the workers' placement group (where a Tune trial's tasks could
    not be scheduled).
    """
    offsets = np.cumsum([0, *(len(plan) for plan in plans.values())])
    tagged = pd.concat(
        [
            plan[["row", "seq"]].assign(order=plan["seq"].to_numpy() + offset)
            for plan, offset in zip(plans.values(), offsets[:-1], strict=True)
        ],
        ignore_index=True,
    )
    total, edges = int(offsets[-1]), [int(o) for o in offsets[1:-1]]
    boundaries = sorted({*range(SORT_RANGE_ROWS, total, SORT_RANGE_ROWS), *edges})
    ordered = (
        dataset.map_batches(_attach_schedule, batch_format="pandas", fn_args=(tagged,))
        .sort("order", boundaries=boundaries or None)
        .drop_columns(["order"])
        .materialize()
    )
    if (count := ordered.count()) != total:
        raise RuntimeError(f"the prepared data gave {count} scheduled rows, the schedule has {total}")
    pieces = ordered.split_at_indices(edges) if edges else [ordered]
    return dict(zip(plans, pieces, strict=True))


def rank_plans(plan: pd.DataFrame, world_size: int, prefix: str) -> dict[str, pd.DataFrame]:
    """``{prefix}{r}``: the ``row`` and ``seq`` of the plan's lines whose ``rank`` is r."""
    return {f"{prefix}{rank}": plan.loc[plan["rank"] == rank, ["row", "seq"]] for rank in range(world_size)}


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
    with tracked_run(
        config, "train", parent_run_id, run_name=config.run.name, extra_tags=extra_tags
    ) as tracker:
        if not ray.is_initialized():
            ray.init()
        ensure_logging()
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False  # per-worker bars flood job logs; the progress line says it all
        dataset, report = training_dataset(config)
        tracker.log_dict(report, "data_report.json")
        result = _fit(config, tracker, dataset, callbacks or [])
        tracker.log_loss_curve()
        if not config.train.save_final_model:
            return result
        tracker.set_tags({"llava_ray.final_model": result.final_model})
        if not is_remote(result.final_model):
            hf_export = Path(result.final_model) / HF_DIR
            model_dir = hf_export if hf_export.exists() else Path(result.final_model)
            tracker.log_model_dir(config, model_dir, result.final_model)
        return result


def _fit(
    config: LlavaRayConfig, tracker: Tracker, dataset: ray.data.Dataset, callbacks: list[Any]
) -> TrainResult:
    index = dataset.select_columns(INDEX_COLUMNS).to_pandas().sort_values("row", ignore_index=True)
    index, validation = split_validation(index, config)
    schedule = schedule_for(config, index)
    world_size = config.scaling.num_workers
    logger.info(
        f"[train] {len(index)} prepared samples -> {schedule.steps} steps of {config.train.global_batch_size} "
        f"({schedule.dropped_per_epoch} per epoch left out of incomplete global batches)"
        + (f"; {len(validation)} held out for validation" if len(validation) else "")
    )
    plans = rank_plans(assignments(index, schedule), world_size, "rank")
    if len(validation):
        plans |= rank_plans(validation_plan(validation, world_size), world_size, VAL_DATASET_PREFIX)
    datasets = scheduled_datasets(dataset, plans)
    storage_path, storage_filesystem = ray_storage(config.run.storage_path)
    use_gpu = config.scaling.use_gpu
    if use_gpu == "auto":
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "step_tokens": schedule.step_tokens,
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
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
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
