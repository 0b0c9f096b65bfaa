"""The prepare job: LLaVA-format sources -> tokenised, image-processed parquet shards + report.json.

Run it with ``llava-ray prepare --config FILE [key=value ...]`` or as a Ray job
(``jobs/prepare.py``); training reads the result with :func:`read_prepared`, or streams the
same pipeline without shards (:func:`build_prepare_pipeline`).

How it runs, in one streaming pass over the images:

1. Before any work: the config's prepared_path, the sources and their image roots are checked
   (:func:`llava_ray.data.sources.resolve_sources`), the tokenizer loads and renders a probe
   conversation. Anything that would fail every sample fails here, with the fix.
2. The driver scans the source files (JSON text only): parse errors and duplicate ids become
   skips, weight/repeat decide each record's copies, and usable records go to the object store
   in blocks of work items. Duplicate ids need this one global view; it is cheap next to images.
3. ``map_batches`` runs :class:`PrepareWorker` (a callable class on an actor pool of one CPU per
   actor, the tokenizer loaded once per actor): each record is prepared once
   (:class:`llava_ray.data.samples.SamplePreparer`) and its row emitted ``copies`` times. Skips
   and written lengths go to a small report actor; nothing leaves a batch unaccounted for.
4. Rows stream into parquet shards of about ``data.shard_size_mb`` in row groups of
   :data:`ROW_GROUP_ROWS` rows; ``report.json`` is written
   last, so a folder without it is an unfinished run. The report must balance
   (``input == written + sum(skipped)``) and the shards must hold ``written`` rows, or the job fails.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from PIL import Image
from ray.actor import ActorHandle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from transformers import PreTrainedTokenizerBase

from llava_ray.config.loader import ConfigError
from llava_ray.config.schema import LlavaRayConfig
from llava_ray.data.report import ReportActor, Skip, Written, finish_report, format_summary
from llava_ray.data.samples import (
    PREPARED_SCHEMA,
    PreparedSample,
    PrepareSettings,
    SamplePreparer,
    decode_prepared_row,
    load_checked_tokenizer,
    row_keys,
    samples_to_table,
)
from llava_ray.data.sources import (
    DataPathError,
    Source,
    SourceScanner,
    WorkItem,
    bucket_exists,
    describe_access_error,
    resolve_sources,
)
from llava_ray.utils.storage import filesystem, is_remote

logger = logging.getLogger(__name__)

__all__ = [
    "PREPARED_SCHEMA",
    "REPORT_FILE",
    "PreparePipeline",
    "build_prepare_pipeline",
    "decode_prepared_row",
    "load_report",
    "read_prepared",
    "run_prepare",
]

REPORT_FILE = "report.json"
ROW_GROUP_ROWS = 64  # rows per parquet row group: about 2-3 MB of 336 px images, one ranged read
ITEMS_PER_BLOCK = 64  # work items per input block: small blocks spread evenly over the actors
BATCH_SIZE = 32  # samples per worker call: one report round trip and one concurrent image fetch each
_SKIPS_PER_MESSAGE = 10_000

ITEM_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("source", pa.int32()),
        ("id", pa.string()),
        ("locator", pa.string()),
        ("sample", pa.string()),
        ("copies", pa.int32()),
    ]
)


class PrepareWorker:
    """Ray Data callable class: a batch of work items -> the rows to write."""

    def __init__(
        self,
        settings: PrepareSettings,
        sources: list[Source],
        tokenizer: PreTrainedTokenizerBase,
        report: ActorHandle,
    ):
        # This process only prepares data, and open_image checks data.max_image_pixels on the
        # header before decoding; Pillow's global limit would otherwise pre-empt a higher setting.
        Image.MAX_IMAGE_PIXELS = None
        self.preparer = SamplePreparer(settings, sources, tokenizer)
        self.report = report

    def __call__(self, batch: pa.Table) -> pa.Table:
        items = [WorkItem(**row) for row in batch.to_pylist()]
        skips: list[Skip] = []
        written: list[Written] = []
        rows: list[PreparedSample] = []
        keys: list[int] = []
        for item, outcome in zip(items, self.preparer.prepare(items), strict=True):
            if isinstance(outcome, Skip):
                skips.append(outcome)
            else:
                written.append(
                    Written(item.row, item.source, outcome.length, item.copies, outcome.changes, item.id)
                )
                rows.extend([outcome] * item.copies)
                keys.extend(row_keys(item.row, item.copies))
        # Wait for the report to take the records before the rows leave: once the dataset has
        # finished, every record is counted.
        ray.get(self.report.add.remote(skips, written))
        return samples_to_table(rows, keys)


@dataclass
class PreparePipeline:
    """The lazy dataset of prepared rows, and what is needed to report on it once consumed."""

    dataset: ray.data.Dataset
    report: ActorHandle
    scanner: SourceScanner
    settings: PrepareSettings
    workers: int

    def finish(self, elapsed_s: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The balanced report (call after the dataset has been consumed once)."""
        counts = ray.get(self.report.counts.remote())
        expected = {name: vars(stats) for name, stats in self.scanner.stats.items()}
        settings = {
            "template": self.settings.template,
            "model_max_length": self.settings.max_length,
            "image_size": self.settings.image.size,
            "image_positions": self.settings.image_positions,
            "image_aspect": self.settings.image.aspect,
            "image_format": self.settings.image.format,
            "workers": self.workers,
            **(extra or {}),
        }
        return finish_report(counts, expected, elapsed_s, settings)


