"""Per-step training metrics and the progress line rank 0 prints."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any


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
