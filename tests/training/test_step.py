"""The training step without Ray: collation, loss normalisation and accumulation invariance."""

import copy

import pytest
import torch

from llava_ray.config import load_config
from llava_ray.config.model_sources import CLIP_MEAN, CLIP_STD, TowerInput, build_vision_config, tower_input
from llava_ray.config.schema import ModelConfig
from llava_ray.conversation.templates import IGNORE_INDEX
from llava_ray.model.build import build_llava_model
from llava_ray.training.collate import collate_rows
from llava_ray.training.optim import build_optimizer, build_scheduler, deepspeed_config
from llava_ray.training.step import PlainEngine, train_step
from llava_ray.training.trainable import set_trainable

CPU = torch.device("cpu")
TINY_TOWER = tower_input(build_vision_config(ModelConfig(preset="tiny")))  # 64 px, CLIP's mean and std


def test_collate_pads_right_and_counts_tokens(stage2_rows, tiny_tokenizer):
    rows = stage2_rows[:4]
    batch = collate_rows(rows, tiny_tokenizer.pad_token_id, TINY_TOWER)
    longest = max(len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (4, longest)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == row["input_ids"]
        assert (batch["input_ids"][i, n:] == tiny_tokenizer.pad_token_id).all()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all() and batch["attention_mask"][i].sum() == n
    assert int(batch["num_tokens"]) == sum(len(r["input_ids"]) for r in rows)
    expected = sum(sum(label != IGNORE_INDEX for label in r["labels"][1:]) for r in rows)
    assert int(batch["num_supervised"]) == expected
    images = sum(len(r["images"]) for r in rows)
    assert batch["pixel_values"].shape == (images, 3, 64, 64)
    # A white-ish pixel normalises with CLIP's statistics.
    white = max((1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True))
    assert batch["pixel_values"].max() <= white + 1e-5


def test_collate_refuses_images_of_the_wrong_size(stage2_rows, tiny_tokenizer):
    with pytest.raises(
        ValueError, match=r"prepared image is 64x64, the vision tower takes 32x32; prepare the data again"
    ):
        collate_rows(stage2_rows[:1], tiny_tokenizer.pad_token_id, TowerInput(32, CLIP_MEAN, CLIP_STD))


def make_engine(config, tokenizer, accumulation, seed=0):
    model = build_llava_model(config.model, tokenizer, seed=seed)
    set_trainable(model, config.train.trainable, lora=config.train.lora)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, total_steps=10)
    return PlainEngine(model, optimizer, scheduler, accumulation, config.train.max_grad_norm)


def run_steps(config, tokenizer, rows, micro, steps=2):
    accumulation = config.train.global_batch_size // micro
    engine = make_engine(config, tokenizer, accumulation)
    losses = []
    for step in range(steps):
        batch_rows = rows[step * 8 : (step + 1) * 8]
        batches = [
            collate_rows(batch_rows[i : i + micro], tokenizer.pad_token_id, TINY_TOWER)
            for i in range(0, 8, micro)
        ]
        step_tokens = sum(int(b["num_supervised"]) for b in batches)
        losses.append(train_step(engine, batches, step_tokens, 1, CPU).loss_sum)
    return losses, engine.module


@pytest.mark.parametrize("trainable", ["full", "lora"])
def test_accumulation_1x8_equals_8x1(stage2_rows, tiny_tokenizer, trainable):
    config = load_config(
        None,
        [
            "model.preset=tiny",
            "train.stage=finetune",
            f"train.trainable={trainable}",
            "train.global_batch_size=8",
            "train.micro_batch_size=1",
            "train.learning_rate=1e-3",
            "train.lora.r=4",
            "train.lora.dropout=0",
        ],
    )
    losses_a, model_a = run_steps(config, tiny_tokenizer, stage2_rows, micro=8)
    losses_b, model_b = run_steps(config, tiny_tokenizer, stage2_rows, micro=1)
    assert losses_a == pytest.approx(losses_b, rel=1e-5)
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    assert not torch.equal(
        model_a.projector[0].weight, make_engine(config, tiny_tokenizer, 1).module.projector[0].weight
    )


def test_loss_is_the_mean_over_supervised_tokens(stage2_rows, tiny_tokenizer):
    config = load_config(None, ["model.preset=tiny", "train.global_batch_size=8", "train.micro_batch_size=4"])
    engine = make_engine(config, tiny_tokenizer, accumulation=2)
    reference = copy.deepcopy(engine.module)
    batches = [collate_rows(stage2_rows[i : i + 4], tiny_tokenizer.pad_token_id, TINY_TOWER) for i in (0, 4)]
    total = sum(int(b["num_supervised"]) for b in batches)
    result = train_step(engine, batches, total, 1, CPU)
    with torch.no_grad():
        sums = [
            reference(
                **{k: b[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values") if k in b},
                loss_reduction="sum",
            ).loss
            for b in batches
        ]
    assert result.loss_sum == pytest.approx(float(sum(sums)) / total, rel=1e-5)
    assert result.supervised == total and result.samples == 8


def test_deepspeed_config_is_derived_from_the_training_config():
    config = load_config(
        None,
        [
            "train.global_batch_size=64",
            "train.micro_batch_size=4",
            "scaling.num_workers=4",
            "deepspeed.zero_stage=3",
            "deepspeed.offload_optimizer=true",
            "train.max_grad_norm=0.5",
        ],
    )
    cpu = deepspeed_config(config, world_size=4, on_gpu=False)
    assert cpu["train_batch_size"] == 64 and cpu["train_micro_batch_size_per_gpu"] == 4
    assert cpu["gradient_accumulation_steps"] == 4 and cpu["gradient_clipping"] == 0.5
    assert (
        cpu["zero_optimization"]["stage"] == 3
        and cpu["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    )
    assert not cpu["bf16"]["enabled"] and deepspeed_config(config, 4, on_gpu=True)["bf16"]["enabled"]


def test_collate_takes_ray_datas_empty_image_arrays(stage2_rows, tiny_tokenizer):
    import numpy as np

    text_only = next(row for row in stage2_rows if not row["images"])
    as_ray_data_gives_it = {**text_only, "images": np.array([], dtype=object)}
    batch = collate_rows([as_ray_data_gives_it], tiny_tokenizer.pad_token_id, TINY_TOWER)
    assert "pixel_values" not in batch
