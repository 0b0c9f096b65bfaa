"""Relative config paths become absolute against the driver's cwd when a config is loaded (config.paths)."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from llava_ray.config import load_config
from llava_ray.config.loader import SHIPPED_CONFIGS
from llava_ray.config.paths import HUB_OR_PATH_FIELDS, PATH_FIELDS, TRACKING_URI_FIELD, resolve_paths
from llava_ray.config.schema import LlavaRayConfig
from llava_ray.config.sweep import load_sweep

TINY = Path(str(SHIPPED_CONFIGS)) / "tiny"


def test_relative_paths_of_a_loaded_config_are_absolute_against_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(
        TINY / "finetune.yaml",
        ["model.init_from=llava_ray_runs/tiny-pretrain/final", "model.projector_weights=../mm_projector.bin"],
    )
    assert config.run.storage_path == str(tmp_path / "llava_ray_runs")
    assert config.model.init_from == str(tmp_path / "llava_ray_runs/tiny-pretrain/final")
    assert config.model.projector_weights == str(tmp_path.parent / "mm_projector.bin")
    assert [source.path for source in config.data.sources] == [str(tmp_path / "data/synthetic/stage2.json")]
    assert config.data.prepared_path == str(tmp_path / "data/prepared/tiny-stage2")
    assert config.evaluate.output_dir == str(tmp_path / "eval_results")  # a default is a path too


def test_urls_absolute_paths_and_hub_names_are_left_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(
        None,
        [
            "run.storage_path=s3://bucket/runs",
            "data.prepared_path=/data/prepared",
            "model.language_model=lmsys/vicuna-7b-v1.5",
            "model.vision_tower=openai/clip-vit-large-patch14-336",
            "tracking.uri=http://127.0.0.1:5000",
            "serve.model=file:///models/final",
        ],
    )
    assert config.run.storage_path == "s3://bucket/runs"
    assert config.data.prepared_path == "/data/prepared"
    assert config.model.language_model == "lmsys/vicuna-7b-v1.5"
    assert config.model.vision_tower == "openai/clip-vit-large-patch14-336"
    assert config.tracking.uri == "http://127.0.0.1:5000"
    assert config.serve.model == "file:///models/final"


def test_a_hub_or_path_field_is_a_path_when_it_exists_here_or_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models/vicuna").mkdir(parents=True)
    config = load_config(
        None,
        [
            "model.language_model=models/vicuna",  # exists here: a local folder
            "model.tokenizer=./tokenizers/tiny",  # ./ says it is a path, even before it exists
            "evaluate.model=org/not-here",  # neither: a hub name
        ],
    )
    assert config.model.language_model == str(tmp_path / "models/vicuna")
    assert config.model.tokenizer == str(tmp_path / "tokenizers/tiny")
    assert config.evaluate.model == "org/not-here"


def test_tracking_uri_sqlite_and_folder_resolve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert (
        load_config(None, ["tracking.uri=sqlite:///mlflow.db"]).tracking.uri
        == f"sqlite:///{tmp_path}/mlflow.db"
    )
    assert load_config(None, ["tracking.uri=sqlite:////abs/m.db"]).tracking.uri == "sqlite:////abs/m.db"
    assert load_config(None, ["tracking.uri=mlruns"]).tracking.uri == str(tmp_path / "mlruns")


def test_resolution_is_idempotent_and_a_copy(tmp_path):
    config = LlavaRayConfig()
    once = resolve_paths(config, tmp_path)
    assert config.run.storage_path == "./llava_ray_runs"  # the input is not changed
    assert resolve_paths(once, tmp_path / "elsewhere") == once


def test_sweep_storage_path_resolves_against_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(
        yaml.safe_dump(
            {
                "sweep": {
                    "name": "s",
                    "base": str(TINY / "pretrain.yaml"),
                    "storage_path": "sweeps",
                    "metric": "train_loss",
                    "search_space": {"train.learning_rate": {"choice": [1e-3]}},
                }
            }
        )
    )
    sweep, base = load_sweep(sweep_file)
    assert sweep.storage_path == str(tmp_path / "sweeps")
    assert base.run.storage_path == str(tmp_path / "llava_ray_runs")


# ---- every path-like field is declared ------------------------------------------------------------

# String fields whose names look like paths but are not local paths.
NOT_PATHS = {
    "generate.image_prefix",  # a prefix inside the output's image paths, relative by design
    "generate.base_url",
    "evaluate.judge.base_url",
    "evaluate.reference.base_url",
    "evaluate.scienceqa_ensemble.base_url",
    "tracking.register_model",  # a registry name
    "serve.model_name",  # the id clients send
    # model names sent to an OpenAI-compatible endpoint
    "generate.model",
    "evaluate.judge.model",
    "evaluate.reference.model",
    "evaluate.scienceqa_ensemble.model",
}
PATHLIKE_WORDS = ("path", "dir", "root", "file", "model", "init_from", "weights", "tower", "tokenizer", "uri")


def _string_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted names of every string field of ``model`` and its sections (``*`` for list items)."""
    found = []
    for name, field in model.model_fields.items():
        annotation, dotted = field.annotation, f"{prefix}{name}"
        if typing.get_origin(annotation) is list:
            annotation, dotted = typing.get_args(annotation)[0], f"{dotted}.*"
        options = typing.get_args(annotation) or (annotation,)
        for option in options:
            if isinstance(option, type) and issubclass(option, BaseModel):
                found += _string_fields(option, f"{dotted}.")
        if str in options:
            found.append(dotted)
    return found


def test_every_pathlike_string_field_is_declared():
    declared = {*PATH_FIELDS, *HUB_OR_PATH_FIELDS, TRACKING_URI_FIELD}
    pathlike = {
        field
        for field in _string_fields(LlavaRayConfig)
        if any(word in field.rsplit(".", 1)[-1] for word in PATHLIKE_WORDS) and field not in NOT_PATHS
    }
    undeclared = sorted(pathlike - declared)
    assert not undeclared, f"declare these in config.paths (or in NOT_PATHS here): {undeclared}"
    assert declared <= set(_string_fields(LlavaRayConfig)), "config.paths names a field the schema lacks"


@pytest.mark.parametrize("field", sorted({*PATH_FIELDS, *HUB_OR_PATH_FIELDS}))
def test_each_declared_field_resolves(field, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    override = field.replace("*", "0")
    extra = [] if not field.startswith("data.sources") else ["data.sources=[{path: x.json}]"]
    config = load_config(None, [*extra, f"{override}=./some/where"])
    node = config
    for part in override.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    assert node == str(tmp_path / "some/where")
