"""The Ray Train worker loop of a stage job: setup -> train -> save -> cleanup.

Every rank runs this function. Rank 0 alone logs progress, logs metrics and writes the final
model; every rank takes part in DeepSpeed checkpoints (ZeRO shards) and in ``ray.train.report``,
which is a barrier.
"""

from __future__ import annotations

import logging
import random
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import torch
import torch.distributed as dist

from llava_ray.config.model_sources import tower_input
from llava_ray.config.schema import LlavaRayConfig
from llava_ray.conversation.tokenizer import load_tokenizer
from llava_ray.model.build import build_llava_model
from llava_ray.model.llava import LlavaModel
from llava_ray.tracking.mlflow_tracking import open_worker_tracker
from llava_ray.training.checkpoint import read_checkpoint_files, write_checkpoint_files
from llava_ray.training.collate import collate_rows
from llava_ray.training.faults import maybe_inject_fault
from llava_ray.training.final_model import save_final_model
from llava_ray.training.metrics import FlopsModel, ProgressMeter, StepMetrics, peak_flops
from llava_ray.training.optim import (
    accumulation_steps,
    build_optimizer,
    build_scheduler,
    deepspeed_config,
    learning_rates,
    resolve_precision,
)
from llava_ray.training.packing import pack_micro_batch, use_segment_attention
from llava_ray.training.step import StepResult, allow_tf32, train_step
from llava_ray.training.stream import RankStream, Reads, Units
from llava_ray.training.trainable import set_trainable
from llava_ray.training.validation import Validation
from llava_ray.utils.compat import skip_deepspeed_cpu_shm_op
from llava_ray.utils.logging import ensure_logging, setup_logging

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    """All resumable progress besides model, optimizer and scheduler (DeepSpeed keeps those)."""

    step: int = 0
    samples_seen: int = 0
    loss_first: float | None = None
    loss_last: float | None = None
    resumed_from_step: int | None = None


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    config = LlavaRayConfig.model_validate(loop_config["config"])
    step_tokens: np.ndarray = loop_config["step_tokens"]
    total_steps = len(step_tokens)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    setup_logging(loop_config.get("verbose", False), rank)  # before DeepSpeed: it warns on import
    device = ray.train.torch.get_device()
    allow_tf32(config.train.tf32, device)

    # Asynchronous and buffered: an MLflow outage costs one warning, never a step (a no-op off rank 0).
    tracker = open_worker_tracker(
        config, loop_config.get("tracking_uri"), loop_config.get("mlflow_run_id") if rank == 0 else None
    )
    engine, model, tokenizer = setup_engine(config, world_size, device, total_steps)
    state = restore_checkpoint(engine, rank)
    checkpoint_contents = {"run_config": loop_config["config"], "model": model, "tokenizer": tokenizer}
    units = ray.get(loop_config["units"])
    batches = micro_batches(
        config,
        units,
        ray.get(loop_config["reads"][rank]),
        tokenizer.pad_token_id,
        model,
        skip_steps=state.step,
        world_size=world_size,
        steps_per_epoch=loop_config["steps_per_epoch"],
    )
    if rank == 0:
        logger.info(
            f"[train] {config.run.name}: {config.train.stage}/{config.train.trainable}, {total_steps} steps, "
            f"{world_size} workers x {config.train.micro_batch_size} x {accumulation_steps(config, world_size)} "
            f"accumulation, ZeRO-{config.deepspeed.zero_stage}, {resolve_precision(config, device.type == 'cuda')}"
            + (f", resuming at step {state.step}" if state.step else ""),
        )
    val_reads = loop_config["val_reads"]
    validation = Validation(
        config,
        tokenizer.pad_token_id,
        tower_input(model.vision_tower.config),
        total_steps,
        units,
        ray.get(val_reads[rank]) if val_reads else None,
    )
    flops = FlopsModel.of(model)
    accumulation = accumulation_steps(config, world_size)
    progress = ProgressMeter(total_steps, state.step, config.train.log_every_steps)
    # A worker group restarted from the final checkpoint (a crash after it, e.g. while writing the final
    # model) runs no step: it reports what that checkpoint recorded.
    report: dict[str, Any] = {"step": state.step, "total_steps": total_steps}
    while state.step < total_steps:
        result = train_step(
            engine,
            [next(batches) for _ in range(accumulation)],
            int(step_tokens[state.step]),
            world_size,
            device,
        )
        state.step += 1
        metrics = reduce_metrics(result, engine, world_size, device)
        if device.type == "cuda":
            metrics.mfu = (
                flops.step_flops(metrics.tokens, metrics.image_positions)
                / metrics.seconds
                / peak_flops(world_size, config.scaling.gpu_peak_tflops)
            )
        state.samples_seen += metrics.samples
        state.loss_first = metrics.loss if state.loss_first is None else state.loss_first
        state.loss_last = metrics.loss
        step_metrics = metrics.as_dict(state.step)
        report = {**step_metrics, "total_steps": total_steps}
        if state.step % config.train.log_every_steps == 0 or state.step == total_steps:
            tracker.log_metrics(step_metrics, step=state.step)  # a no-op off rank 0
        if validation.due(state.step):
            validated = validation.loss(engine, world_size, device)
            report |= validated
            tracker.log_metrics(validated, step=state.step, flush=True)  # sent before Tune may stop the trial
            if rank == 0:
                logger.info(f"[train] step {state.step}/{total_steps} val_loss {validated['val_loss']:.4f}")
        if rank == 0 and (line := progress.update(state.step, metrics)):
            logger.info(line)
        every = config.checkpoint.every_n_steps
        if state.step < total_steps and every and state.step % every == 0:
            save_checkpoint(engine, state, rank, world_size, report, checkpoint_contents)
        elif "val_loss" in report:  # a Tune sweep schedules trials on these
            ray.train.report(report)
        # Other steps report nothing to Ray: it takes one report per controller poll (every 2 s),
        # which would hold each step to that pace. Rank 0 has logged the metrics to MLflow already.
        maybe_inject_fault(config, rank, state.step)
    if state.resumed_from_step is None or state.step > state.resumed_from_step:
        save_checkpoint(engine, state, rank, world_size, report, checkpoint_contents, final=True)
    else:  # resumed from the final checkpoint: it is already the last one; report its metrics again
        ray.train.report({**report, **summary_metrics(state), "final": True})
    if config.train.save_final_model:
        save_final_model(engine, model, tokenizer, config, rank)
    tracker.close()  # flush the queued metrics (bounded wait); the unsendable go beside the checkpoints


