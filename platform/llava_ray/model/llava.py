"""The LLaVA model: a vision tower, a projector and a causal LM joined by splicing image features into text.

Every ``<image>`` in a tokenized conversation is already expanded to ``image_positions`` copies of
the image token id (``templates.tokenize_conversation``); :class:`LlavaModel` embeds the text with
the LM's own embedding table and overwrites those positions with the projected image features, in
order. Everything here runs on the plain module, before any DeepSpeed wrapping, so weights load
with their real shapes (the reference's ZeRO-3 ``size mismatch ... torch.Size([0])`` cannot occur).

- :func:`build_llava_model` builds a model from a :class:`ModelConfig` (preset parts, ``init_from``
  a llava-ray or Hugging Face LLaVA folder, a reference ``mm_projector.bin``).
- :meth:`LlavaModel.save_pretrained` / :meth:`LlavaModel.from_pretrained`: llava-ray's own format,
  rebuilt offline from the folder alone.
- :func:`set_trainable`, :func:`parameter_groups`, :func:`merge_lora`: what trains in each stage.
- :func:`generate`: batched, left-padded generation with a KV cache that stops at the template's
  end marker.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_model
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    CLIPVisionConfig,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from llava_ray.config.schema import LoraConfig, ModelConfig
from llava_ray.model.presets import build_language_model, build_vision_tower, image_positions, image_token_id
from llava_ray.model.projector import build_projector
from llava_ray.model.templates import IGNORE_INDEX, get_template, tokenize_prompt
from llava_ray.model.tokenizer import IMAGE_TOKEN
from llava_ray.utils.storage import local_copy

CONFIG_FILE = "llava_ray_config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_NAME = "llava-ray"
FORMAT_VERSION = 1
SELECT_FEATURES = ("patch", "cls_patch")
TRAINABLE = ("projector", "full", "lora")


@dataclass
class LlavaOutput(CausalLMOutputWithPast):
    """The LM's output plus the supervised-token count, for normalising a loss sum across ranks."""

    num_supervised_tokens: torch.Tensor | None = None


