"""Prepare LLaVA-format data into tokenised, image-processed parquet shards plus report.json.

Submit it to a Ray cluster from the repository root (the cluster's Python has llava-ray installed):

    ray job submit --working-dir . -- python jobs/prepare.py --config jobs/configs/tiny/pretrain.yaml

Overrides follow the config: ``... --config FILE data.prepared_path=s3://bucket/prepared/stage1``.
On a cluster, give ``data.sources`` and ``data.prepared_path`` as absolute paths on shared
storage or s3:// URLs: a relative path is resolved inside the job's temporary working directory.
Locally, ``python jobs/prepare.py --config ...`` starts a Ray instance of its own (the same as
``llava-ray prepare``). Tracked as an MLflow run. Exit status: 0 done, 2 bad config or unreadable sources (nothing was done).
"""

import sys

from llava_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
