"""Sweep configs and the validation split, without Ray: what fails before any work, what trials train."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from llava_ray.cli import main
from llava_ray.config import ConfigError, load_config
from llava_ray.config.loader import parse_override
from llava_ray.config.sweep import SearchDomain, load_sweep, override
from llava_ray.training.validation import split_validation, validation_plan
from llava_ray.workflows.tune import best_config_for, trial_config

REPO = Path(__file__).resolve().parents[2]
TINY_SWEEP = REPO / "jobs/sweeps/tiny/projector_lr.yaml"


def write_sweep(tmp_path: Path, **changes) -> Path:
    raw = yaml.safe_load(TINY_SWEEP.read_text())
    raw["sweep"]["base"] = str(REPO / "jobs/configs/tiny/pretrain.yaml")
    raw["sweep"].update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_tiny_sweep_loads_with_trial_settings_applied_to_the_base():
    sweep, base = load_sweep(TINY_SWEEP)
    assert set(sweep.search_space) == {"model.projector", "train.learning_rate"}
    assert base.scaling.num_workers == 1 and base.scaling.cpus_per_worker == 0.25
    assert base.train.val_fraction == 0.1 and base.train.eval_every_steps == 2
    assert base.train.save_final_model is False and base.train.max_steps == 8


def test_every_bad_key_and_search_value_is_reported_in_one_error(tmp_path):
    bad_space = {
        "train.learning_rate": {"grid": [1e-3, -1.0]},
        "model.projecter": {"choice": ["linear"]},
        "model.projector": {"choice": ["linear", "mlp2x_gelu", "conv"]},
    }
    with pytest.raises(ConfigError) as raised:
        load_sweep(write_sweep(tmp_path, metirc="val_loss", search_space=bad_space))
    assert len(raised.value.problems) == 1  # the sweep file itself is checked first
    assert raised.value.problems[0].startswith("metirc: unknown key. Did you mean 'metric'?")
    with pytest.raises(ConfigError) as raised:
        load_sweep(write_sweep(tmp_path, search_space=bad_space))
    problems = "\n".join(raised.value.problems)
    assert "search_space.train.learning_rate value -1.0: train.learning_rate = -1.0" in problems
    assert (
        "search_space.model.projecter value 'linear': model.projecter: unknown key. Did you mean 'projector'?"
        in problems
    )
    assert "search_space.model.projector value 'conv': model.projector = 'conv'" in problems
    assert "value 0.001" not in problems and "value 'mlp2x_gelu'" not in problems  # good values pass


@pytest.mark.parametrize(
    ("domain", "message"),
    [
        ({"grid": [1], "choice": [2]}, "exactly one of"),
        ({}, "exactly one of"),
        ({"grid": []}, "at least one value"),
        ({"uniform": [2, 1]}, "low < high"),
        ({"loguniform": [0, 1]}, "positive low bound"),
    ],
)
def test_bad_domains_are_config_errors(tmp_path, domain, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(write_sweep(tmp_path, search_space={"train.learning_rate": domain}))


def test_optuna_cannot_search_a_grid(tmp_path):
    with pytest.raises(ConfigError, match="use choice instead of grid"):
        load_sweep(write_sweep(tmp_path, search_alg="optuna"))


def test_range_bounds_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"train.micro_batch_size = 0"):
        load_sweep(write_sweep(tmp_path, search_space={"train.micro_batch_size": {"randint": [0, 4]}}))
    domain = SearchDomain(randint=(1, 4))
    assert domain.values_to_check() == [1, 3]  # randint's high is exclusive


def test_cli_overrides_reach_the_sweep_and_the_base(tmp_path, capsys):
    sweep, base = load_sweep(TINY_SWEEP, ["sweep.num_samples=3", "train.max_steps=5"])
    assert sweep.num_samples == 3 and base.train.max_steps == 5
    assert main(["tune", "--config", str(TINY_SWEEP), "sweep.num_sampels=3"]) == 2
    assert "num_sampels: unknown key. Did you mean 'num_samples'?" in capsys.readouterr().err


@pytest.mark.parametrize("value", [1e-6, 0.001, "mlp2x_gelu", True, 3, [1, 2], None, "a: b"])
def test_override_text_parses_back_to_the_value(value):
    assert parse_override(override("train.x", value)) == (["train", "x"], value)


def test_trial_and_best_configs():
    sweep, base = load_sweep(TINY_SWEEP)
    params = {"model.projector": "linear", "train.learning_rate": 1e-6}
    trial = trial_config(
        base.model_dump(mode="json"), params, "abc_00001", sweep, "/runs", "sqlite:////t/m.db"
    )
    assert trial.model.projector == "linear" and trial.train.learning_rate == 1e-6
    assert trial.run.name == f"{sweep.name}-abc_00001"
    assert trial.run.storage_path == f"/runs/{sweep.name}/trials"
    assert trial.tracking.uri == "sqlite:////t/m.db" and trial.train.val_fraction == 0.1
    best = best_config_for(base, params, sweep)
    assert best.model.projector == "linear" and best.train.learning_rate == 1e-6
    assert best.train.val_fraction == 0 and best.train.eval_every_steps is None
    assert best.train.save_final_model and best.run.name == f"{sweep.name}-best"


def index_of(count: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "row": np.arange(count) * 3,
            "length": rng.integers(10, 100, count),
            "is_image": True,
            "num_supervised": 5,
            "unit": np.arange(count) // 64,
            "offset": np.arange(count) % 64,
        }
    )


def test_validation_split_is_seeded_disjoint_capped_and_even_per_rank():
    config = load_config(
        None, ["train.val_fraction=0.1", "scaling.num_workers=4", "train.micro_batch_size=1"]
    )
    index = index_of(1000)
    train, validation = split_validation(index, config)
    assert len(validation) == 100 and len(train) == 900
    assert set(train["row"]).isdisjoint(validation["row"])
    assert set(train["row"]) | set(validation["row"]) == set(index["row"])
    again = split_validation(index, config)[1]
    assert list(again["row"]) == list(validation["row"])
    other_seed = load_config(
        None, ["train.val_fraction=0.1", "run.seed=1", "scaling.num_workers=4", "train.micro_batch_size=1"]
    )
    assert list(split_validation(index, other_seed)[1]["row"]) != list(validation["row"])
    capped = load_config(
        None,
        [
            "train.val_fraction=0.5",
            "train.val_max_samples=30",
            "scaling.num_workers=4",
            "train.micro_batch_size=1",
        ],
    )
    assert len(split_validation(index, capped)[1]) == 28  # at most 30, a multiple of 4 workers
    plan = validation_plan(validation, 4)
    assert [len(reads) for reads in plan] == [25] * 4
    assert sorted(np.concatenate([reads.row for reads in plan]).tolist()) == sorted(validation["row"])
    lengths = validation.set_index("row")["length"]
    assert all((np.diff(lengths[reads.row].to_numpy()) >= 0).all() for reads in plan)  # by length


def test_no_split_without_val_fraction_and_an_error_when_it_leaves_none():
    index = index_of(10)
    train, validation = split_validation(index, load_config(None))
    assert len(train) == 10 and validation.empty
    with pytest.raises(ConfigError, match="leaves no validation sample"):
        split_validation(index, load_config(None, ["train.val_fraction=0.01"]))


def test_eval_every_steps_needs_a_split():
    with pytest.raises(ConfigError, match=r"train\.eval_every_steps=5 without a validation split"):
        load_config(None, ["train.eval_every_steps=5"])
