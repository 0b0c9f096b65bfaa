"""Building the model a :class:`ModelConfig` describes: preset parts, ``init_from``, a reference projector.

With ``init_from`` (a llava-ray folder or a Hugging Face LLaVA folder) the architecture is the saved
one and must agree with the config and the tokenizer; ``projector_weights`` loads a reference
stage-1 ``mm_projector.bin``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    PreTrainedTokenizerBase,
)

from llava_ray.config.schema import ModelConfig
from llava_ray.conversation.tokenizer import IMAGE_TOKEN, image_token_id
from llava_ray.model.export import is_hf_llava_dir, load_hf_llava
from llava_ray.model.llava import LlavaModel
from llava_ray.model.presets import build_language_model, build_vision_tower
from llava_ray.model.weights import CONFIG_FILE, load_weights, read_weights
from llava_ray.utils.storage import local_copy


def build_llava_model(
    model_config: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0
) -> LlavaModel:
    """The model a config describes, with ``init_from`` and ``projector_weights`` loaded.

    With ``init_from`` the architecture is the saved one (nothing else downloads); the config's
    projector and feature selection must agree with it.
    """
    if model_config.init_from is not None:
        model = load_init_from(model_config.init_from)
        check_compatible(model, model_config, tokenizer)
    else:
        vision_tower = build_vision_tower(model_config, seed=seed)
        language_model = build_language_model(model_config, tokenizer, seed=seed)
        torch.manual_seed(seed)  # the projector's init depends on the seed alone
        model = LlavaModel(
            vision_tower,
            language_model,
            projector=model_config.projector,
            image_token_id=image_token_id(tokenizer),
            vision_select_layer=model_config.vision_select_layer,
            vision_select_feature=model_config.vision_select_feature,
        )
    if model_config.projector_weights is not None:
        load_projector_weights(model, model_config.projector_weights)
    return model


def load_init_from(source: str) -> LlavaModel:
    """A llava-ray folder (``llava_ray_config.json``) or a Hugging Face LLaVA folder, local or remote."""
    path = Path(local_copy(source))
    if (path / CONFIG_FILE).is_file():
        return LlavaModel.from_pretrained(path)
    if is_hf_llava_dir(path):
        return load_hf_llava(path)
    raise ValueError(
        f"model.init_from={source!r} is neither a llava-ray model folder (with {CONFIG_FILE}) nor a Hugging Face "
        "LLaVA folder (config.json with model_type 'llava'); point it at a saved or exported model"
    )


def check_compatible(
    model: LlavaModel, model_config: ModelConfig, tokenizer: PreTrainedTokenizerBase
) -> None:
    """Raise when the loaded model disagrees with the config or the tokenizer, naming every difference."""
    problems = []
    for key, saved in (
        ("projector", model.projector_name),
        ("vision_select_layer", model.vision_select_layer),
        ("vision_select_feature", model.vision_select_feature),
    ):
        wanted = getattr(model_config, key)
        if wanted != saved:
            problems.append(
                f"model.{key}={wanted!r} but init_from was saved with {saved!r}; set model.{key}={saved!r}"
            )
    token_id = image_token_id(tokenizer)
    if token_id != model.image_token_id:
        problems.append(
            f"the tokenizer's {IMAGE_TOKEN} id is {token_id} but init_from uses {model.image_token_id}; "
            "use the tokenizer saved with init_from (model.tokenizer=<init_from folder>)"
        )
    rows = model.language_model.get_input_embeddings().num_embeddings
    if rows < len(tokenizer):
        problems.append(
            f"the tokenizer has {len(tokenizer)} tokens but init_from's embedding has {rows} rows; "
            "use the tokenizer saved with init_from (model.tokenizer=<init_from folder>)"
        )
    if problems:
        raise ValueError(
            f"model.init_from={model_config.init_from!r} does not fit the config: " + "; ".join(problems)
        )


def load_projector_weights(model: LlavaModel, path: str) -> None:
    """Load a reference stage-1 projector file (``model.mm_projector.0.weight``, ...) into the projector."""
    state = read_weights(local_copy(path))
    marker = "mm_projector."
    projector_state = {key.split(marker, 1)[1]: value for key, value in state.items() if marker in key}
    if not projector_state:
        raise ValueError(
            f"model.projector_weights={path!r} holds no '{marker}*' keys (found: {', '.join(sorted(state)[:8])}); "
            "point it at the reference's stage-1 mm_projector.bin"
        )
    load_weights(model.projector, projector_state, source=f"{path} (projector {model.projector_name})")
