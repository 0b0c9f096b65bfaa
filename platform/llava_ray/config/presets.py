"""Model presets: which vision tower, LM and tokenizer a ``model.preset`` means, and their shapes.

A preset names the pretrained parts (hub names; any local folder or ``s3://`` URL works in their
place) and also carries their shapes, so the same architecture can be built at random with no
download (``model.init=random``: tests, the demo, and GPU benchmarks on machines with no network).
The ``tiny`` preset exists only at random and uses the tokenizer shipped in the package. Plain data:
no torch, no transformers (``config.schema`` takes its preset names from here).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The tiny preset's tokenizer ships in the package (built by `llava-ray build-tokenizer`).
TINY_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny-tokenizer"

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
