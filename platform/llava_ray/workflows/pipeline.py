"""The LLaVA recipe as one job: prepare -> pretrain -> finetune (-> evaluate), one MLflow parent run.

Each stage is an ordinary llava-ray job (the same code ``llava-ray prepare`` and ``llava-ray
train`` run) tracked as a child of the pipeline's run. Stage 2 starts from stage 1's final
model. Used by ``jobs/pipeline.py`` and by the demo.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from llava_ray.config.loader import ConfigError, describe_error, load_config, read_yaml
from llava_ray.config.schema import LlavaRayConfig
from llava_ray.config.workflow import PipelineConfig, PipelineJobs
from llava_ray.data.prepare import load_report, run_prepare
from llava_ray.evaluation.job import evaluate_problems
from llava_ray.generation.job import run_generate
from llava_ray.tracking.mlflow_tracking import tracked_run
from llava_ray.training.driver import TrainResult, run_train
from llava_ray.utils.logging import ensure_logging

logger = logging.getLogger(__name__)


@dataclass
class StageOutcome:
    name: str
    seconds: float
    result: Any


@dataclass
class PipelineResult:
    parent_run_id: str | None
    stages: list[StageOutcome] = field(default_factory=list)

    def stage(self, name: str) -> StageOutcome:
        return next(stage for stage in self.stages if stage.name == name)


def report_counts(report: dict[str, Any]) -> dict[str, int]:
    """A prepare / generate-data report's counts as MLflow metrics: input, written, skipped by reason."""
    skipped = {f"skipped.{reason}": count for reason, count in report["skipped"].items()}
    return {"input": report["input"], "written": report["written"], **skipped}


def prepare_job(
    config: LlavaRayConfig, parent_run_id: str | None = None, reuse: bool = False
) -> dict[str, Any]:
    """Run (or, with ``reuse``, reuse a finished) prepare, tracked as an MLflow run."""
    ensure_logging()
    with tracked_run(config, "prepare", parent_run_id, label=f"prepare {config.train.stage}") as tracker:
        report = None
        if reuse:
            try:
                report = load_report(config.data.prepared_path)
                logger.info(f"[prepare] reusing prepared data at {config.data.prepared_path}")
            except FileNotFoundError:
                pass  # not prepared yet: prepare below
        reused = report is not None
        if report is None:
            report = run_prepare(config)
        tracker.log_dict(report, "data_report.json")
        tracker.log_metrics(report_counts(report))
        tracker.set_tags({"llava_ray.reused_prepared_data": str(reused)})
        return report


def generate_job(config: LlavaRayConfig, parent_run_id: str | None = None) -> dict[str, Any]:
    """Instruction-data generation (``config.generate``), tracked as an MLflow run."""
    ensure_logging()
    with tracked_run(config, "generate-data", parent_run_id) as tracker:
        report = run_generate(config.generate, seed=config.run.seed)
        tracker.log_dict(report, "generation_report.json")
        tracker.log_metrics(report_counts(report))
        return report


def run_pipeline(
    pretrain: LlavaRayConfig,
    finetune: LlavaRayConfig,
    name: str = "pipeline",
    reuse_prepared: bool = False,
    evaluate: Callable[[str, str | None], Any] | None = None,
    generate: LlavaRayConfig | None = None,
) -> PipelineResult:
    """Generate instruction data (with ``generate``), prepare both stages' data, train stage 1, train
    stage 2 from it, then ``evaluate(model, parent)``."""
    ensure_logging()
    with tracked_run(pretrain, "pipeline", run_name=name, extra_tags={"llava_ray.pipeline": name}) as parent:
        outcome = PipelineResult(parent.run_id)

        def timed(stage: str, action: Callable[[], Any]) -> Any:
            started = time.time()
            logger.info(f"[pipeline] {stage} ...")
            result = action()
            outcome.stages.append(StageOutcome(stage, time.time() - started, result))
            return result

        if generate is not None:
            timed("generate-data", lambda: generate_job(generate, parent.run_id))
        for stage_name, config in (("prepare-pretrain", pretrain), ("prepare-finetune", finetune)):
            timed(stage_name, lambda c=config: prepare_job(c, parent.run_id, reuse=reuse_prepared))
        stage1: TrainResult = timed("pretrain", lambda: run_train(pretrain, parent.run_id))
        finetune = finetune.model_copy(
            update={"model": finetune.model.model_copy(update={"init_from": stage1.final_model})}
        )
        stage2: TrainResult = timed("finetune", lambda: run_train(finetune, parent.run_id))
        if evaluate is not None:
            timed("evaluate", lambda: evaluate(stage2.final_model, parent.run_id))
        parent.set_tags({"llava_ray.final_model": stage2.final_model})
        return outcome


def load_pipeline(path: str | Path, overrides: list[str] = ()) -> PipelineJobs:
    """The pipeline and every job's config, all validated before any work; one error lists every problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"pipeline file {str(path)!r} does not exist; pass an existing YAML file"])
    raw = read_yaml(path)  # safe: no aliases, bounded size; errors are ConfigErrors
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
        # evaluate.model is the pipeline's own final model, set once stage 2 has written it.
        problems += [
            f"evaluate ({pipeline.evaluate}): {problem}"
            for problem in evaluate_problems(configs["evaluate"].evaluate, check_model=False)
        ]
    if problems:
        raise ConfigError(problems, str(path))
    return PipelineJobs(pipeline, configs["pretrain"], configs["finetune"], generate, configs["evaluate"])
