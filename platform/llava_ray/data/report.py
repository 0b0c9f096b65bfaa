"""The prepare report: every input sample is either written or skipped with a reason, and it adds up.

Workers send :class:`Skip` and :class:`Written` records (one per source record, with how many
copies the mix asked for) to one :class:`ReportBuilder`, run as a small Ray actor
(:data:`ReportActor`). Records are deduplicated by their row number, so a task that Ray Data
retries after a worker failure is never counted twice. :func:`finish_report` joins the counts
with what the source scan expected and refuses to return a report that does not balance:
``input == written + sum(skipped)`` overall and per source, or the run fails loudly.

``report.json`` (written beside the shards)::

    input             samples entering the pipeline: copies asked for by the mix (weight/repeat),
                      plus one per record that could not be parsed into a sample
    written           rows in the shards
    skipped           {reason: count}
    examples          {reason: [up to 5 sample ids, or "file:line" / "file[index]" locators]}
                      (skipped and examples: :class:`llava_ray.utils.skips.SkipCounter`)
    changed           {change: count} of written samples the reference's preprocessing altered
                      (``leading_answer_dropped``, ``image_moved_to_front``; templates.conform_turns)
    changed_examples  {change: [up to 5 sample ids]}
    length_histogram  {"lo-hi": count} of written lengths (text + image positions), power-of-two buckets
    sources           {name: {records, sampled_out, input, written, skipped: {reason: count}, changed}}
    records           records read from the source files
    sampled_out       records a weight below 1 left out of this mix (not inspected)
    template, elapsed_s, samples_per_s (input over elapsed_s), and the settings the shards were made with
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import ray

from llava_ray.utils.skips import SkipCounter

_SMALLEST_BUCKET = 64


class Skip(NamedTuple):
    """One source record that produced no rows; ``count`` is how many input samples it stood for."""

    row: int
    source: int
    reason: str
    example: str
    count: int = 1


class Written(NamedTuple):
    """One source record written ``copies`` times, each ``length`` positions long.

    ``changes`` names what matching the reference's preprocessing changed in it
    (``templates.conform_turns``); ``id`` is the sample's, kept as the change's example.
    """

    row: int
    source: int
    length: int
    copies: int
    changes: tuple[str, ...] = ()
    id: str = ""


class ReportImbalanceError(RuntimeError):
    """Samples went missing between the scan and the shards: a bug, never bad input."""


class ReportBuilder:
    """Aggregates skip and written records; idempotent per row."""

    def __init__(self, source_names: Sequence[str]):
        self._names = list(source_names)
        self._seen_rows: set[int] = set()
        self._skips = [SkipCounter() for _ in self._names]
        self._written = [0] * len(self._names)
        self._changed = [SkipCounter() for _ in self._names]
        self._lengths: Counter[int] = Counter()

    def add(self, skips: Iterable[Skip] = (), written: Iterable[Written] = ()) -> None:
        """Count records once per row (a retried task sends its records again)."""
        for skip in skips:
            if self._first_time(skip.row):
                self._skips[skip.source].add(skip.reason, skip.example, skip.count)
        for record in written:
            if self._first_time(record.row):
                self._written[record.source] += record.copies
                for change in record.changes:
                    self._changed[record.source].add(change, record.id, record.copies)
                self._lengths[record.length] += record.copies

    def _first_time(self, row: int) -> bool:
        if row in self._seen_rows:
            return False
        self._seen_rows.add(row)
        return True

    def counts(self) -> dict[str, Any]:
        """Written and skipped counts, overall and per source, with examples and the length histogram."""
        skips, changed = SkipCounter(), SkipCounter()
        for per_source in self._skips:
            skips.merge(per_source)
        for per_source in self._changed:
            changed.merge(per_source)
        return {
            "written": sum(self._written),
            **skips.to_dict(),
            "changed": changed.counts,
            "changed_examples": changed.examples,
            "length_histogram": length_histogram(self._lengths),
            "sources": {
                name: {
                    "written": self._written[index],
                    "skipped": self._skips[index].counts,
                    "changed": self._changed[index].counts,
                }
                for index, name in enumerate(self._names)
            },
        }


# The same class as a Ray actor: no CPU reserved, it only adds numbers.
ReportActor = ray.remote(num_cpus=0)(ReportBuilder)


def length_bucket(length: int) -> tuple[int, int]:
    """The power-of-two bucket ``(lo, hi)`` holding ``length``; everything up to 64 shares one."""
    high = max(_SMALLEST_BUCKET, 1 << max(0, length - 1).bit_length())
    low = 1 if high == _SMALLEST_BUCKET else high // 2 + 1
    return low, high


def length_histogram(lengths: Mapping[int, int]) -> dict[str, int]:
    buckets: Counter[tuple[int, int]] = Counter()
    for length, count in lengths.items():
        buckets[length_bucket(length)] += count
    return {f"{low}-{high}": buckets[(low, high)] for low, high in sorted(buckets)}


def finish_report(
    counts: Mapping[str, Any],
    expected: Mapping[str, Mapping[str, int]],
    elapsed_s: float,
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """The full report from the builder's ``counts`` and the scan's ``expected`` per-source numbers.

    ``expected[name]`` holds ``records``, ``sampled_out`` and ``input``. Raises
    :class:`ReportImbalanceError` unless every source and the total balance.
    """
    sources = {
        name: {
            "records": expected[name]["records"],
            "sampled_out": expected[name]["sampled_out"],
            "input": expected[name]["input"],
            **counts["sources"][name],
        }
        for name in expected
    }
    total_input = sum(source["input"] for source in sources.values())
    report = {
        "input": total_input,
        "written": counts["written"],
        "skipped": counts["skipped"],
        "examples": counts["examples"],
        "changed": counts["changed"],
        "changed_examples": counts["changed_examples"],
        "length_histogram": counts["length_histogram"],
        "sources": sources,
        "records": sum(source["records"] for source in sources.values()),
        "sampled_out": sum(source["sampled_out"] for source in sources.values()),
        **settings,
        "elapsed_s": round(elapsed_s, 3),
        "samples_per_s": round(total_input / elapsed_s, 2) if elapsed_s > 0 else 0.0,
    }
    check_balance(report)
    return report


def check_balance(
    report: Mapping[str, Any], parts: str = "sources", job: str = "prepare", unit: str = "samples"
) -> None:
    """``input == written + sum(skipped)`` for the total and every entry of ``report[parts]``, or raise."""
    problems = []
    for name, numbers in [("total", report), *report[parts].items()]:
        accounted = numbers["written"] + sum(numbers["skipped"].values())
        if numbers["input"] != accounted:
            problems.append(
                f"{name}: input {numbers['input']} != written {numbers['written']} + skipped "
                f"{sum(numbers['skipped'].values())}"
            )
    if problems:
        raise ReportImbalanceError(
            f"{job} report does not balance, {unit} vanished (a bug, please report it): "
            + "; ".join(problems)
        )


def format_summary(report: Mapping[str, Any]) -> str:
    """One line: counts, skips and reference-matching changes by reason, throughput."""
    skipped, changed = report["skipped"], report.get("changed", {})
    reasons = ", ".join(f"{reason} {count}" for reason, count in skipped.items())
    changes = ", ".join(f"{change} {count}" for change, count in changed.items())
    return (
        f"prepare: {report['input']} samples in, {report['written']} written, "
        f"{sum(skipped.values())} skipped{f' ({reasons})' if reasons else ''}"
        f"{f', changed as the reference does: {changes}' if changes else ''}; "
        f"{report['samples_per_s']} samples/s over {report['elapsed_s']} s"
    )
