"""``llava-ray export`` (``run_export``) from real ZeRO checkpoints, each mode loaded back with stock libraries.

A one-process gloo DeepSpeed engine trains a tiny model one step and writes a checkpoint the way a
worker does; the export is loaded with stock ``transformers.LlavaForConditionalGeneration`` (and
``peft.PeftModel`` for the adapter) and its logits compared with the engine's model at that checkpoint.
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from PIL import Image
from transformers import LlavaForConditionalGeneration

from llava_ray.config import load_config
from llava_ray.config.model_sources import build_vision_config, tower_input
from llava_ray.config.schema import ModelConfig
from llava_ray.conversation.templates import tokenize_conversation
from llava_ray.conversation.tokenizer import load_tokenizer
from llava_ray.data.synthetic import generate
from llava_ray.model.build import build_llava_model
from llava_ray.model.llava import LlavaModel
from llava_ray.training.checkpoint import CheckpointError, write_checkpoint_files
from llava_ray.training.collate import collate_rows
from llava_ray.training.optim import build_optimizer, build_scheduler, deepspeed_config
from llava_ray.training.step import train_step
from llava_ray.training.trainable import set_trainable
from llava_ray.training.worker import TrainState, rng_state
from llava_ray.utils.compat import skip_deepspeed_cpu_shm_op
from llava_ray.workflows.export import run_export

CPU = torch.device("cpu")
TINY = ModelConfig(preset="tiny")
TINY_TOWER = tower_input(build_vision_config(TINY))
POSITIONS = 16
CHECKPOINT = "checkpoint_2026-01-01_00-00-01.000001"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY)


@pytest.fixture(scope="module")
def rows(tmp_path_factory, tokenizer):
    """Four synthetic stage-2 rows with images, as prepared rows."""
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, samples=8, seed=0)
    out = []
    for sample in json.loads((root / "stage2.json").read_text()):
        if "image" not in sample:
            continue
        tokens = tokenize_conversation(sample["conversations"], "vicuna_v1", tokenizer, POSITIONS)
        with Image.open(root / sample["image"]) as image:
            buffer = io.BytesIO()
            image.convert("RGB").resize((64, 64)).save(buffer, format="PNG")
        out.append({"input_ids": tokens.input_ids, "labels": tokens.labels, "images": [buffer.getvalue()]})
    return out[:4]


def trained_run(trainable: str, zero_stage: int, tokenizer, rows, storage: Path):
    """A run folder holding one checkpoint of a real ZeRO engine after one step; returns the engine."""
    import deepspeed

    skip_deepspeed_cpu_shm_op(deepspeed)
    config = load_config(
        None,
        [
            "model.preset=tiny",
            "train.stage=finetune",
            f"train.trainable={trainable}",
            "train.global_batch_size=4",
            "train.micro_batch_size=4",
            "train.learning_rate=1e-2",
            "train.warmup_ratio=0",
            "train.lr_schedule=constant",
            "train.lora.r=4",
            "train.lora.dropout=0",
            f"deepspeed.zero_stage={zero_stage}",
            "scaling.num_workers=1",
        ],
    )
    model = build_llava_model(config.model, tokenizer, seed=0)
    model.template = config.data.template
    set_trainable(model, config.train.trainable, config.train.freeze_vision_tower, config.train.lora)
    optimizer = build_optimizer(model, config)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=build_scheduler(optimizer, config, total_steps=10),
        config=deepspeed_config(config, 1, False),
        dist_init_required=False,
    )
    batch = collate_rows(rows, tokenizer.pad_token_id, TINY_TOWER)
    train_step(engine, [batch], int(batch["num_supervised"]), 1, CPU)
    directory = storage / "run" / CHECKPOINT
    directory.mkdir(parents=True)
    write_checkpoint_files(
        engine,
        directory,
        0,
        1,
        asdict(TrainState(step=1)),
        rng_state(),
        run_config=config.model_dump(mode="json"),
        model=model,
        tokenizer=tokenizer,
        metrics={"step": 1},
    )
    return engine


def reference_logits(engine, batch) -> torch.Tensor:
    """The engine's own model at the checkpoint (ZeRO-3 gathers its shards in forward)."""
    engine.module.eval()
    with torch.no_grad():
        return engine.module(
            batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]
        ).logits


