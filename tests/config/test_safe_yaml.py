"""YAML a user writes (configs, sweeps, pipelines, override values) is read safely: no aliases, bounded size
and depth, and every problem is one ConfigError line (the CLI exits 2), never a hang or a PyYAML traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from llava_ray.cli import main
from llava_ray.config import ConfigError, load_config
from llava_ray.config.sweep import load_sweep
from llava_ray.utils.safe_yaml import MAX_YAML_BYTES, MAX_YAML_DEPTH
from llava_ray.workflows.pipeline import load_pipeline

# The classic "billion laughs": nine levels of nine aliases, 9^9 (~387M) strings once expanded.
BILLION_LAUGHS = "\n".join(
    ['lol1: &lol1 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    + [f"lol{level}: &lol{level} [{', '.join([f'*lol{level - 1}'] * 9)}]" for level in range(2, 10)]
)


def indented(text: str, spaces: int) -> str:
    return "\n".join(" " * spaces + line for line in text.splitlines())


@pytest.mark.parametrize(
    "document",
    [
        BILLION_LAUGHS,
        # Where it used to pass validation: a free-form dict of the model section.
        "model:\n  preset: tiny\n  vision_config_overrides:\n" + indented(BILLION_LAUGHS, 4),
    ],
    ids=["top-level", "under-model.vision_config_overrides"],
)
def test_billion_laughs_config_fails_fast_with_a_config_error(tmp_path: Path, document: str) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(document + "\n")
    with pytest.raises(ConfigError, match=r"line \d+: alias \*lol1 refused .*write the value out") as caught:
        load_config(path)
    assert len(caught.value.problems) == 1


def test_sweep_and_pipeline_files_refuse_aliases_too(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        "sweep:\n  base: &base config.yaml\n  search_space:\n    train.learning_rate: {grid: [*base]}\n"
    )
    with pytest.raises(ConfigError, match=r"alias \*base refused"):
        load_sweep(sweep)
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text("pipeline:\n  pretrain: &stage config.yaml\n  finetune: *stage\n")
    with pytest.raises(ConfigError, match=r"alias \*stage refused"):
        load_pipeline(pipeline)


def test_oversized_and_too_deep_files_are_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * (MAX_YAML_BYTES // 10 + 1) + "model: {preset: tiny}\n")
    with pytest.raises(ConfigError, match=rf"big.yaml'.*over the {MAX_YAML_BYTES} bytes llava-ray reads"):
        load_config(big)
    deep = tmp_path / "deep.yaml"
    depth = MAX_YAML_DEPTH + 10
    deep.write_text("model:\n  vision_config_overrides:\n    x: " + "[" * depth + "]" * depth + "\n")
    with pytest.raises(ConfigError, match=rf"nested more than {MAX_YAML_DEPTH} levels deep"):
        load_config(deep)


def test_invalid_yaml_file_is_one_line_with_its_position(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  preset: [tiny\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    (problem,) = caught.value.problems
    assert "\n" not in problem and "broken.yaml" in problem and "line 3" in problem


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.learning_rate=[1e-3", r"override 'train.learning_rate=\[1e-3': the value is not valid YAML"),
        ("run.name='unterminated", r"the value is not valid YAML \(line 1, column \d+: .*quoted scalar"),
        ("model.vision_config_overrides={a: &a [1], b: *a}", r"alias \*a refused"),
    ],
)
def test_an_unparsable_override_is_a_config_error(override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as caught:
        load_config(None, [override, "train.max_steps=3"])
    (problem,) = caught.value.problems
    assert "\n" not in problem


def test_cli_exits_2_with_one_line_for_a_bad_override(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("model: {preset: tiny}\n")
    assert main(["validate", "--config", str(config), "train.learning_rate=[1e-3"]) == 2
    err = capsys.readouterr().err
    assert "override 'train.learning_rate=[1e-3': the value is not valid YAML" in err
    assert "Traceback" not in err
