"""Collate prepared rows into model inputs.

Input: rows as ``prepare`` writes them (``input_ids``, ``labels``: int lists with every image
placeholder already expanded; ``images``: encoded images at the vision tower's size).
Output (``B`` rows, ``T`` the longest row, ``N`` images in the micro-batch, ``S`` the image size):

- ``input_ids``: long [B, T], right-padded with ``pad_id``
- ``attention_mask``: long [B, T], 1 on real tokens
- ``labels``: long [B, T], IGNORE_INDEX on padding, prompts and image positions
- ``pixel_values``: float [N, 3, S, S] normalised with the tower's mean and std (``tower``), images in
  row order
  (absent when no row has an image)
- ``num_tokens``: the real (non-padding) tokens; ``num_supervised``: labels that carry a loss
  after the causal shift
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from llava_ray.config.model_sources import TowerInput
from llava_ray.conversation.templates import IGNORE_INDEX
from llava_ray.data.images import stored_image_array


def image_to_tensor(data: bytes, tower: TowerInput) -> torch.Tensor:
    """An encoded, already resized RGB image as a [3, S, S] float tensor normalised for ``tower``."""
    return torch.from_numpy(stored_image_array(data, tower))


def collate_rows(rows: Sequence[dict[str, Any]], pad_id: int, tower: TowerInput) -> dict[str, torch.Tensor]:
    """Pad a micro-batch of prepared rows (see the module docstring for keys and shapes)."""
    longest = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    images: list[torch.Tensor] = []
    for i, row in enumerate(rows):
        length = len(row["input_ids"])
        input_ids[i, :length] = torch.tensor(np.asarray(row["input_ids"]), dtype=torch.long)
        labels[i, :length] = torch.tensor(np.asarray(row["labels"]), dtype=torch.long)
        attention_mask[i, :length] = 1
        # Ray Data hands a text-only row's images as an empty numpy array, whose truth value is an error.
        row_images = row.get("images")
        images += [image_to_tensor(data, tower) for data in ([] if row_images is None else row_images)]
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "num_tokens": attention_mask.sum(),
        "num_supervised": (labels[:, 1:] != IGNORE_INDEX).sum(),
    }
    if images:
        batch["pixel_values"] = torch.stack(images)
    return batch