def build_prepare_pipeline(config: LlavaRayConfig, workers: int | None = None) -> PreparePipeline:
    """Check everything, scan the sources and return the lazy pipeline (see the module docstring)."""
    return _build_pipeline(config, resolve_sources(config.data), workers)


def run_prepare(config: LlavaRayConfig, workers: int | None = None) -> dict[str, Any]:
    """Write shards and ``report.json`` to ``data.prepared_path``; print a summary; return the report.

    ``workers`` caps the actor pool (default: ``data.prepare_workers``, else every CPU of the cluster).
    """
    started = time.perf_counter()
    output = config.data.prepared_path
    if output is None:
        raise ConfigError(
            ["data.prepared_path is not set; set it to a folder or s3:// prefix for the shards"]
        )
    fs, path = filesystem(output)
    previous, problems = inspect_output(fs, path, output)
    try:
        sources = resolve_sources(config.data)
    except DataPathError as error:
        raise DataPathError([*error.problems, *problems]) from None
    if problems:
        raise DataPathError(problems)
    pipeline = _build_pipeline(config, sources, workers)
    remove_previous_output(fs, path, previous)
    pipeline.dataset.write_parquet(
        path,
        filesystem=fs,
        min_bytes_per_file=config.data.shard_size_mb * 2**20,
        # Small row groups: a training rank reads just the groups holding its rows (training/stream.py).
        row_group_size=ROW_GROUP_ROWS,
        # Writing is I/O; holding no CPU lets the actor pool grow to every core.
        ray_remote_args={"num_cpus": 0},
    )
    shards, rows = count_shard_rows(fs, path)
    report = pipeline.finish(time.perf_counter() - started, {"prepared_path": output, "shards": shards})
    if rows != report["written"]:
        raise RuntimeError(
            f"the shards at {output} hold {rows} rows but the report counts {report['written']}"
        )
    fs.pipe_file(posixpath.join(path, REPORT_FILE), (json.dumps(report, indent=1) + "\n").encode())
    logger.info(f"{format_summary(report)} -> {output}")
    return report


def _build_pipeline(config: LlavaRayConfig, sources: list[Source], workers: int | None) -> PreparePipeline:
    # Loaded once here and shipped to every actor: workers never import the model code.
    tokenizer = load_checked_tokenizer(config)
    settings = PrepareSettings.from_config(config, tokenizer)
    if not ray.is_initialized():
        ray.init()
    # data.prepare_workers lets an autoscaling cluster grow: the CPUs up now may be none at all.
    workers = workers or config.data.prepare_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    # The report is the run's only tally, so it lives on the driver's node: a 0-CPU actor could
    # otherwise land on any node, and losing that node would fail the run (the driver's own loss
    # ends it anyway). The prepare actors restart elsewhere and resend their batches' records.
    report = ReportActor.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False
        )
    ).remote([source.name for source in sources])
    scanner = SourceScanner(sources, config.run.seed)
    blocks = _scan_into_blocks(scanner, report)
    actors = min(workers, len(blocks))  # an actor per block at most: a small run starts no idle ones
    dataset = ray.data.from_arrow_refs(blocks).map_batches(
        PrepareWorker,
        fn_constructor_args=(settings, sources, tokenizer, report),
        batch_size=BATCH_SIZE,
        batch_format="pyarrow",
        # All actors start at once (initial_size) instead of the pool growing from one as its
        # utilisation crosses a threshold, seconds later; min_size=1 still lets the job run on a
        # cluster where some CPUs stay busy.
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors, initial_size=actors),
        num_cpus=1,
    )
    return PreparePipeline(dataset, report, scanner, settings, workers)


