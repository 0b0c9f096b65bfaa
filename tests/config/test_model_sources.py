"""The vision tower's image input (size, mean, std, pad colour) comes from the tower's own image-processor config.

Towers are local folders written here (a config.json and, where the test says so, a
preprocessor_config.json as CLIP's and SigLIP's hub folders carry): nothing downloads.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import CLIPVisionConfig, Dinov2Config, SiglipVisionConfig

from llava_ray.config.model_sources import (
    CLIP_MEAN,
    CLIP_STD,
    TowerInput,
    build_vision_config,
    tower_input,
)
from llava_ray.config.schema import ModelConfig

TOWER_SHAPES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4}
# google/siglip-*'s preprocessor_config.json, at the tiny preset's 64 px.
SIGLIP_PROCESSOR = json.loads(
    (Path(__file__).resolve().parents[1] / "assets/siglip/preprocessor_config.json").read_text()
)


def tower_folder(path: Path, vision_config, processor: dict | None) -> str:
    vision_config.save_pretrained(path)
    if processor is not None:
        (path / "preprocessor_config.json").write_text(json.dumps(processor))
    return str(path)


def model_config(tower: str, **overrides) -> ModelConfig:
    # Naming both parts makes the tower "pretrained": its folder is read (the LM is not, here).
    return ModelConfig(preset="tiny", vision_tower=tower, language_model="unused/lm", **overrides)


def test_a_siglip_tower_takes_its_processors_mean_std_and_pad_colour(tmp_path: Path) -> None:
    folder = tower_folder(
        tmp_path, SiglipVisionConfig(image_size=64, patch_size=16, **TOWER_SHAPES), SIGLIP_PROCESSOR
    )
    vision_config = build_vision_config(model_config(folder))
    tower = tower_input(vision_config)
    assert tower == TowerInput(size=64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert tower.pad_color == (127, 127, 127)  # not CLIP's (122, 116, 104)
    # Recorded on the config, so a saved or exported model carries them.
    assert (vision_config.image_mean, vision_config.image_std) == ([0.5] * 3, [0.5] * 3)
    assert json.loads(vision_config.to_json_string())["image_mean"] == [0.5] * 3


def test_the_processor_file_wins_over_the_model_types_defaults(tmp_path: Path) -> None:
    """A CLIP tower whose preprocessor_config.json has its own numbers (CLIP's layout: crop_size, shortest_edge)."""
    processor = {
        "crop_size": {"height": 64, "width": 64},
        "do_center_crop": True,
        "image_mean": [0.25, 0.5, 0.75],
        "image_std": [0.2, 0.3, 0.4],
        "image_processor_type": "CLIPImageProcessor",
        "size": {"shortest_edge": 64},
    }
    folder = tower_folder(tmp_path, CLIPVisionConfig(image_size=64, patch_size=16, **TOWER_SHAPES), processor)
    tower = tower_input(build_vision_config(model_config(folder)))
    assert tower == TowerInput(size=64, mean=(0.25, 0.5, 0.75), std=(0.2, 0.3, 0.4))
    assert tower.pad_color == (63, 127, 191)
    # model.vision_config_overrides still has the last word.
    overridden = build_vision_config(
        model_config(folder, vision_config_overrides={"image_mean": [0.0, 0.0, 0.0]})
    )
    assert tower_input(overridden).mean == (0.0, 0.0, 0.0)


def test_without_a_processor_file_the_model_type_decides(tmp_path: Path) -> None:
    siglip = tower_folder(
        tmp_path / "siglip", SiglipVisionConfig(image_size=64, patch_size=16, **TOWER_SHAPES), None
    )
    assert tower_input(build_vision_config(model_config(siglip))).mean == (0.5, 0.5, 0.5)
    tiny = tower_input(build_vision_config(ModelConfig(preset="tiny")))  # random init: no folder at all
    assert tiny == TowerInput(size=64, mean=CLIP_MEAN, std=CLIP_STD)
    assert tiny.pad_color == (122, 116, 104)


def test_a_processor_of_another_size_than_the_tower_is_an_error(tmp_path: Path) -> None:
    folder = tower_folder(
        tmp_path,
        SiglipVisionConfig(image_size=64, patch_size=16, **TOWER_SHAPES),
        {**SIGLIP_PROCESSOR, "size": {"height": 384, "width": 384}},
    )
    with pytest.raises(
        ValueError,
        match=r"makes 384x384 images but the tower's config has image_size=64; fix its preprocessor_config.json",
    ):
        build_vision_config(model_config(folder))


def test_an_unknown_tower_type_needs_its_numbers() -> None:
    with pytest.raises(
        ValueError, match=r"\('dinov2'\) records no image_mean/image_std.*put its preprocessor_config.json"
    ):
        tower_input(Dinov2Config(image_size=64))
    recorded = Dinov2Config(image_size=64, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    assert tower_input(recorded).pad_color == (123, 116, 103)
