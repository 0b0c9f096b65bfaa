"""Batched generation: left-padded prompts rendered exactly as in training, a KV cache, and stops at
the template's end marker (or EOS), which is cut from the answer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from llava_ray.conversation.templates import get_template, tokenize_prompt
from llava_ray.model.llava import LlavaModel

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


def visible_answer(text: str, markers: Sequence[str], final: bool) -> str:
    """The part of generated ``text`` that can be shown while it streams: before any marker, minus an unsure tail.

    Until ``final``, text that may be the beginning of a marker (``</`` of ``</s>``) or half of a
    multi-byte character (decoded as U+FFFD) is held back until the next token shows what it is.
    """
    ends = [text.find(marker) for marker in markers if marker in text]
    if ends:
        text = text[: min(ends)]
    elif not final:
        hold = max(
            (k for marker in markers for k in range(1, len(marker)) if text.endswith(marker[:k])), default=0
        )
        text = text[: len(text) - hold].rstrip("\ufffd")
    return text.lstrip()


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
    system: str | None = None,
    streamer: BaseStreamer | None = None,
) -> list[str]:
    """Answers to a batch of prompts, each ``(conversation ending with the user's turn, pixels or None)``.

    Pixels are ``(3, H, W)`` or ``(images, 3, H, W)``, one image per ``<image>`` of the conversation.
    Rows are left-padded and decoded together with the LM's KV cache; each stops at the template's
    end marker (or EOS), which is stripped from the answer. ``system`` replaces the template's system
    prompt; ``streamer`` gets the new tokens as HF's ``generate`` makes them (the chat's live answer).
    """
    if not prompts:
        return []
    rows = [
        prompt_input_ids(
            conversation, template_name, tokenizer, model.image_positions, model.tokenization, system=system
        )
        for conversation, _ in prompts
    ]
    markers = end_markers(template_name, tokenizer)
    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        new_tokens = decode(
            model,
            tokenizer,
            rows,
            [pixels for _, pixels in prompts],
            max_new_tokens,
            markers,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_p=top_p if do_sample else None,
            top_k=None,
            streamer=streamer,
        )
    finally:
        model.train(was_training)
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=False)
    return [cut_at_markers(text, markers) for text in texts]


def decode(
    model: LlavaModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[Sequence[int]],
    pixels: Sequence[torch.Tensor | None],
    max_new_tokens: int,
    markers: Sequence[str],
    stopping: Sequence[StoppingCriteria] = (),
    logits_processor: LogitsProcessorList | None = None,
    streamer: BaseStreamer | None = None,
    **sampling: Any,
) -> torch.Tensor:
    """The new tokens of prompt ``rows`` (ids, ``<image>`` expanded) decoded together, one row each.

    Rows are left-padded, their images (``pixels``, one entry per row) embedded, and the LM
    generates with its KV cache until every row has met one of ``markers`` (or a ``stopping``
    criterion) or ``max_new_tokens``. ``sampling`` goes to the ``GenerationConfig`` (do_sample,
    temperature, top_p, top_k). Shared by :func:`generate` and the serving engine.
    """
    device = model.language_model.get_input_embeddings().weight.device
    input_ids, attention_mask = left_pad(rows, tokenizer.pad_token_id, device)
    pixel_values = batch_pixels(pixels, device)
    generation_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
        **sampling,
    )
    embeds = model.embed_inputs(input_ids, pixel_values)
    # From inputs_embeds alone a decoder-only LM returns only the new tokens.
    return model.language_model.generate(
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        generation_config=generation_config,
        logits_processor=logits_processor,
        stopping_criteria=StoppingCriteriaList([StopOnText(tokenizer, markers), *stopping]),
        streamer=streamer,
    )


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
