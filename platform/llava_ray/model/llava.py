"""The LLaVA model: a vision tower, a projector and a causal LM joined by splicing image features into text.

Every ``<image>`` in a tokenized conversation is already expanded to ``image_positions`` copies of
the image token id (``conversation.templates.tokenize_conversation``); :class:`LlavaModel` embeds the text with
the LM's own embedding table and overwrites those positions with the projected image features, in
order. Everything here runs on the plain module, before any DeepSpeed wrapping, so weights load
with their real shapes (the reference's ZeRO-3 ``size mismatch ... torch.Size([0])`` cannot occur).

This module holds the module alone (and its own file format's save/load, in
:meth:`LlavaModel.save_pretrained` / :meth:`LlavaModel.from_pretrained`). Its neighbours: :mod:`.build`
(from a config), :mod:`.loss`, :mod:`.weights`, :mod:`.generate`, :mod:`.export` (Hugging Face format),
:mod:`.presets` and :mod:`.projector`; what trains lives in :mod:`llava_ray.training.trainable`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from peft import PeftModel
from safetensors.torch import save_model
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    CLIPVisionConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from llava_ray.config.model_sources import image_positions
from llava_ray.conversation.templates import IGNORE_INDEX
from llava_ray.model.loss import kept_token_loss_sum, supervised_positions, token_loss_sum
from llava_ray.model.projector import build_projector
from llava_ray.model.weights import (
    CONFIG_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    config_from_dict,
    load_weights,
    read_llava_ray_config,
    read_weights,
)
from llava_ray.utils.compat import enable_activation_checkpointing
from llava_ray.utils.storage import local_copy

SELECT_FEATURES = ("patch", "cls_patch")


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
        tokenization: str = "joined",
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
        self.tokenization = tokenization  # and how its text became ids (data.tokenization), recorded too
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
        enable_activation_checkpointing(self.language_model, use_reentrant=False)

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
            "tokenization": self.tokenization,
        }
        (out_dir / CONFIG_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
        return out_dir

    @classmethod
    def from_record(cls, record: dict) -> LlavaModel:
        """The architecture a ``config.json`` record of :meth:`save_pretrained` describes, at random
        (under ``torch.device("meta")``: weightless)."""
        return cls(
            vision_tower=AutoModel.from_config(config_from_dict(record["vision_config"])),
            language_model=AutoModelForCausalLM.from_config(config_from_dict(record["lm_config"])),
            projector=record["projector"],
            image_token_id=record["image_token_id"],
            vision_select_layer=record["vision_select_layer"],
            vision_select_feature=record["vision_select_feature"],
            template=record.get("template"),
            tokenization=record.get("tokenization", "joined"),  # folders saved before it was recorded: joined
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: torch.dtype | None = None) -> LlavaModel:
        """Rebuild a model written by :meth:`save_pretrained` (a local folder or an ``s3://`` URL)."""
        model_dir = Path(local_copy(str(model_dir)))
        model = cls.from_record(read_llava_ray_config(model_dir))
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


# ---- weights -------------------------------------------------------------------------------------


# ---- generation ----------------------------------------------------------------------------------
