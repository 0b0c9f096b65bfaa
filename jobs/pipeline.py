"""The LLaVA recipe as one Ray job: [generate-data] -> prepare -> pretrain -> finetune -> [evaluate].

One MLflow parent run holds every step as a child run; the bracketed steps run when the pipeline
YAML names their configs (``generate:``, ``evaluate:``).

Submit to a cluster (from the repository root):

    ray job submit --working-dir . -- python jobs/pipeline.py --config jobs/configs/llava-1.5-7b/pipeline.yaml

Extra ``key=value`` arguments override both stages. Every job's config is validated before
anything starts; stage 2 starts from stage 1's final model, and the evaluation runs on stage 2's.
"""

import argparse
import sys
from collections.abc import Callable
from typing import Any

from llava_ray.config import ConfigError, LlavaRayConfig
from llava_ray.workflows.pipeline import load_pipeline, run_pipeline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="pipeline YAML (see jobs/configs/*/pipeline.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for both stages")
    args = parser.parse_args(argv)
    try:
        jobs = load_pipeline(args.config, args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    result = run_pipeline(
        jobs.pretrain,
        jobs.finetune,
        name=jobs.pipeline.name,
        reuse_prepared=jobs.pipeline.reuse_prepared,
        generate=jobs.generate,
        evaluate=evaluate_step(jobs.evaluate) if jobs.evaluate else None,
    )
    print(f"[pipeline] done: final model {result.stage('finetune').result.final_model}")
    if jobs.evaluate:
        metrics = result.stage("evaluate").result["metrics"]
        print(f"[pipeline] evaluation ({jobs.evaluate.evaluate.benchmark}): {metrics}")
    return 0


def evaluate_step(config: LlavaRayConfig) -> Callable[[str, str | None], dict[str, Any]]:
    """Evaluate stage 2's final model with ``config.evaluate``, as a child of the pipeline's run."""

    def evaluate(final_model: str, parent_run_id: str | None) -> dict[str, Any]:
        from llava_ray.evaluation.job import run_evaluate

        return run_evaluate(config.evaluate.model_copy(update={"model": final_model}), config, parent_run_id)

    return evaluate


if __name__ == "__main__":
    sys.exit(main())