class LlavaModel(nn.Module):
    """Vision tower + projector + causal LM (``vision_tower``, ``projector``, ``language_model``)."""

    def __init__(
        self,
        vision_tower: PreTrainedModel,
        language_model: PreTrainedModel,
        projector: str,
        image_token_id: int,
        vision_select_layer: int = -2,
        vision_select_feature: str = "patch",
        template: str | None = None,
    ):
        super().__init__()
        if vision_select_feature not in SELECT_FEATURES:
            raise ValueError(
                f"vision_select_feature={vision_select_feature!r} is unknown; use one of {', '.join(SELECT_FEATURES)}"
            )
        self.vision_tower = vision_tower
        self.language_model = language_model
        self.projector_name = projector
        self.projector = build_projector(
            projector, vision_tower.config.hidden_size, language_model.config.hidden_size
        )
        self.image_token_id = image_token_id
        self.vision_select_layer = vision_select_layer
        self.vision_select_feature = vision_select_feature
        self.template = template  # the conversation template it was trained with, recorded when saved
        self.image_positions = image_positions(vision_tower.config, vision_select_feature)

    @property
    def drops_cls(self) -> bool:
        """CLIP puts a CLS token first; 'patch' drops it. SigLIP has none, so there is nothing to drop."""
        return (
            isinstance(self.vision_tower.config, CLIPVisionConfig) and self.vision_select_feature == "patch"
        )

    @property
    def has_lora(self) -> bool:
        return isinstance(self.language_model, PeftModel)

    # ---- forward -------------------------------------------------------------------------------

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected features, ``(images, image_positions, lm_width)``, of ``(images, 3, H, W)`` pixels."""
        # A frozen tower keeps no activations: nothing of it needs a gradient.
        tower_trains = any(p.requires_grad for p in self.vision_tower.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and tower_trains):
            outputs = self.vision_tower(pixel_values.to(self.vision_tower.dtype), output_hidden_states=True)
            hidden = outputs.hidden_states[self.vision_select_layer]
        if self.drops_cls:
            hidden = hidden[:, 1:]
        projector_dtype = next(self.projector.parameters(), hidden).dtype
        return self.projector(hidden.to(projector_dtype))

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Text embeddings with every image-token position replaced by image features, in order.

        Images fill placeholder positions row by row, so ``pixel_values`` holds the batch's images in
        the order their ``<image>`` placeholders appear. A batch without images still runs the tower
        and projector on a dummy image and adds zero times their output, so that every parameter
        takes part in the graph on every rank (DeepSpeed ZeRO-3 otherwise waits forever for a
        gradient that one rank never produces).
        """
        embeds = self.language_model.get_input_embeddings()(input_ids)
        placeholders = input_ids == self.image_token_id
        num_images = 0 if pixel_values is None else pixel_values.shape[0]
        check_placeholder_count(
            int(placeholders.sum()), num_images, self.image_positions, self.image_token_id
        )
        if num_images == 0:
            return embeds + self._zero_from_image_path(embeds)
        features = self.image_features(pixel_values).to(embeds.dtype)
        return embeds.masked_scatter(placeholders.unsqueeze(-1), features.reshape(-1, embeds.shape[-1]))

    def _zero_from_image_path(self, embeds: torch.Tensor) -> torch.Tensor:
        """Zero, computed through the tower and projector on a blank image (keeps them in the graph)."""
        config = self.vision_tower.config
        blank = torch.zeros(
            1, config.num_channels, config.image_size, config.image_size, device=embeds.device
        )
        return 0.0 * self.image_features(blank).sum().to(embeds.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        loss_reduction: Literal["mean", "sum"] = "mean",
        return_logits: bool = True,
        **lm_kwargs: Any,
    ) -> LlavaOutput:
        """Logits, and with ``labels`` the shifted causal-LM loss over supervised tokens.

        ``loss_reduction="sum"`` returns the sum of token losses, and ``num_supervised_tokens`` comes
        with every loss, so training can divide by the global count over ranks and accumulation steps.
        Packed rows (several samples per row) pass ``position_ids`` restarting at 0 per sample and no
        ``attention_mask``: each sample then attends only to itself.

        ``return_logits=False`` with ``labels`` (training): the LM head runs only at positions whose
        next label is supervised (see :func:`supervised_positions`; in a padded batch of several rows,
        at the positions supervised in any row) and the fp32 cross-entropy only at the supervised
        ones, so no [tokens, vocab] logits exist; ``logits`` is then None. Same loss and gradients.
        """
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction={loss_reduction!r} is unknown; use 'mean' or 'sum'")
        embeds = self.embed_inputs(input_ids, pixel_values)
        # No KV cache in training: transformers builds per-sample masks for packed rows (position ids
        # restarting at 0, no attention mask) only without one, and a cache is wasted memory here.
        lm_kwargs.setdefault("use_cache", False)
        if labels is not None:
            # The data already ignores image positions; enforce it so no batch can train on them.
            labels = labels.masked_fill(input_ids == self.image_token_id, IGNORE_INDEX)
        keep = None if labels is None or return_logits else supervised_positions(labels)
        if keep is not None:
            # Positions as a 1-D index (every transformers 5 release takes one; a boolean mask only
            # the later ones): the LM returns logits [rows, columns, vocab] at those columns.
            columns = keep.any(dim=0).nonzero().squeeze(1)
            lm_kwargs["logits_to_keep"] = columns
        outputs = self.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, **lm_kwargs
        )
        loss, count = None, None
        if keep is not None:
            loss, count = kept_token_loss_sum(outputs.logits, labels, keep, columns)
        elif labels is not None:
            loss, count = token_loss_sum(outputs.logits, labels)
        if loss is not None and loss_reduction == "mean":
            loss = loss / count.clamp(min=1)
        return LlavaOutput(
            loss=loss,
            logits=None if keep is not None else outputs.logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            num_supervised_tokens=count,
        )

    def enable_activation_checkpointing(self) -> None:
        """Recompute the LM's activations in backward (non-reentrant: works with frozen embeddings)."""
        kwargs = {"use_reentrant": False}
        enable = getattr(self.language_model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:  # transformers releases before the rename
            self.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    # ---- llava-ray's own format ----------------------------------------------------------------

    def save_pretrained(
        self,
        out_dir: str | Path,
        tokenizer: PreTrainedTokenizerBase | None = None,
        template: str | None = None,
    ) -> Path:
        """Write safetensors weights, a JSON config that rebuilds the model offline, and the tokenizer."""
        if self.has_lora:
            raise ValueError(
                "the language model carries LoRA adapters; call merge_lora(model) before saving it"
            )
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_model(self, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
        record = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "vision_config": self.vision_tower.config.to_dict(),
            "lm_config": self.language_model.config.to_dict(),
            "projector": self.projector_name,
            "vision_select_layer": self.vision_select_layer,
            "vision_select_feature": self.vision_select_feature,
            "image_token_id": self.image_token_id,
            "image_positions": self.image_positions,
            "template": template or self.template,
        }
        (out_dir / CONFIG_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
        return out_dir

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: torch.dtype | None = None) -> LlavaModel:
        """Rebuild a model written by :meth:`save_pretrained` (a local folder or an ``s3://`` URL)."""
        model_dir = Path(local_copy(str(model_dir)))
        record = read_llava_ray_config(model_dir)
        model = cls(
            vision_tower=AutoModel.from_config(config_from_dict(record["vision_config"])),
            language_model=AutoModelForCausalLM.from_config(config_from_dict(record["lm_config"])),
            projector=record["projector"],
            image_token_id=record["image_token_id"],
            vision_select_layer=record["vision_select_layer"],
            vision_select_feature=record["vision_select_feature"],
            template=record.get("template"),
        )
        load_weights(model, read_weights(model_dir / WEIGHTS_FILE), source=str(model_dir))
        return model if dtype is None else model.to(dtype)


def check_placeholder_count(found: int, num_images: int, positions: int, token_id: int) -> None:
    """Raise unless the batch has exactly ``positions`` image-token positions per image."""
    expected = num_images * positions
    if found != expected:
        raise ValueError(
            f"the batch has {found} image placeholder positions (token id {token_id}) but {num_images} image(s) "
            f"x {positions} positions = {expected}; expand each <image> to {positions} placeholder ids "
            "(tokenize_conversation does) and pass one image in pixel_values per <image>, in order"
        )


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropies over supervised labels, and how many there are.

    Position t predicts label t+1; labels equal to ``IGNORE_INDEX`` count for nothing.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].to(logits.device)
    loss_sum = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss_sum, (shift_labels != IGNORE_INDEX).sum()


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """Bool [B, T]: the positions whose next label carries a loss (position t predicts label t+1).

    In LLaVA's data a minority (answers, not prompts, images or padding): the only positions where
    training needs the LM head at all.
    """
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def kept_token_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor, columns: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_loss_sum` from logits [rows, len(columns), vocab] computed only at ``columns``,
    the positions where any row's ``keep`` is True; rows' other positions there are left out."""
    if logits.shape[:2] != (keep.shape[0], columns.numel()):
        raise ValueError(
            f"the LM returned logits of shape {tuple(logits.shape)} for {columns.numel()} kept positions per row: "
            "it does not take logits_to_keep as positions; call the model with return_logits=True"
        )
    targets = labels[:, 1:][keep[:, :-1]].to(logits.device)
    kept = logits[keep[:, columns].to(logits.device)]
    return F.cross_entropy(kept.float(), targets, reduction="sum"), keep.sum()


# ---- building ------------------------------------------------------------------------------------


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
    # Imported here: export builds on this module, and only this path needs export's HF mapping.
    from llava_ray.model.export import is_hf_llava_dir, load_hf_llava

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


# ---- weights -------------------------------------------------------------------------------------


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


# ---- what trains ---------------------------------------------------------------------------------


def set_trainable(
    model: LlavaModel,
    trainable: Literal["projector", "full", "lora"],
    freeze_vision_tower: bool = True,
    lora: LoraConfig | None = None,
) -> LlavaModel:
    """Mark what trains: the projector always; ``full`` adds the LM, ``lora`` adds LoRA adapters on it.

    ``lora`` wraps the LM with peft adapters (once) and trains only those of its parameters.
    """
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable={trainable!r} is unknown; use one of {', '.join(TRAINABLE)}")
    if trainable != "lora" and model.has_lora:
        raise ValueError(
            f"trainable={trainable!r} but the LM carries LoRA adapters; call merge_lora(model) first"
        )
    model.requires_grad_(False)
    if trainable == "full":
        model.language_model.requires_grad_(True)
    elif trainable == "lora":
        if not model.has_lora:
            model.language_model = get_peft_model(
                model.language_model, peft_lora_config(lora or LoraConfig())
            )
        for name, parameter in model.language_model.named_parameters():
            parameter.requires_grad_("lora_" in name)
    model.projector.requires_grad_(True)
    model.vision_tower.requires_grad_(not freeze_vision_tower)
    return model


def peft_lora_config(lora: LoraConfig) -> PeftLoraConfig:
    """Our LoRA settings as peft's (``all-linear``: every linear layer of the LM but its output head)."""
    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def merge_lora(model: LlavaModel) -> LlavaModel:
    """Fold LoRA adapters into the LM's weights (a plain LM again, ready to save or export); no-op without."""
    if model.has_lora:
        model.language_model = model.language_model.merge_and_unload()
    return model


def parameter_groups(
    model: LlavaModel, lr: float, projector_lr: float | None = None, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Optimizer groups of the trainable parameters: the projector at ``projector_lr``, the rest at ``lr``.

    Biases and norm weights (1-D parameters) take no weight decay. Each group has a ``name``.
    """
    projector_ids = {id(p) for p in model.projector.parameters()}
    groups: dict[str, dict[str, Any]] = {}
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        owner = "projector" if id(parameter) in projector_ids else "model"
        decays = parameter.ndim >= 2 and weight_decay > 0
        group_name = owner if decays else f"{owner}_no_decay"
        group = groups.setdefault(
            group_name,
            {
                "name": group_name,
                "params": [],
                "lr": projector_lr if owner == "projector" and projector_lr is not None else lr,
                "weight_decay": weight_decay if decays else 0.0,
            },
        )
        group["params"].append(parameter)
    if not groups:
        raise ValueError("the model has no trainable parameters; call set_trainable(model, ...) first")
    return list(groups.values())


# ---- generation ----------------------------------------------------------------------------------


# Generation prompts are tokenized by the templates module, the one implementation training uses.
prompt_input_ids = tokenize_prompt


def end_markers(template_name: str, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Texts that end an answer: the template's end marker, and the tokenizer's EOS."""
    markers = [] if template_name == "tokenizer" else [get_template(template_name).end_marker]
    if tokenizer.eos_token and tokenizer.eos_token not in markers:
        markers.append(tokenizer.eos_token)
    return markers


class StopOnText(StoppingCriteria):
    """Stop a row once its generated text contains any marker (markers need not be single tokens).

    Only the last few tokens are decoded: each decodes to at least one character, so a marker of
    n characters lies within the last n + 1 tokens of the step that completes it.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, markers: Sequence[str]):
        self.tokenizer = tokenizer
        self.markers = list(markers)
        self.window = max(len(marker) for marker in self.markers) + 1

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        tails = self.tokenizer.batch_decode(input_ids[:, -self.window :], skip_special_tokens=False)
        done = [any(marker in tail for marker in self.markers) for tail in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def cut_at_markers(text: str, markers: Sequence[str]) -> str:
    """The answer before the first end marker, without surrounding whitespace."""
    end = min((text.find(marker) for marker in markers if marker in text), default=len(text))
    return text[:end].strip()


@torch.inference_mode()
def generate(
    model: LlavaModel,
    tokenizer: PreTrainedTokenizerBase,
    template_name: str,
    prompts: Sequence[tuple[Sequence[dict[str, Any]], torch.Tensor | None]],
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> list[str]:
    """Answers to a batch of prompts, each ``(conversation ending with the user's turn, pixels or None)``.

    Pixels are ``(3, H, W)`` or ``(images, 3, H, W)``, one image per ``<image>`` of the conversation.
    Rows are left-padded and decoded together with the LM's KV cache; each stops at the template's
    end marker (or EOS), which is stripped from the answer.
    """
    if not prompts:
        return []
    rows = [
        prompt_input_ids(conversation, template_name, tokenizer, model.image_positions)
        for conversation, _ in prompts
    ]
    device = model.language_model.get_input_embeddings().weight.device
    input_ids, attention_mask = left_pad(rows, tokenizer.pad_token_id, device)
    pixel_values = batch_pixels([pixels for _, pixels in prompts], device)
    markers = end_markers(template_name, tokenizer)
    generation_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_p=top_p if do_sample else None,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
    )
    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        embeds = model.embed_inputs(input_ids, pixel_values)
        # From inputs_embeds alone a decoder-only LM returns only the new tokens.
        new_tokens = model.language_model.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            generation_config=generation_config,
            stopping_criteria=StoppingCriteriaList([StopOnText(tokenizer, markers)]),
        )
    finally:
        model.train(was_training)
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=False)
    return [cut_at_markers(text, markers) for text in texts]


def left_pad(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows right-aligned (padding on the left, where generation does not continue) and their mask."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[index, width - len(row) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def batch_pixels(pixels: Sequence[torch.Tensor | None], device: torch.device) -> torch.Tensor | None:
    """The prompts' images stacked in prompt order, or None when no prompt has one."""
    images = [p if p.ndim == 4 else p.unsqueeze(0) for p in pixels if p is not None]
    return torch.cat(images).to(device) if images else None
