"""``${run.root}`` / ``${env:NAME,default}`` references: one value moves every path of a recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llava_ray.cli import main
from llava_ray.config import ConfigError, dump_config, load_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "platform/llava_ray/assets/configs"
# Every shipped config that reads or writes the cluster's storage.
ROOTED = sorted([*CONFIGS.glob("llava-1.5-*/*.yaml"), *CONFIGS.glob("scienceqa/*.yaml")])
ROOTED = [path for path in ROOTED if path.stem != "pipeline"]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_references_resolve_keys_environment_and_defaults(tmp_path, monkeypatch):
    monkeypatch.delenv("LLAVA_TEST_ROOT", raising=False)
    path = write(
        tmp_path,
        """
run:
  root: ${env:LLAVA_TEST_ROOT,s3://default-bucket/team}
  storage_path: ${run.root}/runs
  seed: ${train.max_steps}
train:
  max_steps: 7
data:
  prepared_path: ${run.root}/prepared/$${not-a-reference}
""",
    )
    config = load_config(path)
    assert config.run.root == "s3://default-bucket/team"
    assert config.run.storage_path == "s3://default-bucket/team/runs"
    assert config.run.seed == 7  # a whole-value reference keeps the referenced type
    assert config.data.prepared_path == "s3://default-bucket/team/prepared/${not-a-reference}"

    monkeypatch.setenv("LLAVA_TEST_ROOT", "/mnt/shared")
    assert load_config(path).run.storage_path == "/mnt/shared/runs"
    # An override of the referenced key is seen by every reference (overrides apply first).
    moved = load_config(path, ["run.root=s3://other"])
    assert (moved.run.storage_path, moved.data.prepared_path) == (
        "s3://other/runs",
        "s3://other/prepared/${not-a-reference}",
    )


def test_unresolvable_references_name_the_key_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("LLAVA_TEST_UNSET", raising=False)
    path = write(
        tmp_path,
        """
run:
  name: ${env:LLAVA_TEST_UNSET}
  storage_path: ${run.rot}/runs
model:
  init_from: ${model.tokenizer}
  tokenizer: ${model.init_from}
data:
  prepared_path: ${oc.env:HOME}
  root: ${run.name}/data
""",
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    problems = caught.value.problems
    text = "\n".join(problems)
    assert (
        "run.name = '${env:LLAVA_TEST_UNSET}': environment variable LLAVA_TEST_UNSET is not set; "
        "export LLAVA_TEST_UNSET=... before running, or give a default: ${env:LLAVA_TEST_UNSET,VALUE}"
    ) in text
    assert (
        "run.storage_path = '${run.rot}/runs': ${run.rot} names no key set in this config; set run.rot"
        in text
    )
    assert "model.init_from = '${model.tokenizer}': references form a cycle" in text
    assert "data.prepared_path = '${oc.env:HOME}': ${oc.env:HOME}: unknown resolver 'oc.env'" in text
    # One line per cause: run.name's validator does not report the unresolved text again, and data.root,
    # which fails only through run.name, is not a line of its own.
    assert len(problems) == 5, problems


def test_shipped_recipes_move_with_one_value(monkeypatch):
    """Every storage path of the LLaVA-1.5 and ScienceQA configs follows $LLAVA_ROOT (or run.root=...)."""
    assert ROOTED, "the shipped recipes"
    monkeypatch.setenv("LLAVA_ROOT", "s3://elsewhere/llava")
    for path in ROOTED:
        dumped = dump_config(load_config(path))
        assert "my-llava-bucket" not in dumped, f"{path.name} still names the placeholder bucket"
        assert "s3://elsewhere/llava/" in dumped, path
    monkeypatch.delenv("LLAVA_ROOT")
    for path in ROOTED:
        dumped = dump_config(load_config(path, ["run.root=/mnt/llava"]))
        assert "my-llava-bucket" not in dumped and "s3://" not in dumped, path


def test_validate_prints_resolved_values(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LLAVA_ROOT", "s3://printed")
    assert main(["validate", "--config", str(CONFIGS / "llava-1.5-7b/finetune.yaml")]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["run"]["root"] == "s3://printed"
    assert printed["run"]["storage_path"] == "s3://printed/runs"
    assert printed["model"]["init_from"] == "s3://printed/runs/llava-1.5-7b-pretrain/final"
    assert printed["data"]["sources"][0]["path"] == "s3://printed/data/llava_v1_5_mix665k.json"
