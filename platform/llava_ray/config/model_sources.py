"""Where a model config's parts come from, and what the vision tower takes: geometry and image input.

:class:`TowerInput` is the one description of a vision tower's input (side, normalisation mean
and std, and the pad colour derived from the mean) that prepare, collate, evaluation, chat and the
Hugging Face export all use. It comes from the tower's own image-processor config
(``preprocessor_config.json`` beside a CLIP or SigLIP checkpoint); :func:`build_vision_config`
records its mean and std on the vision config (``image_mean`` / ``image_std``), so they travel with
every saved or exported model. A tower without one (a random-init preset, a model saved before they
were recorded) takes its model type's published values (:data:`DEFAULT_NORMALIZATION`).

Torch-free at import: data preparation workers import this module; transformers' config classes
(which import torch) are imported only when a vision config is actually built, on the driver.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
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
    """The vision encoder's config (CLIP or SigLIP) with its image input recorded, then the overrides applied.

    A pretrained tower's image-processor config gives the mean and std (and must agree with the
    tower on the image side); ``model.vision_config_overrides`` may still set any of them.
    """
    from transformers import AutoConfig, CLIPVisionConfig

    source = resolve_sources(config).vision_tower
    if source is None:
        vision_config: PretrainedConfig = CLIPVisionConfig(**PRESETS[config.preset].vision_config)
        processor = None
    else:
        path = local_copy(source)
        loaded = AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code)
        vision_config = getattr(loaded, "vision_config", loaded)  # CLIPConfig / SiglipConfig hold it
        processor = read_image_processor_config(path)
    recorded = with_image_processing(vision_config, processor, where=source or f"preset {config.preset!r}")
    vision_config = with_overrides(recorded, config.vision_config_overrides)
    tower_input(vision_config)  # an unknown tower type without a processor config fails here, before any work
    return vision_config


# ---- the tower's image input ---------------------------------------------------------------------

IMAGE_PROCESSOR_FILE = "preprocessor_config.json"  # transformers' IMAGE_PROCESSOR_NAME
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # openai/clip-vit-*'s preprocessor_config.json
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)  # google/siglip-*'s preprocessor_config.json
# A tower's normalisation when no image-processor config comes with it, by vision ``model_type``.
DEFAULT_NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "clip_vision_model": (CLIP_MEAN, CLIP_STD),
    "siglip_vision_model": (SIGLIP_MEAN, SIGLIP_STD),
}


@dataclass(frozen=True)
class TowerInput:
    """What the vision tower takes: ``size`` x ``size`` RGB images, scaled to 0-1, minus ``mean``, over ``std``."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def pad_color(self) -> tuple[int, int, int]:
        """LLaVA-1.5's pad colour: the mean as 8-bit RGB, truncated (``int(x * 255)``) as in ``expand2square``.

        (122, 116, 104) for CLIP, (127, 127, 127) for SigLIP; Hugging Face's LLaVA image processor
        pads with the same colour.
        """
        r, g, b = (int(channel * 255) for channel in self.mean)
        return r, g, b


def tower_input(vision_config: Any) -> TowerInput:
    """The input a vision config describes: its ``image_size`` and recorded ``image_mean`` / ``image_std``.

    A config without them (a random-init tower built elsewhere, a model saved before they were
    recorded) takes its model type's defaults; an unknown model type is an error naming the fix.
    """
    mean, std = getattr(vision_config, "image_mean", None), getattr(vision_config, "image_std", None)
    if mean is None or std is None:
        model_type = getattr(vision_config, "model_type", None)
        if model_type not in DEFAULT_NORMALIZATION:
            raise ValueError(
                f"the vision tower ({model_type!r}) records no image_mean/image_std and has no default "
                f"(known: {', '.join(DEFAULT_NORMALIZATION)}); put its {IMAGE_PROCESSOR_FILE} beside the "
                "tower or set model.vision_config_overrides.image_mean and .image_std"
            )
        mean, std = DEFAULT_NORMALIZATION[model_type]
    return TowerInput(
        size=int(vision_config.image_size), mean=_rgb(mean, "image_mean"), std=_rgb(std, "image_std")
    )


def _rgb(values: Any, name: str) -> tuple[float, float, float]:
    values = [values] * 3 if isinstance(values, int | float) else list(values)
    if len(values) != 3:
        raise ValueError(f"{name}={values!r} must have one value per RGB channel (3 values)")
    r, g, b = (float(value) for value in values)
    return r, g, b


def read_image_processor_config(source: str) -> dict[str, Any] | None:
    """The image-processor settings saved with a tower (local folder or hub name), or None when it has none.

    transformers' own reader: ``preprocessor_config.json``, or the ``image_processor`` entry of a
    newer ``processor_config.json``.
    """
    from transformers import ImageProcessingMixin

    path = Path(source)
    if path.is_dir() and not any(
        (path / name).is_file() for name in (IMAGE_PROCESSOR_FILE, "processor_config.json")
    ):
        return None
    try:
        values, _ = ImageProcessingMixin.get_image_processor_dict(source)
    except OSError:
        if (
            path.is_dir()
        ):  # a processor_config.json without an image processor: nothing to read, nothing fetched
            return None
        raise
    return values


def processor_image_size(processor: Mapping[str, Any]) -> int | None:
    """The side of the images an image-processor config produces: its crop when it centre-crops, else its resize.

    CLIP: ``crop_size`` ({"height": 336, "width": 336}); SigLIP: ``size`` ({"height": 384, "width": 384}).
    """
    crop = processor.get("crop_size") if processor.get("do_center_crop", True) else None
    value = crop if crop is not None else processor.get("size")
    if value is None or isinstance(value, int):
        return value
    if "shortest_edge" in value:
        return int(value["shortest_edge"])
    height, width = value.get("height"), value.get("width")
    if height is None or height != width:
        raise ValueError(f"the image processor makes {value!r} images; LLaVA's vision tower takes squares")
    return int(height)


def with_image_processing(
    vision_config: PretrainedConfig, processor: Mapping[str, Any] | None, where: str
) -> PretrainedConfig:
    """A copy of ``vision_config`` with the tower's ``image_mean`` and ``image_std`` recorded on it.

    From ``processor`` (the tower's image-processor config) when there is one, else the model
    type's defaults; the processor's image side must be the tower's ``image_size``.
    """
    vision_config = copy.deepcopy(vision_config)
    if processor is None:
        normalization = tower_input(vision_config)
        vision_config.image_mean, vision_config.image_std = list(normalization.mean), list(normalization.std)
        return vision_config
    size = processor_image_size(processor)
    if size is not None and size != vision_config.image_size:
        raise ValueError(
            f"{where}: the image processor makes {size}x{size} images but the tower's config has "
            f"image_size={vision_config.image_size}; fix its {IMAGE_PROCESSOR_FILE}, or set "
            f"model.vision_config_overrides.image_size to the side the tower should take"
        )
    if processor.get("do_normalize", True):
        mean, std = processor.get("image_mean"), processor.get("image_std")
        if mean is None or std is None:
            raise ValueError(
                f"{where}: its {IMAGE_PROCESSOR_FILE} normalises but names no image_mean/image_std"
            )
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    vision_config.image_mean = list(_rgb(mean, "image_mean"))
    vision_config.image_std = list(_rgb(std, "image_std"))
    return vision_config


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
