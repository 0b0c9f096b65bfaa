"""Hugging Face LLaVA format: export to ``LlavaForConditionalGeneration`` and load from it.

The ecosystem (transformers, vLLM, SGLang) serves LLaVA as ``LlavaForConditionalGeneration``:
vision tower, a 2-layer GELU projector (``multi_modal_projector.linear_1/linear_2``) and a causal
LM, with ``<image>`` expanded by a ``LlavaProcessor`` into one token per image position.
:func:`export_hf` writes such a folder (weights, config, tokenizer, image processor, processor and
a chat template that renders the training template exactly); :func:`load_hf_llava` reads one back
as a :class:`LlavaModel` (``model.init_from`` uses it, e.g. for ``llava-hf/llava-1.5-7b-hf``).

The weights are written under the published llava-hf names (:func:`published_state_dict`:
``language_model.model.*``, ``language_model.lm_head.*``, ``vision_tower.vision_model.*``,
``multi_modal_projector.*``), the layout of ``llava-hf/llava-1.5-7b-hf`` that transformers 4.x,
transformers 5 (through its checkpoint conversion mapping) and serving engines all read; transformers 5
would otherwise save its flattened vision tower (``vision_tower.embeddings.*``), which 4.x cannot load.
The image processor carries the tower's own size, mean and std
(:class:`~llava_ray.config.model_sources.TowerInput`), so it pads and normalises as training did.
``config.json`` records ``llava_ray_tokenization`` (``data.tokenization``); a folder without it,
such as llava-hf's conversions of the official weights, loads as ``llava``, the reference's own
tokenization, which those weights were trained with.

Loading moves whole submodules from transformers' model into ours, so its own checkpoint
conversions (older key layouts, sharding) apply unchanged.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionConfig,
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from llava_ray.config.model_sources import read_image_processor_config, tower_input, with_image_processing
from llava_ray.conversation.chat_template import chat_template_for
from llava_ray.conversation.tokenizer import IMAGE_TOKEN
from llava_ray.model.generate import end_markers
from llava_ray.model.llava import LlavaModel
from llava_ray.utils.compat import llava_image_processor_class
from llava_ray.utils.storage import local_copy

HF_PROJECTOR = "mlp2x_gelu"
TOKENIZATION_KEY = "llava_ray_tokenization"  # config.json: how the training text became ids
SELECT_STRATEGY = {"patch": "default", "cls_patch": "full"}  # llava-ray name -> Hugging Face name


def export_hf(
    source: str | Path | LlavaModel,
    out_dir: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    template: str | None = None,
) -> Path:
    """Write a Hugging Face ``LlavaForConditionalGeneration`` folder of a model or a llava-ray folder.

    A folder brings its own tokenizer and template; a model needs ``tokenizer`` (and ``template``
    unless it records one). LoRA adapters must be merged first (``merge_lora``).
    """
    if isinstance(source, LlavaModel):
        model = source
    else:
        model_dir = local_copy(str(source))
        model = LlavaModel.from_pretrained(model_dir)
        tokenizer = tokenizer or _load_tokenizer(model_dir)
    template = template or model.template
    if tokenizer is None:
        raise ValueError(
            "export_hf(model, ...) needs the tokenizer the model was trained with: pass tokenizer="
        )
    check_exportable(model)
    out_dir = Path(out_dir)
    hf_model = to_hf_model(model)
    hf_model.generation_config = hf_generation_config(tokenizer, template)
    published = published_state_dict(model)
    # save_original_format=False: the names are already the published ones; transformers' reverse
    # conversion would rename them again (language_model.model.model.*).
    names = set(published)  # before saving: save_pretrained edits the dict it is given
    hf_model.save_pretrained(out_dir, state_dict=published, save_original_format=False)
    check_saved_keys(out_dir, names)
    processor = build_processor(model, tokenizer, template)
    processor.save_pretrained(out_dir)
    # transformers 5 nests the image processor in processor_config.json; 4.x and serving engines read
    # preprocessor_config.json (5 reads it too when the nested one is absent: the same settings).
    processor.image_processor.save_pretrained(out_dir)
    return out_dir


def check_exportable(model: LlavaModel) -> None:
    """Raise unless Hugging Face's LLaVA class can hold this model."""
    if model.projector_name != HF_PROJECTOR:
        raise ValueError(
            f"cannot export projector {model.projector_name!r}: Hugging Face's LlavaForConditionalGeneration holds "
            f"only the 2-layer GELU MLP ({HF_PROJECTOR}). Keep this model in llava-ray's own format "
            "(LlavaModel.save_pretrained / LlavaModel.from_pretrained), or train with model.projector=mlp2x_gelu"
        )
    if model.has_lora:
        raise ValueError("the language model carries LoRA adapters; call merge_lora(model) before exporting")


