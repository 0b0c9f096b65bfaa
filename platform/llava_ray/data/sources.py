"""LLaVA-format sources: check them before any work, read their records, mix them by weight or repeat.

A source is a JSON array file (as LLaVA ships its data) or a JSON lines file, local or at any
fsspec URL (``s3://``), optionally compressed (``.gz``, ``.bz2``, ``.xz``): the format is told
from the first character, not the file name. Samples look like::

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat ..."}, {"from": "gpt", "value": "..."}]}

``image`` (a path, or a list of paths) is relative to the source's ``image_root`` (default: the
file's folder); a sample without it is text-only.

Failing fast versus skipping:

- :func:`resolve_sources` raises :class:`DataPathError` (a :class:`ConfigError`: the CLI exits 2)
  naming every source that cannot be read at all (missing file or bucket, access denied, empty,
  not JSON, one JSON object instead of an array of samples or JSON lines) and its fix, before anything else happens. A JSON array with a syntax error is
  reported the same way by the scan: past an error an array has no next element to resume at.
- Everything else is per record and never stops the job. :class:`SourceScanner` yields a
  :class:`WorkItem` per usable record and a :class:`Skip` per record that is not a sample
  (``malformed_json``, ``non_utf8``, ``invalid_record``, ``missing_id``, ``invalid_id``,
  ``duplicate_id``, ``missing_conversations``, ``invalid_conversations``, ``invalid_image_field``).
  Ids must be unique across all sources; the first record with an id keeps it.

Mixing: ``repeat: k`` gives every sample k copies; ``weight: w`` gives ``floor(w)`` copies plus one
more with probability ``w - floor(w)``, decided by a hash of (run.seed, source name, sample id),
so the same seed keeps the same samples whatever the order or the number of workers.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import math
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any, Literal

import fsspec

from llava_ray.config.loader import ConfigError
from llava_ray.config.schema import DataConfig, DataSource
from llava_ray.data.report import Skip
from llava_ray.utils.skips import Skipped
from llava_ray.utils.storage import filesystem, is_remote

SourceFormat = Literal["array", "lines"]

_SNIFF_BYTES = 4096
_FIRST_LINE_BYTES = 16 * 2**20  # a JSON lines sample is a few KiB; a longer first line is not one
_READ_CHARS = 1 << 20


class DataPathError(ConfigError):
    """A source, image root or output location that cannot be used; raised before any work."""


@dataclass(frozen=True)
class Source:
    """A configured source, resolved: its report name, file, image root and mixing rule."""

    index: int
    name: str
    path: str
    image_root: str
    format: SourceFormat
    weight: float | None = None
    repeat: int | None = None


@dataclass(frozen=True)
class SampleRecord:
    """The fields of a LLaVA record this pipeline uses, validated."""

    id: str
    conversations: list[Any]
    images: list[str]


@dataclass(frozen=True)
class WorkItem:
    """One record to prepare: ``row`` is unique across all sources, ``sample`` the record as JSON."""

    row: int
    source: int
    id: str
    locator: str
    sample: str
    copies: int


@dataclass
class SourceStats:
    """What the scan saw in one source; ``input`` is what the report must account for."""

    records: int = 0
    sampled_out: int = 0
    input: int = 0


# ---------------------------------------------------------------------------------------------
# Resolving and checking sources before any work


def resolve_sources(data: DataConfig) -> list[Source]:
    """The configured sources, each checked readable; one :class:`DataPathError` lists every problem."""
    if not data.sources:
        raise DataPathError(["data.sources is empty; add at least one LLaVA JSON or JSON lines file"])
    problems: list[str] = []
    sources = []
    for index, configured in enumerate(data.sources):
        key = f"data.sources.{index}"
        source_format, problem = _check_source_file(configured.path)
        if problem:
            problems.append(f"{key}.path = {configured.path!r}: {problem}")
        image_root = configured.image_root or _parent(configured.path)
        if configured.image_root is not None:
            root_problem = _check_image_root(configured.image_root)
            if root_problem:
                problems.append(f"{key}.image_root = {configured.image_root!r}: {root_problem}")
        name = configured.name or posixpath.basename(configured.path.rstrip("/"))
        sources.append(_source(index, name, configured, image_root, source_format or "lines"))
    problems += _duplicate_name_problems(sources)
    if problems:
        raise DataPathError(problems)
    return sources


def _source(
    index: int, name: str, configured: DataSource, image_root: str, source_format: SourceFormat
) -> Source:
    return Source(
        index=index,
        name=name,
        path=configured.path,
        image_root=image_root,
        format=source_format,
        weight=configured.weight,
        repeat=configured.repeat,
    )


def _parent(uri: str) -> str:
    protocol, sep, rest = uri.partition("://")
    if not sep:
        return posixpath.dirname(uri) or "."
    return f"{protocol}://{posixpath.dirname(rest)}"


def _duplicate_name_problems(sources: Sequence[Source]) -> list[str]:
    first_index: dict[str, int] = {}
    problems = []
    for source in sources:
        if source.name in first_index:
            problems.append(
                f"data.sources.{source.index}: report name {source.name!r} is already used by "
                f"data.sources.{first_index[source.name]}; set data.sources.{source.index}.name to tell them apart"
            )
        first_index.setdefault(source.name, source.index)
    return problems


def describe_access_error(error: Exception, uri: str) -> str:
    """A storage error as a problem line with its fix."""
    text = f"{type(error).__name__}: {error}"
    if isinstance(error, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return (
            f"access denied ({text}); check the credentials the job runs with (AWS_* variables, "
            "profile or instance role) and the bucket policy"
        )
    if isinstance(error, FileNotFoundError):
        if "bucket" in text.lower():
            return f"the bucket does not exist ({text}); create it or fix the bucket name"
        where = (
            "the bucket and key"
            if is_remote(uri)
            else "the path (relative paths start at the working directory)"
        )
        return f"no such file ({text}); check {where}"
    return f"cannot be read ({text}); check the URL, the network and the credentials"


def _check_source_file(uri: str) -> tuple[SourceFormat | None, str | None]:
    """The file's format, or a problem explaining why it cannot be read."""
    try:
        fs, path = filesystem(uri)
        if fs.isdir(path):
            return None, "is a folder; point it at a .json or .jsonl file"
        with _open_binary(fs, path) as stream:
            head = stream.read(_SNIFF_BYTES)
        source_format, problem = sniff_format(head)
        if source_format == "lines":
            with _open_binary(fs, path) as stream:
                first, second = stream.readline(_FIRST_LINE_BYTES), stream.readline(_SNIFF_BYTES)
            problem = top_level_object_problem(first, second)
    except Exception as error:  # storage back ends raise many types; each becomes a problem line
        return None, describe_access_error(error, uri)
    return (None, problem) if problem else (source_format, None)


