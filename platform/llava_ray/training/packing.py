"""Pack several prepared samples into each row of a micro-batch, each attending only to itself.

Padded micro-batches (``collate_rows``) waste every position between a row's end and the longest
row; LLaVA-1.5's mix (short VQA answers next to long conversations) pads a lot even when grouped
by length. :func:`pack_rows` instead places whole samples into rows of at most ``token_budget``
tokens, first-fit decreasing, never splitting a sample (one longer than the budget gets a row of
its own). Training (``train.packing``) packs each scheduled micro-batch into one row with
:func:`pack_micro_batch` and runs the LM with :func:`use_segment_attention`.

Output: the keys of ``collate_rows`` but ``attention_mask`` (``input_ids``, ``labels``,
``pixel_values``, ``num_tokens``, ``num_supervised``), plus:

- ``position_ids``: long [R, T], restarting at 0 at every sample (and at the row's padding)
- ``num_samples``: samples in the micro-batch (``input_ids`` has fewer rows than samples)

Per-sample attention, two exact ways, both checked against running each sample alone:

- transformers' SDPA: no attention mask. transformers 5 then derives a block-diagonal causal mask
  from position ids that restart at 0, but only when no attention mask is passed AND there is no
  KV cache (``use_cache=False``, which ``LlavaModel.forward`` defaults to). With a cache, packed
  rows silently attend across samples.
- :func:`use_segment_attention` on the LM (what training uses): SDPA runs causally on each sample
  alone, so attention costs sum(L^2) / 2 instead of T^2 per row and no mask exists.

With ``train.attention=varlen`` (``use_segment_attention(lm, "varlen")``), on CUDA in half
precision (torch >= 2.10), the segments go to torch's variable-length FlashAttention kernel in one
call (:func:`varlen_segments`) instead of one SDPA call each; elsewhere it falls back to them. Its
layout is tested on the CPU against a reference of the kernel's contract; the kernel itself has not
yet run on a GPU, so ``segments`` is the default until the GPU benchmark has run with it.

Why segments rather than transformers' mask from position ids: that mask runs SDPA densely over
T x T, which costs more than the padding it saves (measured: ``benchmarks/README.md``,
``python benchmarks/run.py train``). Batches with an attention mask or a KV cache (padded batches,
generation) go through transformers' own SDPA path unchanged, so switching it on is safe for every
other use.

Loss: position t predicts label t+1, so the first token of a packed sample would be trained from
the previous sample's last token. In an unpacked row that label is never used (it has no
predecessor), so every sample's first label is set to IGNORE_INDEX: the summed loss, the
supervised count and the gradients equal those of the padded batch.

Images: ``pixel_values`` holds the images in packed order (row by row, sample by sample), the
order in which the model meets their placeholders, so its splice stays aligned.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from llava_ray.config.model_sources import TowerInput
from llava_ray.conversation.templates import IGNORE_INDEX
from llava_ray.training.collate import collate_rows
from llava_ray.utils.compat import VARLEN_PARAMETERS, varlen_attn


def first_fit_decreasing(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Sample indices per packed row: longest first, each into the first row it still fits.

    A sample longer than ``token_budget`` gets a row of its own (it is never split or dropped).
    """
    if token_budget <= 0:
        raise ValueError(f"token_budget={token_budget} must be positive")
    rows: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: ties keep their order
        length = lengths[index]
        slot = next((r for r, space in enumerate(free) if space >= length), None)
        if slot is None:
            rows.append([index])
            free.append(max(token_budget - length, 0))
        else:
            rows[slot].append(index)
            free[slot] -= length
    return rows


def pack_rows(
    rows: Sequence[dict[str, Any]], token_budget: int, pad_id: int, tower: TowerInput
) -> dict[str, torch.Tensor]:
    """Pack a micro-batch of prepared rows (see the module docstring for keys and shapes)."""
    lengths = [len(row["input_ids"]) for row in rows]
    bins = first_fit_decreasing(lengths, token_budget)
    packed = [_concatenate([rows[i] for i in members]) for members in bins]
    batch = collate_rows(packed, pad_id, tower)  # padding, images and counts as unpacked
    width = batch["input_ids"].shape[1]
    batch["position_ids"] = torch.stack(
        [_positions([lengths[i] for i in members], width) for members in bins]
    )
    del batch["attention_mask"]  # the per-sample structure lives in position_ids
    batch["num_samples"] = torch.tensor(len(rows))
    return batch


