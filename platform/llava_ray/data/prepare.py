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
   :data:`ROW_GROUP_ROWS` rows, written to a staging location; ``report.json`` is written
   last, so a folder without it is an unfinished run. The report must balance
   (``input == written + sum(skipped)``) and the shards must hold ``written`` rows, or the job fails.
5. The finished run replaces the previous one at ``data.prepared_path`` in one atomic step (see
   :func:`publish`): a run killed at any moment leaves the previous data whole and readable.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import json
import logging
import os
import posixpath
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
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
    "shards_location",
]

REPORT_FILE = "report.json"
SHARDS_FOLDER_KEY = "shards_folder"  # in report.json on object stores: the version prefix of the shards
VERSION_PREFIX = "v-"  # object stores: <prepared_path>/v-<run>/ holds one run's shards
PARTIAL_SUFFIX = ".partial-"  # local: <prepared_path>.partial-<run> is a run being written
OLD_SUFFIX = ".old-"  # local, without an atomic exchange: the replaced folder, deleted at once
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
    problems = inspect_output(fs, path, output)
    try:
        sources = resolve_sources(config.data)
    except DataPathError as error:
        raise DataPathError([*error.problems, *problems]) from None
    if problems:
        raise DataPathError(problems)
    pipeline = _build_pipeline(config, sources, workers)
    run_id = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    staging = staging_path(fs, path, output, run_id)
    fs.makedirs(staging, exist_ok=True)
    logger.info(
        f"[prepare] writing shards to {staging}; {output} keeps its previous data until they are done"
    )
    try:
        pipeline.dataset.write_parquet(
            staging,
            filesystem=fs,
            min_bytes_per_file=config.data.shard_size_mb * 2**20,
            # Small row groups: a training rank reads just the groups holding its rows (training/stream.py).
            row_group_size=ROW_GROUP_ROWS,
            # Writing is I/O; holding no CPU lets the actor pool grow to every core.
            ray_remote_args={"num_cpus": 0},
        )
        shards, rows = count_shard_rows(fs, staging)
        extra = {"prepared_path": output, "shards": shards}
        if is_remote(output) and shards:  # no shards, no version prefix: nothing to point at
            extra[SHARDS_FOLDER_KEY] = posixpath.basename(staging)
        report = pipeline.finish(time.perf_counter() - started, extra)
        if rows != report["written"]:
            raise RuntimeError(
                f"the shards at {output} hold {rows} rows but the report counts {report['written']}"
            )
    except BaseException:
        # A failed run leaves the previous data as it was; a killed one leaves its staging
        # folder, which readers never look at and the next successful run deletes.
        _remove_quietly(fs, staging)
        raise
    publish(fs, path, output, staging, report)
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
    ``report.json`` (an unfinished run) and reads only the parquet shards that report names.
    """
    report = load_report(uri)
    if report["written"] == 0:
        return ray.data.from_arrow(PREPARED_SCHEMA.empty_table())
    fs, path = filesystem(shards_location(uri, report))
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


def shards_location(uri: str, report: dict[str, Any] | None = None) -> str:
    """The folder or prefix holding the shards of the finished prepare at ``uri``.

    ``uri`` itself for a local folder (and for object-store data written before versions); on
    object stores the version folder ``report.json`` names. ``report``: the already loaded report.
    """
    report = load_report(uri) if report is None else report
    folder = report.get(SHARDS_FOLDER_KEY)
    return f"{uri.rstrip('/')}/{folder}" if folder else uri


# ---- replacing a previous run's data atomically -------------------------------------------------
#
# Local (and any file system with rename): the run writes beside the output, into
# ``<prepared_path>.partial-<run>``, report.json included, and the finished folder then takes the
# output's place in one atomic exchange of the two names (Linux renameat2 RENAME_EXCHANGE). Where
# the file system cannot exchange (NFS, non-Linux), two renames: old -> ``.old-<run>``, new -> the
# output; for the microseconds between them the output folder is absent, never half written, and
# both copies are whole on disk. Readers always see the old run's data or the new one's.
#
# Object stores have no rename: the shards go to a new version prefix ``<prepared_path>/v-<run>/``
# and report.json, written last in one PUT, names it (``shards_folder``); readers follow it
# (:func:`shards_location`). Only then are the previous version and any killed run's leftovers deleted.


def staging_path(fs: fsspec.AbstractFileSystem, path: str, uri: str, run_id: str) -> str:
    """Where this run writes before it replaces the output (see the comment above)."""
    if is_remote(uri):
        return posixpath.join(path, f"{VERSION_PREFIX}{run_id}")
    return f"{path.rstrip('/')}{PARTIAL_SUFFIX}{run_id}"


def publish(fs: fsspec.AbstractFileSystem, path: str, uri: str, staging: str, report: dict[str, Any]) -> None:
    """Make ``staging``, with ``report``, the data at ``path`` in one step; then delete what it replaced."""
    text = (json.dumps(report, indent=1) + "\n").encode()
    if is_remote(uri):
        fs.pipe_file(posixpath.join(path, REPORT_FILE), text)  # one PUT: the switch
        keep = {REPORT_FILE, posixpath.basename(staging)}
        for entry in fs.ls(path, detail=False):
            if posixpath.basename(entry.rstrip("/")) not in keep:
                fs.rm(entry, recursive=True)
        fs.invalidate_cache(path)
        return
    staging_dir, output = Path(staging), Path(path)
    (staging_dir / REPORT_FILE).write_bytes(text)
    if output.exists() or output.is_symlink():
        swap_folders(staging_dir, output)
    else:
        staging_dir.rename(output)
    remove_leftovers(output)


def swap_folders(new: Path, output: Path) -> None:
    """Put ``new`` at ``output``; the replaced folder is left under a leftover name (``.partial-``/``.old-``)."""
    if not exchange_paths(new, output):
        run = new.name.rsplit(PARTIAL_SUFFIX, 1)[-1]
        swap_by_renames(new, output, output.with_name(f"{output.name}{OLD_SUFFIX}{run}"))


def swap_by_renames(new: Path, output: Path, old: Path) -> None:
    """The fallback swap: ``output`` -> ``old``, then ``new`` -> ``output``."""
    output.rename(old)
    new.rename(output)


def remove_leftovers(output: Path) -> None:
    """Delete the folder a swap replaced and killed runs' staging folders: superseded now."""
    for suffix in (PARTIAL_SUFFIX, OLD_SUFFIX):
        for leftover in output.parent.glob(f"{glob.escape(output.name)}{suffix}*"):
            if leftover.is_symlink():  # the output was a link to a folder: the link goes, not its target
                leftover.unlink()
            else:
                shutil.rmtree(leftover, ignore_errors=True)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV}


