"""Benchmarks of llava-ray stages, measured against a bare baseline in the same run.

    python jobs/benchmark.py prepare [--samples 2000] [--workers W] [--workdir DIR]
    ray job submit --working-dir . -- python jobs/benchmark.py prepare --samples 20000
    python jobs/benchmark.py train [--preset tiny|llava-7b-stage1|stage2-1b] [--steps N]
                                   [--device cpu|cuda] [--packing on|off]
                                   [--lm-head supervised|full] [--ray]
    ray job submit --working-dir . -- python jobs/benchmark.py train --preset stage2-1b --device cuda --ray

``prepare`` writes COCO-like photos (non-square JPEGs around 640x480) and a LLaVA JSON file, then
measures, on the same files:

(a) a bare single-process Pillow loop: read, decode, pad to a square in CLIP's mean colour,
    bicubic resize to 336 px, encode JPEG (quality 95, 4:4:4): samples/s on one core;
(b) the prepare pipeline (``run_prepare``: scan, tokenise, the same image work, parquet shards,
    report) at LLaVA-1.5-7B's image size with ``--workers`` actors: samples/s per worker core,
    end to end: scan, actor start-up and writing included; only the driver process's one-off
    import of the model code (torch) happens before the clock starts.

An untimed warm-up prepare of ``--warmup`` samples runs first (0 turns it off), so (b) meets
Ray worker processes that already exist, as on a cluster that has run jobs before; a cold run
adds several seconds of process start-up. (a) is measured before and after (b) and averaged, so load from other processes on a shared
machine weighs on both. It prints both figures and the ratio b/a (goal: >= 0.6), and the same
by CPU time (samples per CPU second of the bare loop vs of the pipeline's workers and driver),
which other processes' load skews far less; the last line is one JSON object with every figure.

``train`` times one training step of stock Hugging Face ``LlavaForConditionalGeneration`` with
LLaVA-style padded batches (a) against llava-ray's step (b) on the same samples of a LLaVA-1.5
665K-like length mix, in one process on one device (``--ray``: as one Ray task); the data mix,
the contenders and every figure are described in ``llava_ray.training.benchmark``. The last line
is one JSON object with each contender's figures and ``ratio`` (b/a in supervised tokens/s).
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFilter

from llava_ray.config import validate_config
from llava_ray.config.presets import TINY_TOKENIZER_DIR
from llava_ray.training.benchmark import (
    TRAIN_PRESETS,
    TrainBenchOptions,
    format_summary,
    run_train_benchmark,
)

PHOTO_SIZES = ((640, 480), (480, 640), (640, 427), (427, 640), (500, 375), (640, 512))
BENCH_IMAGE_SIZE = 336  # LLaVA-1.5's CLIP ViT-L/14-336
PAD_COLOUR = (122, 116, 104)
GOAL_RATIO = 0.6


# ---------------------------------------------------------------------------------------------
# prepare


def write_photo_corpus(root: Path, samples: int, seed: int) -> Path:
    """``samples`` photo-like JPEGs and a LLaVA JSON array over them; reused when already there."""
    data_file = root / f"bench_{samples}_{seed}.json"
    if data_file.exists():
        return data_file
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for index in range(samples):
        name = f"images/photo_{seed}_{index:07d}.jpg"
        photo_like(rng, rng.choice(PHOTO_SIZES)).save(root / name, format="JPEG", quality=90)
        words = " ".join(
            rng.choice(("red", "bus", "street", "two", "people", "near", "a", "tall")) for _ in range(40)
        )
        records.append(
            {
                "id": f"bench-{index:07d}",
                "image": name,
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe the image in detail."},
                    {"from": "gpt", "value": words},
                ],
            }
        )
    data_file.write_text(json.dumps(records))
    return data_file


def photo_like(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """A smooth gradient with blurred shapes and grain: compresses like a photo (tens of KB)."""
    width, height = size
    top, bottom = [tuple(rng.randrange(256) for _ in range(3)) for _ in range(2)]
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    image = Image.composite(Image.new("RGB", size, top), Image.new("RGB", size, bottom), image.convert("L"))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = rng.randrange(width), rng.randrange(height)
        radius = rng.randrange(10, 120)
        draw.ellipse(
            (x - radius, y - radius, x + radius, y + radius), fill=tuple(rng.randrange(256) for _ in range(3))
        )
    image = image.filter(ImageFilter.GaussianBlur(2))
    grain = Image.effect_noise(size, 24).convert("RGB")
    return Image.blend(image, grain, 0.12)


@dataclass(frozen=True)
class LoopTiming:
    """Samples/s of the bare loop on one core, by the wall clock and by this process's CPU time."""

    per_s: float
    per_cpu_s: float


