"""Generate LLaVA-Instruct-style data (conversation, detail, complex) from COCO-style annotations.

Submit to a cluster (from the repository root; the config's ``generate`` section names the
annotations, the output and the LLM: an OpenAI-compatible endpoint or a local Hugging Face model):

    ray job submit --working-dir . -- python jobs/generate_data.py --config jobs/configs/generate.yaml

Locally: ``python jobs/generate_data.py --config FILE generate.limit=10``. The API key comes from
``generate.api_key`` or ``$OPENAI_API_KEY`` (pass it with ``--runtime-env-json`` env_vars on a
cluster). Rerunning the same config resumes: pairs already in the journal are not requested again.
Exits 2 on a bad config, listing every problem.
"""

import sys

from llava_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate-data", *sys.argv[1:]]))
