"""The LLaVA-1.5 recipes as the reference ran them (scripts/v1_5/*.sh with scripts/zero{2,3}.json).

Each value here once differed: the reference's ZeRO JSONs set no ``gradient_clipping`` (DeepSpeed's
default, 0: unclipped) where llava-ray clipped at 1.0; its stage 1 passes no
``--image_aspect_ratio`` (CLIP's resize and centre crop) where llava-ray padded; its scripts pass
``--tf32 True``, which llava-ray never set.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llava_ray.config import load_config
from llava_ray.training.optim import deepspeed_config
from llava_ray.training.step import allow_tf32

CONFIGS = Path(__file__).resolve().parents[2] / "platform/llava_ray/assets/configs"
RECIPES = sorted(CONFIGS.glob("llava-1.5-*/*.yaml"))
RECIPES = [path for path in RECIPES if path.stem != "pipeline"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda path: f"{path.parent.name}/{path.stem}")
def test_llava_1_5_recipes_train_unclipped_with_tf32(path: Path) -> None:
    config = load_config(path)
    assert config.train.max_grad_norm == 0.0 and config.train.tf32
    assert deepspeed_config(config, world_size=8, on_gpu=True)["gradient_clipping"] == 0.0


@pytest.mark.parametrize("path", RECIPES, ids=lambda path: f"{path.parent.name}/{path.stem}")
def test_stage_1_crops_and_stage_2_pads_as_the_reference(path: Path) -> None:
    config = load_config(path)
    expected = "crop" if config.train.stage == "pretrain" else "pad"
    assert config.data.image_aspect == expected


def test_an_explicit_image_aspect_beats_the_stage_default() -> None:
    assert load_config(None, ["data.image_aspect=pad"]).data.image_aspect == "pad"


def test_tf32_leaves_the_cpu_alone() -> None:
    before = torch.get_float32_matmul_precision()
    allow_tf32(True, torch.device("cpu"))
    assert torch.get_float32_matmul_precision() == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tf32_on_a_gpu_follows_the_config() -> None:
    allow_tf32(True, torch.device("cuda"))
    assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    allow_tf32(False, torch.device("cuda"))
    assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
