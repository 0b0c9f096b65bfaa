"""Batched generation over evaluation items: in this process, or on a Ray Data actor pool.

:func:`predict` answers a list of :class:`EvalItem` (a prompt conversation ending with the
user's turn, and an image location or none) and returns one :class:`Outcome` per item id: the
answer, or why there is none (``image_missing``, ``corrupt_image``, ``prompt_too_long``,
``image_placeholder_mismatch``, ...). Every item gets exactly one outcome.

- ``num_actors=0``: one :class:`Predictor` in this process (no Ray), for small runs and tests.
- ``num_actors=N``: ``ray.data.from_items(rows).map_batches(Predictor, compute=ActorPoolStrategy(N, N))``;
  each actor loads the model once (``num_gpus_per_actor`` GPUs on clusters) and answers
  ``batch_size`` prompts at a time.

Items are sorted by prompt length before batching so that a batch's rows need little left
padding; greedy answers do not depend on the batching (``tests/evaluation/test_generation_eval.py``).
Prompts are rendered with the template stored with the model, and answers stop at its end marker
(:func:`llava_ray.model.llava.generate`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from llava_ray.conversation.tokenizer import IMAGE_TOKEN
from llava_ray.data.images import Aspect
from llava_ray.evaluation.items import EvalItem, Outcome
from llava_ray.evaluation.loaded_model import load_inference_model, load_pixels
from llava_ray.model.generate import generate
from llava_ray.utils.logging import ensure_logging
from llava_ray.utils.skips import Skipped

logger = logging.getLogger(__name__)

OUTPUT_SCHEMA = pa.schema(
    [("id", pa.string()), ("prediction", pa.string()), ("error", pa.string()), ("detail", pa.string())]
)
PROGRESS_EVERY_S = 30.0


@dataclass(frozen=True)
class GenerationSettings:
    """What every actor needs to load the model and answer (picklable: actors are built from it)."""

    model: str
    template: str | None = None
    image_aspect: Aspect = "pad"
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    use_gpu: bool = False


class Predictor:
    """Ray Data callable class: loads the model once, then answers a batch of rows per call.

    Rows: ``{"id", "conversation" (JSON), "image" ("" when none)}`` -> :data:`OUTPUT_SCHEMA` rows.
    """

    def __init__(self, settings: GenerationSettings):
        import torch

        device = "cuda" if settings.use_gpu and torch.cuda.is_available() else "cpu"
        self.settings = settings
        self.loaded = load_inference_model(settings.model, settings.template, device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist(self.predict_rows(batch.to_pylist()), schema=OUTPUT_SCHEMA)

    def predict_rows(self, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """One output row per input row, in order; rows that cannot be asked carry an error."""
        results: dict[str, dict[str, Any]] = {}
        prompts, prompt_ids = [], []
        for row in rows:
            try:
                prompts.append(self._prompt(json.loads(row["conversation"]), row["image"] or None))
                prompt_ids.append(row["id"])
            except Skipped as error:
                results[row["id"]] = _row(row["id"], None, error.reason, str(error))
        settings = self.settings
        answers = generate(
            self.loaded.model,
            self.loaded.tokenizer,
            self.loaded.template,
            prompts,
            max_new_tokens=settings.max_new_tokens,
            do_sample=settings.temperature > 0,
            temperature=settings.temperature or 1.0,
            top_p=settings.top_p,
            seed=settings.seed,
        )
        for row_id, answer in zip(prompt_ids, answers, strict=True):
            results[row_id] = _row(row_id, answer)
        return [results[row["id"]] for row in rows]

    def _prompt(
        self, conversation: list[dict[str, Any]], image: str | None
    ) -> tuple[list[dict[str, Any]], Any]:
        """``(conversation, pixels or None)`` for generate, or a counted error."""
        placeholders = sum(str(turn.get("value", "")).count(IMAGE_TOKEN) for turn in conversation)
        if placeholders != (1 if image else 0):
            raise Skipped(
                "image_placeholder_mismatch",
                f"the prompt has {placeholders} <image> placeholder(s) but {'one image' if image else 'no image'}",
            )
        length = self.loaded.prompt_length(conversation)
        limit = self.loaded.max_positions
        if limit is not None and length + self.settings.max_new_tokens > limit:
            raise Skipped(
                "prompt_too_long",
                f"{length} prompt positions + {self.settings.max_new_tokens} new tokens > the model's {limit}",
            )
        pixels = load_pixels(image, self.loaded.tower_input, self.settings.image_aspect) if image else None
        return conversation, pixels


def _row(
    row_id: str, prediction: str | None, error: str | None = None, detail: str | None = None
) -> dict[str, Any]:
    return {"id": row_id, "prediction": prediction, "error": error, "detail": detail}


def item_rows(items: Iterable[EvalItem]) -> list[dict[str, Any]]:
    """Predictor input rows, shortest prompts first (little padding per batch)."""
    rows = [
        {"id": item.id, "conversation": json.dumps(item.conversation), "image": item.image or ""}
        for item in items
    ]
    return sorted(rows, key=lambda row: (len(row["conversation"]), row["id"]))


def predict(
    items: Sequence[EvalItem],
    settings: GenerationSettings,
    batch_size: int = 16,
    num_actors: int = 0,
    num_cpus_per_actor: float = 1,
    num_gpus_per_actor: float = 0,
    predictor: Predictor | None = None,
) -> dict[str, Outcome]:
    """Every item's :class:`Outcome` by id (see the module docstring).

    ``predictor`` reuses an already loaded in-process model (``num_actors=0`` only).
    """
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        repeated = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"item ids must be unique; repeated: {repeated}. Give every question its own id")
    # Items refused when loading (an image outside the image root) are never opened or asked.
    refused = {item.id: item.refused for item in items if item.refused is not None}
    rows = item_rows(item for item in items if item.refused is None)
    if not rows:
        return refused
    ensure_logging()
    meter = _Progress(len(rows))
    outputs: list[dict[str, Any]] = []
    if num_actors == 0:
        predictor = predictor or Predictor(settings)
        for start in range(0, len(rows), batch_size):
            outputs += predictor.predict_rows(rows[start : start + batch_size])
            meter.update(len(outputs))
    else:
        outputs = _predict_on_actors(
            rows, settings, batch_size, num_actors, num_cpus_per_actor, num_gpus_per_actor, meter
        )
    outcomes = {row["id"]: Outcome(row["prediction"], row["error"], row["detail"]) for row in outputs}
    outcomes.update(refused)
    missing = set(ids) - set(outcomes)
    if missing:
        raise RuntimeError(f"{len(missing)} item(s) came back without an answer, e.g. {sorted(missing)[:5]}")
    return outcomes


def _predict_on_actors(
    rows: list[dict[str, Any]],
    settings: GenerationSettings,
    batch_size: int,
    num_actors: int,
    num_cpus: float,
    num_gpus: float,
    meter: _Progress,
) -> list[dict[str, Any]]:
    import ray

    if not ray.is_initialized():
        ray.init()
    blocks = math.ceil(len(rows) / batch_size)
    actors = min(num_actors, blocks)  # an actor without a block would load the model for nothing
    dataset = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
        Predictor,
        fn_constructor_kwargs={"settings": settings},
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=actors, max_size=actors),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )
    outputs = []
    for row in dataset.iter_rows():
        outputs.append(row)
        meter.update(len(outputs))
    return outputs


class _Progress:
    """A log line at most every PROGRESS_EVERY_S seconds, and one at the end."""

    def __init__(self, total: int):
        self.total = total
        self.started = time.monotonic()
        self.last = self.started

    def update(self, done: int) -> None:
        now = time.monotonic()
        if done == self.total or now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            rate = done / max(now - self.started, 1e-9)
            logger.info(f"[evaluate] answered {done}/{self.total} ({rate:.2f} items/s)")