def pack_micro_batch(
    rows: Sequence[dict[str, Any]], pad_id: int, tower: TowerInput
) -> dict[str, torch.Tensor]:
    """A training micro-batch's rows as one packed row: the same samples, no padding at all.

    What ``train.packing`` does to each scheduled micro-batch. With segment attention
    (:func:`use_segment_attention`) a row's attention costs sum(L^2) however many samples it holds,
    and the row has no more positions than the padded micro-batch, so one row is the cheapest
    layout; nothing else changes (samples per step, the loss normalisation, accumulation).
    """
    return pack_rows(rows, sum(len(row["input_ids"]) for row in rows), pad_id, tower)


def _concatenate(members: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One packed row; each sample's first label is ignored (it would be predicted across samples)."""
    input_ids: list[int] = []
    labels: list[int] = []
    images: list[bytes] = []
    for row in members:
        input_ids += np.asarray(row["input_ids"]).tolist()
        sample_labels = np.asarray(row["labels"]).tolist()
        labels += [IGNORE_INDEX, *sample_labels[1:]]
        # Ray Data hands an empty image list over as an empty numpy array: no truth value.
        images += [] if row.get("images") is None else list(row["images"])
    return {"input_ids": input_ids, "labels": labels, "images": images}


def _positions(lengths: Sequence[int], width: int) -> torch.Tensor:
    """0..n-1 per sample, then 0.. over the padding: padding is a segment of its own, so no real
    token ever attends to it and no padding query has an empty row (SDPA would return NaN)."""
    pieces = [torch.arange(n) for n in lengths]
    if width > sum(lengths):
        pieces.append(torch.arange(width - sum(lengths)))
    return torch.cat(pieces)


def segment_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """Bool [R, T]: where a segment starts, i.e. where positions do not continue by one (as
    transformers' ``find_packed_sequence_indices`` reads them)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


# ---- attention that skips the masked blocks -----------------------------------------------------

SegmentKernel = Literal["segments", "varlen"]  # train.attention: how the segments' attention runs
# The names under which transformers' AttentionInterface holds the two kernels.
ATTENTION_NAMES: dict[str, str] = {"segments": "llava_ray_segments", "varlen": "llava_ray_varlen"}


def segment_lengths(position_ids: torch.Tensor) -> list[int]:
    """Lengths of the segments of all rows, row by row (one host sync: split sizes are ints)."""
    flat = torch.nonzero(segment_starts(position_ids).reshape(-1)).flatten().tolist()
    return [end - start for start, end in zip(flat, [*flat[1:], position_ids.numel()], strict=True)]


def segment_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: torch.Tensor | None = None,
    varlen: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal SDPA run on each packed segment alone, so attention costs sum(L^2) instead of T^2 per row.

    ``varlen``: all segments in one call of torch's variable-length kernel where it applies
    (:func:`varlen_applies`), one SDPA call per segment elsewhere. Anything else (an attention mask, keys beyond the queries when decoding with a cache, no
    position ids) goes to transformers' own SDPA attention unchanged.
    """
    rows, heads, width, head_dim = query.shape
    if attention_mask is not None or position_ids is None or key.shape[2] != width:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    lengths = segment_lengths(position_ids.expand(rows, -1))
    if len(lengths) == rows:  # one sample per row: plain causal attention, one kernel call
        return sdpa_attention_forward(
            module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs
        )
    window = getattr(module, "sliding_window", None)
    if window is not None and max(lengths) > window:
        raise ValueError(
            f"a packed sample of {max(lengths)} tokens exceeds the LM's sliding window of {window}; "
            "segment attention is full causal attention: pack with train.packing=false for this LM"
        )
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if varlen and varlen_applies(query, dropout, scaling):
        return varlen_segments(query, key, value, lengths, scaling), None
    # [rows, heads, width, dim] -> [1, heads, tokens, dim]: segments are contiguous slices of the
    # token axis. split (not indexing) keeps the backward to one cat; 4-D inputs reach the flash
    # kernel (3-D ones fall back to the math path on the CPU).
    flat = [t.transpose(0, 1).reshape(1, heads, rows * width, head_dim) for t in (query, key, value)]
    outputs = [
        F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True)
        for q, k, v in zip(*(t.split(lengths, dim=2) for t in flat), strict=True)
    ]
    output = torch.cat(outputs, dim=2).view(heads, rows, width, head_dim)
    return output.permute(1, 2, 0, 3), None


