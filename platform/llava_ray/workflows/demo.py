"""The embedded default: the whole pipeline on one machine, no cluster, no network.

``llava-ray demo`` (what ``make demo`` runs) goes through the same code paths as a cluster run,
at tiny size, on synthetic data: synthetic data -> Ray Data prepare -> stage 1 (Ray Train, 2
workers, DeepSpeed ZeRO-2) -> stage 2 (ZeRO-2 here; the tiny config and the tests use ZeRO-3) ->
evaluation -> MLflow (local store) -> Hugging Face export. It ends with a table and ``summary.json``
in the work dir: held-out accuracy per question type, for first turns and follow-ups (a question
asked after earlier ones in the same conversation) apart, and overall. Rerunning reuses the
synthetic and prepared data (written anew when asked for another size or seed) and starts new runs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from importlib.resources import as_file
from pathlib import Path
from typing import Any

from llava_ray.config import LlavaRayConfig, load_config
from llava_ray.config.loader import SHIPPED_CONFIGS
from llava_ray.data.synthetic import generate
from llava_ray.evaluation.job import run_evaluate
from llava_ray.training.final_model import final_model_uri
from llava_ray.utils.logging import ensure_logging
from llava_ray.workflows.pipeline import run_pipeline

logger = logging.getLogger(__name__)

DEMO_CONFIGS = SHIPPED_CONFIGS / "tiny"  # the shipped tiny configs (jobs/configs/tiny in a checkout)

# Sized so the tiny model learns every question type of the synthetic task in a few minutes on 2
# CPU cores: 4,000 images, stage 1 for one epoch, stage 2 for 3 epochs (about 825 steps). Shape,
# count and colour are learned first, position last and from more images rather than more epochs
# (the sizes tried and their accuracies: benchmarks/README.md). Checkpoints every 200 steps instead of the tiny configs' 10: each ZeRO checkpoint
# costs about as much as a few steps. Metrics go to MLflow every 10 steps, not every step (a
# SQLite write each). Stage 2 runs ZeRO-2, not the tiny config's ZeRO-3: the same updates (40
# steps gave the same loss to the last digit), but ZeRO-3 gathers and releases every layer's
# parameters over gloo in every forward and backward, which on a tiny model costs more than the
# arithmetic (about twice as slow; benchmarks/README.md).
DEMO_SAMPLES = 4000
DEMO_STAGE_OVERRIDES = {
    "pretrain": ["train.epochs=1", "checkpoint.every_n_steps=200", "train.log_every_steps=10"],
    "finetune": [
        "train.epochs=3",
        "checkpoint.every_n_steps=200",
        "train.log_every_steps=10",
        "deepspeed.zero_stage=2",
    ],
}

# The accuracy table's rows besides the question types and "overall".
_ROW_LABELS = {"first_turn": "first turn", "follow_up": "follow-up"}


def stage_config(stage: str, workdir: Path, extra: tuple[str, ...] = ()) -> LlavaRayConfig:
    """The tiny stage config with every path moved under ``workdir``."""
    data_file = "stage1.json" if stage == "pretrain" else "stage2.json"
    with as_file(DEMO_CONFIGS / f"{stage}.yaml") as path:
        return load_config(
            path,
            [
                f"data.sources.0.path={workdir / 'data' / data_file}",
                f"data.prepared_path={workdir / 'prepared' / stage}",
                f"run.storage_path={workdir / 'runs'}",
                f"run.name=demo-{stage}-{time.strftime('%Y%m%d-%H%M%S')}",
                f"tracking.uri={tracking_uri_for(workdir)}",
                *DEMO_STAGE_OVERRIDES[stage],
                *extra,
            ],
        )


def tracking_uri_for(workdir: Path) -> str:
    """The demo's MLflow store: ``$MLFLOW_TRACKING_URI`` when set, else ``mlflow.db`` in the work dir."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workdir / 'mlflow.db'}"


def synthetic_data(workdir: Path, samples: int, seed: int) -> dict[str, Any]:
    """The work dir's synthetic data: reused when written for these ``samples`` and ``seed``, else
    written anew, and then the data prepared from the old one is removed too."""
    data_dir = workdir / "data"
    if (data_dir / "manifest.json").exists():
        manifest = json.loads((data_dir / "manifest.json").read_text())
        if (manifest.get("samples"), manifest.get("seed")) == (samples, seed):
            logger.info(f"[demo] reusing synthetic data in {data_dir}")
            return manifest
        logger.info(
            f"[demo] {data_dir} holds {manifest.get('samples')} images of seed {manifest.get('seed')}, not "
            f"{samples} of seed {seed}: writing them anew and preparing again"
        )
        shutil.rmtree(data_dir)
        shutil.rmtree(workdir / "prepared", ignore_errors=True)
    logger.info(f"[demo] writing {samples} synthetic training images to {data_dir}")
    return generate(data_dir, samples=samples, seed=seed)