def hf_config(model: LlavaModel) -> LlavaConfig:
    """The ``LlavaConfig`` equivalent of a llava-ray model."""
    text_config = model.language_model.config
    return LlavaConfig(
        vision_config=model.vision_tower.config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_index=model.image_token_id,
        image_seq_length=model.image_positions,
        projector_hidden_act="gelu",
        vision_feature_layer=model.vision_select_layer,
        vision_feature_select_strategy=hf_select_strategy(model),
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
        # How the training text became ids (data.tokenization); transformers keeps unknown keys.
        **{TOKENIZATION_KEY: model.tokenization},
    )


def hf_select_strategy(model: LlavaModel) -> str:
    """Hugging Face's 'default' drops the first token, so a tower without CLS (SigLIP) must use 'full'."""
    return "default" if model.drops_cls else "full"


def to_hf_model(model: LlavaModel) -> LlavaForConditionalGeneration:
    """A ``LlavaForConditionalGeneration`` sharing this model's modules (no weights are copied).

    The shell is built on the meta device, then every module that holds weights is replaced by ours.
    """
    with torch.device("meta"):
        hf_model = LlavaForConditionalGeneration(hf_config(model))
    language_model = model.language_model
    hf_model.model.vision_tower = model.vision_tower
    hf_model.model.language_model = getattr(language_model, language_model.base_model_prefix)
    hf_model.lm_head = language_model.get_output_embeddings()
    hf_model.model.multi_modal_projector.linear_1 = model.projector[0]
    hf_model.model.multi_modal_projector.linear_2 = model.projector[2]
    _check_no_meta(hf_model, "the exported LlavaForConditionalGeneration")
    return hf_model


def published_state_dict(model: LlavaModel) -> dict[str, torch.Tensor]:
    """The model's weights under the published llava-hf names (``llava-hf/llava-1.5-7b-hf``'s layout).

    transformers 5 keeps a CLIP or SigLIP tower's weights without the ``vision_model.`` level
    (``embeddings.*``); the published layout, and transformers 4.x, have it. A tied LM head is
    left out, as transformers saves it.
    """
    state: dict[str, torch.Tensor] = {}
    for key, tensor in model.vision_tower.state_dict().items():
        inner = key if key.startswith("vision_model.") else f"vision_model.{key}"
        state[f"vision_tower.{inner}"] = tensor
    for index, name in ((0, "linear_1"), (2, "linear_2")):
        for key, tensor in model.projector[index].state_dict().items():
            state[f"multi_modal_projector.{name}.{key}"] = tensor
    language_model = model.language_model
    head = language_model.get_output_embeddings()
    tied = head is not None and head.weight is language_model.get_input_embeddings().weight
    head_prefix = (
        next(name for name, module in language_model.named_modules() if module is head) if tied else None
    )
    for key, tensor in language_model.state_dict().items():
        if head_prefix is not None and key == f"{head_prefix}.weight":
            continue
        state[f"language_model.{key}"] = tensor
    return state


def check_saved_keys(out_dir: Path, expected: set[str]) -> None:
    """Raise unless the folder's weight files hold exactly ``expected`` (transformers renames on save)."""
    files = sorted(out_dir.glob("model*.safetensors"))
    saved: set[str] = set()
    for file in files:
        with safe_open(str(file), "pt") as handle:
            saved.update(handle.keys())
    if saved != expected:
        raise RuntimeError(
            f"the exported weights in {out_dir} are not in the published llava-hf layout: "
            f"unexpected {sorted(saved - expected)[:5]}, missing {sorted(expected - saved)[:5]}; this transformers "
            "version renamed them on save (report it with `pip show transformers`)"
        )


def hf_generation_config(tokenizer: PreTrainedTokenizerBase, template: str | None) -> GenerationConfig:
    """Greedy defaults that stop at EOS and at the template's end marker when it is one token."""
    stop_ids = [tokenizer.eos_token_id]
    if template is not None:
        for marker in end_markers(template, tokenizer):
            ids = tokenizer.encode(marker, add_special_tokens=False)
            if len(ids) == 1 and ids[0] not in stop_ids:
                stop_ids.append(ids[0])
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop_ids if len(stop_ids) > 1 else stop_ids[0],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )


def build_processor(
    model: LlavaModel, tokenizer: PreTrainedTokenizerBase, template: str | None
) -> LlavaProcessor:
    """A ``LlavaProcessor`` that expands ``<image>`` to the model's image positions, with the chat template.

    Its image processor is the tower's (size, mean, std) and pads to a square in the mean colour
    before resizing, as ``prepare`` does by default (LLaVA-1.5's ``expand2square``).
    """
    vision_config = model.vision_tower.config
    tower = tower_input(vision_config)
    image_processor = llava_image_processor_class()(
        do_pad=True,
        size={"shortest_edge": tower.size},
        crop_size={"height": tower.size, "width": tower.size},
        image_mean=list(tower.mean),
        image_std=list(tower.std),
        do_convert_rgb=True,
    )
    tokenizer = copy.deepcopy(tokenizer)  # the chat template is set on the copy, not the caller's tokenizer
    chat_template = chat_template_for(template, tokenizer) if template else tokenizer.chat_template
    tokenizer.chat_template = chat_template
    has_cls = isinstance(vision_config, CLIPVisionConfig)
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=hf_select_strategy(model),
        num_additional_image_tokens=1 if has_cls else 0,
        chat_template=chat_template,
        image_token=IMAGE_TOKEN,
    )


