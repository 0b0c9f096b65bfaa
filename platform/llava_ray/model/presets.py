"""Model presets: which vision tower, LM and tokenizer a config means, and building them.

A preset names the pretrained parts (hub names; any local folder or ``s3://`` URL works in their
place) and also carries their shapes, so the same architecture can be built at random with no
download (``model.init=random``: tests, the demo, and GPU benchmarks on machines with no network).
The ``tiny`` preset exists only at random and uses the tokenizer shipped in the package.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from llava_ray.config.model_sources import build_vision_config, resolve_sources, with_overrides
from llava_ray.config.presets import PRESETS
from llava_ray.config.schema import ModelConfig
from llava_ray.utils.storage import local_copy


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
    return with_overrides(lm_config, config.lm_config_overrides)


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