def setup_engine(
    config: LlavaRayConfig, world_size: int, device: torch.device, total_steps: int
) -> tuple[Any, LlavaModel, Any]:
    """Build the model (weights loaded before any sharding), optimizer, schedule and DeepSpeed engine."""
    import deepspeed

    if device.type == "cpu":
        skip_deepspeed_cpu_shm_op(deepspeed)
    ensure_logging()  # importing DeepSpeed set its logger's level
    seed_everything(config.run.seed)
    tokenizer = load_tokenizer(config.model)
    model = build_llava_model(config.model, tokenizer, seed=config.run.seed)
    model.template = config.data.template
    model.tokenization = config.data.tokenization
    if config.train.packing:  # packed rows attend per sample, at sum(L^2) (see micro_batches)
        use_segment_attention(model.language_model, config.train.attention)
    set_trainable(model, config.train.trainable, config.train.freeze_vision_tower, config.train.lora)
    if config.train.gradient_checkpointing:
        model.enable_activation_checkpointing()
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, total_steps)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(config, world_size, device.type == "cuda"),
        dist_init_required=False,
    )
    return engine, model, tokenizer


def micro_batches(
    config: LlavaRayConfig,
    units: Units,
    reads: Reads,
    pad_id: int,
    model: LlavaModel,
    skip_steps: int,
    world_size: int,
    steps_per_epoch: int,
) -> Iterator[dict[str, Any]]:
    """This rank's micro-batches in schedule order, resuming after ``skip_steps`` optimizer steps.

    They stream from the shards (:class:`RankStream`), starting at the resumed step's first read;
    each row is checked against the row key the schedule placed there. With ``train.packing`` each
    micro-batch's rows become one packed row (``pack_micro_batch``): the same samples per micro-batch
    and per step, so the loss, a token mean over the global batch, is unchanged; only padding goes.
    """
    per_step = config.train.micro_batch_size * accumulation_steps(config, world_size)
    tower = tower_input(model.vision_tower.config)  # size, mean and std the tower was built with
    collate = pack_micro_batch if config.train.packing else collate_rows
    stream = RankStream(
        units,
        reads,
        micro_batch_size=config.train.micro_batch_size,
        collate=lambda rows: collate(rows, pad_id, tower),
        start=skip_steps * per_step,
        reads_per_epoch=steps_per_epoch * per_step,
    )
    return iter(stream)


