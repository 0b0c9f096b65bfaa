"""The training input: every rank streams its scheduled rows straight from the prepared shards.

Driver (:func:`index_prepared`): each shard's footer and its light columns (``row``, ``length``,
``modality``, ``num_supervised``) become a :class:`PreparedIndex`, one line of
:data:`INDEX_BYTES_PER_ROW` bytes per row; no image is read. The schedule
(:mod:`llava_ray.training.schedule`) is built from it, with shuffle windows of parquet row groups
(*units*), and each rank gets the :class:`Reads` of its rows in order: unit, row within the unit,
and the row key to check it by (16 bytes a read), through the object store.

Worker (:class:`RankStream`): a background thread walks the rank's reads from its resume point,
reads each unit it needs a few micro-batches ahead on a small thread pool (one parquet row group:
a ranged read, no whole-file read), keeps only this rank's rows of it until they are consumed,
and collates micro-batches into a bounded queue. What a rank holds is bounded by its share of one
shuffle window (``train.shuffle_window`` rows / workers) plus the read-ahead, whatever the size of
the data; nothing is materialized or sorted across the cluster, and a resumed rank starts at its
exact data position without reading the rows before it.

Every rank reads every unit of a window that holds one of its rows, so a window's row groups are
read up to once per rank: the price of batches that do not depend on the worker count
(docs/scale.md gives the figures; the OS page cache serves the ranks of one node).

Data prepared on the fly (no ``data.prepared_path``) is materialized once in the object store
and its blocks serve as the units (:func:`index_blocks`).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from llava_ray.data.prepare import load_report, shards_location
from llava_ray.utils.storage import filesystem, is_remote

logger = logging.getLogger(__name__)

LIGHT_COLUMNS = ["row", "length", "modality", "num_supervised"]
READ_COLUMNS = ["row", "input_ids", "labels", "images"]
# row int64 + length, num_supervised, unit, offset int32 + is_image bool
INDEX_BYTES_PER_ROW = 8 + 4 * 4 + 1
READ_BYTES = 4 + 4 + 8  # a scheduled read: unit, offset, row key
SCAN_THREADS = 16  # shard footers and light columns read at once on the driver
READ_THREADS = 8  # row groups a rank reads at once
READ_AHEAD = 8  # micro-batches whose row groups are requested before they are needed
QUEUE_DEPTH = 4  # collated micro-batches waiting for the training step
LARGE_ROW_GROUP = 64 * 2**20  # bytes: above this, reading one row costs a lot (shards from older prepares)


@dataclass(frozen=True)
class Units:
    """Where each unit lives: a row group of a shard file, or a block of a materialized dataset."""

    files: list[str]  # shard URIs (empty for blocks)
    unit_file: np.ndarray  # int32 [units]: index into ``files``
    unit_group: np.ndarray  # int32 [units]: row group in that file, or block index
    blocks: list[ray.ObjectRef] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.unit_group)


@dataclass(frozen=True)
class PreparedIndex:
    """The light columns of every prepared row, and the unit holding it.

    ``rows``: one line per prepared row, sorted by ``row`` key: ``row``, ``length``, ``is_image``,
    ``num_supervised``, ``unit``, ``offset`` (the row's position within its unit).
    """

    units: Units
    rows: pd.DataFrame


@dataclass(frozen=True)
class Reads:
    """One rank's reads in order: the unit, the row within it, and the row key it must hold."""

    unit: np.ndarray  # int32
    offset: np.ndarray  # int32
    row: np.ndarray  # int64

    @classmethod
    def of(cls, rows: pd.DataFrame) -> Reads:
        """The reads of ``rows`` (index lines), in their order."""
        return cls(
            unit=rows["unit"].to_numpy(np.int32),
            offset=rows["offset"].to_numpy(np.int32),
            row=rows["row"].to_numpy(np.int64),
        )

    def __len__(self) -> int:
        return len(self.unit)


# ---- driver ------------------------------------------------------------------------------------


def _light_table(table: pa.Table) -> pd.DataFrame:
    """Light columns as compact numpy columns (modality becomes a bool)."""
    return pd.DataFrame(
        {
            "row": table.column("row").to_numpy().astype(np.int64),
            "length": table.column("length").to_numpy().astype(np.int32),
            "is_image": pc.equal(table.column("modality"), "image").to_numpy(zero_copy_only=False),
            "num_supervised": table.column("num_supervised").to_numpy().astype(np.int32),
        }
    )


def index_prepared(uri: str) -> PreparedIndex:
    """Index the shards a finished ``prepare`` wrote at ``uri`` (footers and light columns only)."""
    report = load_report(uri)  # refuses an unfinished prepare
    fs, path = filesystem(shards_location(uri, report))
    files = sorted(entry for entry in fs.ls(path, detail=False) if entry.endswith(".parquet"))

    def scan(file: str) -> tuple[pd.DataFrame, list[int], list[int]]:
        with fs.open(file, "rb") as handle:
            shard = pq.ParquetFile(handle)
            meta = shard.metadata
            groups = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            sizes = [meta.row_group(g).total_byte_size for g in range(meta.num_row_groups)]
            return _light_table(shard.read(columns=LIGHT_COLUMNS)), groups, sizes

    with ThreadPoolExecutor(SCAN_THREADS) as pool:
        scanned = list(pool.map(scan, files))
    frames, unit_file, unit_group = [], [], []
    unit = 0
    for file_index, (frame, groups, _) in enumerate(scanned):
        counts = np.asarray(groups, dtype=np.int64)
        frame["unit"] = np.repeat(np.arange(unit, unit + len(groups), dtype=np.int32), counts)
        frame["offset"] = (np.arange(len(frame)) - np.repeat(np.cumsum(counts) - counts, counts)).astype(
            np.int32
        )
        frames.append(frame)
        unit_file += [file_index] * len(groups)
        unit_group += range(len(groups))
        unit += len(groups)
    largest = max((size for *_, sizes in scanned for size in sizes), default=0)
    if largest > LARGE_ROW_GROUP:
        logger.warning(
            f"[train] {uri} has row groups of up to {largest / 2**20:.0f} MiB: each rank reads a whole row "
            "group for any row in it; prepare the data again for 64-row groups"
        )
    rows = _sorted_index(frames)
    if len(rows) != report["written"]:
        raise RuntimeError(
            f"the shards at {uri} hold {len(rows)} rows but report.json counts {report['written']}"
        )
    uris = [fs.unstrip_protocol(file) if is_remote(uri) else file for file in files]
    units = Units(uris, np.asarray(unit_file, dtype=np.int32), np.asarray(unit_group, dtype=np.int32))
    return PreparedIndex(units, rows)


@ray.remote(num_cpus=0)
def _block_light_columns(block: pa.Table) -> pd.DataFrame:
    return _light_table(block)


def index_blocks(dataset: ray.data.Dataset) -> PreparedIndex:
    """Index a materialized dataset of prepared rows: each block is a unit (data prepared on the fly)."""
    blocks = dataset.to_arrow_refs()
    frames = ray.get([_block_light_columns.remote(block) for block in blocks])
    for unit, frame in enumerate(frames):
        frame["unit"] = np.full(len(frame), unit, dtype=np.int32)
        frame["offset"] = np.arange(len(frame), dtype=np.int32)
    units = Units(
        [], np.full(len(blocks), -1, dtype=np.int32), np.arange(len(blocks), dtype=np.int32), blocks
    )
    return PreparedIndex(units, _sorted_index(frames))


def _sorted_index(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    columns = ["row", "length", "is_image", "num_supervised", "unit", "offset"]
    if not frames:
        return pd.DataFrame({name: np.zeros(0, dtype=np.int32) for name in columns})
    rows = pd.concat(frames, ignore_index=True).sort_values("row", ignore_index=True)
    if rows["row"].duplicated().any():
        raise RuntimeError("the prepared data holds a row key twice; prepare it again")
    return rows[columns]


# ---- worker ------------------------------------------------------------------------------------


class UnitReader:
    """Reads units on a worker; shard footers are read once and kept."""

    def __init__(self, units: Units):
        self.units = units
        self._metadata: dict[int, pq.FileMetaData] = {}
        self._lock = threading.Lock()

    def read(self, unit: int) -> pa.Table:
        group = int(self.units.unit_group[unit])
        if self.units.blocks:
            return ray.get(self.units.blocks[group]).select(READ_COLUMNS)
        file_index = int(self.units.unit_file[unit])
        uri = self.units.files[file_index]
        fs, path = filesystem(uri)
        with fs.open(path, "rb") as handle:
            with self._lock:
                metadata = self._metadata.get(file_index)
            shard = pq.ParquetFile(handle, metadata=metadata)
            with self._lock:
                self._metadata[file_index] = shard.metadata
            return shard.read_row_group(group, columns=READ_COLUMNS)


def table_rows(table: pa.Table, offsets: Sequence[int]) -> list[dict[str, Any]]:
    """Rows ``offsets`` of a unit as collate's input: int arrays and a list of encoded images."""
    taken = table.take(pa.array(offsets, type=pa.int64()))
    input_ids = taken.column("input_ids").combine_chunks()
    labels = taken.column("labels").combine_chunks()
    images = taken.column("images").to_pylist()
    ids_values, ids_offsets = input_ids.values.to_numpy(), input_ids.offsets.to_numpy()
    label_values, label_offsets = labels.values.to_numpy(), labels.offsets.to_numpy()
    keys = taken.column("row").to_numpy()
    return [
        {
            "row": int(keys[i]),
            "input_ids": ids_values[ids_offsets[i] : ids_offsets[i + 1]],
            "labels": label_values[label_offsets[i] : label_offsets[i + 1]],
            "images": images[i],
        }
        for i in range(len(offsets))
    ]


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class RankStream:
    """A rank's micro-batches in schedule order, read and collated ahead (see the module docstring).

    ``start``: the first read (a resumed run's data position); ``reads_per_epoch``: this rank's reads
    per epoch, so a unit read in two epochs is read again rather than held from one to the next.
    """

    def __init__(
        self,
        units: Units,
        reads: Reads,
        *,
        micro_batch_size: int,
        collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
        start: int = 0,
        reads_per_epoch: int | None = None,
        read_ahead: int = READ_AHEAD,
        queue_depth: int = QUEUE_DEPTH,
    ):
        if start % micro_batch_size:
            raise ValueError(f"start {start} is not on a micro-batch boundary of {micro_batch_size}")
        self.units, self.reads, self.micro = units, reads, micro_batch_size
        self.collate, self.start = collate, start
        per_epoch = reads_per_epoch or max(len(reads), 1)
        epochs = np.arange(len(reads), dtype=np.int64) // per_epoch
        self.loads = epochs * max(len(units), 1) + reads.unit  # a unit, once per epoch
        self.read_ahead, self.queue_depth = read_ahead, queue_depth
        self.rows_held_peak = 0  # most rows held at once (the bound the module docstring states)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        batches: queue.Queue = queue.Queue(self.queue_depth)
        stop = threading.Event()
        producer = threading.Thread(
            target=self._produce, args=(batches, stop), daemon=True, name="rank-stream"
        )
        producer.start()
        try:
            while True:
                item = batches.get()
                if item is None:
                    return
                if isinstance(item, _Failed):
                    raise item.error
                yield item
        finally:
            stop.set()

    def _produce(self, batches: queue.Queue, stop: threading.Event) -> None:
        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    batches.put(item, timeout=0.2)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="rank-read") as pool:
                for batch in self._batches(pool, stop):
                    if not put(batch):
                        return
            put(None)
        except BaseException as error:  # handed to the training loop, which raises it
            put(_Failed(error))

    def _batches(self, pool: ThreadPoolExecutor, stop: threading.Event) -> Iterator[dict[str, Any]]:
        reader = UnitReader(self.units)
        total = len(self.reads)
        if self.start >= total:
            return
        order = np.argsort(self.loads[self.start :], kind="stable") + self.start
        loads, firsts = np.unique(self.loads[order], return_index=True)
        members = dict(zip(loads.tolist(), np.split(order, firsts[1:]), strict=True))
        pending: dict[int, Future] = {}
        held: dict[int, dict[str, Any]] = {}
        requested = self.start

        def request(until: int) -> int:
            for j in range(requested, min(until, total)):
                load = int(self.loads[j])
                if j not in held and load not in pending and load in members:
                    pending[load] = pool.submit(self._read_load, reader, members.pop(load))
            return max(requested, min(until, total))

        for begin in range(self.start, total, self.micro):
            if stop.is_set():
                return
            end = min(begin + self.micro, total)
            requested = request(end + self.read_ahead * self.micro)
            for j in range(begin, end):
                if j not in held:
                    held.update(pending.pop(int(self.loads[j])).result())
            self.rows_held_peak = max(self.rows_held_peak, len(held))
            yield self.collate([held.pop(j) for j in range(begin, end)])

    def _read_load(self, reader: UnitReader, reads: np.ndarray) -> dict[int, dict[str, Any]]:
        """This rank's rows of one unit, by read position; each must hold the row key scheduled."""
        unit = int(self.reads.unit[reads[0]])
        rows = table_rows(reader.read(unit), self.reads.offset[reads].tolist())
        for j, row in zip(reads.tolist(), rows, strict=True):
            if row["row"] != self.reads.row[j]:
                raise RuntimeError(
                    f"unit {unit} row {self.reads.offset[j]} holds row {row['row']}, the schedule expected "
                    f"{self.reads.row[j]}: the prepared data changed after training started"
                )
        return dict(zip(reads.tolist(), rows, strict=True))