# ---- loading -------------------------------------------------------------------------------------


def is_hf_llava_dir(path: str | Path) -> bool:
    """True for a folder whose ``config.json`` has ``model_type`` 'llava'."""
    config = Path(path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "llava"


def load_hf_llava(path: str | Path) -> LlavaModel:
    """A Hugging Face LLaVA folder (e.g. ``llava-hf/llava-1.5-7b-hf``) as a :class:`LlavaModel`.

    transformers reads the weights (safetensors, or ``.bin`` with ``weights_only``) and applies its
    key conversions; every missing, unexpected or misshapen key is an error, never a random init.
    The folder's image processor (``preprocessor_config.json``) gives the tower's mean and std.
    """
    path = Path(local_copy(str(path)))
    if not is_hf_llava_dir(path):
        raise ValueError(f"{path} is not a Hugging Face LLaVA folder (config.json with model_type 'llava')")
    hf_model, info = LlavaForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    _check_loading_info(info, path)
    config = hf_model.config
    _check_convertible(config, path)
    language_model = _causal_lm_from(hf_model)
    vision_tower = hf_model.model.vision_tower
    vision_tower.config = with_image_processing(
        vision_tower.config, read_image_processor_config(str(path)), where=str(path)
    )
    model = LlavaModel(
        vision_tower=vision_tower,
        language_model=language_model,
        projector=HF_PROJECTOR,
        image_token_id=config.image_token_id,
        vision_select_layer=config.vision_feature_layer,
        vision_select_feature=_select_feature(config),
        # A folder that does not say (llava-hf's conversions of the official weights) was trained by the
        # reference, whose tokenizer_image_token is data.tokenization 'llava'.
        tokenization=getattr(config, TOKENIZATION_KEY, "llava"),
    )
    hf_projector = hf_model.model.multi_modal_projector
    model.projector[0] = hf_projector.linear_1
    model.projector[2] = hf_projector.linear_2
    return model


def _select_feature(config: LlavaConfig) -> str:
    """'full' keeps CLIP's CLS ('cls_patch'); a tower without CLS (SigLIP) has only patches either way."""
    keeps_cls = config.vision_feature_select_strategy == "full" and isinstance(
        config.vision_config, CLIPVisionConfig
    )
    return "cls_patch" if keeps_cls else "patch"


def _causal_lm_from(hf_model: LlavaForConditionalGeneration) -> PreTrainedModel:
    """The LLaVA's text model and head as a causal LM of the text config's own class (no copies)."""
    with torch.device("meta"):
        language_model = AutoModelForCausalLM.from_config(hf_model.config.text_config)
    setattr(language_model, language_model.base_model_prefix, hf_model.model.language_model)
    language_model.set_output_embeddings(hf_model.lm_head)
    _check_no_meta(language_model, "the language model taken from the Hugging Face LLaVA")
    return language_model


def _check_loading_info(info: dict[str, list], path: Path) -> None:
    problems = [
        f"{label} ({len(keys)}): {', '.join(map(str, list(keys)[:8]))}"
        for label, keys in (
            ("missing keys", info.get("missing_keys", [])),
            ("unexpected keys", info.get("unexpected_keys", [])),
            ("shape mismatches", info.get("mismatched_keys", [])),
        )
        if keys
    ]
    if problems:
        raise ValueError(f"cannot load the Hugging Face LLaVA at {path}: " + "; ".join(problems))


def _check_convertible(config: LlavaConfig, path: Path) -> None:
    """llava-ray's model reads one feature layer through a bias-carrying GELU MLP."""
    problems = []
    if not isinstance(config.vision_feature_layer, int):
        problems.append(f"vision_feature_layer={config.vision_feature_layer!r} (llava-ray reads one layer)")
    if config.projector_hidden_act != "gelu":
        problems.append(
            f"projector_hidden_act={config.projector_hidden_act!r} (llava-ray's mlp2x_gelu uses gelu)"
        )
    if not config.multimodal_projector_bias:
        problems.append("multimodal_projector_bias=false (llava-ray's projector has biases)")
    if problems:
        raise ValueError(
            f"the Hugging Face LLaVA at {path} has no llava-ray equivalent: " + "; ".join(problems)
        )


def _check_no_meta(module: nn.Module, what: str) -> None:
    left = [name for name, tensor in [*module.named_parameters(), *module.named_buffers()] if tensor.is_meta]
    if left:
        raise RuntimeError(f"{what} still has placeholder (meta) tensors: {', '.join(left[:8])}")


def _load_tokenizer(model_dir: str) -> PreTrainedTokenizerBase:
    if not (Path(model_dir) / "tokenizer_config.json").is_file():
        raise ValueError(f"{model_dir} holds no tokenizer; pass tokenizer= to export_hf")
    return AutoTokenizer.from_pretrained(model_dir)
