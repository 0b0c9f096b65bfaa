"""llava-ray's weight files: reading safetensors / ``.bin`` files and folders, and loading them strictly.

A llava-ray model folder holds ``model.safetensors`` and ``llava_ray_config.json`` (:data:`CONFIG_FILE`),
enough to rebuild the model offline (:meth:`llava_ray.model.llava.LlavaModel.from_pretrained`).
Every load names each missing, unexpected and misshapen key at once; nothing is silently random.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AutoConfig,
    PretrainedConfig,
)

CONFIG_FILE = "llava_ray_config.json"


WEIGHTS_FILE = "model.safetensors"


FORMAT_NAME = "llava-ray"


FORMAT_VERSION = 1


def read_llava_ray_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{model_dir} has no {CONFIG_FILE}, so it is not a llava-ray model folder; "
            "save one with LlavaModel.save_pretrained (a Hugging Face LLaVA folder loads with load_hf_llava)"
        )
    record = json.loads(path.read_text())
    if record.get("format") != FORMAT_NAME or record.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path} is format {record.get('format')!r} version {record.get('format_version')!r}; this llava-ray "
            f"reads {FORMAT_NAME!r} up to version {FORMAT_VERSION}: upgrade llava-ray"
        )
    return record


def config_from_dict(values: Mapping[str, Any]) -> PretrainedConfig:
    """A transformers config from its ``to_dict()`` (``model_type`` picks the class)."""
    values = dict(values)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file or folder: safetensors (single or sharded) or a PyTorch ``.bin``.

    ``.bin`` files load with ``weights_only=True``: tensors only, never arbitrary pickled objects.
    """
    path = Path(path)
    if path.is_dir():
        return _read_weights_dir(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights at {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _read_weights_dir(path: Path) -> dict[str, torch.Tensor]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {key: value for shard in shards for key, value in read_weights(path / shard).items()}
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return read_weights(path / name)
    found = sorted(p.name for p in path.iterdir())
    raise FileNotFoundError(
        f"{path} holds no model.safetensors or pytorch_model.bin (or their index); found {found}"
    )


def load_weights(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``module``, raising once with every missing, unexpected and misshapen key.

    Tolerated: a tied weight saved under one of its names, and non-persistent buffers (older
    checkpoints stored ``position_ids`` and ``inv_freq``).
    """
    expected = module.state_dict()
    buffers = {name for name, _ in module.named_buffers()}
    missing = [key for key in expected if key not in state and not _tied_key_present(module, key, state)]
    unexpected = [key for key in state if key not in expected and key not in buffers]
    misshapen = [
        f"{key}: file {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in expected
        if key in state and state[key].shape != expected[key].shape
    ]
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", misshapen),
        )
        if keys
    ]
    if problems:
        raise ValueError(
            f"cannot load {source} into {type(module).__name__}: "
            + "; ".join(problems)
            + ". Check that the file was saved from the same architecture (preset, projector, tokenizer)"
        )
    module.load_state_dict({key: value for key, value in state.items() if key in expected}, strict=False)


def _tied_key_present(module: nn.Module, key: str, state: Mapping[str, torch.Tensor]) -> bool:
    """True when ``key`` shares its tensor with another key that ``state`` holds (tied embeddings)."""
    tensors = module.state_dict(keep_vars=True)
    target = tensors[key]
    return any(other in state and tensor is target for other, tensor in tensors.items() if other != key)
