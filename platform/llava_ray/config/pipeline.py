"""The pipeline config: which jobs run, in order, under one MLflow parent run.

generate-data (optional) -> prepare both stages -> pretrain -> finetune -> evaluate (optional).
"""

from __future__ import annotations

from dataclasses import dataclass
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
    generate: str | None = Field(
        None,
        description="Instruction-generation config run first (its generate section); list its "
        "generate.output_path among the finetune config's data.sources.",
    )
    evaluate: str | None = Field(
        None, description="Evaluation config (its evaluate section) run on stage 2's final model at the end."
    )
    evaluate_overrides: list[str] = Field(
        default_factory=list, description="Overrides for the evaluation only."
    )


@dataclass
class PipelineJobs:
    """A validated pipeline: its settings and the config of each job it runs."""

    pipeline: PipelineConfig
    pretrain: LlavaRayConfig
    finetune: LlavaRayConfig
    generate: LlavaRayConfig | None = None
    evaluate: LlavaRayConfig | None = None


def load_pipeline(path: str | Path, overrides: list[str] = ()) -> PipelineJobs:
    """The pipeline and every job's config, all validated before any work; one error lists every problem."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text()) or {}
    try:
        pipeline = PipelineConfig.model_validate(raw.get("pipeline", raw))
    except ValidationError as error:
        raise ConfigError([describe_error(e, PipelineConfig) for e in error.errors()], str(path)) from None
    problems: list[str] = []
    configs: dict[str, LlavaRayConfig | None] = {}
    jobs = (
        ("pretrain", pipeline.pretrain, [*pipeline.overrides, *pipeline.pretrain_overrides, *overrides]),
        ("finetune", pipeline.finetune, [*pipeline.overrides, *pipeline.finetune_overrides, *overrides]),
        ("generate", pipeline.generate, []),
        ("evaluate", pipeline.evaluate, pipeline.evaluate_overrides),
    )
    for job, job_file, job_overrides in jobs:
        if job_file is None:
            configs[job] = None
            continue
        job_path = Path(job_file)
        job_path = job_path if job_path.is_absolute() or job_path.exists() else path.parent / job_path
        try:
            configs[job] = load_config(job_path, job_overrides)
        except ConfigError as error:
            problems += [f"{job} ({job_path}): {problem}" for problem in error.problems]
    generate, finetune = configs["generate"], configs["finetune"]
    if generate is not None and finetune is not None:
        output = generate.generate.output_path
        if output is None:
            problems.append(
                f"generate ({pipeline.generate}): generate.output_path is not set; set where it writes"
            )
        elif output not in [source.path for source in finetune.data.sources]:
            problems.append(
                f"finetune: data.sources does not read the generated data {output!r}; add "
                f"{{path: {output}}} to the finetune config's data.sources (with its image_root)"
            )
    if configs["evaluate"] is not None:
        from llava_ray.evaluation.evaluate import evaluate_problems

        problems += [
            f"evaluate ({pipeline.evaluate}): {problem}"
            for problem in evaluate_problems(configs["evaluate"].evaluate)
            if not problem.startswith("evaluate.model")  # the pipeline's own final model, set at the end
        ]
    if problems:
        raise ConfigError(problems, str(path))
    return PipelineJobs(pipeline, configs["pretrain"], configs["finetune"], generate, configs["evaluate"])
