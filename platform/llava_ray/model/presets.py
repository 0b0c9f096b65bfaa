"""Model presets: which vision tower, LM and tokenizer a config means, and building them.

A preset names the pretrained parts (hub names; any local folder or ``s3://`` URL works in their
place) and also carries their shapes, so the same architecture can be built at random with no
download (``model.init=random``: tests, the demo, and GPU benchmarks on machines with no network).
The ``tiny`` preset exists only at random and uses the tokenizer shipped in the package.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from llava_ray.config.schema import ModelConfig
from llava_ray.model.tokenizer import IMAGE_TOKEN, TINY_TOKENIZER_DIR, ensure_special_tokens
from llava_ray.utils.storage import local_copy

CLIP_L_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "projection_dim": 768,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}


def _llama(hidden: int, intermediate: int, layers: int, heads: int) -> dict[str, Any]:
    """Llama-2 / Vicuna-v1.5 shapes (vocabulary 32000, 4096 positions)."""
    return {
        "vocab_size": 32000,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    }


@dataclass(frozen=True)
class Preset:
    """Pretrained sources (None: random init only) and the shapes to build at random."""

    name: str
    vision_tower: str | None
    language_model: str | None
    tokenizer: str | None
    vision_config: dict[str, Any]
    lm_config: dict[str, Any]
    notes: str = ""
    # A random tower's learned position embeddings start some 20x smaller than its patch embeddings,
    # so its features barely say where a patch is; fixed 2-D sine-cosine ones (as MAE's ViT) do.
    sincos_vision_positions: bool = False


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        vision_tower=None,
        language_model=None,
        tokenizer=str(TINY_TOKENIZER_DIR),
        # 64 px images in 16 px patches: 16 image positions per image, a 4x4 grid (quadrants are 2x2).
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 256,
            "projection_dim": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 64,
            "patch_size": 16,
        },
        lm_config={
            "hidden_size": 128,
            "intermediate_size": 384,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 1024,
            "tie_word_embeddings": False,
        },
        notes="CLIP-style ViT (2 layers, width 64, 16 image positions) + Llama-style LM (4 layers, width 128); offline.",
        sincos_vision_positions=True,
    ),
    "llava-1.5-7b": Preset(
        name="llava-1.5-7b",
        vision_tower="openai/clip-vit-large-patch14-336",
        language_model="lmsys/vicuna-7b-v1.5",
        tokenizer="lmsys/vicuna-7b-v1.5",
        vision_config=CLIP_L_336,
        lm_config=_llama(4096, 11008, 32, 32),
        notes="LLaVA-1.5-7B: CLIP ViT-L/14-336 + Vicuna-7B v1.5.",
    ),
    "llava-1.5-13b": Preset(
        name="llava-1.5-13b",
        vision_tower="openai/clip-vit-large-patch14-336",
        language_model="lmsys/vicuna-13b-v1.5",
        tokenizer="lmsys/vicuna-13b-v1.5",
        vision_config=CLIP_L_336,
        lm_config=_llama(5120, 13824, 40, 40),
        notes="LLaVA-1.5-13B: CLIP ViT-L/14-336 + Vicuna-13B v1.5.",
    ),
}


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


def load_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer with LLaVA's ``<image>`` placeholder and a pad token present."""
    source = resolve_sources(config).tokenizer
    tokenizer = AutoTokenizer.from_pretrained(
        local_copy(source),
        trust_remote_code=config.trust_remote_code,
        model_max_length=config.model_max_length,
    )
    return ensure_special_tokens(tokenizer)


def build_vision_config(config: ModelConfig) -> PretrainedConfig:
    """The vision encoder's config (CLIP or SigLIP), with the config's overrides applied."""
    source = resolve_sources(config).vision_tower
    if source is None:
        vision_config: PretrainedConfig = CLIPVisionConfig(**PRESETS[config.preset].vision_config)
    else:
        loaded = AutoConfig.from_pretrained(local_copy(source), trust_remote_code=config.trust_remote_code)
        vision_config = getattr(loaded, "vision_config", loaded)  # CLIPConfig / SiglipConfig hold it
    return _with_overrides(vision_config, config.vision_config_overrides)


