"""Fixtures for the evaluation tests: synthetic data and a tiny model overfit on its held-out questions.

The model is built in-process from the tiny preset and trained with plain torch for a few dozen
steps on the synthetic ``eval.json`` items themselves, through the same image preprocessing the
evaluation uses, so that its greedy answers are mostly right and the scoring has something to
count. It is saved in llava-ray's format with the ``vicuna_v1`` template.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llava_ray.config.model_sources import tower_input
from llava_ray.config.schema import ModelConfig
from llava_ray.conversation.templates import IGNORE_INDEX, tokenize_conversation
from llava_ray.conversation.tokenizer import load_tokenizer
from llava_ray.data.synthetic import generate
from llava_ray.evaluation.loaded_model import load_pixels
from llava_ray.model.build import build_llava_model
from llava_ray.training.trainable import set_trainable

TINY = ModelConfig(preset="tiny")
TEMPLATE = "vicuna_v1"
TRAIN_STEPS = 60


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(TINY)


@pytest.fixture(scope="session")
def synthetic_eval_dir(tmp_path_factory) -> Path:
    """``llava-ray synth`` output with 4 held-out images (about 14 eval.json questions)."""
    out = tmp_path_factory.mktemp("synthetic")
    generate(out, samples=4, eval_samples=4, seed=0)
    return out


def _batch(samples, pad_id):
    width = max(sample.length for sample in samples)
    input_ids = torch.full((len(samples), width), pad_id)
    labels = torch.full((len(samples), width), IGNORE_INDEX)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, sample in enumerate(samples):
        input_ids[row, : sample.length] = torch.tensor(sample.input_ids)
        labels[row, : sample.length] = torch.tensor(sample.labels)
        attention_mask[row, : sample.length] = 1
    return input_ids, labels, attention_mask


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory, tokenizer, synthetic_eval_dir) -> Path:
    """A tiny model overfit on the synthetic eval questions, saved with its template and tokenizer."""
    torch.manual_seed(0)
    model = set_trainable(build_llava_model(TINY, tokenizer, seed=0), "full").train()
    items = json.loads((synthetic_eval_dir / "eval.json").read_text())
    positions = model.image_positions
    samples = [tokenize_conversation(item["conversations"], TEMPLATE, tokenizer, positions) for item in items]
    tower = tower_input(model.vision_tower.config)
    pixels = torch.stack([load_pixels(str(synthetic_eval_dir / item["image"]), tower) for item in items])
    input_ids, labels, attention_mask = _batch(samples, tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0
    )
    for _ in range(TRAIN_STEPS):
        loss = model(input_ids, attention_mask=attention_mask, labels=labels, pixel_values=pixels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out = tmp_path_factory.mktemp("model")
    model.eval().save_pretrained(out, tokenizer, template=TEMPLATE)
    return out
