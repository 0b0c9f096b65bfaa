"""One LLaVA sample -> one training row: checks, tokens and labels, processed images. No Ray here.

:class:`SamplePreparer` is what each Ray Data worker runs and what tests call in-process, so the
pipeline and a direct call cannot disagree. Per sample, in order (the first
:class:`~llava_ray.utils.skips.Skipped` raised gives the skip reason; cheap text checks run before
any image is fetched):

1. the record's fields (:func:`llava_ray.data.sources.parse_record`);
2. ``<image>`` placeholders: as many as the sample has images (``image_count_mismatch``), none in a
   text-only sample (``image_token_in_text_only``);
3. rendering and tokenising with :func:`llava_ray.conversation.templates.tokenize_conversation`, whose
   skip reasons pass through (``roles_not_alternating``, ``empty_turn``, ``no_supervised_tokens``,
   ``truncated_inside_image``, ...); the rendered images must match the
   sample's (``template_image_mismatch``) and survive truncation (``image_truncated_away``);
4. image paths stay inside the image root (``image_path_outside_root``);
5. image files, fetched for a whole batch at once (concurrently from object stores):
   ``missing_image``, ``unreadable_image``, then :mod:`llava_ray.data.images`'s reasons.

A prepared row (:data:`PREPARED_SCHEMA`): a unique ``row`` key, ``id``, ``source``, ``modality`` ("image" / "text"),
``input_ids`` and ``labels`` (int32; -100 where no loss), ``length`` (text + image positions),
``num_supervised`` and ``images`` (encoded JPEG/PNG bytes at the vision tower's size).
"""

from __future__ import annotations

import itertools
import json
import posixpath
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
from PIL import Image
from transformers import PreTrainedTokenizerBase

from llava_ray.config.loader import ConfigError
from llava_ray.config.model_sources import build_vision_config, image_positions, tower_input
from llava_ray.config.model_sources import resolve_sources as resolve_model_sources
from llava_ray.config.schema import LlavaRayConfig, ModelConfig
from llava_ray.conversation.templates import tokenize_conversation
from llava_ray.conversation.tokenizer import IMAGE_TOKEN, image_token_id, load_tokenizer
from llava_ray.data.images import ImageSettings, decode_stored_image, process_image
from llava_ray.data.report import Skip
from llava_ray.data.sources import SampleRecord, Source, WorkItem, parse_record, resolve_sources
from llava_ray.utils.skips import Skipped
from llava_ray.utils.storage import filesystem, is_remote

