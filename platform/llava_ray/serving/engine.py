"""Batched, streamed generation for serving: many callers' prompts decoded together, each with its own settings.

No Ray here: :func:`generate_batch` runs one batch in a plain process (the Ray Serve replica calls it in a
thread), so it is tested and benchmarked alone. What it adds to :func:`llava_ray.model.generate.generate`,
which evaluation uses:

- **per-row sampling** (:class:`RowSampler`): each request keeps its own temperature, top-p and seed in a
  mixed batch. The sampler draws each sampled row's token with that row's own ``torch.Generator`` and
  leaves HF's greedy step to pick it, so a request with a seed gets the same answer whatever it is
  batched with (up to the float noise of padding); temperature 0 rows stay greedy;
- **per-row length limits** (:class:`RowLimits`): a row stops at its own ``max_tokens``;
- **per-row streaming** (:class:`RowStreamer`): after every decoding step each row's new visible text
  goes to ``emit``, up to the template's end marker, never the marker itself nor half of one.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    StoppingCriteria,
)
from transformers.generation.streamers import BaseStreamer

from llava_ray.evaluation.loaded_model import InferenceModel
from llava_ray.model.generate import decode, end_markers, visible_answer


@dataclass
class Job:
    """One request's prompt and settings, validated (see :mod:`llava_ray.serving.protocol`)."""

    prompt_ids: list[int]  # the rendered prompt, each <image> expanded to the tower's positions
    pixels: torch.Tensor | None  # (images, 3, S, S), one per <image> in order, or None
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class RowUpdate:
    """What one row produced in one decoding step: new visible text, and why it ended when it did."""

    text: str = ""
    finish_reason: str | None = None  # "stop" (end marker or EOS) or "length" (max_tokens)
    completion_tokens: int = 0


@dataclass
class _Row:
    limit: int
    ids: list[int] = field(default_factory=list)
    shown: int = 0
    finished: bool = False


class RowStreamer(BaseStreamer):
    """Hands each decoding step's new visible text of every row to ``emit`` (one list per step)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        markers: Sequence[str],
        limits: Sequence[int],
        emit: Callable[[list[RowUpdate]], None],
    ):
        self.tokenizer = tokenizer
        self.markers = list(markers)
        self.rows = [_Row(limit) for limit in limits]
        self.emit = emit
        self.prompt_skipped = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_skipped:  # generate() first hands over the prompt (empty: it is embeddings)
            self.prompt_skipped = True
            return
        tokens = value.reshape(len(self.rows), -1)[:, -1].tolist()
        updates = []
        for row, token in zip(self.rows, tokens, strict=True):
            if row.finished:  # HF pads rows that stopped; nothing of theirs is new
                updates.append(RowUpdate(completion_tokens=len(row.ids)))
                continue
            row.ids.append(token)
            updates.append(self._update(row, final=False))
        self.emit(updates)

    def end(self) -> None:
        updates = [
            RowUpdate(completion_tokens=len(row.ids)) if row.finished else self._update(row, final=True)
            for row in self.rows
        ]
        self.emit(updates)

    def _update(self, row: _Row, final: bool) -> RowUpdate:
        text = self.tokenizer.decode(row.ids, skip_special_tokens=False)
        stopped = any(marker in text for marker in self.markers)
        at_limit = len(row.ids) >= row.limit
        done = final or stopped or at_limit
        visible = visible_answer(text, self.markers, final=done)
        new = visible[row.shown :] if len(visible) > row.shown else ""
        row.shown = max(row.shown, len(visible))
        if not done:
            return RowUpdate(new, None, len(row.ids))
        row.finished = True
        return RowUpdate(new, "stop" if stopped or not at_limit else "length", len(row.ids))


class RowLimits(StoppingCriteria):
    """Each row stops after its own number of new tokens (the ids seen here are the new tokens only)."""

    def __init__(self, limits: Sequence[int]):
        self.limits = torch.tensor(list(limits))

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return input_ids.shape[1] >= self.limits.to(input_ids.device)


class RowSampler(LogitsProcessor):
    """Samples each row with its own temperature, top-p and generator; greedy where temperature is 0.

    A sampled row's scores become 0 at the drawn token and -inf elsewhere, so the greedy step that
    follows picks it: the same draw as HF's temperature and top-p warpers followed by multinomial.
    """

    def __init__(self, jobs: Sequence[Job]):
        self.jobs = list(jobs)
        self.generators: list[torch.Generator | None] = [None] * len(self.jobs)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for row, job in enumerate(self.jobs):
            if job.temperature <= 0:
                continue
            probs = torch.softmax(scores[row].float() / job.temperature, dim=-1)
            if job.top_p < 1.0:
                probs = _nucleus(probs, job.top_p)
            token = torch.multinomial(probs, 1, generator=self._generator(row, scores.device))
            scores[row] = float("-inf")
            scores[row, token] = 0.0
        return scores

    def _generator(self, row: int, device: torch.device) -> torch.Generator:
        if self.generators[row] is None:
            seed = self.jobs[row].seed
            generator = torch.Generator(device=device)
            generator.manual_seed(seed if seed is not None else secrets.randbits(63))
            self.generators[row] = generator
        return self.generators[row]


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``probs`` kept on the smallest set of most likely tokens whose mass reaches ``top_p`` (at least one)."""
    ordered, order = torch.sort(probs, descending=True)
    before = torch.cumsum(ordered, dim=-1) - ordered  # mass of the tokens ranked above each one
    ordered = torch.where(before < top_p, ordered, torch.zeros_like(ordered))
    kept = torch.zeros_like(probs).scatter(-1, order, ordered)
    return kept / kept.sum()


@torch.inference_mode()
def generate_batch(
    loaded: InferenceModel, jobs: Sequence[Job], emit: Callable[[list[RowUpdate]], None]
) -> None:
    """Decode ``jobs`` together; ``emit`` gets one :class:`RowUpdate` per job after every step.

    Every row's last update carries its ``finish_reason``; after it the row's updates are empty.
    """
    tokenizer = loaded.tokenizer
    markers = end_markers(loaded.template, tokenizer)
    limits = [job.max_tokens for job in jobs]
    decode(
        loaded.model,
        tokenizer,
        [job.prompt_ids for job in jobs],
        [job.pixels for job in jobs],
        max(limits),
        markers,
        stopping=[RowLimits(limits)],
        logits_processor=LogitsProcessorList([RowSampler(jobs)]),
        streamer=RowStreamer(tokenizer, markers, limits, emit),
        do_sample=False,  # RowSampler draws the sampled rows' tokens
    )
