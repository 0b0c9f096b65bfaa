"""Prepare benchmark: llava-ray's Ray Data prepare pipeline vs a bare Pillow loop, on the same files.

    python benchmarks/run.py prepare [--samples 2000] [--workers W] [--workdir DIR] [--warmup N]
    ray job submit --working-dir . -- python benchmarks/run.py prepare --samples 20000

It writes COCO-like photos (non-square JPEGs around 640x480) and a LLaVA JSON file, then measures:

(a) a bare single-process Pillow loop: read, decode, pad to a square in CLIP's mean colour,
    bicubic resize to 336 px, encode JPEG (quality 95, 4:4:4): samples/s on one core;
(b) the prepare pipeline (``run_prepare``: scan, tokenise, the same image work, parquet shards,
    report) at LLaVA-1.5-7B's image size with ``--workers`` actors: samples/s per worker core, by
    the wall clock around ``run_prepare``, end to end (scan, actor start-up and writing included);
    only the driver process's one-off import of the model code (torch) happens before the clock.

An untimed warm-up prepare of ``--warmup`` samples runs first (0 turns it off), so (b) meets Ray
worker processes that already exist, as on a cluster that has run jobs before; a cold run adds
several seconds of process start-up. (a) is measured before and after (b) and averaged, so load
from other processes on a shared machine weighs on both. Both figures and the ratio b/a (goal:
>= 0.6) are printed, and the same by CPU time (samples per CPU second of the bare loop vs of the
pipeline: this process plus the Ray worker processes it started, sampled while the run goes),
which other processes' load skews far less. CPU time is measured only where this process started
Ray itself; under ``ray job submit`` the workers are not its children and the CPU figures are
``None``. The last line is one JSON object with every figure. Measured figures:
``benchmarks/README.md``.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import random
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from PIL import Image, ImageDraw, ImageFilter

from llava_ray.config import validate_config
from llava_ray.config.presets import TINY_TOKENIZER_DIR

PHOTO_SIZES = ((640, 480), (480, 640), (640, 427), (427, 640), (500, 375), (640, 512))
BENCH_IMAGE_SIZE = 336  # LLaVA-1.5's CLIP ViT-L/14-336
PAD_COLOUR = (122, 116, 104)
GOAL_RATIO = 0.6


@dataclass(frozen=True)
class PrepareBenchOptions:
    samples: int = 2000
    workers: int | None = None  # prepare actors; default: every CPU of the Ray cluster
    workdir: str | None = None  # keep (and reuse) the photos here instead of a temporary folder
    seed: int = 0
    warmup: int = 128  # samples of an untimed prepare run first (0: measure cold)


# ---- the corpus --------------------------------------------------------------------------------


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


# ---- (a) the bare loop -------------------------------------------------------------------------


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


# ---- (b) the pipeline --------------------------------------------------------------------------


class ChildCpuSampler:
    """CPU seconds this process's descendants (a local Ray's workers) use while it runs.

    Prepare actors exit when the dataset is done, taking their CPU counters with them, so each
    descendant is sampled every ``interval_s`` and its last reading kept: a process that exits
    loses at most one interval of its CPU time.
    """

    def __init__(self, interval_s: float = 0.2):
        self.interval_s = interval_s
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ChildCpuSampler:
        self._sample()  # processes already running count from here, not from their start
        self._first = dict(self._last)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def cpu_s(self) -> float:
        return sum(cpu - self._first.get(pid, 0.0) for pid, cpu in self._last.items())

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        for child in psutil.Process().children(recursive=True):
            try:
                times = child.cpu_times()
            except psutil.Error:  # ended between the listing and the reading
                continue
            self._last[child.pid] = times.user + times.system


@dataclass(frozen=True)
class PipelineTiming:
    """One timed ``run_prepare``: wall seconds, and CPU seconds of this process and of Ray's workers."""

    seconds: float
    driver_cpu_s: float
    worker_cpu_s: float | None  # None: Ray's workers are not this process's children
    report: dict[str, Any]


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


