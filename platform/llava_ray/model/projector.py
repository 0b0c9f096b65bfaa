"""The multimodal projector: maps vision-tower features into the language model's embedding space.

Names and layouts follow the LLaVA reference so that its stage-1 ``mm_projector.bin`` loads as is:

- ``linear``: one ``Linear(vision -> lm)`` (the first LLaVA paper).
- ``mlp{N}x_gelu``: ``Linear(vision -> lm)`` then ``(GELU, Linear(lm -> lm))`` N-1 times, an
  ``nn.Sequential`` whose state-dict keys are ``0.*``, ``2.*``, ... (``mlp2x_gelu`` is LLaVA-1.5's).
- ``identity``: features pass unchanged; only valid when both widths agree.
"""

from __future__ import annotations

import re

from torch import nn

PROJECTOR_NAMES = ("linear", "identity", "mlp{N}x_gelu")
_MLP_PATTERN = re.compile(r"^mlp([1-9][0-9]*)x_gelu$")


def mlp_depth(name: str) -> int | None:
    """N of an ``mlp{N}x_gelu`` name (its number of Linear layers), None for any other name."""
    match = _MLP_PATTERN.match(name)
    return int(match.group(1)) if match else None


def build_projector(name: str, vision_width: int, lm_width: int) -> nn.Module:
    """The projector called ``name``, mapping ``vision_width`` features to ``lm_width``."""
    if name == "linear":
        return nn.Linear(vision_width, lm_width)
    if name == "identity":
        if vision_width != lm_width:
            raise ValueError(
                f"projector 'identity' needs equal widths, but the vision tower gives {vision_width} and the "
                f"language model takes {lm_width}; use model.projector=mlp2x_gelu (or linear)"
            )
        return nn.Identity()
    depth = mlp_depth(name)
    if depth is None:
        raise ValueError(
            f"unknown projector {name!r}; choose one of {', '.join(PROJECTOR_NAMES)} (e.g. mlp2x_gelu)"
        )
    layers: list[nn.Module] = [nn.Linear(vision_width, lm_width)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(lm_width, lm_width)]
    return nn.Sequential(*layers)
