"""Shared test set-up: nothing downloads, everything runs on the CPU."""

import os

# Tests build tiny models from configs and a tokenizer shipped in the package; any hub access is a bug.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads, and on 2 cores shared with Ray workers spinning
# OpenMP threads make a step 20-50x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