def varlen_segment_attention_forward(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """:func:`segment_attention_forward` with the variable-length kernel (``train.attention=varlen``)."""
    return segment_attention_forward(*args, varlen=True, **kwargs)


def varlen_applies(query: torch.Tensor, dropout: float, scaling: float | None) -> bool:
    """Whether torch's variable-length flash kernel can run these segments: the kernel exists (torch
    >= 2.10), CUDA, half precision, no dropout, a head size flash supports and a scale it can take."""
    if varlen_attn is None:
        return False
    head_dim = query.shape[-1]
    default_scale = scaling is None or abs(scaling - head_dim**-0.5) < 1e-12
    return (
        query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and dropout == 0.0
        and head_dim <= 256
        and ("scale" in VARLEN_PARAMETERS or default_scale)
    )


def varlen_segments(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    lengths: Sequence[int],
    scaling: float | None,
    kernel: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """Causal attention of every segment in one variable-length kernel call.

    ``query``/``key``/``value``: [rows, heads, width, dim] with as many key as query heads;
    ``lengths``: the segments of all rows, row by row. Returns [rows, width, heads, dim], as
    transformers' attention functions do. ``kernel`` defaults to torch's ``varlen_attn``, whose
    causal argument is ``is_causal`` in torch 2.10 and ``window_size=(-1, 0)`` from 2.11 on.
    """
    parameters = VARLEN_PARAMETERS if kernel is None else set(inspect.signature(kernel).parameters)
    kernel = kernel or varlen_attn
    rows, heads, width, head_dim = query.shape
    flat = [t.transpose(1, 2).reshape(rows * width, heads, head_dim) for t in (query, key, value)]
    starts = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=query.device)
    options: dict[str, Any] = {"window_size": (-1, 0)} if "window_size" in parameters else {"is_causal": True}
    if "scale" in parameters:
        options["scale"] = scaling
    longest = max(lengths)
    output = kernel(*flat, starts, starts, longest, longest, **options)
    return output.view(rows, width, heads, head_dim)


def segment_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """No mask for rows without padding mask or cache (the attention reads the segments from the
    position ids); transformers' SDPA mask otherwise (padded batches, generation)."""
    if attention_mask is None and q_length == kv_length and q_offset == 0 and kv_offset == 0:
        return None
    return sdpa_mask(
        batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask=attention_mask, **kwargs
    )


def use_segment_attention(language_model: PreTrainedModel, attention: SegmentKernel = "segments") -> None:
    """Switch a causal LM to :func:`segment_attention_forward` (exact for packed and padded batches).

    ``attention`` (``train.attention``): ``segments``, one SDPA call per sample; ``varlen``, one call
    of torch's variable-length FlashAttention kernel per layer where it runs (CUDA, half precision),
    the per-sample calls elsewhere. Only for LMs whose layers all use full causal attention (Llama, Vicuna, Mistral and Qwen2
    without windows shorter than a sample); hybrid layer types are refused.
    """
    layer_types = set(getattr(language_model.config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise ValueError(
            f"the LM mixes attention layer types {sorted(layer_types)}; segment attention covers full "
            "causal attention only: train this LM with train.packing=false"
        )
    if attention not in ATTENTION_NAMES:
        raise ValueError(f"attention={attention!r} is unknown; use one of {', '.join(ATTENTION_NAMES)}")
    name = ATTENTION_NAMES[attention]
    forward = varlen_segment_attention_forward if attention == "varlen" else segment_attention_forward
    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, segment_mask)
    language_model.set_attn_implementation(name)
