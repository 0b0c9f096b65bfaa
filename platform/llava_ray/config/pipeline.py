"""The pipeline config: which stage configs run, in order, under one MLflow parent run."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field, ValidationError

from llava_ray.config.loader import ConfigError, describe_error, load_config
from llava_ray.config.schema import LlavaRayConfig, Section


class PipelineConfig(Section):
    name: str = Field("llava-pipeline", description="Name of the pipeline's MLflow parent run.")
    pretrain: str = Field(description="Stage-1 config file (relative paths: to this file's folder).")
    finetune: str = Field(description="Stage-2 config file; its model.init_from is set to stage 1's output.")
    overrides: list[str] = Field(
        default_factory=list, description="dotted.key=value overrides for both stages."
    )
    pretrain_overrides: list[str] = Field(default_factory=list, description="Overrides for stage 1 only.")
    finetune_overrides: list[str] = Field(default_factory=list, description="Overrides for stage 2 only.")
    reuse_prepared: bool = Field(True, description="Skip prepare where finished shards already exist.")


def load_pipeline(
    path: str | Path, overrides: list[str] = ()
) -> tuple[PipelineConfig, LlavaRayConfig, LlavaRayConfig]:
    """The pipeline and both stage configs, all validated before any work; one error lists every problem."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text()) or {}
    try:
        pipeline = PipelineConfig.model_validate(raw.get("pipeline", raw))
    except ValidationError as error:
        raise ConfigError([describe_error(e) for e in error.errors()], str(path)) from None
    problems: list[str] = []
    stages = []
    for stage, extra in (
        ("pretrain", pipeline.pretrain_overrides),
        ("finetune", pipeline.finetune_overrides),
    ):
        stage_path = Path(getattr(pipeline, stage))
        stage_path = (
            stage_path if stage_path.is_absolute() or stage_path.exists() else path.parent / stage_path
        )
        try:
            stages.append(load_config(stage_path, [*pipeline.overrides, *extra, *overrides]))
        except ConfigError as error:
            problems += [f"{stage} ({stage_path}): {problem}" for problem in error.problems]
    if problems:
        raise ConfigError(problems, str(path))
    return pipeline, stages[0], stages[1]