@pytest.fixture(scope="module")
def lora_run(process_group, tokenizer, rows, tmp_path_factory):
    storage = tmp_path_factory.mktemp("lora-runs")
    engine = trained_run("lora", 3, tokenizer, rows, storage)
    batch = collate_rows(rows, tokenizer.pad_token_id, TINY_TOWER)
    return storage / "run", batch, reference_logits(engine, batch)


@pytest.fixture(scope="module")
def full_run(process_group, tokenizer, rows, tmp_path_factory):
    storage = tmp_path_factory.mktemp("full-runs")
    engine = trained_run("full", 2, tokenizer, rows, storage)
    batch = collate_rows(rows, tokenizer.pad_token_id, TINY_TOWER)
    return storage / "run", batch, reference_logits(engine, batch)


def hf_logits(hf_dir: Path, batch) -> torch.Tensor:
    model = LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
        ).logits


def assert_same_logits(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> None:
    valid = mask.bool()
    assert (a[valid] - b[valid]).abs().max() < 1e-4
    assert a.abs().max() > 0.1


def test_a_lora_run_exports_merged_for_stock_transformers(lora_run, tmp_path):
    run_dir, batch, expected = lora_run
    summary = run_export(str(run_dir), str(tmp_path / "out"), lora="merge")
    assert summary.checkpoint == f"{run_dir}/{CHECKPOINT}" and summary.step == 1 and summary.lora == "merged"
    assert_same_logits(hf_logits(tmp_path / "out" / "hf", batch), expected, batch["attention_mask"])
    assert not (tmp_path / "out" / "adapter").exists()


def test_a_lora_run_exports_the_adapter_in_peft_format(lora_run, tmp_path):
    run_dir, batch, expected = lora_run
    summary = run_export(str(run_dir / CHECKPOINT), str(tmp_path / "out"), lora="adapter")
    adapter = tmp_path / "out" / "adapter"
    assert summary.adapter_dir == str(adapter) and summary.lora == "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    base = LlavaModel.from_pretrained(tmp_path / "out")
    without_adapter = hf_logits(tmp_path / "out" / "hf", batch)  # the base alone, in stock transformers
    assert (without_adapter - expected)[batch["attention_mask"].bool()].abs().max() > 1e-3
    base.language_model = PeftModel.from_pretrained(base.language_model, adapter)
    with torch.no_grad():
        ours = base.eval()(
            batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]
        ).logits
    assert_same_logits(ours, expected, batch["attention_mask"])


def test_a_full_run_exports_and_refuses_an_adapter(full_run, tmp_path):
    run_dir, batch, expected = full_run
    summary = run_export(str(run_dir), str(tmp_path / "out"))
    assert summary.lora == "none" and summary.hf_dir == str(tmp_path / "out" / "hf")
    assert_same_logits(hf_logits(tmp_path / "out" / "hf", batch), expected, batch["attention_mask"])
    assert_same_logits(
        LlavaModel.from_pretrained(tmp_path / "out")
        .eval()(
            batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]
        )
        .logits.detach(),
        expected,
        batch["attention_mask"],
    )
    with pytest.raises(ValueError, match=r"--lora adapter, but .* train.trainable='full': it has no LoRA"):
        run_export(str(run_dir), str(tmp_path / "other"), lora="adapter")
    with pytest.raises(ValueError, match=r"exists and is not empty; choose a new folder"):
        run_export(str(run_dir), str(tmp_path / "out"))


def test_a_corrupt_checkpoint_is_refused_and_a_run_has_none_left(full_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(full_run[0], run_dir)
    target = run_dir / CHECKPOINT / "state" / "mp_rank_00_model_states.pt"
    target.write_bytes(target.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"is not an intact checkpoint: .*truncated"):
        run_export(str(run_dir / CHECKPOINT), str(tmp_path / "out"))
    with pytest.raises(CheckpointError, match=r"holds no intact checkpoint .*truncated"):
        run_export(str(run_dir), str(tmp_path / "out"))