def sniff_format(head: bytes) -> tuple[SourceFormat | None, str | None]:
    """``array`` for ``[``, ``lines`` for ``{``; anything else is not LLaVA data."""
    text = head.removeprefix(codecs.BOM_UTF8).decode("utf-8", errors="replace").lstrip()
    if not text:
        return None, "is empty; remove the source or point it at the data file"
    if text[0] == "[":
        return "array", None
    if text[0] == "{":
        return "lines", None
    return None, (
        f"is not JSON (it starts with {text[:20]!r}); LLaVA data is a JSON array of samples "
        "or JSON lines (one sample per line)"
    )


def top_level_object_problem(first: bytes, second: bytes) -> str | None:
    """Why a file starting with ``{`` is one JSON object, not JSON lines (None when it is JSON lines).

    ``first`` and ``second``: its first two lines. A JSON lines record never continues on the next
    line; a pretty-printed object opens on its first line and goes on with a ``"key": value`` member.
    On one line, an object is told from a sample by holding the samples (a list of them, or a
    mapping of ids to them) and no ``conversations`` of its own.
    """
    expected = (
        'LLaVA data is a JSON array of samples ([{"id": ..., "conversations": [...]}, ...]) or JSON lines '
        "(one sample object per line); write the samples out in one of those formats"
    )
    if len(first) >= _FIRST_LINE_BYTES and not first.endswith(b"\n"):
        return f"its first line is over {_FIRST_LINE_BYTES >> 20} MiB, too long for one sample: one JSON object? {expected}"
    line = first.removeprefix(codecs.BOM_UTF8).decode("utf-8", errors="replace").strip()
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        following = second.decode("utf-8", errors="replace").strip()
        if line.endswith(("{", "[", ",")) and following and not _is_json(following):
            return f"is one JSON object spread over several lines, not a JSON array or JSON lines; {expected}"
        return None  # a malformed first record: skipped like any other
    if isinstance(value, dict) and value and "conversations" not in value:
        if _is_sample(next(iter(value.values()))):
            return f"is one JSON object mapping ids to samples, not a JSON array or JSON lines; {expected}"
        holder = next(
            (
                key
                for key, member in value.items()
                if isinstance(member, list) and member and _is_sample(member[0])
            ),
            None,
        )
        if holder is not None:
            return f"is one JSON object holding the samples under {holder!r}, not a JSON array or JSON lines; {expected}"
    return None


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _is_sample(value: Any) -> bool:
    return isinstance(value, dict) and "conversations" in value


def _check_image_root(uri: str) -> str | None:
    try:
        fs, path = filesystem(uri)
        if fs.isdir(path):
            return None
        if fs.exists(path):
            return "is a file; image_root must be the folder the samples' image paths are relative to"
    except Exception as error:
        return describe_access_error(error, uri)
    if is_remote(uri) and not bucket_exists(fs, path):
        return "the bucket does not exist; create it or fix the bucket name"
    return "no such folder; set image_root to the folder the samples' image paths are relative to"


