"""Run a llava-ray benchmark: each measures a stage against a bare baseline in the same run.

    python benchmarks/run.py prepare [--samples 2000] [--workers W] [--workdir DIR] [--warmup N]
    python benchmarks/run.py scale [--rows 66500 665000] [--workers 2] [--seconds 20] [--workdir DIR]
    python benchmarks/run.py serve [--preset tiny] [--requests 32] [--batch 8] [--tokens 32] [--device cpu]
    python benchmarks/run.py train [--preset tiny|llava-7b-stage1|stage2-1b] [--steps N]
                                   [--device cpu|cuda] [--packing on|off] [--grouping sorted|llava]
                                   [--lm-head supervised|full] [--attention segments|varlen]
                                   [--smoke] [--ray]
    ray job submit --working-dir . -- python benchmarks/run.py prepare --samples 20000
    ray job submit --working-dir . -- python benchmarks/run.py train --preset stage2-1b --device cuda --ray
    bash benchmarks/gpu_benchmark.sh OUT_DIR      # the GPU checks in one go, on a bare GPU machine

``prepare`` is described in ``prepare_throughput.py``, ``scale`` in ``scale_rehearsal.py``,
``serve`` in ``serving_throughput.py``, ``train`` in ``train_step.py``. The last
line of each is one JSON object with every figure; the figures measured so far, with the commit
and machine, are in ``benchmarks/README.md``. Benchmarks import ``llava_ray`` (installed, or
``PYTHONPATH=platform``); the package never imports them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import train_step


def cmd_prepare(args: argparse.Namespace) -> dict[str, Any]:
    import prepare_throughput  # only here: it needs Ray and psutil, which a bare GPU box may lack

    options = prepare_throughput.PrepareBenchOptions(
        samples=args.samples, workers=args.workers, workdir=args.workdir, seed=args.seed, warmup=args.warmup
    )
    return prepare_throughput.run_prepare_benchmark(options)


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    options = train_step.TrainBenchOptions(
        preset=args.preset,
        steps=args.steps,
        warmup=args.warmup,
        device=args.device,
        packing=args.packing == "on",
        grouping=args.grouping,
        lm_head=args.lm_head,
        attention=args.attention,
        smoke=args.smoke,
        seed=args.seed,
    )
    if args.ray:
        import ray  # only here: the train benchmark runs where Ray is not installed (a bare GPU box)

        if not ray.is_initialized():
            # The task's output would reach this driver asynchronously, after the last (JSON) line.
            local = {} if os.environ.get("RAY_ADDRESS") else {"address": "local", "include_dashboard": False}
            ray.init(log_to_driver=False, **local)
        # benchmarks/ is not on the workers' path: ship this module's code with the task.
        ray.cloudpickle.register_pickle_by_value(train_step)
        # One task holding the whole device: both contenders share its process, as without Ray.
        task = ray.remote(num_cpus=1, num_gpus=1 if args.device == "cuda" else 0)(
            train_step.run_train_benchmark
        )
        figures = ray.get(task.remote(options))
    else:
        figures = train_step.run_train_benchmark(options)
    print(train_step.format_summary(figures), flush=True)
    return figures


def cmd_scale(args: argparse.Namespace) -> dict[str, Any]:
    import scale_rehearsal  # only here: it needs Ray

    return scale_rehearsal.rehearse(args)


def cmd_serve(args: argparse.Namespace) -> dict[str, Any]:
    import serving_throughput

    options = serving_throughput.ServeBenchOptions(
        preset=args.preset, requests=args.requests, batch=args.batch, tokens=args.tokens, device=args.device
    )
    return serving_throughput.run_serve_benchmark(options)


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

    scale = add("scale", cmd_scale, "training input at LLaVA-665K size: first batch, memory, loader rate")
    scale.add_argument("--rows", type=int, nargs="+", default=[66_500, 665_000], help="sizes to rehearse")
    scale.add_argument("--workers", type=int, default=2, help="training ranks (default 2)")
    scale.add_argument("--seconds", type=float, default=20.0, help="how long each rank's rate is measured")
    scale.add_argument("--workdir", default="/tmp/llava-scale", help="shards are written (and reused) here")
    scale.add_argument(
        "--baseline-max-rows",
        type=int,
        default=66_500,
        help="run the pre-streaming design up to this size (it materializes every image in the object store)",
    )
    scale.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per case")

    serve = add("serve", cmd_serve, "serving generation one request at a time vs batched, requests/s")
    serve.add_argument("--preset", default="tiny", help="model preset, random init (default tiny)")
    serve.add_argument("--requests", type=int, default=32, help="requests, each with an image (default 32)")
    serve.add_argument("--batch", type=int, default=8, help="requests per batch in (b) (default 8)")
    serve.add_argument("--tokens", type=int, default=32, help="max_tokens of every request (default 32)")
    serve.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")

    train = add("train", cmd_train, "HF LLaVA padded training vs llava-ray's step, supervised tokens/s")
    train.add_argument(
        "--preset",
        choices=sorted(train_step.TRAIN_PRESETS),
        default="tiny",
        help="model and batch (default tiny)",
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
        "--attention",
        choices=("segments", "varlen"),
        default="segments",
        help="(b)'s per-sample attention, as train.attention: one SDPA call per sample (default), or "
        "torch's variable-length FlashAttention kernel (CUDA, bf16)",
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
