"""The ``llava-ray`` command line.

Each subcommand parses its arguments, validates the config before any work, and calls the
package. A bad config exits with status 2 and one message listing every problem. Each handler
imports its job's module when it runs (the one place lazy imports are the rule): ``--help`` and
``validate`` do not pay for torch, Ray and MLflow.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from llava_ray.config import ConfigError, LlavaRayConfig, dump_config, load_config
from llava_ray.utils.logging import setup_logging


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_steps=10"
    )


def _config(args: argparse.Namespace) -> LlavaRayConfig:
    return load_config(args.config, args.overrides)


def cmd_validate(args: argparse.Namespace) -> int:
    """Print the resolved config (every default spelled out)."""
    print(dump_config(_config(args)), end="")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from llava_ray.workflows.pipeline import prepare_job

    prepare_job(_config(args))
    return 0


def cmd_generate_data(args: argparse.Namespace) -> int:
    from llava_ray.workflows.pipeline import generate_job

    generate_job(_config(args))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from llava_ray.training.driver import run_train

    result = run_train(_config(args))
    print(f"[train] {result.run_name}: {result.steps} steps, final model in {result.final_model}")
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from llava_ray.workflows.pipeline import load_pipeline, run_pipeline

    jobs = load_pipeline(args.config, args.overrides)
    result = run_pipeline(
        jobs.pretrain,
        jobs.finetune,
        name=jobs.pipeline.name,
        reuse_prepared=jobs.pipeline.reuse_prepared,
        generate=jobs.generate,
        evaluate=_evaluate_final_model(jobs.evaluate) if jobs.evaluate else None,
    )
    print(f"[pipeline] done: final model {result.stage('finetune').result.final_model}")
    if jobs.evaluate:
        metrics = result.stage("evaluate").result["metrics"]
        print(f"[pipeline] evaluation ({jobs.evaluate.evaluate.benchmark}): {metrics}")
    return 0


def _evaluate_final_model(config: LlavaRayConfig) -> Callable[[str, str | None], dict[str, Any]]:
    """The pipeline's last step: ``config.evaluate`` on stage 2's final model, as a child of its run."""

    def evaluate(final_model: str, parent_run_id: str | None) -> dict[str, Any]:
        from llava_ray.evaluation.job import run_evaluate

        return run_evaluate(config.evaluate.model_copy(update={"model": final_model}), config, parent_run_id)

    return evaluate


def cmd_tune(args: argparse.Namespace) -> int:
    from llava_ray.config.sweep import load_sweep
    from llava_ray.workflows.tune import run_sweep

    run_sweep(*load_sweep(args.config, args.overrides))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from llava_ray.evaluation.job import run_evaluate

    config = _config(args)
    run_evaluate(config.evaluate, config)
    return 0


def cmd_scienceqa_convert(args: argparse.Namespace) -> int:
    import json

    from llava_ray.evaluation.scienceqa import convert_scienceqa

    base = args.scienceqa_dir.rstrip("/")
    try:
        out = convert_scienceqa(
            f"{base}/problems.json",
            f"{base}/pid_splits.json",
            args.image_root or f"{base}/images",
            args.split,
            args.out,
            prompt_format=args.format,
        )
    except (OSError, ValueError) as error:  # a wrong folder or split: nothing was written
        print(f"error: {error}", file=sys.stderr)
        return 2
    report = json.loads(out.with_name(f"{out.stem}.report.json").read_text())
    skipped = (
        f" ({sum(report['skipped'].values())} skipped: {report['skipped']})" if report["skipped"] else ""
    )
    print(
        f"[scienceqa] wrote {report['written']} {args.format} samples of split {args.split} to {out}{skipped}"
    )
    return 0


def cmd_scienceqa_ensemble(args: argparse.Namespace) -> int:
    from llava_ray.evaluation.scienceqa_ensemble import format_table, run_ensemble

    summary = run_ensemble(_config(args).evaluate)
    print(format_table(summary))
    return 1 if summary["requests"]["failed"] else 0


def cmd_reference_answers(args: argparse.Namespace) -> int:
    from llava_ray.evaluation.llava_bench_reference import answer_references

    report = answer_references(_config(args).evaluate)  # logs its summary line
    return 0 if report["written"] == report["questions"] else 1  # 1: rerun for the missing answers


def cmd_serve(args: argparse.Namespace) -> int:
    import yaml

    from llava_ray.serving.run import run_serve, serve_deploy_config

    overrides = list(args.overrides)
    for flag, key in ((args.model, "model"), (args.host, "host"), (args.port, "port")):
        if flag is not None:
            overrides.append(f"serve.{key}={flag}")
    config = load_config(args.config, overrides).serve
    if args.print_config:
        print(yaml.safe_dump(serve_deploy_config(config), sort_keys=False), end="")
        return 0
    run_serve(config)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from llava_ray.data.synthetic import generate

    manifest = generate(args.out, samples=args.samples, eval_samples=args.eval_samples, seed=args.seed)
    print(
        f"wrote {manifest['samples']} training and {manifest['eval_samples']} evaluation images with "
        f"stage-1, stage-2, eval and COCO-style files to {args.out}"
    )
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from llava_ray.config.presets import describe_presets

    print(describe_presets())
    return 0


def cmd_build_tokenizer(args: argparse.Namespace) -> int:
    from llava_ray.conversation.tokenizer import train_tiny_tokenizer
    from llava_ray.data.synthetic import tiny_corpus

    out = train_tiny_tokenizer(tiny_corpus(), args.out)
    print(f"tiny tokenizer written to {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from llava_ray.workflows.demo import DEMO_SAMPLES, run_demo

    samples = DEMO_SAMPLES if args.samples is None else args.samples
    run_demo(args.workdir, samples=samples, seed=args.seed, extra=tuple(args.overrides))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llava-ray", description="Train LLaVA-style vision-language assistants on Ray."
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show every rank's lines and third-party (Ray, DeepSpeed, transformers, MLflow) info and warnings",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, handler: Callable[[argparse.Namespace], int], help_text: str
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    _add_config_arguments(add("validate", cmd_validate, "validate a config and print it resolved"))
    _add_config_arguments(
        add(
            "generate-data",
            cmd_generate_data,
            "generate instruction data from COCO-style annotations with an LLM",
        )
    )
    _add_config_arguments(
        add("prepare", cmd_prepare, "preprocess LLaVA data into parquet shards with Ray Data")
    )
    _add_config_arguments(
        add("train", cmd_train, "train one stage (pretrain or finetune) on Ray Train + DeepSpeed")
    )
    pipeline = add(
        "pipeline",
        cmd_pipeline,
        "the LLaVA recipe as one job: [generate-data] -> prepare -> pretrain -> finetune -> [evaluate]",
    )
    pipeline.add_argument("--config", required=True, help="pipeline YAML (see jobs/configs/*/pipeline.yaml)")
    pipeline.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides for both training stages"
    )
    tune = add(
        "tune", cmd_tune, "sweep stage-job settings (projector, learning rate, ...) with Ray Tune and ASHA"
    )
    tune.add_argument("--config", required=True, help="sweep YAML (see jobs/sweeps/)")
    tune.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="sweep.<key>=value for the sweep file (sweep.num_samples=4), any other key for every trial's stage config",
    )
    _add_config_arguments(
        add(
            "evaluate",
            cmd_evaluate,
            "evaluate a model: synthetic exact match, ScienceQA, LLM-judged LLaVA-Bench",
        )
    )
    sqa_convert = add(
        "scienceqa-convert",
        cmd_scienceqa_convert,
        "convert a ScienceQA release split to LLaVA samples (evaluation items or fine-tuning data)",
    )
    sqa_convert.add_argument(
        "--scienceqa-dir", required=True, help="folder with problems.json and pid_splits.json"
    )
    sqa_convert.add_argument(
        "--split", required=True, help="split of pid_splits.json (train, val, test, ...)"
    )
    sqa_convert.add_argument("--out", required=True, help="output LLaVA JSON file")
    sqa_convert.add_argument(
        "--format",
        default="CQM-A",
        # The formats are checked by the converter (scienceqa.PROMPT_FORMATS): an unknown one exits 2 listing them.
        help="CQM-A: LLaVA-1.5 zero-shot evaluation (default); QCM-LEA: the paper's fine-tuning and its test",
    )
    sqa_convert.add_argument(
        "--image-root", default=None, help="folder of {split}/{pid}/image.png (default: SCIENCEQA_DIR/images)"
    )
    _add_config_arguments(
        add(
            "scienceqa-ensemble",
            cmd_scienceqa_ensemble,
            "ScienceQA with a text-only LLM as judge: its answers, a requery where it and the model disagree",
        )
    )
    _add_config_arguments(
        add(
            "reference-answers",
            cmd_reference_answers,
            "write LLaVA-Bench reference answers with a text-only LLM given each image's context",
        )
    )
    # `chat` has its own parser (llava_ray.evaluation.chat); listed here for --help.
    commands.add_parser(
        "chat", help="chat with a model in the terminal: chat --model DIR [--image PATH] [--system TEXT]"
    )

    serve_parser = add(
        "serve",
        cmd_serve,
        "serve a model with Ray Serve: OpenAI-compatible /v1/chat/completions and a web chat page",
    )
    serve_parser.add_argument("--model", help="model folder or s3:// URL: a run's final/ (or final/hf)")
    serve_parser.add_argument("--config", help="YAML config with a serve section (default: the defaults)")
    serve_parser.add_argument("--host", help="HTTP address (default 127.0.0.1; 0.0.0.0 for every interface)")
    serve_parser.add_argument("--port", type=int, help="HTTP port (default 8000)")
    serve_parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the Serve config (for `serve deploy` or a RayService's serveConfigV2) and exit",
    )
    serve_parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. serve.max_batch_size=16"
    )

    synth = add(
        "synth", cmd_synth, "write the synthetic dataset (images, LLaVA JSON, COCO-style annotations)"
    )
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--samples", type=int, default=200, help="training images (default 200)")
    synth.add_argument("--eval-samples", type=int, default=None, help="held-out images (default samples/5)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    add("presets", cmd_presets, "list the model presets")

    demo = add(
        "demo", cmd_demo, "run the embedded default pipeline on synthetic data (what `make demo` runs)"
    )
    demo.add_argument(
        "--workdir", default="demo_run", help="where data, runs and summary go (default demo_run)"
    )
    demo.add_argument(
        "--samples", type=int, default=None, help="synthetic training images (default: the demo's, 4000)"
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides for both stages, e.g. train.max_steps=3 for a quick check",
    )

    tokenizer = add("build-tokenizer", cmd_build_tokenizer, "retrain the tiny preset's tokenizer")
    tokenizer.add_argument("--out", required=True, help="output folder")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from llava_ray.tracking.mlflow_tracking import TrackingUnavailable

    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = argv[:1] == ["--verbose"]
    if argv[verbose : verbose + 1] == ["chat"]:
        from llava_ray.evaluation.chat import chat_main

        setup_logging(verbose)
        return chat_main(argv[verbose + 1 :])
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return args.handler(args)
    except (ConfigError, TrackingUnavailable) as error:  # nothing was done: say why, exit 2
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