def exchange_paths(first: Path, second: Path) -> bool:
    """Atomically swap two paths' names (Linux renameat2); False where the file system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _NO_EXCHANGE:
        return False
    raise OSError(code, f"cannot exchange {first} and {second}: {os.strerror(code)}")


def _remove_quietly(fs: fsspec.AbstractFileSystem, path: str) -> None:
    try:
        fs.rm(path, recursive=True)
    except Exception:  # nothing written yet, or the store is unreachable: the next run cleans up
        logger.debug(f"could not remove {path}", exc_info=True)


def inspect_output(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> list[str]:
    """Problems that make ``path`` unusable as prepare's output (a previous run's is fine); changes nothing."""
    key = f"data.prepared_path = {uri!r}"
    try:
        if not fs.exists(path):
            if is_remote(uri) and not bucket_exists(fs, path):
                raise FileNotFoundError(f"the bucket of {uri} does not exist")
            return []
        if not fs.isdir(path):
            return [f"{key} is a file; point it at a folder or prefix"]
        entries = fs.ls(path, detail=False)
    except Exception as error:  # storage back ends raise many types; each becomes a problem line
        return [f"{key}: {describe_access_error(error, uri)}"]
    foreign = [posixpath.basename(entry.rstrip("/")) for entry in entries if not _is_prepare_output(entry)]
    if foreign:
        return [
            f"{key} holds files prepare did not write ({', '.join(foreign[:3])}); use an empty or new folder"
        ]
    return []


def _is_prepare_output(entry: str) -> bool:
    name = posixpath.basename(entry.rstrip("/"))
    return name == REPORT_FILE or name.endswith(".parquet") or name.startswith(VERSION_PREFIX)


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
