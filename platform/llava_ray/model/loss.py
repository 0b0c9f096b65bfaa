"""The language-modelling loss as a sum and a count, so ranks can normalise by the global token count.

:func:`kept_token_loss_sum` is the supervised-only LM head's variant: logits exist only at the
positions whose next label carries a loss (``logits_to_keep``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llava_ray.conversation.templates import IGNORE_INDEX


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
