"""A stage job's preflight (training.driver.train_problems) refuses a bad projector file before any work."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from llava_ray.config import load_config
from llava_ray.conversation.tokenizer import load_tokenizer
from llava_ray.model.build import build_llava_model
from llava_ray.training.driver import train_problems

TINY = ["model.preset=tiny", "model.init=random", "data.sources=[{path: data.json}]"]


def problems_for(path) -> list[str]:
    config = load_config(None, [*TINY, f"model.projector_weights={path}"])
    return [p for p in train_problems(config) if "projector_weights" in p]


@pytest.fixture(scope="module")
def tiny_projector_state():
    config = load_config(None, TINY)
    model = build_llava_model(config.model, load_tokenizer(config.model))
    return {f"model.mm_projector.{key}": value for key, value in model.projector.state_dict().items()}


class RunsCode:
    """A pickle that runs a command when loaded without weights_only (what a malicious .bin does)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_good_projector_file_passes(tmp_path, tiny_projector_state):
    path = tmp_path / "mm_projector.bin"
    torch.save(tiny_projector_state, path)
    assert problems_for(path) == []


def test_a_missing_projector_file_is_a_problem(tmp_path):
    (problem,) = problems_for(tmp_path / "absent.bin")
    assert "no such file" in problem


def test_a_pickle_that_runs_code_is_refused_on_the_driver(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "mm_projector.bin"
    with path.open("wb") as handle:
        pickle.dump({"model.mm_projector.0.weight": RunsCode(marker)}, handle, protocol=2)
    (problem,) = problems_for(path)
    assert "refused or unreadable" in problem and "weights_only=True" in problem
    assert not marker.exists(), "the preflight ran the file's code"


def test_a_projector_of_another_shape_is_a_problem(tmp_path, tiny_projector_state):
    path = tmp_path / "mm_projector.bin"
    wrong = {
        key: torch.zeros(value.shape[0] + 1, *value.shape[1:]) for key, value in tiny_projector_state.items()
    }
    torch.save(wrong, path)
    (problem,) = problems_for(path)
    assert "shape mismatches" in problem
    torch.save({"model.vision_tower.x": torch.zeros(1)}, path)
    (problem,) = problems_for(path)
    assert "holds no 'mm_projector.*' keys" in problem
