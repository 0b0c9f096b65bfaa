"""Optimizer groups are found by name, whatever order they were built in."""

import torch

from llava_ray.training.optim import learning_rates


def _optimizer(names_and_rates):
    groups = [
        {"name": name, "params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr}
        for name, lr in names_and_rates
    ]
    return torch.optim.AdamW(groups)


def test_learning_rates_by_group_name_not_position():
    optimizer = _optimizer(
        [("projector", 2e-3), ("model_no_decay", 2e-5), ("model", 2e-5), ("projector_no_decay", 2e-3)]
    )
    assert learning_rates(optimizer) == (2e-5, 2e-3)
    reversed_order = _optimizer([("model", 1e-5), ("projector", 1e-3)])
    assert learning_rates(reversed_order) == (1e-5, 1e-3)


def test_projector_only_stage_reports_the_projector_rate_for_both():
    assert learning_rates(_optimizer([("projector", 1e-3)])) == (1e-3, 1e-3)
