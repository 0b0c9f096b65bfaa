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
    length_histogram  {"lo-hi": count} of written lengths (text + image positions), power-of-two buckets
    sources           {name: {records, sampled_out, input, written, skipped: {reason: count}}}
    records           records read from the source files
    sampled_out       records a weight below 1 left out of this mix (not inspected)
    worker_cpu_s      CPU seconds the prepare workers' processes used (start-up included)
    steady_state      throughput with each worker's first batch (start-up) left out: samples,
                      seconds, samples_per_s by the wall clock; cpu_samples over worker_cpu_s
    template, elapsed_s, samples_per_s, and the settings the shards were made with
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import ray

MAX_EXAMPLES = 5
_SMALLEST_BUCKET = 64


class Skip(NamedTuple):
    """One source record that produced no rows; ``count`` is how many input samples it stood for."""

    row: int
    source: int
    reason: str
    example: str
    count: int = 1


class Written(NamedTuple):
    """One source record written ``copies`` times, each ``length`` positions long."""

    row: int
    source: int
    length: int
    copies: int


class ReportImbalanceError(RuntimeError):
    """Samples went missing between the scan and the shards: a bug, never bad input."""


class ReportBuilder:
    """Aggregates skip and written records; idempotent per row."""

    def __init__(self, source_names: Sequence[str], max_examples: int = MAX_EXAMPLES):
        self._names = list(source_names)
        self._max_examples = max_examples
        self._seen_rows: set[int] = set()
        self._skipped: list[Counter[str]] = [Counter() for _ in self._names]
        self._written = [0] * len(self._names)
        self._examples: dict[str, list[str]] = {}
        self._lengths: Counter[int] = Counter()
        self._worker_cpu: dict[str, float] = {}
        self._calls: list[tuple[float, str, int, float]] = []  # (time here, worker, samples, its CPU)

    def add(
        self,
        skips: Iterable[Skip] = (),
        written: Iterable[Written] = (),
        worker_cpu: tuple[str, float] | None = None,
    ) -> None:
        """Count records once per row; ``worker_cpu`` is (worker key, CPU seconds its process used so far)."""
        skips, written = list(skips), list(written)
        if worker_cpu is not None:
            self._worker_cpu[worker_cpu[0]] = worker_cpu[1]
            self._calls.append((time.monotonic(), worker_cpu[0], len(skips) + len(written), worker_cpu[1]))
        for skip in skips:
            if self._first_time(skip.row):
                self._skipped[skip.source][skip.reason] += skip.count
                examples = self._examples.setdefault(skip.reason, [])
                if len(examples) < self._max_examples:
                    examples.append(skip.example)
        for record in written:
            if self._first_time(record.row):
                self._written[record.source] += record.copies
                self._lengths[record.length] += record.copies

    def _first_time(self, row: int) -> bool:
        if row in self._seen_rows:
            return False
        self._seen_rows.add(row)
        return True

    def counts(self) -> dict[str, Any]:
        """Written and skipped counts, overall and per source, with examples and the length histogram."""
        skipped: Counter[str] = Counter()
        for per_source in self._skipped:
            skipped.update(per_source)
        return {
            "written": sum(self._written),
            "skipped": dict(skipped.most_common()),
            "examples": {reason: list(self._examples[reason]) for reason in skipped},
            "length_histogram": length_histogram(self._lengths),
            "worker_cpu_s": round(sum(self._worker_cpu.values()), 3),
            "steady_state": self.steady_state(),
            "sources": {
                name: {"written": self._written[index], "skipped": dict(self._skipped[index].most_common())}
                for index, name in enumerate(self._names)
            },
        }

    def steady_state(self) -> dict[str, float] | None:
        """Throughput once every worker has started, each worker's first batch (process start-up,
        imports, first-touch costs) left out: by the wall clock, the samples of the batches finished
        after the last worker's first one over the time to the end; by CPU time, each worker's samples
        after its first batch over the CPU it used for them. None when too few batches ran."""
        calls = sorted(self._calls)
        first: dict[str, tuple[float, float]] = {}
        cpu_samples, cpu_seconds = 0, 0.0
        for at, worker, count, worker_cpu in calls:
            if worker in first:
                cpu_samples += count
            else:
                first[worker] = (at, worker_cpu)
        for worker, (_, cpu_at_first) in first.items():
            cpu_seconds += max(cpu for _, name, _, cpu in calls if name == worker) - cpu_at_first
        started = max(at for at, _ in first.values()) if first else 0.0
        samples = sum(count for at, _, count, _ in calls if at > started)
        seconds = calls[-1][0] - started if calls else 0.0
        if not samples or seconds <= 0 or cpu_seconds <= 0:
            return None
        return {
            "samples": samples,
            "seconds": round(seconds, 3),
            "samples_per_s": round(samples / seconds, 2),
            "cpu_samples": cpu_samples,
            "worker_cpu_s": round(cpu_seconds, 3),
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
        "length_histogram": counts["length_histogram"],
        "sources": sources,
        "records": sum(source["records"] for source in sources.values()),
        "sampled_out": sum(source["sampled_out"] for source in sources.values()),
        **settings,
        "elapsed_s": round(elapsed_s, 3),
        "samples_per_s": round(total_input / elapsed_s, 2) if elapsed_s > 0 else 0.0,
        "worker_cpu_s": counts["worker_cpu_s"],
        "steady_state": counts.get("steady_state"),
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
    """One line: counts, skips by reason, throughput."""
    skipped = report["skipped"]
    reasons = ", ".join(f"{reason} {count}" for reason, count in skipped.items())
    return (
        f"prepare: {report['input']} samples in, {report['written']} written, "
        f"{sum(skipped.values())} skipped{f' ({reasons})' if reasons else ''}; "
        f"{report['samples_per_s']} samples/s over {report['elapsed_s']} s"
    )