def read_prepared(uri: str) -> ray.data.Dataset:
    """The rows a finished ``prepare`` wrote at ``uri`` (local folder or ``s3://`` prefix), lazily.

    The one reader of prepared data, for training and tests alike. It refuses a folder without
    ``report.json`` (an unfinished run) and reads only the parquet shards beside it.
    """
    fs, path = filesystem(uri)
    report = load_report(uri)
    if report["written"] == 0:
        return ray.data.from_arrow(PREPARED_SCHEMA.empty_table())
    return ray.data.read_parquet(path, filesystem=fs, file_extensions=["parquet"])


def load_report(uri: str) -> dict[str, Any]:
    """``report.json`` of a finished prepare run; its absence means the run did not finish."""
    fs, path = filesystem(uri)
    report_path = posixpath.join(path, REPORT_FILE)
    try:
        return json.loads(fs.cat_file(report_path))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no {REPORT_FILE} at {uri}: prepare has not finished there; run `llava-ray prepare` with "
            "data.prepared_path set to it"
        ) from None


def inspect_output(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> tuple[list[str], list[str]]:
    """(a previous run's files at ``path``, problems that make ``path`` unusable); changes nothing."""
    key = f"data.prepared_path = {uri!r}"
    try:
        if not fs.exists(path):
            if is_remote(uri) and not bucket_exists(fs, path):
                raise FileNotFoundError(f"the bucket of {uri} does not exist")
            return [], []
        if not fs.isdir(path):
            return [], [f"{key} is a file; point it at a folder or prefix"]
        entries = fs.ls(path, detail=False)
    except Exception as error:  # storage back ends raise many types; each becomes a problem line
        return [], [f"{key}: {describe_access_error(error, uri)}"]
    foreign = [posixpath.basename(entry.rstrip("/")) for entry in entries if not _is_prepare_output(entry)]
    if foreign:
        return [], [
            f"{key} holds files prepare did not write ({', '.join(foreign[:3])}); use an empty or new folder"
        ]
    return entries, []


def remove_previous_output(fs: fsspec.AbstractFileSystem, path: str, previous: list[str]) -> None:
    """Delete a previous run's report, then its shards: a crash in between never looks finished."""
    report = [entry for entry in previous if posixpath.basename(entry) == REPORT_FILE]
    for group in (report, [entry for entry in previous if entry not in report]):
        if group:
            fs.rm(group)
    fs.makedirs(path, exist_ok=True)


def _is_prepare_output(entry: str) -> bool:
    name = posixpath.basename(entry.rstrip("/"))
    return name == REPORT_FILE or name.endswith(".parquet")


def count_shard_rows(fs: fsspec.AbstractFileSystem, path: str) -> tuple[int, int]:
    """(number of parquet shards, rows in them), read from the footers only."""
    shards = [entry for entry in fs.ls(path, detail=False) if entry.endswith(".parquet")]
    rows = 0
    for shard in shards:
        with fs.open(shard, "rb") as stream:
            rows += pq.ParquetFile(stream).metadata.num_rows
    return len(shards), rows


def _scan_into_blocks(scanner: SourceScanner, report: ActorHandle) -> list[ray.ObjectRef]:
    """Put the scan's work items into the object store in blocks; send its skips to the report."""
    blocks: list[ray.ObjectRef] = []
    chunk: list[WorkItem] = []
    skips: list[Skip] = []
    for entry in scanner.scan():
        if isinstance(entry, Skip):
            skips.append(entry)
            if len(skips) == _SKIPS_PER_MESSAGE:
                ray.get(report.add.remote(skips, []))
                skips = []
            continue
        chunk.append(entry)
        if len(chunk) == ITEMS_PER_BLOCK:
            blocks.append(_put_block(chunk))
            chunk = []
    if chunk or not blocks:
        blocks.append(_put_block(chunk))
    ray.get(report.add.remote(skips, []))
    return blocks


def _put_block(items: list[WorkItem]) -> ray.ObjectRef:
    return ray.put(pa.Table.from_pylist([vars(item) for item in items], schema=ITEM_SCHEMA))
