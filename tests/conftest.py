"""Shared test set-up: nothing downloads, everything runs on the CPU."""

import os

# Tests build tiny models from configs and a tokenizer shipped in the package; any hub access is a bug.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