def build_vision_tower(config: ModelConfig, seed: int = 0) -> PreTrainedModel:
    """The vision encoder alone (no text tower), pretrained or random."""
    vision_config = build_vision_config(config)
    model_class = SiglipVisionModel if isinstance(vision_config, SiglipVisionConfig) else CLIPVisionModel
    source = resolve_sources(config).vision_tower
    if source is None:
        torch.manual_seed(seed)
        tower = model_class(vision_config)
        if PRESETS[config.preset].sincos_vision_positions:
            set_sincos_positions(tower)
        return tower
    return model_class.from_pretrained(local_copy(source), config=vision_config)


def sincos_position_embedding(grid: int, width: int) -> torch.Tensor:
    """MAE's fixed 2-D sine-cosine embedding: ``(grid * grid, width)``, rows in patch order.

    The first half of the channels encodes the patch's row, the second half its column, each as
    sines and cosines at ``width // 4`` frequencies.
    """
    if width % 4:
        raise ValueError(
            f"2-D sine-cosine positions need a width divisible by 4, got {width}; set hidden_size"
        )
    quarter = width // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def encode(coordinate: torch.Tensor) -> torch.Tensor:
        angles = coordinate.reshape(-1, 1).float() * frequencies
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1)


def set_sincos_positions(tower: PreTrainedModel) -> None:
    """Replace a CLIP tower's position embeddings with fixed sine-cosine ones (zero for the CLS token)."""
    if not isinstance(tower.config, CLIPVisionConfig):
        raise ValueError(
            f"sine-cosine positions are implemented for CLIP towers, not {type(tower.config).__name__}; "
            "set sincos_vision_positions=False in the preset"
        )
    embeddings = getattr(tower, "vision_model", tower).embeddings
    grid = tower.config.image_size // tower.config.patch_size
    table = sincos_position_embedding(grid, tower.config.hidden_size)
    with torch.no_grad():
        weight = embeddings.position_embedding.weight
        weight[0].zero_()
        weight[1:].copy_(table.to(weight.dtype))


def build_lm_config(config: ModelConfig, vocab_size: int) -> PretrainedConfig:
    """The LM's config; a random-init LM gets ``vocab_size`` rows (the tokenizer's length)."""
    source = resolve_sources(config).language_model
    if source is None:
        lm_config: PretrainedConfig = LlamaConfig(
            **{**PRESETS[config.preset].lm_config, "vocab_size": vocab_size}
        )
    else:
        lm_config = AutoConfig.from_pretrained(local_copy(source), trust_remote_code=config.trust_remote_code)
    return _with_overrides(lm_config, config.lm_config_overrides)


def build_language_model(
    config: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0
) -> PreTrainedModel:
    """The causal LM, with its embedding grown to cover tokens the tokenizer added (``<image>``)."""
    lm_config = build_lm_config(config, len(tokenizer))
    source = resolve_sources(config).language_model
    if source is None:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(lm_config)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            local_copy(source), config=lm_config, trust_remote_code=config.trust_remote_code
        )
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        # Hugging Face's llava-1.5 checkpoints pad the grown vocabulary to a multiple of 64.
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def image_positions(vision_config: PretrainedConfig, select_feature: str = "patch") -> int:
    """Sequence positions one image takes: patches, plus CLS when it is kept (576 for CLIP-L/336)."""
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    has_cls = isinstance(vision_config, CLIPVisionConfig)
    return patches + (1 if has_cls and select_feature == "cls_patch" else 0)


def image_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id of LLaVA's ``<image>`` placeholder in this tokenizer."""
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def _with_overrides(config: PretrainedConfig, overrides: dict[str, Any]) -> PretrainedConfig:
    config = copy.deepcopy(config)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def describe_presets() -> str:
    """One line per preset, for ``llava-ray presets``."""
    lines = []
    for preset in PRESETS.values():
        parts = (
            "random init only"
            if preset.vision_tower is None
            else f"{preset.vision_tower} + {preset.language_model}"
        )
        lines.append(f"{preset.name:15s} {parts}. {preset.notes}")
    return "\n".join(lines)
