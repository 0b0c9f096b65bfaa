"""Where a model config's parts come from, and the vision geometry data preparation needs.

Torch-free at import: data preparation workers import this module; transformers' config classes
(which import torch) are imported only when a vision config is actually built, on the driver.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PretrainedConfig

from llava_ray.config.presets import PRESETS, TINY_TOKENIZER_DIR
from llava_ray.config.schema import ModelConfig
from llava_ray.utils.storage import local_copy


@dataclass(frozen=True)
class ModelSources:
    """Where each part comes from once the preset and the config's explicit choices are merged."""

    vision_tower: str | None  # None: build from the preset's shapes at random
    language_model: str | None
    tokenizer: str


def resolve_sources(config: ModelConfig) -> ModelSources:
    """Merge the preset with explicit config keys; a random-init model loads no weights.

    A preset without pretrained weights (``tiny``) builds at random unless the config names both parts.
    """
    preset = PRESETS[config.preset]
    named = config.vision_tower is not None and config.language_model is not None
    random_init = config.init == "random" or (preset.vision_tower is None and not named)
    language_model = None if random_init else config.language_model or preset.language_model
    tokenizer = config.tokenizer or config.language_model or preset.tokenizer or str(TINY_TOKENIZER_DIR)
    return ModelSources(
        vision_tower=None if random_init else config.vision_tower or preset.vision_tower,
        language_model=language_model,
        tokenizer=tokenizer,
    )


def build_vision_config(config: ModelConfig) -> PretrainedConfig:
    """The vision encoder's config (CLIP or SigLIP), with the config's overrides applied."""
    from transformers import AutoConfig, CLIPVisionConfig

    source = resolve_sources(config).vision_tower
    if source is None:
        vision_config: PretrainedConfig = CLIPVisionConfig(**PRESETS[config.preset].vision_config)
    else:
        loaded = AutoConfig.from_pretrained(local_copy(source), trust_remote_code=config.trust_remote_code)
        vision_config = getattr(loaded, "vision_config", loaded)  # CLIPConfig / SiglipConfig hold it
    return with_overrides(vision_config, config.vision_config_overrides)


def image_positions(vision_config: PretrainedConfig, select_feature: str = "patch") -> int:
    """Sequence positions one image takes: patches, plus CLS when it is kept (576 for CLIP-L/336)."""
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    has_cls = vision_config.model_type == "clip_vision_model"
    return patches + (1 if has_cls and select_feature == "cls_patch" else 0)


def with_overrides(config: PretrainedConfig, overrides: dict[str, Any]) -> PretrainedConfig:
    """A copy of a transformers config with ``overrides`` set (``model.*_config_overrides``)."""
    config = copy.deepcopy(config)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config
