"""Evaluate a trained model on a benchmark (synthetic, ScienceQA or LLaVA-Bench) and log it to MLflow.

Submit to a cluster (from the repository root; the config's ``evaluate`` section, or overrides,
name the model, the benchmark's file and, for llava_bench, the judge endpoint), e.g. the tiny
stage-2 model on the synthetic held-out questions, tracked in the stage's MLflow experiment:

    ray job submit --working-dir . -- python jobs/evaluate.py --config jobs/configs/tiny/finetune.yaml \
        evaluate.model=./llava_ray_runs/tiny-finetune/final evaluate.data_path=data/synthetic/eval.json

Locally: the same ``python jobs/evaluate.py ...`` (add ``evaluate.num_actors=0`` to skip Ray).
Generation runs on ``evaluate.num_actors`` Ray actors (``evaluate.num_gpus_per_actor`` GPUs each);
results.jsonl and summary.json go to ``evaluate.output_dir`` and to the MLflow run. The judge's
key comes from ``evaluate.judge.api_key`` or ``$OPENAI_API_KEY`` (pass it with
``--runtime-env-json`` env_vars on a cluster). Exits 2 on a bad config, listing every problem.
"""

import argparse
import sys

from llava_ray.config import ConfigError, load_config
from llava_ray.evaluation.job import run_evaluate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config file with an evaluate section")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. evaluate.limit=100")
    parser.add_argument("--parent-run-id", help="MLflow run to nest this evaluation under")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        run_evaluate(config.evaluate, config, parent_run_id=args.parent_run_id)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