def start_ray(workers: int | None) -> bool:
    """Join the job's cluster under ``ray job submit``, else start a private local instance of
    ``workers`` CPUs; True when this process started Ray (its workers are then its children)."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return False
    ray.init(address="local", num_cpus=workers, include_dashboard=False)
    return True


def timed_prepare(config: Any, workers: int, local_ray: bool) -> PipelineTiming:
    from llava_ray.data.prepare import run_prepare

    sampler = ChildCpuSampler()
    started, started_cpu = time.perf_counter(), time.process_time()
    with sampler:
        report = run_prepare(config, workers=workers)
    seconds = time.perf_counter() - started
    driver_cpu_s = time.process_time() - started_cpu
    return PipelineTiming(seconds, driver_cpu_s, sampler.cpu_s if local_ray else None, report)


def run_prepare_benchmark(options: PrepareBenchOptions) -> dict[str, Any]:
    """Write (or reuse) the photos, time (a), (b), (a) again; return every figure."""
    import ray

    with tempfile.TemporaryDirectory(prefix="llava-ray-bench-") as scratch:
        root = Path(options.workdir) if options.workdir else Path(scratch)
        print(f"writing {options.samples} photo-like JPEGs to {root} (reused when present) ...", flush=True)
        data_file = write_photo_corpus(root, options.samples, options.seed)
        paths = [root / record["image"] for record in json.loads(data_file.read_text())]
        local_ray = start_ray(options.workers)
        # The driver imports the model code (torch) once per process: start-up, not throughput.
        importlib.import_module("llava_ray.model.presets")
        workers = options.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        if options.warmup:
            warm_up(data_file, root, options.warmup, workers)

        before = bare_pillow_loop(paths)
        print(f"(a) bare Pillow loop: {before.per_s:.1f} samples/s on one core", flush=True)
        pipeline = timed_prepare(bench_config(data_file, root / "prepared"), workers, local_ray)
        after = bare_pillow_loop(paths)
        print(f"(a) bare Pillow loop again: {after.per_s:.1f} samples/s on one core", flush=True)
    return {
        **prepare_figures(options.samples, workers, before, after, pipeline),
        "warmup_samples": options.warmup,
    }


def warm_up(data_file: Path, root: Path, samples: int, workers: int) -> None:
    """A small prepare first, so Ray's worker processes exist, as on a cluster that has run jobs."""
    from llava_ray.data.prepare import run_prepare

    records = json.loads(data_file.read_text())[:samples]
    warmup_file = root / "warmup.json"
    warmup_file.write_text(json.dumps(records))
    print(f"warm-up: preparing {len(records)} samples ...", flush=True)
    run_prepare(bench_config(warmup_file, root / "warmup-prepared"), workers=workers)


def prepare_figures(
    samples: int, workers: int, before: LoopTiming, after: LoopTiming, pipeline: PipelineTiming
) -> dict[str, Any]:
    """Print and return (a), (b) and b/a by the wall clock, and the same by CPU time."""
    bare = (before.per_s + after.per_s) / 2
    bare_cpu = (before.per_cpu_s + after.per_cpu_s) / 2
    per_s = samples / pipeline.seconds
    per_core = per_s / workers
    print(
        f"(b) prepare pipeline, end to end: {per_s:.1f} samples/s on {workers} workers = "
        f"{per_core:.1f} per core; ratio b/a = {per_core / bare:.2f} (goal >= {GOAL_RATIO})",
        flush=True,
    )
    cpu_figures: dict[str, Any] = {"prepare_samples_per_cpu_s": None, "ratio_cpu_time": None}
    if pipeline.worker_cpu_s is not None:
        per_cpu_s = samples / (pipeline.worker_cpu_s + pipeline.driver_cpu_s)
        cpu_figures = {
            "prepare_samples_per_cpu_s": round(per_cpu_s, 2),
            "ratio_cpu_time": round(per_cpu_s / bare_cpu, 3),
        }
        print(
            f"    by CPU time: bare {bare_cpu:.1f}, pipeline {per_cpu_s:.1f} samples per CPU second "
            f"(Ray workers {pipeline.worker_cpu_s:.1f} s + driver {pipeline.driver_cpu_s:.1f} s); "
            f"ratio {per_cpu_s / bare_cpu:.2f}",
            flush=True,
        )
    return {
        "benchmark": "prepare",
        "samples": samples,
        "workers": workers,
        "image_size": BENCH_IMAGE_SIZE,
        "bare_pillow_samples_per_s_per_core": round(bare, 2),
        "bare_pillow_before_after": [round(before.per_s, 2), round(after.per_s, 2)],
        "prepare_seconds": round(pipeline.seconds, 3),
        "prepare_samples_per_s": round(per_s, 2),
        "prepare_samples_per_s_per_core": round(per_core, 2),
        "written": pipeline.report["written"],
        "ratio": round(per_core / bare, 3),
        "bare_pillow_samples_per_cpu_s": round(bare_cpu, 2),
        "prepare_worker_cpu_s": None if pipeline.worker_cpu_s is None else round(pipeline.worker_cpu_s, 3),
        "prepare_driver_cpu_s": round(pipeline.driver_cpu_s, 3),
        **cpu_figures,
        "goal_ratio": GOAL_RATIO,
    }
