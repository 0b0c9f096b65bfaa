"""Per-step training metrics and the progress line rank 0 prints."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

from torch import nn

# Dense bf16 peak of one H100 SXM; set LLAVA_RAY_PEAK_TFLOPS for other accelerators (A100: 312).
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


def peak_flops(world_size: int) -> float:
    return float(os.environ.get("LLAVA_RAY_PEAK_TFLOPS", DEFAULT_PEAK_TFLOPS)) * 1e12 * world_size


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