PREPARED_SCHEMA = pa.schema(
    [
        # Unique per written row (copies of one sample differ): training addresses rows by it.
        pa.field("row", pa.int64(), nullable=False),
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("modality", pa.string(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("labels", pa.list_(pa.int32()), nullable=False),
        pa.field("length", pa.int32(), nullable=False),
        pa.field("num_supervised", pa.int32(), nullable=False),
        pa.field("images", pa.list_(pa.binary()), nullable=False),
    ]
)

_PROBE_CONVERSATION = [{"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "Hello."}]
_FETCH_THREADS = 16  # concurrent object-store reads per worker; local files are read in turn
_DRIVE_LETTER = re.compile(r"^[A-Za-z]:[\\/]")


@dataclass(frozen=True)
class PrepareSettings:
    """Everything a worker needs to turn a record into a row, derived once from the config."""

    model: ModelConfig
    template: str
    max_length: int
    image_positions: int
    image_token_id: int
    image: ImageSettings
    tokenization: str = "joined"  # data.tokenization

    @classmethod
    def from_config(cls, config: LlavaRayConfig, tokenizer: PreTrainedTokenizerBase) -> PrepareSettings:
        vision = build_vision_config(config.model)
        data = config.data
        return cls(
            model=config.model,
            template=data.template,
            tokenization=data.tokenization,
            max_length=config.model.model_max_length,
            image_positions=image_positions(vision, config.model.vision_select_feature),
            image_token_id=image_token_id(tokenizer),
            image=ImageSettings(
                tower=tower_input(vision),
                aspect=data.image_aspect,
                format=data.image_format,
                jpeg_quality=data.jpeg_quality,
                max_pixels=data.max_image_pixels,
            ),
        )


@dataclass
class PreparedSample:
    """One training row (a sample with ``copies`` > 1 is written that many times)."""

    id: str
    source: str
    modality: str
    input_ids: list[int]
    labels: list[int]
    num_supervised: int
    images: list[bytes] = field(default_factory=list)
    # What matching the reference's preprocessing changed (templates.conform_turns); not written.
    changes: tuple[str, ...] = ()

    @property
    def length(self) -> int:
        return len(self.input_ids)


@dataclass
class _Pending:
    """A sample whose text is done and whose images are still to fetch and process."""

    item: WorkItem
    sample: PreparedSample
    paths: list[str]


class SamplePreparer:
    """Prepares batches of work items; holds the tokenizer and one file system per image root."""

    def __init__(
        self, settings: PrepareSettings, sources: Sequence[Source], tokenizer: PreTrainedTokenizerBase
    ):
        self.settings = settings
        self.sources = list(sources)
        self.tokenizer = tokenizer
        self._roots = [filesystem(source.image_root) for source in self.sources]

    @classmethod
    def from_config(cls, config: LlavaRayConfig) -> SamplePreparer:
        """A preparer in this process, exactly as the pipeline's workers build theirs."""
        tokenizer = load_checked_tokenizer(config)
        return cls(PrepareSettings.from_config(config, tokenizer), resolve_sources(config.data), tokenizer)

    def prepare(self, items: Sequence[WorkItem]) -> list[PreparedSample | Skip]:
        """One outcome per item, in order: a row to write ``item.copies`` times, or a skip."""
        outcomes: list[PreparedSample | Skip | None] = [None] * len(items)
        pending: list[tuple[int, _Pending]] = []
        for index, item in enumerate(items):
            try:
                pending.append((index, self._prepare_text(item)))
            except Skipped as error:
                outcomes[index] = _skip(item, error.reason)
        for index, outcome in self._prepare_images(pending):
            outcomes[index] = outcome
        return [outcome for outcome in outcomes if outcome is not None]

    def _prepare_text(self, item: WorkItem) -> _Pending:
        record = parse_record(json.loads(item.sample))
        check_placeholders(record)
        settings = self.settings
        tokenized = tokenize_conversation(
            record.conversations,
            settings.template,
            self.tokenizer,
            settings.image_positions,
            max_length=settings.max_length,
            tokenization=settings.tokenization,
        )
        self._check_rendered_images(tokenized.num_images, tokenized.input_ids, len(record.images))
        root = self._roots[item.source][1]
        sample = PreparedSample(
            id=record.id,
            source=self.sources[item.source].name,
            modality="image" if record.images else "text",
            input_ids=tokenized.input_ids,
            labels=tokenized.labels,
            num_supervised=tokenized.num_supervised,
            changes=tokenized.changes,
        )
        return _Pending(item, sample, [resolve_image_path(root, path) for path in record.images])

    def _check_rendered_images(self, rendered: int, input_ids: list[int], images: int) -> None:
        """The template kept every image, and truncation left each one whole."""
        if rendered != images:
            # LLaVA's templates keep one <image> per sample, at the start of the first turn.
            raise Skipped("template_image_mismatch", f"the template rendered {rendered} of {images} image(s)")
        if input_ids.count(self.settings.image_token_id) != images * self.settings.image_positions:
            raise Skipped("image_truncated_away", "model_max_length cut an image out of the sequence")

    def _prepare_images(self, pending: list[tuple[int, _Pending]]) -> list[tuple[int, PreparedSample | Skip]]:
        fetched = self._fetch_all(pending)
        results: list[tuple[int, PreparedSample | Skip]] = []
        for index, entry in pending:
            try:
                entry.sample.images = [
                    self._process(fetched[(entry.item.source, path)]) for path in entry.paths
                ]
            except Skipped as error:
                results.append((index, _skip(entry.item, error.reason)))
                continue
            results.append((index, entry.sample))
        return results

    def _fetch_all(self, pending: list[tuple[int, _Pending]]) -> dict[tuple[int, str], bytes | Exception]:
        """Every image file the batch needs, read once each, keyed by (source, path)."""
        wanted: dict[int, dict[str, None]] = {}  # per source, paths in first-seen order without repeats
        for _, entry in pending:
            wanted.setdefault(entry.item.source, {}).update(dict.fromkeys(entry.paths))
        fetched: dict[tuple[int, str], bytes | Exception] = {}
        for source, unique_paths in wanted.items():
            paths = list(unique_paths)
            fs = self._roots[source][0]
            remote = is_remote(self.sources[source].image_root)
            for path, data in zip(paths, fetch_files(fs, paths, concurrent=remote), strict=True):
                fetched[(source, path)] = data
        return fetched

    def _process(self, data: bytes | Exception) -> bytes:
        if isinstance(data, Exception):
            raise Skipped(_fetch_error_reason(data), str(data))
        return process_image(data, self.settings.image)


def load_checked_tokenizer(config: LlavaRayConfig) -> PreTrainedTokenizerBase:
    """The config's tokenizer, after rendering a probe conversation with the configured template.

    A template that cannot work with this tokenizer (``tokenizer`` without generation markers)
    would fail every sample; it raises :class:`ConfigError` here instead, before any work.
    """

    template = config.data.template
    try:
        tokenizer = load_tokenizer(config.model)
    except (OSError, ValueError) as error:
        source = resolve_model_sources(config.model).tokenizer
        raise ConfigError(
            [f"model.tokenizer = {source!r} (model.preset={config.model.preset!r}) does not load: {error}"]
        ) from None
    try:
        tokenize_conversation(
            _PROBE_CONVERSATION, template, tokenizer, image_positions=1, tokenization=config.data.tokenization
        )
    except ValueError as error:
        raise ConfigError(
            [f"data.template = {template!r} with tokenizer of model.preset={config.model.preset!r}: {error}"]
        ) from None
    return tokenizer


def _skip(item: WorkItem, reason: str) -> Skip:
    return Skip(item.row, item.source, reason, item.id, item.copies)


def count_placeholders(conversations: Sequence[Any]) -> int:
    """``<image>`` occurrences over all turns (turns that are not objects are the template's concern)."""
    count = 0
    for turn in conversations:
        if isinstance(turn, dict):
            text = turn.get("value", turn.get("content"))
            if isinstance(text, str):
                count += text.count(IMAGE_TOKEN)
    return count


def check_placeholders(record: SampleRecord) -> None:
    placeholders = count_placeholders(record.conversations)
    if not record.images and placeholders:
        raise Skipped("image_token_in_text_only", f"{placeholders} <image> in a sample without an image")
    if record.images and placeholders != len(record.images):
        raise Skipped(
            "image_count_mismatch", f"{placeholders} <image> placeholder(s) for {len(record.images)} image(s)"
        )


def resolve_image_path(root: str, relative: str) -> str:
    """``root``/``relative``; a path that is absolute or climbs out of ``root`` is skipped."""
    if relative.startswith(("/", "\\")) or "://" in relative or _DRIVE_LETTER.match(relative):
        raise Skipped("image_path_outside_root", f"absolute image path {relative!r}")
    normalized = posixpath.normpath(relative.replace("\\", "/"))
    if normalized == ".." or normalized.startswith("../"):
        raise Skipped("image_path_outside_root", f"image path {relative!r} leaves the image root")
    return posixpath.join(root, normalized)


def fetch_files(
    fs: fsspec.AbstractFileSystem, paths: Sequence[str], concurrent: bool
) -> list[bytes | Exception]:
    """The bytes of each path, or the exception reading it raised, in order."""

    def read(path: str) -> bytes | Exception:
        try:
            return fs.cat_file(path)
        except Exception as error:  # reported per image as a skip reason
            return error

    if not concurrent or len(paths) < 2:
        return [read(path) for path in paths]
    with ThreadPoolExecutor(max_workers=min(_FETCH_THREADS, len(paths))) as pool:
        return list(pool.map(read, paths))


def _fetch_error_reason(error: Exception) -> str:
    if isinstance(error, FileNotFoundError | IsADirectoryError | NotADirectoryError):
        return "missing_image"
    return "unreadable_image"


COPY_KEY_STRIDE = 2**20  # row key = input row x stride + copy index: unique while copies < 2**20


def row_keys(input_row: int, copies: int) -> list[int]:
    """The ``row`` keys of the ``copies`` written rows of one input sample."""
    return [input_row * COPY_KEY_STRIDE + copy for copy in range(copies)]


def samples_to_table(samples: Sequence[PreparedSample], keys: Sequence[int]) -> pa.Table:
    """Rows in :data:`PREPARED_SCHEMA` with their ``row`` keys (empty when every sample was skipped)."""
    columns = {
        "row": pa.array(keys, pa.int64()),
        "id": pa.array([sample.id for sample in samples], pa.string()),
        "source": pa.array([sample.source for sample in samples], pa.string()),
        "modality": pa.array([sample.modality for sample in samples], pa.string()),
        # Token lists go through numpy: converting ~600 Python ints per row one by one costs
        # about as much as tokenising the row.
        "input_ids": _int32_lists([sample.input_ids for sample in samples]),
        "labels": _int32_lists([sample.labels for sample in samples]),
        "length": pa.array([sample.length for sample in samples], pa.int32()),
        "num_supervised": pa.array([sample.num_supervised for sample in samples], pa.int32()),
        "images": pa.array([sample.images for sample in samples], pa.list_(pa.binary())),
    }
    return pa.Table.from_pydict(columns, schema=PREPARED_SCHEMA)


def _int32_lists(lists: Sequence[Sequence[int]]) -> pa.ListArray:
    offsets = np.zeros(len(lists) + 1, dtype=np.int32)
    np.cumsum([len(values) for values in lists], out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


def decode_prepared_row(row: dict[str, Any]) -> tuple[list[int], list[int], list[Image.Image]]:
    """A prepared row (from shards or a streamed dataset) as (input_ids, labels, RGB images)."""
    input_ids = [int(token) for token in row["input_ids"]]
    labels = [int(label) for label in row["labels"]]
    images = [decode_stored_image(bytes(data)) for data in row["images"]]
    return input_ids, labels, images