def bucket_exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether the bucket of an object-store ``path`` ("bucket/key...") exists and is visible to us."""
    try:
        return bool(fs.exists(path.split("/", 1)[0]))
    except Exception:  # access errors included: either way the bucket cannot be used
        return False


def _open_binary(fs: fsspec.AbstractFileSystem, path: str) -> IO[bytes]:
    # compression="infer": .gz / .bz2 / .xz sources are read as they are.
    return fs.open(path, "rb", compression="infer")


# ---------------------------------------------------------------------------------------------
# Reading records


@dataclass(frozen=True)
class RawRecord:
    """One element of a JSON array or one line of JSON lines: its value, or why it has none."""

    locator: str
    value: Any = None
    error: str | None = None  # "malformed_json" or "non_utf8"


def iter_records(source: Source) -> Iterator[RawRecord]:
    """The source's records in file order; a JSON array with a syntax error raises :class:`DataPathError`."""
    fs, path = filesystem(source.path)
    with _open_binary(fs, path) as binary:
        # Undecodable bytes become lone surrogates, so they are found per record, not per file.
        text = io.TextIOWrapper(binary, encoding="utf-8-sig", errors="surrogateescape", newline="")
        if source.format == "array":
            yield from _array_records(text, source)
        else:
            yield from _line_records(text, source)


def _line_records(text: IO[str], source: Source) -> Iterator[RawRecord]:
    for number, line in enumerate(text, start=1):
        if not line.strip():
            continue
        yield _decode_record(line, f"{source.name}:{number}")


def _decode_record(raw: str, locator: str) -> RawRecord:
    if not _is_utf8(raw):
        return RawRecord(locator, error="non_utf8")
    try:
        return RawRecord(locator, value=json.loads(raw))
    except json.JSONDecodeError:
        return RawRecord(locator, error="malformed_json")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _array_records(text: IO[str], source: Source) -> Iterator[RawRecord]:
    for index, (raw, value) in enumerate(_JsonArrayReader(text, source)):
        locator = f"{source.name}[{index}]"
        yield RawRecord(locator, value=value) if _is_utf8(raw) else RawRecord(locator, error="non_utf8")


class _JsonArrayReader:
    """Streams each element of a top-level JSON array (raw text and value), a chunk at a time.

    Memory stays at one chunk plus the largest element, so a multi-gigabyte LLaVA file never has
    to fit in memory as one Python object.
    """

    def __init__(self, text: IO[str], source: Source):
        self._text = text
        self._source = source
        self._decoder = json.JSONDecoder()
        self._buffer = ""
        self._position = 0
        self._consumed_lines = 0  # newlines in text already dropped from the buffer
        self._eof = False

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        self._skip_space()
        self._expect("[")
        self._skip_space()
        if self._peek() == "]":
            self._position += 1
            self._expect_end()
            return
        while True:
            yield self._element()
            self._skip_space()
            separator = self._peek()
            self._position += 1
            if separator == "]":
                self._expect_end()
                return
            if separator != ",":
                self._fail(
                    f"expected ',' or ']' after an element, found {separator or 'the end of the file'!r}"
                )
            self._skip_space()

    def _element(self) -> tuple[str, Any]:
        while True:
            start = self._position
            try:
                value, end = self._decoder.raw_decode(self._buffer, start)
            except json.JSONDecodeError as error:
                if self._eof or not self._may_continue(error):
                    self._fail(error.msg, error.pos)
                self._read_more(at_least=len(self._buffer) - start)
                continue
            # A number or literal that ends exactly at the buffer's end may continue in the next chunk.
            if end == len(self._buffer) and not self._eof:
                self._read_more(at_least=len(self._buffer) - start)
                continue
            self._position = end
            return self._buffer[start:end], value

    def _may_continue(self, error: json.JSONDecodeError) -> bool:
        """Whether the error may be the chunk's end rather than bad JSON (so read on, don't fail)."""
        # An unterminated string is reported at its opening quote; other errors where they are seen.
        return error.msg.startswith("Unterminated string") or error.pos >= len(self._buffer) - 16

    def _peek(self) -> str:
        if self._position >= len(self._buffer) and not self._eof:
            self._read_more()
        return self._buffer[self._position : self._position + 1]

    def _skip_space(self) -> None:
        while True:
            while self._position < len(self._buffer) and self._buffer[self._position] in " \t\r\n":
                self._position += 1
            if self._position < len(self._buffer) or self._eof:
                return
            self._read_more()

    def _expect(self, char: str) -> None:
        found = self._peek()
        if found != char:
            self._fail(f"expected {char!r}, found {found or 'the end of the file'!r}")
        self._position += 1

    def _expect_end(self) -> None:
        self._skip_space()
        if self._position < len(self._buffer):
            self._fail("unexpected text after the closing ']'")

    def _read_more(self, at_least: int = 0) -> None:
        """Drop consumed text and append a chunk (at least doubling a pending element's window)."""
        self._consumed_lines += self._buffer.count("\n", 0, self._position)
        self._buffer = self._buffer[self._position :]
        self._position = 0
        chunk = self._text.read(max(_READ_CHARS, at_least))
        if not chunk:
            self._eof = True
        self._buffer += chunk

    def _fail(self, message: str, position: int | None = None) -> None:
        position = self._position if position is None else position
        line = self._consumed_lines + self._buffer.count("\n", 0, position) + 1
        column = position - (self._buffer.rfind("\n", 0, position) + 1) + 1
        raise DataPathError(
            [
                f"data.sources.{self._source.index}.path = {self._source.path!r}: not valid JSON at line {line} "
                f"column {column} ({message}); fix the file, or convert it to JSON lines (one sample per line) "
                "so that a bad line is skipped and counted instead"
            ]
        )


