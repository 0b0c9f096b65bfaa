"""Sweep stage-job settings with Ray Tune: every trial is a Ray Train + DeepSpeed stage job.

Submit to a cluster (from the repository root):

    ray job submit --working-dir . -- python jobs/tune.py --config jobs/sweeps/llava-1.5-7b/pretrain_projector_lr.yaml

Locally: ``python jobs/tune.py --config jobs/sweeps/tiny/projector_lr.yaml``. Rerunning with the same
sweep ``name`` resumes an interrupted sweep. The best trial's stage config is written as
``{storage_path}/{name}/best_config.yaml``, ready for ``jobs/train.py --config``.
"""

import sys

from llava_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
