"""Every fallback between torch/transformers versions (and optional packages), in one place.

The rest of the package calls these instead of probing versions itself, so when a minimum version
is raised the shim to delete is here and nowhere else.
"""

from __future__ import annotations

import importlib.util
import inspect
from typing import Any

try:  # torch >= 2.10: FlashAttention's variable-length kernel (it runs on CUDA only)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # older torch: no such module, so no varlen kernel
    varlen_attn = None

# Keyword arguments of ``varlen_attn``: causality is ``is_causal`` in torch 2.10, ``window_size`` from 2.11.
VARLEN_PARAMETERS: frozenset[str] = (
    frozenset(inspect.signature(varlen_attn).parameters) if varlen_attn is not None else frozenset()
)


def enable_activation_checkpointing(model: Any, **checkpoint_kwargs: Any) -> None:
    """Recompute a transformers model's activations in backward, passing ``checkpoint_kwargs`` on.

    transformers 5.24 renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``
    (the old name warns); earlier releases have only the old one.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=checkpoint_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)


def llava_image_processor_class() -> type:
    """transformers' LLaVA image processor class that runs with what is installed.

    transformers 5's ``LlavaImageProcessor`` needs torchvision; without it, constructing one warns and
    falls back to ``LlavaImageProcessorPil``, which this returns directly (where that class exists).
    """
    import transformers

    if importlib.util.find_spec("torchvision") is None and hasattr(transformers, "LlavaImageProcessorPil"):
        return transformers.LlavaImageProcessorPil
    return transformers.LlavaImageProcessor


def skip_deepspeed_cpu_shm_op(deepspeed: Any) -> None:
    """Keep DeepSpeed's CPU backend from JIT-compiling its shared-memory op (``deepspeed_shm_comm``).

    DeepSpeed 0.19 compiles it at the first ``initialize`` on a CPU machine (minutes on 2 busy
    cores), yet only its inference all-reduce uses it; training goes over gloo. Takes the imported
    module, so this file never imports DeepSpeed itself.
    """
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
