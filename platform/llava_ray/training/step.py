"""The training step, usable with or without Ray and DeepSpeed.

One optimizer step runs ``accumulation`` micro-batches on each of ``world_size`` ranks. The loss
is the mean over every supervised token of the whole global batch: each micro-batch contributes
``sum of its token losses / step_tokens``, where ``step_tokens`` (the global batch's supervised
tokens, known in advance from the schedule) is the same on every rank. DeepSpeed divides the
loss by the accumulation steps and averages gradients over ranks, so the backward loss is scaled
by ``world_size x accumulation`` to undo both. Hence 1x8 accumulation equals 8x1 micro-batches
and 1 worker equals 2 workers at the same global batch.

:class:`PlainEngine` gives a plain torch model and optimizer the few engine methods used here,
so the step runs in one process on one device for benchmarks and profiling.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values", "position_ids")


def allow_tf32(enabled: bool, device: torch.device) -> None:
    """TF32 tensor cores for float32 matmuls on an NVIDIA GPU, as LLaVA-1.5's ``--tf32 True``.

    Under bf16 autocast this touches only what stays float32 (the loss, optimizer-side matmuls).
    Off CUDA nothing changes: CPU results stay bit-for-bit comparable across runs and machines.
    """
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if enabled else "highest")
        torch.backends.cudnn.allow_tf32 = enabled


class PlainEngine:
    """DeepSpeed's engine interface (call, backward, step) over a torch model and optimizer."""

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        accumulation: int,
        max_grad_norm: float,
    ):
        self.module = module
        self.optimizer = optimizer
        self.lr_scheduler = scheduler
        self.accumulation = accumulation
        self.max_grad_norm = max_grad_norm
        self.micro_steps = 0
        self._grad_norm: float | None = None

    def __call__(self, **inputs: Any) -> Any:
        return self.module(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()  # as DeepSpeed scales by gradient accumulation

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.accumulation:
            return
        parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(
            parameters, self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        )
        self._grad_norm = float(norm)
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_global_grad_norm(self) -> float | None:
        return self._grad_norm


@dataclass
class StepResult:
    """What one optimizer step did on this rank (sums; divide after reducing over ranks)."""

    loss_sum: float  # this rank's share of the global mean loss
    samples: int
    tokens: int  # real (non-padding) tokens
    padded_tokens: int  # tokens including padding
    supervised: int
    image_positions: int
    seconds: float
    grad_norm: float | None


def move_inputs(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {key: batch[key].to(device, non_blocking=True) for key in MODEL_INPUTS if key in batch}


def train_step(
    engine: Any,
    micro_batches: Sequence[dict[str, Any]],
    step_tokens: int,
    world_size: int,
    device: torch.device,
) -> StepResult:
    """Run one optimizer step over this rank's micro-batches (see the module docstring)."""
    started = time.perf_counter()
    scale = world_size * len(micro_batches) / max(int(step_tokens), 1)
    loss_sum = 0.0
    samples = tokens = padded = supervised = image_positions = 0
    for batch in micro_batches:
        # No logits: the LM head runs only where a label is supervised (LlavaModel.forward).
        output = engine(**move_inputs(batch, device), loss_reduction="sum", return_logits=False)
        engine.backward(output.loss * scale)
        engine.step()
        loss_sum += float(output.loss.detach()) / max(int(step_tokens), 1)
        samples += int(batch.get("num_samples", batch["input_ids"].shape[0]))  # a packed row holds several
        tokens += int(batch["num_tokens"])
        padded += int(batch["input_ids"].numel())
        supervised += int(output.num_supervised_tokens)
        if "pixel_values" in batch:
            image_positions += int(batch["pixel_values"].shape[0]) * engine.module.image_positions
    return StepResult(
        loss_sum=loss_sum,
        samples=samples,
        tokens=tokens,
        padded_tokens=padded,
        supervised=supervised,
        image_positions=image_positions,
        seconds=time.perf_counter() - started,
        grad_norm=_grad_norm(engine),
    )


def _grad_norm(engine: Any) -> float | None:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)
