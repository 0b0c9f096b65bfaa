"""The benchmarks under ``benchmarks/`` (outside the package): the training benchmark's pieces and
a short run of ``benchmarks/run.py train`` end to end; the prepare benchmark's figures and CPU
sampler (its full run needs a Ray cluster and minutes, so it is not run here); the scale
rehearsal's shards and figures (its cases need minutes and tens of GB, so they are not run here)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest

from llava_ray.conversation.templates import IGNORE_INDEX

REPO = Path(__file__).resolve().parents[2]


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (benchmarks/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(module)
    return module


train_step = load_benchmark("train_step")
prepare_throughput = load_benchmark("prepare_throughput")
scale_rehearsal = load_benchmark("scale_rehearsal")
LLAVA_665K_MIX = train_step.LLAVA_665K_MIX
TrainBenchOptions = train_step.TrainBenchOptions
grouped_micro_batches = train_step.grouped_micro_batches
run_train_benchmark = train_step.run_train_benchmark
synthetic_rows = train_step.synthetic_rows


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
        [sys.executable, "benchmarks/run.py", "train", "--preset", "tiny", "--steps", "2", "--warmup", "1"],
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


def test_prepare_figures_are_measured_around_the_run():
    loop = prepare_throughput.LoopTiming(per_s=100.0, per_cpu_s=110.0)
    timing = prepare_throughput.PipelineTiming(
        seconds=10.0, driver_cpu_s=2.0, worker_cpu_s=18.0, report={"written": 1000}
    )
    figures = prepare_throughput.prepare_figures(1000, 2, loop, loop, timing)
    assert figures["prepare_samples_per_s_per_core"] == 50.0 and figures["ratio"] == 0.5
    assert figures["prepare_samples_per_cpu_s"] == 50.0 and figures["ratio_cpu_time"] == pytest.approx(
        0.455, abs=1e-3
    )
    # Under ray job submit the workers are not this process's children: no CPU-time figures.
    remote = prepare_throughput.PipelineTiming(10.0, 2.0, None, {"written": 1000})
    figures = prepare_throughput.prepare_figures(1000, 2, loop, loop, remote)
    assert figures["ratio"] == 0.5 and figures["ratio_cpu_time"] is None


def test_child_cpu_sampler_counts_children_that_exit():
    burn = "import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass"
    with prepare_throughput.ChildCpuSampler(interval_s=0.05) as sampler:
        subprocess.run([sys.executable, "-c", burn], check=True)
    assert sampler.cpu_s >= 0.3


def test_scale_rehearsal_writes_shards_training_reads(tmp_path):
    from llava_ray.training.stream import index_prepared

    report = scale_rehearsal.write_prepared(tmp_path / "prepared", 300)
    index = index_prepared(str(tmp_path / "prepared"))
    rows = index.rows
    assert report["written"] == len(rows) == 300 and sorted(rows["row"]) == list(range(300))
    assert len(index.units) == 5  # row groups of 64
    images = rows[rows["is_image"]]
    assert 0.85 < len(images) / 300 < 0.99 and (images["length"] > scale_rehearsal.IMAGE_POSITIONS).all()
    assert 30_000 < report["image_bytes_mean"] < 80_000  # photo-like encoded 336 px JPEGs
    again = scale_rehearsal.write_prepared(tmp_path / "prepared", 300)
    assert again == report  # complete shards are reused


def test_scale_rehearsal_goals_are_read_at_the_largest_size():
    args = SimpleNamespace(rows=[10, 20])
    results = {
        "20": {"stream": {"first_batch_s": [41.0, 58.5], "samples_per_s_per_rank": [30.0, 17.0]}},
    }
    goals = scale_rehearsal.summary(results, args)["goals"]
    assert goals["rows"] == 20 and goals["first_batch_within_60_s"]
    assert goals["loader_at_least_3x"] and goals["loader_over_stage1_gpu"] == round(
        17 / (558_000 / 100_800), 1
    )
    results["20"]["stream"]["first_batch_s"][1] = 61.0
    assert not scale_rehearsal.summary(results, args)["goals"]["first_batch_within_60_s"]
