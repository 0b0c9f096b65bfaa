"""Projector shapes, parameter counts and errors (../shared/LLAVA_REFERENCE.md sizes)."""

import pytest
import torch
from torch import nn

from llava_ray.model.projector import build_projector, mlp_depth


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_linear_maps_widths_with_one_layer():
    projector = build_projector("linear", 64, 128)
    assert isinstance(projector, nn.Linear)
    assert projector(torch.randn(2, 5, 64)).shape == (2, 5, 128)
    assert count(projector) == 64 * 128 + 128


def test_mlp2x_gelu_has_the_reference_layout():
    projector = build_projector("mlp2x_gelu", 64, 128)
    assert [type(layer) for layer in projector] == [nn.Linear, nn.GELU, nn.Linear]
    # The reference's mm_projector.bin keys are 0.* and 2.*.
    assert sorted(projector.state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert projector(torch.randn(3, 64)).shape == (3, 128)


def test_llava_1_5_sizes():
    # LLaVA-1.5-7B: CLIP-L width 1024 into Vicuna-7B width 4096.
    assert count(build_projector("mlp2x_gelu", 1024, 4096)) == 20_979_712
    assert count(build_projector("linear", 1024, 4096)) == 4_198_400


def test_deeper_mlp_repeats_gelu_and_square_linear():
    projector = build_projector("mlp3x_gelu", 64, 128)
    assert sorted(projector.state_dict()) == [
        "0.bias",
        "0.weight",
        "2.bias",
        "2.weight",
        "4.bias",
        "4.weight",
    ]
    assert count(projector) == (64 * 128 + 128) + 2 * (128 * 128 + 128)
    assert mlp_depth("mlp12x_gelu") == 12
    assert mlp_depth("linear") is None


def test_identity_passes_features_through():
    projector = build_projector("identity", 128, 128)
    features = torch.randn(2, 4, 128)
    assert torch.equal(projector(features), features)
    assert count(projector) == 0


def test_identity_with_different_widths_names_the_widths_and_the_fix():
    with pytest.raises(
        ValueError, match=r"gives 64 and the language model takes 128; use model.projector=mlp2x_gelu"
    ):
        build_projector("identity", 64, 128)


@pytest.mark.parametrize("name", ["mlp0x_gelu", "mlp2x_relu", "conv", ""])
def test_unknown_projector_lists_the_valid_names(name):
    with pytest.raises(
        ValueError, match=r"unknown projector .* choose one of linear, identity, mlp\{N\}x_gelu"
    ):
        build_projector(name, 64, 128)
