"""The embedded default: the whole pipeline on one machine, no cluster, no network.

``llava-ray demo`` (what ``make demo`` runs) goes through the same code paths as a cluster run,
at tiny size, on synthetic data. Stages are added here as the platform grows.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from llava_ray.config import LlavaRayConfig, load_config
from llava_ray.data.synthetic import generate
from llava_ray.model.presets import build_language_model, build_vision_tower, load_tokenizer

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "tiny"
STAGES = ("pretrain", "finetune")


def stage_config(stage: str, workdir: Path, extra: tuple[str, ...] = ()) -> LlavaRayConfig:
    """The tiny stage config with every path moved under ``workdir``."""
    data_file = "stage1.json" if stage == "pretrain" else "stage2.json"
    return load_config(
        REPO_CONFIGS / f"{stage}.yaml",
        [
            f"data.sources.0.path={workdir / 'data' / data_file}",
            f"data.prepared_path={workdir / 'prepared' / stage}",
            f"run.storage_path={workdir / 'runs'}",
            *extra,
        ],
    )


def run_demo(workdir: str | Path, samples: int = 400, seed: int = 0) -> dict:
    workdir = Path(workdir).resolve()
    started = time.time()
    data_dir = workdir / "data"
    if (data_dir / "manifest.json").exists():
        print(f"[demo] reusing synthetic data in {data_dir}")
        manifest = json.loads((data_dir / "manifest.json").read_text())
    else:
        print(f"[demo] writing {samples} synthetic training images to {data_dir}")
        manifest = generate(data_dir, samples=samples, seed=seed)
    configs = {stage: stage_config(stage, workdir) for stage in STAGES}
    for stage, config in configs.items():
        print(
            f"[demo] {stage} config valid: {config.train.trainable} on {config.data.template}, "
            f"ZeRO-{config.deepspeed.zero_stage}, {config.scaling.num_workers} workers"
        )
    model_config = configs["pretrain"].model
    tokenizer = load_tokenizer(model_config)
    vision = build_vision_tower(model_config, seed=seed)
    lm = build_language_model(model_config, tokenizer, seed=seed)
    parameters = sum(p.numel() for p in vision.parameters()) + sum(p.numel() for p in lm.parameters())
    print(
        f"[demo] tiny preset built offline: {parameters / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}"
    )
    summary = {
        "workdir": str(workdir),
        "samples": manifest["samples"],
        "eval_samples": manifest["eval_samples"],
        "parameters": parameters,
        "elapsed_s": round(time.time() - started, 2),
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"[demo] done in {summary['elapsed_s']} s; summary in {workdir / 'summary.json'}")
    return summary
