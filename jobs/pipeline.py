"""The LLaVA recipe as one Ray job: prepare -> pretrain -> finetune, one MLflow parent run.

Submit to a cluster (from the repository root):

    ray job submit --working-dir . -- python jobs/pipeline.py --config jobs/configs/llava-1.5-7b/pipeline.yaml

Extra ``key=value`` arguments override both stages. Both stage configs are validated before
anything starts; stage 2 starts from stage 1's final model.
"""

import argparse
import sys

from llava_ray.config import ConfigError
from llava_ray.config.pipeline import load_pipeline
from llava_ray.pipeline import run_pipeline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="pipeline YAML (see jobs/configs/*/pipeline.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for both stages")
    args = parser.parse_args(argv)
    try:
        pipeline, pretrain, finetune = load_pipeline(args.config, args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    result = run_pipeline(pretrain, finetune, name=pipeline.name, reuse_prepared=pipeline.reuse_prepared)
    print(f"[pipeline] done: final model {result.stage('finetune').result.final_model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
