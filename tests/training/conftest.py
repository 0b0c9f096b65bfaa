"""Tiny prepared rows for training tests, built in-process from the synthetic data."""

import io
import json

import pytest
from PIL import Image

from llava_ray.config.schema import ModelConfig
from llava_ray.conversation.templates import tokenize_conversation
from llava_ray.conversation.tokenizer import load_tokenizer
from llava_ray.data.synthetic import generate

IMAGE_SIZE = 64
IMAGE_POSITIONS = 16  # the tiny preset: 64 px images in 16 px patches


def encode_image(path, size=IMAGE_SIZE) -> bytes:
    with Image.open(path) as image:
        buffer = io.BytesIO()
        image.convert("RGB").resize((size, size)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    generate(out, samples=48, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return load_tokenizer(ModelConfig(preset="tiny"))


@pytest.fixture(scope="session")
def stage2_rows(synthetic_dir, tiny_tokenizer):
    """Prepared-style rows (input_ids, labels, images) of the synthetic stage-2 data."""
    rows = []
    for sample in json.loads((synthetic_dir / "stage2.json").read_text()):
        tokens = tokenize_conversation(sample["conversations"], "vicuna_v1", tiny_tokenizer, IMAGE_POSITIONS)
        images = [encode_image(synthetic_dir / sample["image"])] if "image" in sample else []
        rows.append(
            {"id": sample["id"], "input_ids": tokens.input_ids, "labels": tokens.labels, "images": images}
        )
    return rows
