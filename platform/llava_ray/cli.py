"""The ``llava-ray`` command line.

Each subcommand parses its arguments, validates the config before any work, and calls the
package. A bad config exits with status 2 and one message listing every problem. Each handler
imports its job's module when it runs (the one place lazy imports are the rule): ``--help``,
``--version``, ``validate``, ``presets`` and ``configs`` import neither torch nor Ray, MLflow or
transformers (a test checks), so they answer in about a second.

Every subcommand's ``--help`` gives a description and two examples (:data:`EXAMPLES`).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from llava_ray.config import ConfigError, LlavaRayConfig, dump_config, load_config
from llava_ray.config.catalog import KIND_COMMANDS, CatalogError, copy_config, find_config, shipped_configs
from llava_ray.config.evaluation import BENCHMARKS
from llava_ray.utils.logging import setup_logging
from llava_ray.utils.redact import redact_urls

# Two examples per subcommand, shown under its --help (a test parses each one with build_parser).
EXAMPLES: dict[str, tuple[str, ...]] = {
    "validate": (
        "llava-ray validate --config jobs/configs/tiny/pretrain.yaml",
        "llava-ray validate --config jobs/configs/llava-1.5-7b/finetune.yaml train.max_steps=100 scaling.num_workers=4",
    ),
    "configs": ("llava-ray configs list", "llava-ray configs copy tiny/pretrain my_pretrain.yaml"),
    "configs list": ("llava-ray configs list", "llava-ray configs list --kind sweep"),
    "configs show": (
        "llava-ray configs show tiny/pretrain",
        "llava-ray configs show sweeps/tiny/projector_lr",
    ),
    "configs copy": (
        "llava-ray configs copy llava-1.5-7b/finetune_lora my_finetune.yaml",
        "llava-ray configs copy tiny/pipeline my_pipeline/   # with the stage configs it names",
    ),
    "generate-data": (
        "llava-ray generate-data --config jobs/configs/generate.yaml generate.limit=100",
        "llava-ray generate-data --config jobs/configs/generate.yaml generate.base_url=http://127.0.0.1:8001/v1 generate.model=my-llm",
    ),
    "prepare": (
        "llava-ray prepare --config jobs/configs/tiny/pretrain.yaml",
        "llava-ray prepare --config jobs/configs/tiny/finetune.yaml data.prepare_workers=2 data.prepared_path=/tmp/prepared",
    ),
    "train": (
        "llava-ray train --config jobs/configs/tiny/pretrain.yaml",
        "llava-ray train --config jobs/configs/tiny/finetune.yaml train.max_steps=20 scaling.num_workers=1",
    ),
    "pipeline": (
        "llava-ray pipeline --config jobs/configs/tiny/pipeline.yaml",
        "llava-ray pipeline --config jobs/configs/llava-1.5-7b/pipeline.yaml train.max_steps=50",
    ),
    "tune": (
        "llava-ray tune --config jobs/sweeps/tiny/projector_lr.yaml",
        "llava-ray tune --config jobs/sweeps/tiny/projector_lr.yaml sweep.num_samples=2 train.max_steps=4",
    ),
    "evaluate": (
        "llava-ray evaluate --model llava_ray_runs/tiny-finetune/final --benchmark synthetic --data data/synthetic/eval.json",
        "llava-ray evaluate --config jobs/configs/scienceqa/zero_shot.yaml --model s3://BUCKET/runs/llava-1.5-7b-finetune/final evaluate.limit=100",
    ),
    "scienceqa-convert": (
        "llava-ray scienceqa-convert --scienceqa-dir data/scienceqa --split test --out llava_test_CQM-A.json",
        "llava-ray scienceqa-convert --scienceqa-dir data/scienceqa --split train --format QCM-LEA --out llava_train_QCM-LEA.json",
    ),
    "scienceqa-ensemble": (
        "llava-ray scienceqa-ensemble --config jobs/configs/scienceqa/evaluate.yaml",
        "llava-ray scienceqa-ensemble --config jobs/configs/scienceqa/evaluate.yaml evaluate.scienceqa_ensemble.model=gpt-4o evaluate.scienceqa_ensemble.shots=0",
    ),
    "reference-answers": (
        "llava-ray reference-answers --config bench.yaml evaluate.reference.model=gpt-4o",
        "llava-ray reference-answers --config bench.yaml evaluate.data_path=questions.jsonl evaluate.context=caps_boxes.jsonl evaluate.reference_answers=answers_reference.jsonl",
    ),
    "serve": (
        "llava-ray serve --model llava_ray_runs/tiny-finetune/final",
        "llava-ray serve --config jobs/configs/llava-1.5-7b/serve.yaml --print-config",
    ),
    "export": (
        "llava-ray export --from llava_ray_runs/tiny-finetune --out exported/tiny",
        "llava-ray export --from llava_ray_runs/tiny-finetune-lora --out exported/tiny-lora --lora adapter",
    ),
    "synth": (
        "llava-ray synth --out data/synthetic",
        "llava-ray synth --out /tmp/synth --samples 40 --seed 1",
    ),
    "presets": (
        "llava-ray presets",
        "llava-ray validate --config jobs/configs/tiny/pretrain.yaml model.preset=llava-1.5-7b",
    ),
    "demo": ("llava-ray demo", "llava-ray demo --workdir /tmp/demo --samples 400 train.max_steps=3"),
    "build-tokenizer": (
        "llava-ray build-tokenizer --out /tmp/tiny_tokenizer",
        "llava-ray build-tokenizer --out platform/llava_ray/assets/tiny-tokenizer   # replace the shipped one",
    ),
}
TOP_LEVEL_EXAMPLES = (
    "llava-ray configs list",
    "llava-ray demo --workdir demo_run",
)
HELP_WIDTH = 92


def _add_config_arguments(
    parser: argparse.ArgumentParser, overrides_help: str, config_required: bool = True
) -> None:
    if config_required:
        parser.add_argument("--config", required=True, help="YAML config file")
    else:
        parser.add_argument("--config", help="YAML config file (default: the built-in defaults)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help=f"{overrides_help} (values parse as YAML)",
    )


def _config(args: argparse.Namespace) -> LlavaRayConfig:
    return load_config(args.config, args.overrides)


def cmd_validate(args: argparse.Namespace) -> int:
    """Print the resolved config (every default spelled out; credentials in URLs as ***)."""
    print(redact_urls(dump_config(_config(args))), end="")
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

    config = _evaluate_config(args)
    run_evaluate(config.evaluate, config)
    return 0


# What a benchmark reads besides the model and its questions (--data): without a config file these
# come from overrides, and `evaluate --model --benchmark --data` alone says which are missing.
BENCHMARK_EXTRA_INPUTS: dict[str, tuple[str, ...]] = {
    "llava_bench": ("reference_answers", "context", "judge.model"),
}


def _evaluate_config(args: argparse.Namespace) -> LlavaRayConfig:
    """``--config`` (or the defaults) with overrides, then ``--model``/``--benchmark``/``--data`` on top."""
    flags = {"model": args.model, "benchmark": args.benchmark, "data_path": args.data}
    # As overrides: validated and path-resolved like any other, and applied after the file's values.
    flag_overrides = [
        f"evaluate.{key}={_yaml_value(value)}" for key, value in flags.items() if value is not None
    ]
    config = load_config(args.config, [*args.overrides, *flag_overrides])
    if args.config is None:
        evaluate = config.evaluate
        missing = [
            f"evaluate.{key}"
            for key in BENCHMARK_EXTRA_INPUTS.get(evaluate.benchmark, ())
            if _dotted(evaluate, key) is None
        ]
        if missing:
            raise ConfigError(
                [
                    f"--benchmark {evaluate.benchmark} needs more than --data: set {', '.join(missing)} "
                    "(as key=value overrides, or in a --config file's evaluate section)"
                ]
            )
    return config


def _yaml_value(value: str) -> str:
    """``value`` as YAML that parses back to the same string (a path like ``123`` or ``on`` stays text)."""
    return yaml.safe_dump(value, default_flow_style=True, width=1_000_000).removesuffix("\n...\n").strip()


def _dotted(section: Any, key: str) -> Any:
    for part in key.split("."):
        section = getattr(section, part)
    return section


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


def cmd_configs_list(args: argparse.Namespace) -> int:
    entries = [entry for entry in shipped_configs() if args.kind in (None, entry.kind)]
    name_width = max(len("NAME"), *(len(entry.name) for entry in entries))
    kind_width = max(len("KIND"), *(len(entry.kind_label) for entry in entries))
    print(f"{'NAME':{name_width}}  {'KIND':{kind_width}}  DESCRIPTION")
    for entry in entries:
        print(f"{entry.name:{name_width}}  {entry.kind_label:{kind_width}}  {entry.description}")
    commands = ", ".join(f"{kind}: llava-ray {command}" for kind, command in KIND_COMMANDS.items())
    print(
        "\nllava-ray configs show NAME prints one; llava-ray configs copy NAME DEST writes it (with the YAMLs it "
        f"names) to edit.\nRun a copy with --config FILE ({commands})."
    )
    return 0


def cmd_configs_show(args: argparse.Namespace) -> int:
    print(find_config(args.name).text, end="")
    return 0


def cmd_configs_copy(args: argparse.Namespace) -> int:
    entry = find_config(args.name)
    written = copy_config(args.name, args.dest, force=args.force)
    named = f" and the YAMLs it names ({', '.join(str(path) for path in written[1:])})" if written[1:] else ""
    print(f"copied {entry.name} to {written[0]}{named}")
    print(f"run it: {entry.command} {written[0]}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from llava_ray.training.checkpoint import CheckpointError
    from llava_ray.workflows.export import run_export

    try:
        result = run_export(args.source, args.out, lora=args.lora)
    except (ValueError, FileNotFoundError, CheckpointError) as error:  # nothing was exported: say why, exit 2
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(result.lines())
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


def version_text() -> str:
    """``llava-ray <version>`` and the versions of its main dependencies, read from package metadata
    (nothing is imported)."""

    def installed(distribution: str) -> str | None:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            return None

    stack = ", ".join(
        f"{label} {found}"
        for label, distribution in (("Ray", "ray"), ("torch", "torch"), ("transformers", "transformers"))
        if (found := installed(distribution))
    )
    return f"llava-ray {installed('llava-ray') or 'unknown (not installed)'} ({stack}, Python {platform.python_version()})"


def _help_page(description: str, examples: Sequence[str]) -> dict[str, Any]:
    """A parser's description and epilog: the description wrapped, two examples kept as written."""
    return {
        "description": textwrap.fill(description, HELP_WIDTH),
        "epilog": "examples:\n" + "\n".join(f"  {example}" for example in examples),
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llava-ray",
        **_help_page(
            "Train LLaVA-style vision-language assistants on Ray: data preparation with Ray Data, "
            "training with Ray Train + DeepSpeed, sweeps with Ray Tune, evaluation, serving with Ray "
            "Serve, tracking with MLflow. Run llava-ray COMMAND --help for a command's options and examples.",
            TOP_LEVEL_EXAMPLES,
        ),
    )
    parser.add_argument("--version", action="version", version=version_text())
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show every rank's lines and third-party (Ray, DeepSpeed, transformers, MLflow) info and warnings",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str,
        handler: Callable[[argparse.Namespace], int] | None,
        help_text: str,
        details: str = "",
        group: argparse._SubParsersAction | None = None,
    ) -> argparse.ArgumentParser:
        description = f"{help_text[0].upper()}{help_text[1:]}." + (f" {details}" if details else "")
        examples = EXAMPLES[name if group is None else f"configs {name}"]
        sub = (group or commands).add_parser(name, help=help_text, **_help_page(description, examples))
        if handler is not None:
            sub.set_defaults(handler=handler)
        return sub

    _add_config_arguments(
        add(
            "validate",
            cmd_validate,
            "check a config and print it resolved, every default spelled out",
            "Every problem (unknown keys, bad values, sections that disagree) is listed at once, exit status 2.",
        ),
        "dotted overrides checked together with the file, e.g. train.max_steps=10",
    )

    configs = add(
        "configs",
        None,
        "list, show or copy the configs and sweeps llava-ray ships",
        "They are package data, so this works from any install; copy one to edit it.",
    )
    configs_commands = configs.add_subparsers(dest="configs_command", required=True, metavar="ACTION")
    configs_list = add(
        "list",
        cmd_configs_list,
        "list the shipped configs and sweeps: name, kind, what each is for",
        group=configs_commands,
    )
    configs_list.add_argument("--kind", choices=list(KIND_COMMANDS), help="only this kind")
    configs_show = add("show", cmd_configs_show, "print a shipped config's YAML", group=configs_commands)
    configs_show.add_argument("name", help="a name from llava-ray configs list, e.g. tiny/pretrain")
    configs_copy = add(
        "copy",
        cmd_configs_copy,
        "write a shipped config to a file to edit",
        "A pipeline or a sweep comes with the YAMLs it names (its stage configs, its base config), "
        "written next to it and pointed at; nothing is overwritten without --force.",
        group=configs_commands,
    )
    configs_copy.add_argument("name", help="a name from llava-ray configs list, e.g. tiny/pretrain")
    configs_copy.add_argument(
        "dest", help="file to write, or an existing folder (ending in /) to write NAME's file into"
    )
    configs_copy.add_argument("--force", action="store_true", help="overwrite files that exist")

    _add_config_arguments(
        add(
            "generate-data",
            cmd_generate_data,
            "generate instruction data from COCO-style annotations with an LLM",
            "Conversations, detailed descriptions and complex reasoning as in LLaVA-Instruct (section generate).",
        ),
        "generate settings, e.g. generate.limit=100 generate.model=gpt-4o",
    )
    _add_config_arguments(
        add(
            "prepare",
            cmd_prepare,
            "preprocess a stage's LLaVA data into parquet shards with Ray Data",
            "Writes the shards and report.json (samples kept, skipped by reason) to data.prepared_path.",
        ),
        "data settings for this run, e.g. data.prepared_path=DIR data.prepare_workers=4",
    )
    _add_config_arguments(
        add(
            "train",
            cmd_train,
            "train one stage (pretrain or finetune) on Ray Train + DeepSpeed",
            "Prepares the data first when data.prepared_path holds none; tracked in MLflow.",
        ),
        "training settings, e.g. train.max_steps=20 train.learning_rate=2e-5 scaling.num_workers=4",
    )
    pipeline = add(
        "pipeline",
        cmd_pipeline,
        "run the LLaVA recipe as one job: [generate-data] -> prepare -> pretrain -> finetune -> [evaluate]",
        "One MLflow parent run with a child per stage.",
    )
    pipeline.add_argument(
        "--config", required=True, help="pipeline YAML (see llava-ray configs list --kind pipeline)"
    )
    pipeline.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides for both training stages, e.g. train.max_steps=5",
    )
    tune = add(
        "tune",
        cmd_tune,
        "sweep stage-job settings (projector, learning rate, ...) with Ray Tune and ASHA",
        "Every value the sweep can give a key is validated before the first trial starts.",
    )
    tune.add_argument("--config", required=True, help="sweep YAML (see llava-ray configs list --kind sweep)")
    tune.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="sweep.<key>=value for the sweep file (sweep.num_samples=4), any other key for every trial's stage config",
    )
    evaluate = add(
        "evaluate",
        cmd_evaluate,
        "evaluate a model: synthetic exact match, ScienceQA, LLM-judged LLaVA-Bench",
        "Give a config file with an evaluate section, or just --model, --benchmark and --data (everything "
        "else at its default); the flags override the file. Results go to evaluate.output_dir and MLflow.",
    )
    _add_config_arguments(
        evaluate,
        "evaluate settings, e.g. evaluate.limit=20 evaluate.num_actors=0 evaluate.output_dir=DIR",
        config_required=False,
    )
    evaluate.add_argument("--model", help="model folder or s3:// URL: a run's final/ (sets evaluate.model)")
    evaluate.add_argument(
        "--benchmark",
        type=lambda name: name.replace("-", "_"),
        choices=BENCHMARKS,
        metavar="NAME",
        help=f"{', '.join(BENCHMARKS)} (llava-bench works too; sets evaluate.benchmark)",
    )
    evaluate.add_argument(
        "--data",
        help="the benchmark's questions: eval.json, scienceqa-convert's output, or LLaVA-Bench "
        "questions.jsonl (sets evaluate.data_path)",
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
            "Reads a scienceqa evaluate run's results.jsonl (the paper's GPT-4 ensemble).",
        ),
        "evaluate.scienceqa_ensemble settings, e.g. evaluate.scienceqa_ensemble.model=gpt-4o",
    )
    _add_config_arguments(
        add(
            "reference-answers",
            cmd_reference_answers,
            "write LLaVA-Bench reference answers with a text-only LLM given each image's context",
        ),
        "evaluate.reference settings and the files, e.g. evaluate.reference.model=gpt-4o evaluate.context=FILE",
    )
    # `chat` has its own parser (llava_ray.evaluation.chat, which main() hands the arguments to);
    # listed here for the top-level --help.
    commands.add_parser("chat", help="chat with a model in the terminal, streaming its answers (chat --help)")

    serve_parser = add(
        "serve",
        cmd_serve,
        "serve a model with Ray Serve: OpenAI-compatible /v1/chat/completions and a web chat page",
        "Runs until Ctrl-C on this machine, or as a Ray job on a cluster (jobs/serve.py).",
    )
    serve_parser.add_argument("--model", help="model folder or s3:// URL: a run's final/ (or final/hf)")
    serve_parser.add_argument("--config", help="YAML config with a serve section (default: the defaults)")
    serve_parser.add_argument("--host", help="HTTP address (default 127.0.0.1; 0.0.0.0 for every interface)")
    serve_parser.add_argument("--port", type=int, help="HTTP port (default 8000)")
    serve_parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the Serve config (for serve deploy or a RayService's serveConfigV2) and exit",
    )
    serve_parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="serve settings, e.g. serve.max_batch_size=16 serve.num_replicas=2",
    )

    export = add(
        "export",
        cmd_export,
        "export a run's checkpoint as a model folder and a Hugging Face LLaVA folder",
        "From a run folder (its newest intact checkpoint) or one of its checkpoint_* folders, local or s3://; "
        "LoRA adapters merged into the language model, or kept as a PEFT adapter.",
    )
    export.add_argument(
        "--from",
        dest="source",
        metavar="RUN_OR_CHECKPOINT",
        required=True,
        help="run folder ({run.storage_path}/{run.name}) or one of its checkpoint_* folders",
    )
    export.add_argument("--out", required=True, metavar="DIR", help="output folder")
    export.add_argument(
        "--lora",
        choices=("merge", "adapter"),
        default="merge",
        help="merge: LoRA weights folded into the LM (default); adapter: the base model plus a PEFT adapter",
    )

    synth = add(
        "synth",
        cmd_synth,
        "write the synthetic dataset (images, LLaVA JSON, COCO-style annotations)",
        "Coloured shapes with captions, questions and a held-out split: what the demo and the tests train on.",
    )
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--samples", type=int, default=200, help="training images (default 200)")
    synth.add_argument("--eval-samples", type=int, default=None, help="held-out images (default samples/5)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    add(
        "presets",
        cmd_presets,
        "list the model presets",
        "A preset names a vision tower and a language model (model.preset).",
    )

    demo = add(
        "demo",
        cmd_demo,
        "run the embedded default pipeline on synthetic data (what make demo runs)",
        "Synthetic data, both stages on a local Ray cluster, evaluation; a summary at the end.",
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

    tokenizer = add(
        "build-tokenizer",
        cmd_build_tokenizer,
        "retrain the tiny preset's tokenizer",
        "A byte-level BPE trained on the synthetic corpus (the package ships the result).",
    )
    tokenizer.add_argument("--out", required=True, help="output folder")
    return parser


def _error_text(error: Exception) -> str:
    """What ``main`` prints for an error that stops a command before any work: one line per problem,
    a single problem on one line (a YAML parser's multi-line message flattened)."""
    if isinstance(error, ConfigError):
        problems = [" ".join(problem.split()) for problem in error.problems]
        header = str(error).partition("\n")[0]  # "invalid config in FILE (N problem(s)):"
        if len(problems) == 1:
            return f"{header.rpartition(' (')[0] or 'invalid config'}: {problems[0]}"
        return "\n".join([header, *(f"  - {problem}" for problem in problems)])
    if isinstance(error, yaml.YAMLError):
        return f"not valid YAML: {' '.join(str(error).split())}"
    return " ".join(str(error).split()) if "\n" in str(error) else str(error)


# Settings for a local Ray that a command starts; a cluster's own (`ray start`'s environment) are
# untouched, and an operator's environment wins.
# - The Ray lives as long as the command: its idle pooled workers may live as long too. Ray otherwise
#   retires them 10 s into their idleness, mid-job, and now and then such a retiring worker aborts
#   with a "Mutex corrupt ... Fatal Python error" dump (docs/data.md).
# - Ray starts its workers at niceness 15, below everything else on the machine, so beside any other
#   work they starve: at load 8 two Ray Train workers took 123 s to start instead of 7
#   (docs/reliability.md). Here the workers are the job: they run at the command's priority.
LOCAL_RAY_ENVIRONMENT = {
    "RAY_idle_worker_killing_time_threshold_ms": str(60 * 60 * 1000),
    "RAY_worker_niceness": "0",
}


def main(argv: Sequence[str] | None = None) -> int:
    from llava_ray.tracking.mlflow_tracking import TrackingUnavailable

    for key, value in LOCAL_RAY_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
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
    except (ConfigError, CatalogError, TrackingUnavailable, yaml.YAMLError) as error:
        # nothing was done: say why (credentials in any URL it echoes as ***), exit 2
        print(f"error: {redact_urls(_error_text(error))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
