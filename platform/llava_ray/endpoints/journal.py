"""The resume journal: one JSON line per finished request, appended and flushed as results arrive.

``{output_path}.partial.jsonl`` holds the raw outcome of every request made so far::

    {"id": "42-detail", "reply": "...", "finish_reason": "stop", "attempts": 1}
    {"id": "43-complex", "error": "request_failed", "detail": "HTTP 500 after 6 attempts", "attempts": 6}

Replies are kept raw (parsing happens when the output is rebuilt), so improving the parser never
needs a new request. A rerun reads the journal, requests only what it lacks, and rebuilds the
final JSON array from it. A crash can leave one torn last line; :meth:`Journal.load` cuts it off
(that request is made again). Later lines win over earlier ones for the same id.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

JOURNAL_SUFFIX = ".partial.jsonl"


class JournalError(RuntimeError):
    """A journal damaged somewhere other than its last line."""


class Journal:
    """Read and append ``path`` (a local file)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def load(self) -> dict[str, dict[str, Any]]:
        """Every record by id; a torn last line (a crash mid-write) is removed from the file."""
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        complete, newline, tail = data.rpartition(b"\n")
        records: dict[str, dict[str, Any]] = {}
        for number, line in enumerate(complete.split(b"\n") if newline else [], start=1):
            if line.strip():
                try:
                    record = _parse_record(line)
                except ValueError as error:
                    raise JournalError(
                        f"{self.path} line {number} is damaged ({error}); delete that line to request it again"
                    ) from None
                records[record["id"]] = record
        if tail.strip():
            try:
                record = _parse_record(tail)
            except ValueError:  # the write a crash interrupted: cut it off, the request is made again
                with self.path.open("r+b") as handle:
                    handle.truncate(len(complete) + len(newline))
            else:  # complete but for its newline: keep it and end the line before anything is appended
                records[record["id"]] = record
                with self.path.open("ab") as handle:
                    handle.write(b"\n")
        return records

    @contextmanager
    def appender(self) -> Iterator[Callable[[dict[str, Any]], None]]:
        """A function that appends one record and flushes it to the OS before returning."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:

            def append(record: dict[str, Any]) -> None:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                handle.flush()
                os.fsync(handle.fileno())

            yield append


def _parse_record(line: bytes) -> dict[str, Any]:
    record = json.loads(line)
    if not isinstance(record, dict) or not isinstance(record.get("id"), str):
        raise ValueError("not a JSON object with an 'id'")
    return record
