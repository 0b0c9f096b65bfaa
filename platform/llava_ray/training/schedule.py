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

Shuffle windows (what lets training stream from the shards, :mod:`llava_ray.training.stream`):
with ``units`` (the parquet row group of each row) and a ``window`` of rows, an epoch first
shuffles the row groups, cuts them into windows of about ``window`` rows, and groups as above
within each window, carrying what does not fill a global batch into the next window; only the
last window's remainder is dropped. A rank then needs only the row groups of the current window,
which bounds what it holds whatever the dataset's size (MosaicML streaming's shard-block shuffle,
with LLaVA's grouping inside each block). When one window holds all the data, the schedule is
exactly the global one above. Either way it depends on the data (and its row groups), the seed,
the global batch size and the window, never on the workers or the accumulation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

UNIT_SEED_STREAM = 2  # the row-group shuffle's random stream of run.seed + epoch


@dataclass(frozen=True)
class Schedule:
    """Which rows each rank reads, in order, for every optimizer step of every epoch.

    ``order[step, rank, micro, i]`` is a row index; ``step_tokens[step]`` the number of supervised
    tokens (after the causal shift) in that step's global batch.
    """

    order: np.ndarray  # [steps, world_size, accumulation, micro_batch_size]
    step_tokens: np.ndarray  # [steps]
    dropped_per_epoch: int
    steps_per_epoch: int

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
    batches, leftover = group_batches(
        np.arange(len(lengths)),
        lengths,
        is_image,
        global_batch_size,
        np.random.default_rng(seed),
        group_by_modality_length,
    )
    return batches, len(leftover)


def group_batches(
    rows: np.ndarray,
    lengths: np.ndarray,
    is_image: np.ndarray,
    global_batch_size: int,
    rng: np.random.Generator,
    group_by_modality_length: bool,
) -> tuple[list[np.ndarray], np.ndarray]:
    """``rows`` cut into global batches (see the module docstring), and the rows left over."""
    if not group_by_modality_length:
        perm = rows[rng.permutation(len(rows))]
        full = len(rows) // global_batch_size * global_batch_size
        return list(perm[:full].reshape(-1, global_batch_size)), perm[full:]
    batches: list[np.ndarray] = []
    leftovers: list[np.ndarray] = []
    for modality in (True, False):
        members = rows[is_image[rows] == modality]
        members = members[rng.permutation(len(members))]
        full = len(members) // global_batch_size * global_batch_size
        batches += list(members[:full].reshape(-1, global_batch_size))
        leftovers.append(members[full:])
    mixed = np.concatenate(leftovers)
    full = len(mixed) // global_batch_size * global_batch_size
    batches += list(mixed[:full].reshape(-1, global_batch_size))
    batches = [batches[i] for i in rng.permutation(len(batches))]
    # Sort each batch by length (longest first) so its micro-batches pad little.
    batches = [batch[np.argsort(-lengths[batch], kind="stable")] for batch in batches]
    return batches, mixed[full:]


def windows(units: np.ndarray, window: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch's windows: the row groups shuffled, then cut into runs of at least ``window`` rows.

    ``units[i]`` is row ``i``'s row group; the rows of a group need not be contiguous. Returns the
    row indices of each window, group after group.
    """
    order = np.argsort(units, kind="stable")
    groups, starts = np.unique(units[order], return_index=True)
    members = np.split(order, starts[1:])
    result: list[np.ndarray] = []
    current: list[np.ndarray] = []
    size = 0
    for group in rng.permutation(len(groups)):
        current.append(members[group])
        size += len(members[group])
        if size >= window:
            result.append(np.concatenate(current))
            current, size = [], 0
    if current:
        result.append(np.concatenate(current))
    return result


def epoch_batches(
    lengths: np.ndarray,
    is_image: np.ndarray,
    global_batch_size: int,
    seed: int,
    epoch: int,
    group_by_modality_length: bool,
    units: np.ndarray | None = None,
    window: int | None = None,
) -> tuple[list[np.ndarray], int]:
    """One epoch's global batches, window after window (see the module docstring), and the rows dropped."""
    if units is None or window is None or window >= len(lengths):
        return global_batches(lengths, is_image, global_batch_size, seed + epoch, group_by_modality_length)
    rng = np.random.default_rng(seed + epoch)
    unit_rng = np.random.default_rng([seed, epoch, UNIT_SEED_STREAM])
    batches: list[np.ndarray] = []
    carried = np.zeros(0, dtype=np.int64)
    for rows in windows(units, window, unit_rng):
        window_batches, carried = group_batches(
            np.concatenate([carried, rows]),
            lengths,
            is_image,
            global_batch_size,
            rng,
            group_by_modality_length,
        )
        batches += window_batches
    return batches, len(carried)


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
    units: np.ndarray | None = None,
    window: int | None = None,
) -> Schedule:
    """The whole run's schedule; epoch ``e`` is shuffled with ``seed + e``.

    ``units`` and ``window``: shuffle within windows of row groups (the module docstring).
    """
    per_step = micro_batch_size * world_size
    if global_batch_size % per_step:
        raise ValueError(
            f"global batch {global_batch_size} is not a multiple of micro-batch x workers = {per_step}"
        )
    accumulation = global_batch_size // per_step
    if len(lengths) < global_batch_size:
        raise ValueError(
            f"{len(lengths)} samples do not fill one global batch of {global_batch_size}; "
            "lower train.global_batch_size or add data"
        )
    orders: list[list[np.ndarray]] = []
    dropped = 0
    epoch = 0
    total = max_steps
    while total is None or sum(len(o) for o in orders) < total:
        batches, dropped = epoch_batches(
            lengths, is_image, global_batch_size, seed, epoch, group_by_modality_length, units, window
        )
        orders.append([split_global_batch(b, world_size, accumulation) for b in batches])
        if total is None:  # every epoch has as many steps: the windows drop less than one global batch
            total = round(epochs * len(batches))
        epoch += 1
    order = np.stack([step for epoch_steps in orders for step in epoch_steps][:total])
    step_tokens = supervised[order.reshape(total, -1)].sum(axis=1)
    return Schedule(
        order=order, step_tokens=step_tokens, dropped_per_epoch=dropped, steps_per_epoch=len(orders[0])
    )
