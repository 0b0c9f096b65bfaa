"""The pipeline config: which jobs run, in order, under one MLflow parent run.

generate-data (optional) -> prepare both stages -> pretrain -> finetune -> evaluate (optional).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field

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
