"""A trained model ready to answer: loading it with its template, and images as the vision tower sees them.

Shared by the evaluation runner (one :class:`InferenceModel` per Ray actor) and the chat.

- :func:`load_inference_model` reads a llava-ray model folder (``llava_ray_config.json``) or a
  Hugging Face LLaVA folder, local or ``s3://``, with the tokenizer saved beside it, and picks
  the conversation template the model was trained with (:func:`resolve_template`): the one
  llava-ray stored with the model, else the one a Hugging Face export's chat template renders,
  else the tokenizer's own chat template.
- :func:`load_pixels` turns an image file into a ``(3, S, S)`` tensor exactly as ``prepare``
  does for training (decode, RGB, pad to a square in the tower's mean colour, bicubic resize, the
  tower's normalisation: :class:`~llava_ray.config.model_sources.TowerInput`), raising :class:`~llava_ray.utils.skips.Skipped` with a counted reason
  (``image_missing``, ``corrupt_image``, ...) when it cannot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import torch
from transformers import PreTrainedTokenizerBase

from llava_ray.config.model_sources import TowerInput, tower_input
from llava_ray.conversation.chat_template import chat_template_for
from llava_ray.conversation.templates import TEMPLATES
from llava_ray.conversation.tokenizer import load_tokenizer_dir
from llava_ray.data.images import (
    Aspect,
    ImageSettings,
    normalize_image,
    open_image,
    transform_image,
)
from llava_ray.model.build import load_init_from
from llava_ray.model.export import is_hf_llava_dir
from llava_ray.model.generate import prompt_input_ids
from llava_ray.model.llava import LlavaModel
from llava_ray.model.weights import CONFIG_FILE
from llava_ray.utils.skips import Skipped
from llava_ray.utils.storage import local_copy


@dataclass
class InferenceModel:
    """A model in eval mode with its tokenizer and the template its prompts are rendered with."""

    model: LlavaModel
    tokenizer: PreTrainedTokenizerBase
    template: str
    source: str

    @property
    def tower_input(self) -> TowerInput:
        """The images the vision tower takes: side, mean and std, as the model was trained with."""
        return tower_input(self.model.vision_tower.config)

    @property
    def max_positions(self) -> int | None:
        """The LM's context length, image positions included (None when the config has none)."""
        return getattr(self.model.language_model.config, "max_position_embeddings", None)

    def prompt_length(self, conversation: Sequence[dict[str, Any]]) -> int:
        """Sequence positions of a generation prompt, each ``<image>`` expanded."""
        model = self.model
        ids = prompt_input_ids(
            conversation, self.template, self.tokenizer, model.image_positions, model.tokenization
        )
        return len(ids)


def load_inference_model(source: str, template: str | None = None, device: str = "cpu") -> InferenceModel:
    """The model at ``source`` (see the module docstring) on ``device``, in eval mode.

    On a GPU the weights are cast to bfloat16 (LLaVA-1.5 trains and evaluates in bf16).
    """
    path = Path(local_copy(source))
    problem = model_dir_problem(path, source)
    if problem:
        raise ValueError(problem)
    model = load_init_from(str(path))
    if not (path / "tokenizer_config.json").is_file():
        raise ValueError(
            f"{source} holds no tokenizer (tokenizer_config.json); save the model with its tokenizer "
            "(LlavaModel.save_pretrained(dir, tokenizer) or export_hf)"
        )
    tokenizer = load_tokenizer_dir(path, source=source)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = model.to(device=device, dtype=dtype).eval()
    return InferenceModel(model, tokenizer, resolve_template(model, tokenizer, template, source), source)


def model_dir_problem(path: Path, source: str) -> str | None:
    """Why the local folder ``path`` (from ``source``) is no model this module can load, or None."""
    if (path / CONFIG_FILE).is_file() or is_hf_llava_dir(path):
        return None
    found = sorted(p.name for p in path.iterdir())[:10] if path.is_dir() else "nothing (no such folder)"
    return (
        f"{source!r} is neither a llava-ray model folder (with {CONFIG_FILE}) nor a Hugging Face LLaVA folder "
        f"(config.json with model_type 'llava'); found {found}. Point it at a training run's final/ (or "
        "final/hf/) folder"
    )


def resolve_template(
    model: LlavaModel, tokenizer: PreTrainedTokenizerBase, override: str | None, source: str
) -> str:
    """The template to render prompts with (see the module docstring); ``override`` wins."""
    if override is not None:
        return override
    if model.template is not None:
        return model.template
    # A Hugging Face export carries the training template as a chat template: recognise it exactly.
    for name in TEMPLATES:
        if tokenizer.chat_template and tokenizer.chat_template == chat_template_for(name, tokenizer):
            return name
    if tokenizer.chat_template:
        return "tokenizer"
    raise ValueError(
        f"{source} records no conversation template and its tokenizer has no chat template; "
        "set evaluate.template (e.g. vicuna_v1) to the template the model was trained with"
    )


def read_image(location: str) -> bytes:
    """The bytes of an image file, local or remote; a missing file is the ``image_missing`` skip."""
    try:
        with fsspec.open(location, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise Skipped("image_missing", f"no image file at {location}") from None


def load_pixels(location: str, tower: TowerInput, aspect: Aspect = "pad") -> torch.Tensor:
    """The normalised ``(3, S, S)`` input of an image file, as ``prepare`` and ``collate`` make it for training."""
    return pixels_from_bytes(read_image(location), tower, aspect)


def pixels_from_bytes(
    data: bytes, tower: TowerInput, aspect: Aspect = "pad", max_pixels: int | None = None
) -> torch.Tensor:
    """:func:`load_pixels` of an image's bytes; raises :class:`Skipped` (``corrupt_image``, ``image_too_large``, ...)."""
    settings = ImageSettings(tower=tower, aspect=aspect, format="png")
    image = transform_image(open_image(data, max_pixels or settings.max_pixels), settings)
    return torch.from_numpy(normalize_image(image, tower))
