"""The held-out validation split of a stage job and its loss.

The driver carves ``train.val_fraction`` of the prepared samples (at most ``train.val_max_samples``,
a multiple of the worker count) out of the training schedule with the run's seed, so a resumed run
holds out the same samples. Each rank gets an equal share, sorted by length to pad little, and reads it
once from the shards (:class:`llava_ray.training.stream.RankStream`). Workers
compute the supervised-token mean loss every ``train.eval_every_steps`` steps and at the end; Ray
Tune's schedulers (ASHA) decide on it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from llava_ray.config.loader import ConfigError
from llava_ray.config.model_sources import TowerInput
from llava_ray.config.schema import LlavaRayConfig
from llava_ray.training.collate import collate_rows
from llava_ray.training.step import move_inputs
from llava_ray.training.stream import RankStream, Reads, Units

VAL_SEED_STREAM = 1  # a second random stream of run.seed


def split_validation(index: pd.DataFrame, config: LlavaRayConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(train, validation)`` parts of the prepared-row index; validation is empty without a split."""
    train = config.train
    if not train.val_fraction:
        return index, index.iloc[:0]
    world_size = config.scaling.num_workers
    count = min(round(train.val_fraction * len(index)), train.val_max_samples)
    count -= count % world_size
    if count == 0:
        raise ConfigError(
            [
                f"train.val_fraction={train.val_fraction} of {len(index)} prepared samples leaves no validation "
                f"sample for each of the {world_size} workers; raise train.val_fraction or add data"
            ]
        )
    held_out = np.zeros(len(index), dtype=bool)
    rng = np.random.default_rng([config.run.seed, VAL_SEED_STREAM])  # apart from the schedule's shuffle
    held_out[rng.choice(len(index), count, replace=False)] = True
    return index[~held_out].reset_index(drop=True), index[held_out].reset_index(drop=True)


def validation_plan(validation: pd.DataFrame, world_size: int) -> list[Reads]:
    """Each rank's validation reads: the rows by length, dealt round robin."""
    rows = validation.sort_values(["length", "row"], ignore_index=True)
    return [Reads.of(rows.iloc[rank::world_size]) for rank in range(world_size)]


class Validation:
    """One rank's view of the validation split: when it is due and the loss it gives."""

    def __init__(
        self,
        config: LlavaRayConfig,
        pad_id: int,
        tower: TowerInput,
        total_steps: int,
        units: Units,
        reads: Reads | None,
    ):
        self.enabled = reads is not None
        self.every = config.train.eval_every_steps
        self.total_steps = total_steps
        self.micro_batch_size = config.train.micro_batch_size
        self.pad_id = pad_id
        self.tower = tower
        self.units, self.reads = units, reads
        self._batches: list[dict[str, Any]] | None = None

    def due(self, step: int) -> bool:
        return self.enabled and (step == self.total_steps or bool(self.every and step % self.every == 0))

    def batches(self) -> list[dict[str, Any]]:
        """This rank's validation batches, read once and kept (the split is small)."""
        if self._batches is None and self.reads is not None:
            self._batches = list(
                RankStream(
                    self.units,
                    self.reads,
                    micro_batch_size=self.micro_batch_size,
                    collate=lambda rows: collate_rows(rows, self.pad_id, self.tower),
                )
            )
        return self._batches or []

    def loss(self, engine: Any, world_size: int, device: torch.device) -> dict[str, float]:
        """The supervised-token mean loss over every rank's share; every rank must call this together."""
        return validation_loss(engine, self.batches(), world_size, device)


def validation_loss(
    engine: Any, batches: list[dict[str, Any]], world_size: int, device: torch.device
) -> dict[str, float]:
    """``val_loss`` (token mean over all ranks) and ``val_tokens``; the model is back in train mode after."""
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    engine.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                output = engine(**move_inputs(batch, device), loss_reduction="sum", return_logits=False)
                totals[0] += float(output.loss)
                totals[1] += int(output.num_supervised_tokens)
    finally:
        engine.train()
    if world_size > 1:
        dist.all_reduce(totals)
    loss_sum, tokens = totals.tolist()
    return {"val_loss": loss_sum / max(tokens, 1), "val_tokens": tokens}