# ---------------------------------------------------------------------------------------------
# Records to samples, duplicates and mixing


def parse_record(value: Any) -> SampleRecord:
    """The record's id, conversations and image paths; raise :class:`Skipped` with a skip reason."""
    if not isinstance(value, dict):
        raise Skipped("invalid_record", f"a sample must be a JSON object, not {type(value).__name__}")
    if "id" not in value:
        raise Skipped("missing_id", "the sample has no 'id'")
    sample_id = value["id"]
    if isinstance(sample_id, bool) or not isinstance(sample_id, str | int) or str(sample_id).strip() == "":
        raise Skipped("invalid_id", f"'id' must be a non-empty string or an integer, not {sample_id!r}")
    if "conversations" not in value:
        raise Skipped("missing_conversations", "the sample has no 'conversations'")
    conversations = value["conversations"]
    if not isinstance(conversations, list):
        raise Skipped("invalid_conversations", "'conversations' must be a list of turns")
    return SampleRecord(str(sample_id), conversations, _image_paths(value.get("image")))


def _image_paths(image: Any) -> list[str]:
    if image is None:
        return []
    paths = image if isinstance(image, list) else [image]
    if not paths or not all(isinstance(path, str) and path.strip() for path in paths):
        raise Skipped("invalid_image_field", "'image' must be a path or a non-empty list of paths")
    return list(paths)


def copies_for(source: Source, sample_id: str, seed: int) -> int:
    """How many copies of a sample the mix asks for (see the module docstring)."""
    if source.repeat is not None:
        return source.repeat
    weight = 1.0 if source.weight is None else source.weight
    whole = math.floor(weight)
    fraction = weight - whole
    if fraction == 0:
        return whole
    return whole + (stable_uniform(f"{seed}:{source.name}:{sample_id}") < fraction)


def stable_uniform(key: str) -> float:
    """A number in [0, 1) fixed by ``key`` (the same on every machine and Python process)."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class SourceScanner:
    """Reads every source once, in order: yields work items and record-level skips, counts the rest."""

    def __init__(self, sources: Sequence[Source], seed: int):
        self.sources = list(sources)
        self.seed = seed
        self.stats = {source.name: SourceStats() for source in self.sources}
        self._owners: dict[str, str] = {}  # id -> locator of the record that holds it
        self._next_row = 0

    def scan(self) -> Iterator[WorkItem | Skip]:
        for source in self.sources:
            stats = self.stats[source.name]
            for raw in iter_records(source):
                stats.records += 1
                row = self._next_row
                self._next_row += 1
                entry = self._entry(source, raw, row)
                if entry is None:
                    stats.sampled_out += 1
                    continue
                stats.input += entry.count if isinstance(entry, Skip) else entry.copies
                yield entry

    def _entry(self, source: Source, raw: RawRecord, row: int) -> WorkItem | Skip | None:
        if raw.error:
            return Skip(row, source.index, raw.error, raw.locator)
        try:
            record = parse_record(raw.value)
        except Skipped as error:
            return Skip(row, source.index, error.reason, raw.locator)
        if record.id in self._owners:
            return Skip(row, source.index, "duplicate_id", raw.locator)
        self._owners[record.id] = raw.locator
        try:
            # Escaped lone surrogates ("\udc80") parse fine but cannot be stored as UTF-8.
            sample = json.dumps(raw.value, ensure_ascii=False)
            sample.encode("utf-8")
        except UnicodeEncodeError:
            return Skip(row, source.index, "non_utf8", raw.locator)
        copies = copies_for(source, record.id, self.seed)
        if copies == 0:
            return None
        return WorkItem(row, source.index, record.id, raw.locator, sample, copies)