def bare_pillow_loop(paths: Sequence[Path], size: int = BENCH_IMAGE_SIZE) -> LoopTiming:
    """The bare loop (a), in this process."""
    started, started_cpu = time.perf_counter(), time.process_time()
    for path in paths:
        image = Image.open(io.BytesIO(path.read_bytes())).convert("RGB")
        width, height = image.size
        side = max(width, height)
        square = Image.new("RGB", (side, side), PAD_COLOUR)
        square.paste(image, ((side - width) // 2, (side - height) // 2))
        square = square.resize((size, size), Image.Resampling.BICUBIC)
        square.save(io.BytesIO(), format="JPEG", quality=95, subsampling=0)
    return LoopTiming(
        len(paths) / (time.perf_counter() - started), len(paths) / (time.process_time() - started_cpu)
    )


def bench_config(data_file: Path, prepared: Path) -> Any:
    """LLaVA-1.5-7B's image size and template, built at random (nothing downloads), tiny tokenizer."""
    return validate_config(
        {
            "model": {"preset": "llava-1.5-7b", "init": "random", "tokenizer": str(TINY_TOKENIZER_DIR)},
            "train": {"stage": "finetune"},
            "data": {
                "sources": [{"path": str(data_file)}],
                "prepared_path": str(prepared),
                "image_format": "jpeg",
                "jpeg_quality": 95,
            },
        }
    )


def start_ray(workers: int | None) -> None:
    """Join the job's cluster under ``ray job submit``; else a private local instance of ``workers`` CPUs."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(address="local", num_cpus=workers, include_dashboard=False)


def cmd_prepare(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from llava_ray.data.prepare import run_prepare

    with tempfile.TemporaryDirectory(prefix="llava-ray-bench-") as scratch:
        root = Path(args.workdir) if args.workdir else Path(scratch)
        print(f"writing {args.samples} photo-like JPEGs to {root} (reused when present) ...", flush=True)
        data_file = write_photo_corpus(root, args.samples, args.seed)
        paths = [root / record["image"] for record in json.loads(data_file.read_text())]
        start_ray(args.workers)
        # The driver imports the model code (torch) once per process: start-up, not throughput.
        importlib.import_module("llava_ray.model.presets")
        workers = args.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        if args.warmup:
            warm_up(data_file, root, args.warmup, workers)

        before = bare_pillow_loop(paths)
        print(f"(a) bare Pillow loop: {before.per_s:.1f} samples/s on one core", flush=True)
        report = run_prepare(bench_config(data_file, root / "prepared"), workers=workers)
        after = bare_pillow_loop(paths)
        print(f"(a) bare Pillow loop again: {after.per_s:.1f} samples/s on one core", flush=True)
    figures = prepare_figures(args.samples, workers, before, after, report)
    return {**figures, "warmup_samples": args.warmup}


def warm_up(data_file: Path, root: Path, samples: int, workers: int) -> None:
    """A small prepare first, so Ray's worker processes exist, as on a cluster that has run jobs."""
    from llava_ray.data.prepare import run_prepare

    records = json.loads(data_file.read_text())[:samples]
    warmup_file = root / "warmup.json"
    warmup_file.write_text(json.dumps(records))
    print(f"warm-up: preparing {len(records)} samples ...", flush=True)
    run_prepare(bench_config(warmup_file, root / "warmup-prepared"), workers=workers)


def prepare_figures(
    samples: int, workers: int, before: LoopTiming, after: LoopTiming, report: dict[str, Any]
) -> dict[str, Any]:
    """Print and return (a), (b) and b/a by the wall clock, and the same by CPU time.

    The CPU-time ratio (bare loop CPU per sample / pipeline workers' and driver's CPU per sample)
    moves far less than the wall-clock one when other processes load the machine.
    """
    bare = (before.per_s + after.per_s) / 2
    per_core = report["samples_per_s"] / workers
    bare_cpu = (before.per_cpu_s + after.per_cpu_s) / 2
    pipeline_cpu_s = report["worker_cpu_s"] + report["driver_cpu_s"]
    per_cpu_s = report["input"] / pipeline_cpu_s
    print(
        f"(b) prepare pipeline, end to end: {report['samples_per_s']:.1f} samples/s on {workers} workers = "
        f"{per_core:.1f} per core; ratio b/a = {per_core / bare:.2f} (goal >= {GOAL_RATIO})\n"
        f"    by CPU time: bare {bare_cpu:.1f}, pipeline {per_cpu_s:.1f} samples per CPU second "
        f"(workers {report['worker_cpu_s']:.1f} s + driver {report['driver_cpu_s']:.1f} s); "
        f"ratio {per_cpu_s / bare_cpu:.2f}",
        flush=True,
    )
    steady = report.get("steady_state")
    steady_figures = {}
    if steady:
        steady_per_core = steady["samples_per_s"] / workers
        steady_per_cpu_s = steady["cpu_samples"] / steady["worker_cpu_s"]
        steady_figures = {
            "steady_samples_per_s_per_core": round(steady_per_core, 2),
            "steady_ratio": round(steady_per_core / bare, 3),
            "steady_samples_per_cpu_s": round(steady_per_cpu_s, 2),
            "steady_ratio_cpu_time": round(steady_per_cpu_s / bare_cpu, 3),
            "steady_state": steady,
        }
        print(
            f"(b) once every worker runs (start-up batches left out): {steady['samples_per_s']:.1f} samples/s = "
            f"{steady_per_core:.1f} per core, ratio b/a = {steady_per_core / bare:.2f}; "
            f"by workers' CPU time {steady_per_cpu_s:.1f} samples per CPU second, ratio "
            f"{steady_per_cpu_s / bare_cpu:.2f}",
            flush=True,
        )
    return {
        "benchmark": "prepare",
        "samples": samples,
        "workers": workers,
        "image_size": BENCH_IMAGE_SIZE,
        "bare_pillow_samples_per_s_per_core": round(bare, 2),
        "bare_pillow_before_after": [round(before.per_s, 2), round(after.per_s, 2)],
        "prepare_samples_per_s": report["samples_per_s"],
        "prepare_samples_per_s_per_core": round(per_core, 2),
        "prepare_elapsed_s": report["elapsed_s"],
        "written": report["written"],
        "ratio": round(per_core / bare, 3),
        "bare_pillow_samples_per_cpu_s": round(bare_cpu, 2),
        "prepare_samples_per_cpu_s": round(per_cpu_s, 2),
        "prepare_worker_cpu_s": report["worker_cpu_s"],
        "prepare_driver_cpu_s": report["driver_cpu_s"],
        "ratio_cpu_time": round(per_cpu_s / bare_cpu, 3),
        **steady_figures,
        "goal_ratio": GOAL_RATIO,
    }


# ---------------------------------------------------------------------------------------------
# train


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    options = TrainBenchOptions(
        preset=args.preset,
        steps=args.steps,
        warmup=args.warmup,
        device=args.device,
        packing=args.packing == "on",
        grouping=args.grouping,
        lm_head=args.lm_head,
        smoke=args.smoke,
        seed=args.seed,
    )
    if args.ray:
        import ray  # only here: the train benchmark runs where Ray is not installed (a bare GPU box)

        if not ray.is_initialized():
            # The task's output would reach this driver asynchronously, after the last (JSON) line.
            local = {} if os.environ.get("RAY_ADDRESS") else {"address": "local", "include_dashboard": False}
            ray.init(log_to_driver=False, **local)
        # One task holding the whole device: both contenders share its process, as without Ray.
        task = ray.remote(num_cpus=1, num_gpus=1 if args.device == "cuda" else 0)(run_train_benchmark)
        figures = ray.get(task.remote(options))
    else:
        figures = run_train_benchmark(options)
    print(format_summary(figures), flush=True)
    return figures


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Benchmarks of llava-ray stages against bare baselines.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Callable[[argparse.Namespace], dict[str, Any]], help_text: str):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    prepare = add("prepare", cmd_prepare, "prepare pipeline vs a bare Pillow loop, samples/s per core")
    prepare.add_argument("--samples", type=int, default=2000, help="photos to process (default 2000)")
    prepare.add_argument("--workers", type=int, default=None, help="prepare actors (default: every CPU)")
    prepare.add_argument(
        "--workdir", default=None, help="keep (and reuse) the photos here instead of a temp dir"
    )
    prepare.add_argument("--seed", type=int, default=0, help="seed of the generated photos")
    prepare.add_argument(
        "--warmup",
        type=int,
        default=128,
        help="samples of an untimed prepare run first, so Ray worker processes exist (0: measure cold)",
    )

    train = add("train", cmd_train, "HF LLaVA padded training vs llava-ray's step, supervised tokens/s")
    train.add_argument(
        "--preset", choices=sorted(TRAIN_PRESETS), default="tiny", help="model and batch (default tiny)"
    )
    train.add_argument("--steps", type=int, default=5, help="measured steps per contender (default 5)")
    train.add_argument("--warmup", type=int, default=1, help="untimed steps per contender first (default 1)")
    train.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="where to train (default cpu)"
    )
    train.add_argument(
        "--packing",
        choices=("on", "off"),
        default="on",
        help="(b) packs each micro-batch into one row, as train.packing does (default on)",
    )
    train.add_argument(
        "--lm-head",
        choices=("supervised", "full"),
        default="supervised",
        help="(b)'s LM head: only at supervised positions, as training runs it (default), or everywhere",
    )
    train.add_argument(
        "--grouping",
        choices=("sorted", "llava"),
        default="sorted",
        help="(a)'s micro-batches: sorted by length (default) or spread as LLaVA's sampler does",
    )
    train.add_argument(
        "--smoke",
        action="store_true",
        help="shrink model and batch, bf16: checks a GPU preset's code path on any device (no figures to keep)",
    )
    train.add_argument("--seed", type=int, default=0, help="seed of the model and the samples")
    train.add_argument("--ray", action="store_true", help="run as one Ray task (on the job's cluster if any)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    figures = args.handler(args)
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
