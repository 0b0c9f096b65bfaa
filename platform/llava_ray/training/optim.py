"""Model, optimizer, schedule and DeepSpeed engine, all derived from one training config.

The DeepSpeed config is built here from the llava-ray config, never written by hand, so batch
sizes, precision and accumulation cannot disagree between the two.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from llava_ray.config.schema import LlavaRayConfig
from llava_ray.model.llava import LlavaModel


def resolve_precision(config: LlavaRayConfig, on_gpu: bool) -> str:
    """``auto`` means bf16 on GPUs and fp32 on CPUs (CPU kernels for bf16 training are slow and lossy)."""
    if config.deepspeed.precision != "auto":
        return config.deepspeed.precision
    return "bf16" if on_gpu else "fp32"


def accumulation_steps(config: LlavaRayConfig, world_size: int) -> int:
    return config.train.global_batch_size // (config.train.micro_batch_size * world_size)


def deepspeed_config(config: LlavaRayConfig, world_size: int, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config for this run."""
    ds = config.deepspeed
    precision = resolve_precision(config, on_gpu)
    zero: dict[str, Any] = {
        "stage": ds.zero_stage,
        "overlap_comm": on_gpu,
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e8 if on_gpu else 5e7,
    }
    if ds.zero_stage == 3:
        # Full weights gathered on save, so the final model is one ordinary state dict.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    return {
        "train_batch_size": config.train.global_batch_size,
        "train_micro_batch_size_per_gpu": config.train.micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps(config, world_size),
        "gradient_clipping": config.train.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        # Our own AdamW with per-part learning rates; DeepSpeed wraps it.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_optimizer(model: LlavaModel, config: LlavaRayConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters with the projector's own learning rate."""
    train = config.train
    groups = parameter_groups(model, train.learning_rate, train.projector_learning_rate, train.weight_decay)
    return torch.optim.AdamW(groups, lr=train.learning_rate, betas=train.adam_betas, eps=1e-8)


def build_scheduler(optimizer: torch.optim.Optimizer, config: LlavaRayConfig, total_steps: int) -> Any:
    """Linear warmup over ``warmup_ratio`` of the steps, then cosine decay to zero (or constant)."""
    warmup = math.ceil(config.train.warmup_ratio * total_steps)
    if config.train.lr_schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)


def parameter_groups(
    model: LlavaModel, lr: float, projector_lr: float | None = None, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Optimizer groups of the trainable parameters: the projector at ``projector_lr``, the rest at ``lr``.

    Biases and norm weights (1-D parameters) take no weight decay. Each group has a ``name``.
    """
    projector_ids = {id(p) for p in model.projector.parameters()}
    groups: dict[str, dict[str, Any]] = {}
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        owner = "projector" if id(parameter) in projector_ids else "model"
        decays = parameter.ndim >= 2 and weight_decay > 0
        group_name = owner if decays else f"{owner}_no_decay"
        group = groups.setdefault(
            group_name,
            {
                "name": group_name,
                "params": [],
                "lr": projector_lr if owner == "projector" and projector_lr is not None else lr,
                "weight_decay": weight_decay if decays else 0.0,
            },
        )
        group["params"].append(parameter)
    if not groups:
        raise ValueError("the model has no trainable parameters; call set_trainable(model, ...) first")
    return list(groups.values())


def learning_rates(optimizer: torch.optim.Optimizer) -> tuple[float, float]:
    """The LM's and the projector's current learning rates, looked up by group name (never by position).

    A stage that trains only the projector reports the projector's rate for both.
    """
    by_owner: dict[str, float] = {}
    for group in optimizer.param_groups:
        by_owner.setdefault(group["name"].removesuffix("_no_decay"), group["lr"])
    projector = by_owner["projector"]
    return by_owner.get("model", projector), projector
