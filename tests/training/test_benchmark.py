"""The training benchmark: its pieces, and a short run of ``jobs/benchmark.py train`` end to end."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llava_ray.conversation.templates import IGNORE_INDEX
from llava_ray.training.benchmark import (
    LLAVA_665K_MIX,
    TrainBenchOptions,
    grouped_micro_batches,
    run_train_benchmark,
    synthetic_rows,
)

REPO = Path(__file__).resolve().parents[2]


def test_synthetic_rows_follow_the_mix():
    rows = synthetic_rows(
        400,
        image_positions=64,
        image_size=16,
        image_token_id=4,
        text_ids=np.arange(10, 600),
        length_scale=0.25,
        max_length=512,
        seed=0,
    )
    kinds = [row["kind"] for row in rows]
    for kind in LLAVA_665K_MIX:
        assert kinds.count(kind.name) / len(rows) == pytest.approx(kind.share, abs=0.06)
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) <= 512
        placeholders = row["input_ids"].count(4)
        assert placeholders == (64 if row["kind"] != "sharegpt" else 0) == 64 * len(row["images"])
        assert any(label != IGNORE_INDEX for label in row["labels"])
        assert all(
            label == IGNORE_INDEX
            for label, token in zip(row["labels"], row["input_ids"], strict=True)
            if token == 4
        )


def test_grouped_micro_batches_keep_modalities_apart():
    lengths = [10, 50, 20, 40, 30, 60, 70, 15]
    is_image = [True, True, True, True, True, True, False, False]
    assert grouped_micro_batches(lengths, is_image, 2, "sorted") == [[5, 1], [3, 4], [2, 0], [6, 7]]
    # LLaVA's split_to_even_chunks: each row to the micro-batch with the least length so far.
    assert grouped_micro_batches(lengths, is_image, 2, "llava") == [[5, 0], [1, 2], [3, 4], [6, 7]]
    for grouping in ("sorted", "llava"):  # a modality without samples
        assert grouped_micro_batches([5, 7], [True, True], 2, grouping) == [[1, 0]]


def test_gpu_presets_need_a_gpu_or_smoke():
    with pytest.raises(ValueError, match=r"preset 'stage2-1b' is sized for a GPU; run it with --device cuda"):
        run_train_benchmark(TrainBenchOptions(preset="stage2-1b", device="cpu"))


def test_train_benchmark_runs_and_ends_with_one_json_line():
    completed = subprocess.run(
        [sys.executable, "jobs/benchmark.py", "train", "--preset", "tiny", "--steps", "2", "--warmup", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    figures = json.loads(completed.stdout.strip().splitlines()[-1])
    assert figures["benchmark"] == "train" and figures["preset"] == "tiny" and figures["ratio"] > 0
    for name in ("baseline", "llava_ray"):
        contender = figures[name]
        for key in ("supervised_tokens_per_s", "samples_per_s", "padding_fraction", "peak_memory_gib"):
            assert contender[key] > 0 or key == "padding_fraction", (name, key)
        assert contender["mfu"] is None  # CPU: no meaningful peak to compare against
        assert len(contender["step_seconds"]) == 2
    # The same samples and supervised tokens; packing removes the padding.
    assert figures["baseline"]["step_supervised"] == figures["llava_ray"]["step_supervised"]
    assert figures["baseline"]["step_samples"] == figures["llava_ray"]["step_samples"] == 32
    assert figures["llava_ray"]["padding_fraction"] < figures["baseline"]["padding_fraction"]
    # As training packs: each of (a)'s micro-batches becomes one row, the LM head only where supervised.
    assert figures["baseline"]["step_micro_batches"] == figures["llava_ray"]["step_micro_batches"]
    assert figures["packing"] and figures["lm_head"] == "supervised"
