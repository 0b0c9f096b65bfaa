"""The global sample order: LLaVA-1.5's grouping by modality and length, decided once.

Training splits the data into *global batches* (one optimizer step each) that depend only on
the data, the seed and the global batch size, never on how many workers or accumulation steps
share the work. Each global batch is then cut into ``world_size x accumulation`` micro-batches
of similar length. So 1 worker and 2 workers, or 1x8 and 8x1 accumulation, train on exactly the
same samples per step, and the per-step supervised-token count used to normalise the loss is
known in advance (the invariance tests rely on both).

Grouping (as LLaVA-1.5's ``get_modality_length_grouped_indices``, about 25% faster than random
batches): image and text-only samples are shuffled separately, cut into global batches of one
modality, sorted by length within the batch, and the batches are shuffled together. Samples
that do not fill a last global batch of their modality are carried into a final mixed batch;
what still does not fill a whole global batch is dropped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Schedule:
    """Which rows each rank reads, in order, for every optimizer step of every epoch.

    ``order[step, rank, micro, i]`` is a row index; ``step_tokens[step]`` the number of supervised
    tokens (after the causal shift) in that step's global batch.
    """

    order: np.ndarray  # [steps, world_size, accumulation, micro_batch_size]
    step_tokens: np.ndarray  # [steps]
    dropped_per_epoch: int

    @property
    def steps(self) -> int:
        return int(self.order.shape[0])

    def rank_rows(self, rank: int) -> np.ndarray:
        """Rank ``rank``'s rows in the order it reads them (step-major)."""
        return self.order[:, rank].reshape(-1)


def global_batches(
    lengths: np.ndarray,
    is_image: np.ndarray,
    global_batch_size: int,
    seed: int,
    group_by_modality_length: bool,
) -> tuple[list[np.ndarray], int]:
    """Row indices of each global batch for one epoch (seeded), and how many rows were dropped."""
    rng = np.random.default_rng(seed)
    n = len(lengths)
    if not group_by_modality_length:
        perm = rng.permutation(n)
        full = n // global_batch_size * global_batch_size
        return list(perm[:full].reshape(-1, global_batch_size)), n - full
    batches: list[np.ndarray] = []
    leftovers: list[np.ndarray] = []
    for modality in (True, False):
        rows = np.flatnonzero(is_image == modality)
        rows = rows[rng.permutation(len(rows))]
        full = len(rows) // global_batch_size * global_batch_size
        batches += list(rows[:full].reshape(-1, global_batch_size))
        leftovers.append(rows[full:])
    mixed = np.concatenate(leftovers)
    full = len(mixed) // global_batch_size * global_batch_size
    batches += list(mixed[:full].reshape(-1, global_batch_size))
    batches = [batches[i] for i in rng.permutation(len(batches))]
    # Sort each batch by length (longest first) so its micro-batches pad little.
    batches = [batch[np.argsort(-lengths[batch], kind="stable")] for batch in batches]
    return batches, len(mixed) - full


def split_global_batch(batch: np.ndarray, world_size: int, accumulation: int) -> np.ndarray:
    """Cut a length-sorted global batch into [world_size, accumulation, micro] micro-batches.

    Consecutive (similar-length) rows stay together; micro-batch ``k`` of the sorted batch goes to
    rank ``k % world_size`` so every rank gets a similar share of long and short micro-batches.
    """
    micro = len(batch) // (world_size * accumulation)
    chunks = batch.reshape(world_size * accumulation, micro)
    # chunk k -> (accumulation step k // world_size, rank k % world_size)
    return chunks.reshape(accumulation, world_size, micro).transpose(1, 0, 2)


def build_schedule(
    lengths: np.ndarray,
    is_image: np.ndarray,
    supervised: np.ndarray,
    *,
    global_batch_size: int,
    micro_batch_size: int,
    world_size: int,
    epochs: float,
    seed: int,
    group_by_modality_length: bool = True,
    max_steps: int | None = None,
) -> Schedule:
    """The whole run's schedule; epoch ``e`` is shuffled with ``seed + e``."""
    per_step = micro_batch_size * world_size
    if global_batch_size % per_step:
        raise ValueError(
            f"global batch {global_batch_size} is not a multiple of micro-batch x workers = {per_step}"
        )
    accumulation = global_batch_size // per_step
    steps_per_epoch = len(lengths) // global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(lengths)} samples do not fill one global batch of {global_batch_size}; "
            "lower train.global_batch_size or add data"
        )
    total = max_steps if max_steps is not None else round(epochs * steps_per_epoch)
    orders, dropped = [], 0
    epoch = 0
    while sum(len(o) for o in orders) < total:
        batches, dropped = global_batches(
            lengths, is_image, global_batch_size, seed + epoch, group_by_modality_length
        )
        orders.append([split_global_batch(b, world_size, accumulation) for b in batches])
        epoch += 1
    order = np.stack([step for epoch_steps in orders for step in epoch_steps][:total])
    step_tokens = supervised[order.reshape(total, -1)].sum(axis=1)
    return Schedule(order=order, step_tokens=step_tokens, dropped_per_epoch=dropped)
