"""Serve a trained model with Ray Serve: OpenAI-compatible /v1/chat/completions and a web chat page.

Submit to a cluster (from the repository root); the app lives as long as the job, and
``ray job stop`` takes it down:

    ray job submit --no-wait --working-dir . -- python jobs/serve.py \
        --model s3://my-llava-bucket/runs/llava-1.5-7b-finetune/final --host 0.0.0.0

Locally: ``python jobs/serve.py --model ./llava_ray_runs/tiny-finetune/final`` (Ctrl-C stops it).
Settings (replicas, autoscaling, batching, input limits, the vLLM backend) are the ``serve`` config
section: ``--config FILE`` and/or ``serve.key=value`` overrides; docs/serving.md describes them.
On Kubernetes, cluster/kuberay/rayservice.yaml deploys the same app as a RayService.
"""

import sys

from llava_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