def reduce_metrics(result: StepResult, engine: Any, world_size: int, device: torch.device) -> StepMetrics:
    """Sum the step's counts over ranks (one small all-reduce) into global metrics."""
    values = torch.tensor(
        [
            result.loss_sum,
            result.samples,
            result.tokens,
            result.padded_tokens,
            result.supervised,
            result.image_positions,
        ],
        dtype=torch.float64,
        device=device,
    )
    if world_size > 1:
        dist.all_reduce(values)
    loss, samples, tokens, padded, supervised, image_positions = values.tolist()
    learning_rate, projector_learning_rate = learning_rates(engine.optimizer)
    return StepMetrics(
        loss=loss,
        learning_rate=learning_rate,
        projector_learning_rate=projector_learning_rate,
        grad_norm=result.grad_norm,
        samples=int(samples),
        tokens=int(tokens),
        supervised_tokens=int(supervised),
        padding_fraction=1 - tokens / max(padded, 1),
        seconds=result.seconds,
        peak_memory_gib=peak_memory_gib(device),
        world_size=world_size,
        image_positions=int(image_positions),
    )


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as tensors and plain values (loadable with weights_only)."""
    version, keys, position, has_gauss, cached = np.random.get_state()
    python_version, python_state, python_gauss = random.getstate()
    return {
        "python": [python_version, torch.tensor(python_state, dtype=torch.int64), python_gauss],
        "numpy": [version, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    python_version, python_state, python_gauss = state["python"]
    random.setstate((python_version, tuple(python_state.tolist()), python_gauss))
    version, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((version, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def summary_metrics(state: TrainState) -> dict[str, Any]:
    return {
        "loss_first": state.loss_first,
        "loss_last": state.loss_last,
        "resumed_from_step": state.resumed_from_step,
    }


def save_checkpoint(
    engine: Any,
    state: TrainState,
    rank: int,
    world_size: int,
    report: dict[str, Any],
    contents: dict[str, Any],
    final: bool = False,
) -> None:
    """Every rank writes its ZeRO shard, RNG state and manifest; Ray merges them into one checkpoint.

    Ray registers the checkpoint only once every rank has reported it, so a checkpoint that a
    crash interrupted is never the one a restart resumes from; the manifests
    (:mod:`llava_ray.training.checkpoint`) catch one damaged after that.
    """
    metrics = {**report, **summary_metrics(state), "final": final}
    with tempfile.TemporaryDirectory(prefix="llava-ray-ckpt-") as directory:
        write_checkpoint_files(
            engine,
            Path(directory),
            rank,
            world_size,
            asdict(state),
            rng_state(),
            metrics=metrics,
            **contents,
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def restore_checkpoint(engine: Any, rank: int) -> TrainState:
    """Resume from the checkpoint Ray hands over (the driver chose the newest intact one), if any."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return TrainState()
    with checkpoint.as_directory() as directory:
        saved, rng = read_checkpoint_files(engine, Path(directory), rank)
    set_rng_state(rng)
    state = TrainState(**saved)
    state.resumed_from_step = state.step
    if rank == 0:
        logger.info(f"[train] restored checkpoint at step {state.step}")
    return state
