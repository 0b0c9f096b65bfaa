"""The LLaVA recipe as one Ray job: [generate-data] -> prepare -> pretrain -> finetune -> [evaluate].

One MLflow parent run holds every step as a child run; the bracketed steps run when the pipeline
YAML names their configs (``generate:``, ``evaluate:``).

Submit to a cluster (from the repository root):

    ray job submit --working-dir . -- python jobs/pipeline.py --config jobs/configs/llava-1.5-7b/pipeline.yaml

Locally: ``python jobs/pipeline.py --config jobs/configs/tiny/pipeline.yaml`` (or ``llava-ray pipeline``).
Extra ``key=value`` arguments override both stages. Every job's config is validated before
anything starts; stage 2 starts from stage 1's final model, and the evaluation runs on stage 2's.
"""

import sys

from llava_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
