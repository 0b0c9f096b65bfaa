"""Skipped work, counted: the one exception for "this sample/item cannot be used", and its counter.

Bad input never crashes a job and never vanishes: whoever meets it raises :class:`Skipped` with a
stable ``reason`` (a snake_case key the reports count) and a human ``detail``; the job catches it,
adds it to a :class:`SkipCounter` and carries on. Data preparation, instruction generation and
evaluation all report skips in the same shape (:meth:`SkipCounter.to_dict`)::

    "skipped":  {reason: count}, most frequent first
    "examples": {reason: [up to MAX_EXAMPLES sample ids or "id: detail" strings]}
"""

from __future__ import annotations

from collections import Counter

MAX_EXAMPLES = 5


class Skipped(ValueError):
    """Input that is skipped, not fatal; ``reason`` is the key counted in reports, ``detail`` says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class SkipCounter:
    """Skips counted by reason, with the first ``max_examples`` examples of each reason."""

    def __init__(self, max_examples: int = MAX_EXAMPLES):
        self.max_examples = max_examples
        self._counts: Counter[str] = Counter()
        self._examples: dict[str, list[str]] = {}

    def add(self, reason: str, example: str, count: int = 1) -> None:
        """Count ``count`` skipped inputs (copies of one sample count each) under ``reason``."""
        self._counts[reason] += count
        shown = self._examples.setdefault(reason, [])
        if len(shown) < self.max_examples:
            shown.append(example)

    def merge(self, other: SkipCounter) -> None:
        """Add ``other``'s counts; its examples fill what this counter's cap leaves free."""
        self._counts.update(other._counts)
        for reason, examples in other._examples.items():
            shown = self._examples.setdefault(reason, [])
            shown.extend(examples[: max(0, self.max_examples - len(shown))])

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    @property
    def counts(self) -> dict[str, int]:
        """``{reason: count}``, most frequent first."""
        return dict(self._counts.most_common())

    @property
    def examples(self) -> dict[str, list[str]]:
        """``{reason: [example, ...]}`` in the order of :attr:`counts`."""
        return {reason: list(self._examples[reason]) for reason in self.counts}

    def to_dict(self) -> dict[str, dict]:
        """The report fields: ``{"skipped": counts, "examples": examples}``."""
        return {"skipped": self.counts, "examples": self.examples}
