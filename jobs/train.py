"""Train one LLaVA stage (pretrain or finetune) on Ray Train with DeepSpeed.

Submit to a cluster (from the repository root):

    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/llava-1.5-7b/pretrain.yaml

Locally: ``python jobs/train.py --config jobs/configs/tiny/pretrain.yaml train.max_steps=10``.
Rerunning with the same ``run.name`` and ``run.storage_path`` resumes from the latest checkpoint.
"""

import sys

from llava_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
