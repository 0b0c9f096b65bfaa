"""The final model of a stage: one consolidated folder (safetensors), plus the Hugging Face export.

Under ZeRO-3 every rank holds a shard of each parameter; all ranks gather them together and rank
0 alone writes. LoRA adapters are merged into the LM weights so the output loads anywhere.
Output: ``{run.storage_path}/{run.name}/final`` (llava-ray format, what ``model.init_from`` of
the next stage takes) and ``.../final/hf`` (a stock ``LlavaForConditionalGeneration``) where the
projector allows.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModel, AutoModelForCausalLM

from llava_ray.config.schema import LlavaRayConfig
from llava_ray.model.export import export_hf
from llava_ray.model.llava import LlavaModel
from llava_ray.training.trainable import merge_lora, set_trainable
from llava_ray.utils.storage import filesystem, join_uri

logger = logging.getLogger(__name__)

FINAL_DIR = "final"
HF_DIR = "hf"
ADAPTER_DIR = "adapter"


def final_model_uri(config: LlavaRayConfig) -> str:
    return join_uri(config.run.storage_path, config.run.name, FINAL_DIR)


def gathered_state_dict(engine: Any, model: LlavaModel, rank: int) -> dict[str, torch.Tensor] | None:
    """The full state dict on rank 0 (None elsewhere); every rank must call this."""
    import deepspeed

    gather = engine.zero_optimization_stage() == 3
    state: dict[str, torch.Tensor] = {}
    names = dict(model.named_parameters())
    for key, value in model.state_dict().items():
        parameter = names.get(key)
        if gather and parameter is not None:
            with deepspeed.zero.GatheredParameters([parameter], modifier_rank=None):
                if rank == 0:
                    state[key] = parameter.detach().cpu().clone()
        elif rank == 0:
            state[key] = value.detach().cpu().clone()
    return state if rank == 0 else None


def empty_copy(model: LlavaModel, config: LlavaRayConfig) -> LlavaModel:
    """A weightless (meta) model with the same architecture, LoRA wrapping included."""
    lm = model.language_model
    lm_config = lm.get_base_model().config if model.has_lora else lm.config
    with torch.device("meta"):
        copy = LlavaModel(
            vision_tower=AutoModel.from_config(model.vision_tower.config),
            language_model=AutoModelForCausalLM.from_config(lm_config),
            projector=model.projector_name,
            image_token_id=model.image_token_id,
            vision_select_layer=model.vision_select_layer,
            vision_select_feature=model.vision_select_feature,
            template=model.template,
            tokenization=model.tokenization,
        )
        if model.has_lora:
            set_trainable(copy, "lora", lora=config.train.lora)
    return copy


def save_final_model(
    engine: Any, model: LlavaModel, tokenizer: Any, config: LlavaRayConfig, rank: int
) -> str | None:
    """Gather, merge LoRA, write the llava-ray folder and the HF export; returns the URI on rank 0."""
    state = gathered_state_dict(engine, model, rank)
    if rank != 0:
        return None
    final = empty_copy(model, config)
    final.load_state_dict(state, assign=True, strict=True)
    merge_lora(final)
    target = final_model_uri(config)
    export_note = write_model_folder(final.float(), tokenizer, config.data.template, target)
    logger.info(f"[train] final model written to {target}{export_note}")
    return target


def write_model_folder(
    model: LlavaModel, tokenizer: Any, template: str | None, target: str, adapter_dir: Path | None = None
) -> str:
    """Write ``target`` (local or remote, replaced if there): the llava-ray folder and, where the projector
    allows, its Hugging Face LLaVA export in ``hf/``; ``adapter_dir`` (a saved PEFT adapter) is copied to
    ``adapter/``. Returns a note on the export for the log."""
    with tempfile.TemporaryDirectory(prefix="llava-ray-final-") as directory:
        local = Path(directory) / FINAL_DIR
        model.save_pretrained(local, tokenizer=tokenizer, template=template)
        export_note = export_if_possible(local, local / HF_DIR)
        if adapter_dir is not None:
            shutil.copytree(adapter_dir, local / ADAPTER_DIR)
        fs, path = filesystem(target)
        if fs.exists(path):
            fs.rm(path, recursive=True)
        fs.put(str(local), path, recursive=True)
    return export_note


def export_if_possible(model_dir: Path, out_dir: Path) -> str:
    """Export to Hugging Face LLaVA when the projector is the 2-layer GELU MLP HF's class holds."""
    try:
        export_hf(model_dir, out_dir)
    except ValueError as error:  # a projector HF's LlavaForConditionalGeneration cannot hold
        return f" (no Hugging Face export: {error})"
    return f" (Hugging Face LLaVA export in {HF_DIR}/)"
