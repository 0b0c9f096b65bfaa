"""Pipeline YAMLs: every job's config is validated up front, the optional steps included."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llava_ray.config import ConfigError
from llava_ray.workflows.pipeline import load_pipeline

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "jobs/configs/tiny"


def write(tmp_path: Path, name: str, data: dict) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_optional_steps_are_absent_unless_named(tmp_path):
    path = write(
        tmp_path,
        "p.yaml",
        {"pipeline": {"pretrain": str(TINY / "pretrain.yaml"), "finetune": str(TINY / "finetune.yaml")}},
    )
    jobs = load_pipeline(path)
    assert jobs.generate is None and jobs.evaluate is None
    assert jobs.pretrain.train.stage == "pretrain" and jobs.finetune.train.stage == "finetune"


def test_evaluate_and_generate_steps_are_loaded_and_checked_before_any_work(tmp_path):
    eval_file = tmp_path / "eval.json"
    eval_file.write_text("[]")
    evaluate = write(
        tmp_path, "evaluate.yaml", {"evaluate": {"benchmark": "synthetic", "data_path": str(eval_file)}}
    )
    generate = write(
        tmp_path,
        "generate.yaml",
        {
            "generate": {
                "output_path": str(tmp_path / "generated.json"),
                "model": "m",
                "base_url": "http://127.0.0.1:1/v1",
            }
        },
    )
    finetune_raw = yaml.safe_load((TINY / "finetune.yaml").read_text())
    finetune_raw["data"]["sources"].append({"path": str(tmp_path / "generated.json")})
    finetune = write(tmp_path, "finetune.yaml", finetune_raw)
    pipeline = {
        "pretrain": str(TINY / "pretrain.yaml"),
        "finetune": str(finetune),
        "generate": str(generate),
        "evaluate": str(evaluate),
    }
    jobs = load_pipeline(write(tmp_path, "p.yaml", {"pipeline": pipeline}))
    assert jobs.generate.generate.output_path == str(tmp_path / "generated.json")
    assert jobs.evaluate.evaluate.data_path == str(eval_file) and jobs.evaluate.evaluate.model is None

    eval_file.unlink()
    pipeline["finetune"] = str(TINY / "finetune.yaml")  # does not read the generated data
    with pytest.raises(ConfigError) as raised:
        load_pipeline(write(tmp_path, "p.yaml", {"pipeline": pipeline}))
    problems = raised.value.problems
    assert len(problems) == 2, problems
    assert "finetune: data.sources does not read the generated data" in problems[0]
    assert f"evaluate.data_path={str(eval_file)!r} does not exist" in problems[1]


def test_unknown_pipeline_keys_name_the_pipeline_keys(tmp_path):
    path = write(tmp_path, "p.yaml", {"pipeline": {"pretrain": "a", "finetune": "b", "evaluat": "c"}})
    with pytest.raises(ConfigError, match="Did you mean 'evaluate'"):
        load_pipeline(path)


def test_a_missing_pipeline_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"pipeline file .*missing\.yaml' does not exist"):
        load_pipeline(tmp_path / "missing.yaml")