def evaluate_model(
    config: LlavaRayConfig, workdir: Path, model: str, label: str, parent_run_id: str | None
) -> dict:
    """Exact-match accuracy on the held-out synthetic questions, tracked as a child run."""
    settings = config.evaluate.model_copy(
        update={
            "model": model,
            "benchmark": "synthetic",
            "data_path": str(workdir / "data" / "eval.json"),
            "output_dir": str(workdir / "eval" / label),
            "num_actors": 1,
            # Short answers from a tiny model: larger batches use the CPU better than the config's 16.
            "batch_size": 64,
        }
    )
    return run_evaluate(settings, config, parent_run_id)


def run_demo(
    workdir: str | Path,
    samples: int = DEMO_SAMPLES,
    seed: int = 0,
    extra: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Run the whole pipeline; returns (and writes) the summary."""
    import ray

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    ensure_logging()
    synthetic_data(workdir, samples, seed)
    pretrain, finetune = (stage_config(stage, workdir, extra) for stage in ("pretrain", "finetune"))
    if not ray.is_initialized():
        # With the dashboard: Ray prints its address (watch the jobs while they run), and Ray Train's
        # placement-group cleaner reaches the state API it serves (without it, it warns every second).
        ray.init(include_dashboard=True, log_to_driver=True)
    ensure_logging()  # again: importing Ray reset its loggers' levels
    evaluations: dict[str, dict[str, Any]] = {}

    def evaluate_stages(final_model: str, parent_run_id: str | None) -> None:
        for label, model in (("before_stage2", final_model_uri(pretrain)), ("after_stage2", final_model)):
            evaluations[label] = evaluate_model(finetune, workdir, model, label, parent_run_id)

    outcome = run_pipeline(
        pretrain,
        finetune,
        name=f"demo-{time.strftime('%Y%m%d-%H%M%S')}",
        reuse_prepared=True,
        evaluate=evaluate_stages,
    )
    after, before = evaluations["after_stage2"]["by_type"], evaluations["before_stage2"]["by_type"]
    summary = {
        "eval_accuracy": after["overall"]["accuracy"],
        "eval_chance": after["overall"]["chance"],
        "eval_accuracy_before_stage2": before["overall"]["accuracy"],
        "eval_accuracy_first_turn": after["first_turn"]["accuracy"],
        "eval_accuracy_follow_up": after["follow_up"]["accuracy"],
        "eval_by_type": {
            name: {
                "accuracy": table["accuracy"],
                "chance": table["chance"],
                "before_stage2": before[name]["accuracy"],
            }
            for name, table in after.items()
        },
        "workdir": str(workdir),
        "mlflow_uri": pretrain.tracking.uri,
        "parent_run_id": outcome.parent_run_id,
        "elapsed_s": round(time.time() - started, 1),
        "stages": {
            stage.name: {
                "seconds": round(stage.seconds, 1),
                **(
                    {
                        "loss_first": stage.result.metrics["loss_first"],
                        "loss_last": stage.result.metrics["loss_last"],
                    }
                    if stage.name in ("pretrain", "finetune")
                    else {}
                ),
            }
            for stage in outcome.stages
        },
        "final_model": outcome.stage("finetune").result.final_model,
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    print_summary(summary)
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    logger.info("\n[demo] stage              wall s   loss first -> last")
    for name, stage in summary["stages"].items():
        loss = f"{stage['loss_first']:.3f} -> {stage['loss_last']:.3f}" if "loss_first" in stage else ""
        logger.info(f"[demo] {name:18s} {stage['seconds']:7.1f}   {loss}")
    logger.info("\n[demo] held-out exact match   after stage 2   before stage 2   chance")
    for name, row in summary["eval_by_type"].items():
        after, before, chance = (_figure(row[key]) for key in ("accuracy", "before_stage2", "chance"))
        logger.info(f"[demo] {_ROW_LABELS.get(name, name):22s} {after:>14s} {before:>16s} {chance:>8s}")
    logger.info(f"[demo] total {summary['elapsed_s']} s")
    logger.info("\n[demo] where to look next:")
    logger.info(f"  MLflow UI:      mlflow ui --backend-store-uri {summary['mlflow_uri']}")
    logger.info(f"  outputs:        {summary['workdir']}")
    logger.info(
        f"  exported model: {summary['final_model']}/hf  (transformers' LlavaForConditionalGeneration)"
    )
    logger.info(f"  chat:           llava-ray chat --model {summary['final_model']}")
    logger.info(f"  serve:          llava-ray serve --model {summary['final_model']}  (web chat, OpenAI API)")
    logger.info(f"  summary:        {summary['workdir']}/summary.json")


def _figure(value: float | None) -> str:
    """Three decimals, or "-" for a group without items (an eval.json without follow-ups)."""
    return "-" if value is None else f"{value:.3f}"
