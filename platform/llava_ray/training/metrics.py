"""Per-step training metrics and the progress lines rank 0 logs."""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

PROGRESS_EVERY_S = 10.0  # a progress line at most this often (and every train.log_every_steps at most)
# Dense bf16 peak of one H100 SXM (scaling.gpu_peak_tflops for other accelerators; A100: 312).
DEFAULT_PEAK_TFLOPS = 989.0


@dataclass(frozen=True)
class FlopsModel:
    """Training FLOPs per step from parameter counts (the usual 2N forward / 4N backward rule).

    Every LM token costs a forward (2N) and, since the trainable projector sits below the LM, a
    backward through activations (2N) whether or not the LM trains, plus weight gradients (2N)
    for trainable LM weights. Each image position costs the vision tower's forward (2N) plus its
    backward when it trains. Attention's quadratic term is left out, so MFU is slightly low.
    """

    lm_params: int
    lm_trainable: int
    vision_params: int
    vision_trainable: int

    @classmethod
    def of(cls, model: nn.Module) -> FlopsModel:
        def count(module: nn.Module, trainable: bool) -> int:
            return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)

        return cls(
            lm_params=count(model.language_model, False),
            lm_trainable=count(model.language_model, True),
            vision_params=count(model.vision_tower, False),
            vision_trainable=count(model.vision_tower, True),
        )

    def step_flops(self, tokens: int, image_positions: int) -> float:
        lm = tokens * (4 * self.lm_params + 2 * self.lm_trainable)
        vision = image_positions * (2 * self.vision_params + 4 * self.vision_trainable)
        return float(lm + vision)


def peak_flops(world_size: int, gpu_peak_tflops: float = DEFAULT_PEAK_TFLOPS) -> float:
    """FLOP/s of ``world_size`` GPUs at ``gpu_peak_tflops`` each (``scaling.gpu_peak_tflops``)."""
    return gpu_peak_tflops * 1e12 * world_size


@dataclass
class StepMetrics:
    """Global (all-rank) figures of one optimizer step."""

    loss: float
    learning_rate: float
    projector_learning_rate: float
    grad_norm: float | None
    samples: int
    tokens: int
    supervised_tokens: int
    padding_fraction: float
    seconds: float
    peak_memory_gib: float
    world_size: int
    image_positions: int = 0
    mfu: float | None = None

    def as_dict(self, step: int) -> dict[str, Any]:
        seconds = max(self.seconds, 1e-9)
        values = {
            "step": step,
            "loss": self.loss,
            "learning_rate": self.learning_rate,
            "projector_learning_rate": self.projector_learning_rate,
            "samples_per_s": self.samples / seconds,
            "tokens_per_s": self.tokens / seconds,
            "supervised_tokens_per_s": self.supervised_tokens / seconds,
            "padding_fraction": self.padding_fraction,
            "peak_memory_gib": self.peak_memory_gib,
        }
        if self.grad_norm is not None:
            values["grad_norm"] = self.grad_norm
        if self.mfu is not None:
            values["mfu"] = self.mfu
        return values


def format_progress(step: int, total: int, metrics: StepMetrics, eta_s: float) -> str:
    """``[train] step 12/50 loss 2.3451 lr 1.00e-03 gnorm 1.23 | 45.1 samples/s ... | ETA 0:01:23``."""
    values = metrics.as_dict(step)
    grad = f" gnorm {metrics.grad_norm:.3g}" if metrics.grad_norm is not None else ""
    mfu = f" mfu {metrics.mfu:.1%}" if metrics.mfu is not None else ""
    return (
        f"[train] step {step}/{total} loss {metrics.loss:.4f} lr {metrics.learning_rate:.2e}{grad} | "
        f"{values['samples_per_s']:.1f} samples/s {values['tokens_per_s']:.0f} tok/s "
        f"(supervised {values['supervised_tokens_per_s']:.0f}) pad {metrics.padding_fraction:.0%}{mfu} | "
        f"peak mem {metrics.peak_memory_gib:.2f} GiB | ETA {datetime.timedelta(seconds=round(eta_s))}"
    )


@dataclass
class ProgressMeter:
    """When rank 0 logs a progress line, and the figures of the steps since the last one.

    A line comes every ``every_steps`` steps or every ``every_s`` seconds, whichever is coarser,
    and at the last step. Its loss is the mean over those steps, its rates their totals over their
    time, so a line speaks for every step it covers; learning rate, grad norm and memory are the
    last step's. The ETA comes from the pace since the meter started.
    """

    total_steps: int
    start_step: int
    every_steps: int = 1
    every_s: float = PROGRESS_EVERY_S
    clock: Any = time.monotonic
    _window: list[StepMetrics] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.started = self.last_line = self.clock()
        self.last_step = self.start_step

    def update(self, step: int, metrics: StepMetrics) -> str | None:
        """The progress line to log after ``step``, or None when none is due."""
        self._window.append(metrics)
        now = self.clock()
        due = step - self.last_step >= self.every_steps and now - self.last_line >= self.every_s
        if not due and step < self.total_steps:
            return None
        window, self._window = self._window, []
        combined = replace(
            window[-1],
            loss=sum(m.loss for m in window) / len(window),
            samples=sum(m.samples for m in window),
            tokens=sum(m.tokens for m in window),
            supervised_tokens=sum(m.supervised_tokens for m in window),
            seconds=sum(m.seconds for m in window),
        )
        eta = (now - self.started) / max(step - self.start_step, 1) * (self.total_steps - step)
        self.last_line, self.last_step = now, step
        return format_progress(step, self.total_steps, combined, eta)
