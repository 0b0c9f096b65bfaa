"""What trains in each stage: the projector always; ``full`` adds the LM, ``lora`` adds peft adapters on it.

:func:`merge_lora` folds adapters back into the LM before a model is saved or exported.
"""

from __future__ import annotations

from typing import Literal

from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

from llava_ray.config.schema import LoraConfig
from llava_ray.model.llava import LlavaModel

TRAINABLE = ("projector", "full", "lora")


def set_trainable(
    model: LlavaModel,
    trainable: Literal["projector", "full", "lora"],
    freeze_vision_tower: bool = True,
    lora: LoraConfig | None = None,
) -> LlavaModel:
    """Mark what trains: the projector always; ``full`` adds the LM, ``lora`` adds LoRA adapters on it.

    ``lora`` wraps the LM with peft adapters (once) and trains only those of its parameters.
    """
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable={trainable!r} is unknown; use one of {', '.join(TRAINABLE)}")
    if trainable != "lora" and model.has_lora:
        raise ValueError(
            f"trainable={trainable!r} but the LM carries LoRA adapters; call merge_lora(model) first"
        )
    model.requires_grad_(False)
    if trainable == "full":
        model.language_model.requires_grad_(True)
    elif trainable == "lora":
        if not model.has_lora:
            model.language_model = get_peft_model(
                model.language_model, peft_lora_config(lora or LoraConfig())
            )
        for name, parameter in model.language_model.named_parameters():
            parameter.requires_grad_("lora_" in name)
    model.projector.requires_grad_(True)
    model.vision_tower.requires_grad_(not freeze_vision_tower)
    return model


def peft_lora_config(lora: LoraConfig) -> PeftLoraConfig:
    """Our LoRA settings as peft's (``all-linear``: every linear layer of the LM but its output head)."""
    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def merge_lora(model: LlavaModel) -> LlavaModel:
    """Fold LoRA adapters into the LM's weights (a plain LM again, ready to save or export); no-op without."""
    if model.has_lora:
        model.language_model = model.language_model.merge_and_unload()
    return model
