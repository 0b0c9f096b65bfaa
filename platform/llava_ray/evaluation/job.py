"""The evaluate job: answer a benchmark's questions with a trained model, score them, record everything.

Run it with ``llava-ray evaluate --config FILE [evaluate.key=value ...]`` or as a Ray job
(``jobs/evaluate.py``); from Python, :func:`run_evaluate` takes the ``evaluate`` section
(:class:`llava_ray.config.evaluation.EvaluateConfig`) and, for MLflow, the root config.

1. Every problem of the section (no model, a missing data file, no judge model for
   ``llava_bench``, ...) is collected into one :class:`~llava_ray.config.ConfigError` before any
   model is loaded; an unreachable MLflow server fails here too (``tracking.required``).
2. The benchmark's items are loaded (:mod:`.synthetic`, :mod:`.scienceqa`, :mod:`.judge`)
   and answered in batches with the model's own template, on a Ray Data actor pool
   (:mod:`.runner`).
3. They are scored, and ``output_dir`` (a folder or ``s3://`` URL) receives::

       results.jsonl   one line per question: id, question, prediction, answer, correct / scores, type, ...
       summary.json    benchmark, model, counts (items, answered, skipped by reason), metrics,
                       per-type / per-subject / per-category tables, timings
       reviews.jsonl   llava_bench only: the judge's reviews (the resume journal)

4. With a root config, one MLflow run (job ``evaluate``, nested under ``parent_run_id``) gets
   the metrics and these files as artifacts under ``evaluation/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llava_ray.config.evaluation import EvaluateConfig
from llava_ray.config.loader import ConfigError
from llava_ray.config.schema import LlavaRayConfig
from llava_ray.evaluation import judge, scienceqa, synthetic
from llava_ray.evaluation.batch_generate import GenerationSettings, predict
from llava_ray.evaluation.items import EvalItem, skip_report
from llava_ray.evaluation.loaded_model import model_dir_problem
from llava_ray.tracking.mlflow_tracking import tracked_run
from llava_ray.utils.storage import CACHE_DIR, filesystem, is_remote

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"
ARTIFACT_DIR = "evaluation"
_METRIC_KEY_UNSAFE = re.compile(r"[^\w\-. /]")


def evaluate_problems(config: EvaluateConfig, check_model: bool = True) -> list[str]:
    """Every reason the section cannot run, each naming the key, its value and the fix.

    ``check_model=False`` leaves ``evaluate.model`` out (a pipeline sets it to its own final model).
    """
    problems = []
    if not check_model:
        pass
    elif not config.model:
        problems.append("evaluate.model is not set; point it at a trained model folder (a run's final/)")
    elif not _exists(config.model):
        problems.append(f"evaluate.model={config.model!r} does not exist")
    elif not is_remote(config.model) and model_dir_problem(Path(config.model), config.model):
        problems.append(f"evaluate.model={model_dir_problem(Path(config.model), config.model)}")
    if not config.data_path:
        problems.append(f"evaluate.data_path is not set; name the {config.benchmark} evaluation file")
    elif not _exists(config.data_path):
        problems.append(f"evaluate.data_path={config.data_path!r} does not exist")
    if config.image_root and not _exists(config.image_root):
        problems.append(f"evaluate.image_root={config.image_root!r} does not exist")
    if config.benchmark == "llava_bench":
        if not config.reference_answers:
            problems.append(
                "evaluate.reference_answers is not set; llava_bench needs the reference answers file"
            )
        elif not _exists(config.reference_answers):
            problems.append(
                f"evaluate.reference_answers={config.reference_answers!r} does not exist; "
                "`llava-ray reference-answers` writes it from the questions and their contexts"
            )
        if not config.context:
            problems.append(
                "evaluate.context is not set; llava_bench's judge reads each image's description from "
                "context.jsonl (In-the-Wild) or caps_boxes_coco2014_val_80.jsonl (COCO)"
            )
        elif not _exists(config.context):
            problems.append(f"evaluate.context={config.context!r} does not exist")
        if not config.judge.model:
            problems.append("evaluate.judge.model is not set; llava_bench needs a judge model (e.g. gpt-4o)")
    if config.num_actors == 0 and config.num_gpus_per_actor > 0:
        problems.append(
            "evaluate.num_gpus_per_actor > 0 with evaluate.num_actors=0: in-process generation takes no Ray "
            "resources (it uses this machine's GPU when there is one); set num_actors >= 1 or num_gpus_per_actor=0"
        )
    return problems


def _exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def run_evaluate(
    eval_config: EvaluateConfig, root_config: LlavaRayConfig | None = None, parent_run_id: str | None = None
) -> dict[str, Any]:
    """Evaluate (see the module docstring) and return the summary; tracked when ``root_config`` is given."""
    problems = evaluate_problems(eval_config)
    if problems:
        raise ConfigError(problems)
    seed = eval_config.seed if eval_config.seed is not None else root_config.run.seed if root_config else 0
    if root_config is None:
        return _evaluate(eval_config, seed)[0]

    tags = {"llava_ray.benchmark": eval_config.benchmark, "llava_ray.eval_model": str(eval_config.model)}
    # Named by what it evaluates: its output folder's name (the demo's before_stage2 / after_stage2).
    label = f"evaluate {str(eval_config.output_dir).rstrip('/').rsplit('/', 1)[-1]}"
    with tracked_run(root_config, "evaluate", parent_run_id, extra_tags=tags, label=label) as tracker:
        summary, files = _evaluate(eval_config, seed)
        tracker.log_metrics(metric_values(summary["metrics"]))
        for path in files:
            tracker.log_artifact(path, ARTIFACT_DIR)
        summary["mlflow_run_id"] = tracker.run_id
    return summary


def _evaluate(config: EvaluateConfig, seed: int) -> tuple[dict[str, Any], list[Path]]:
    """The summary, and the local files written (before any upload)."""
    started = time.perf_counter()
    data_path = str(config.data_path)
    references: dict[str, str] = {}
    if config.benchmark == "llava_bench":
        items = judge.load_items(data_path, str(config.context), config.image_root, config.limit)
        references = judge.load_references(str(config.reference_answers))
        missing = judge.missing_references(items, references)
        if missing:
            raise ConfigError(
                [
                    f"evaluate.reference_answers={config.reference_answers!r} lacks {len(missing)} question id(s) "
                    f"of {data_path}, e.g. {missing[:5]}; use the answers file of the same questions"
                ]
            )
    else:
        benchmark = scienceqa if config.benchmark == "scienceqa" else synthetic
        items = benchmark.load_items(data_path, config.image_root, config.limit)
    settings = GenerationSettings(
        model=str(config.model),
        template=config.template,
        image_aspect=config.image_aspect,
        max_new_tokens=config.resolved_max_new_tokens(),
        temperature=config.temperature,
        top_p=config.top_p,
        seed=seed,
        # Actors use the GPUs Ray gives them; in-process generation uses this machine's, if any.
        use_gpu=config.num_gpus_per_actor > 0 or config.num_actors == 0,
    )
    outcomes = predict(
        items,
        settings,
        batch_size=config.batch_size,
        num_actors=config.num_actors,
        num_cpus_per_actor=config.num_cpus_per_actor,
        num_gpus_per_actor=config.num_gpus_per_actor,
    )
    generation_s = time.perf_counter() - started
    with staged_output(config.output_dir) as out_dir:
        if config.benchmark == "llava_bench":
            rows, scored = judge.score(
                items, outcomes, references, config.judge, out_dir / judge.REVIEWS_FILE
            )
        else:
            rows, scored = benchmark.score(items, outcomes)
        summary = {
            "benchmark": config.benchmark,
            "model": config.model,
            "template": config.template or "stored with the model",
            "data_path": data_path,
            "output_dir": config.output_dir,
            "counts": skip_report(items, outcomes),
            **scored,
            "generation": _generation_stats(items, config, generation_s),
            "elapsed_s": round(time.perf_counter() - started, 3),
        }
        files = write_results(out_dir, rows, summary)
    logger.info(f"[evaluate] {config.benchmark}: {headline(summary)}; results in {config.output_dir}")
    return summary, files


def _generation_stats(items: Sequence[EvalItem], config: EvaluateConfig, seconds: float) -> dict[str, Any]:
    return {
        "seconds": round(seconds, 3),
        "items_per_s": round(len(items) / seconds, 3) if seconds > 0 else None,
        "batch_size": config.batch_size,
        "num_actors": config.num_actors,
        "max_new_tokens": config.resolved_max_new_tokens(),
        "temperature": config.temperature,
    }


def write_results(out_dir: Path, rows: Sequence[dict[str, Any]], summary: dict[str, Any]) -> list[Path]:
    """results.jsonl and summary.json (and the reviews journal when there is one) in ``out_dir``."""
    results = out_dir / RESULTS_FILE
    with results.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    summary_path = out_dir / SUMMARY_FILE
    summary_path.write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    reviews = out_dir / judge.REVIEWS_FILE
    return [results, summary_path, *([reviews] if reviews.exists() else [])]


def headline(summary: dict[str, Any]) -> str:
    """The one line worth printing: the main score and how many items it stands on."""
    metrics, counts = summary["metrics"], summary["counts"]
    main = metrics.get("accuracy", metrics.get("relative_score"))
    name = "accuracy" if "accuracy" in metrics else "relative score"
    shown = "n/a" if main is None else f"{main:.4f}" if name == "accuracy" else f"{main:.1f}"
    skipped = sum(counts["skipped"].values())
    # ScienceQA counts unanswered items as wrong: its accuracy stands on every item, unparsable beside it.
    unparsable = f", {metrics['unparsable']} unparsable" if "unparsable" in metrics else ""
    return f"{name} {shown} on {counts['answered']}/{counts['items']} items{unparsable}" + (
        f" ({skipped} skipped: {counts['skipped']})" if skipped else ""
    )


def metric_values(metrics: dict[str, Any]) -> dict[str, float]:
    """Numeric metrics under names MLflow accepts (letters, digits, ``_-. /``)."""
    return {
        _METRIC_KEY_UNSAFE.sub("_", key): float(value)
        for key, value in metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


@contextmanager
def staged_output(output_dir: str, journals: Sequence[str] = (judge.REVIEWS_FILE,)) -> Iterator[Path]:
    """A local folder for the outputs; for an ``s3://`` output_dir, a cache folder uploaded at the end.

    The remote ``journals`` (file names; the reviews journal by default) are fetched first, so a
    rerun resumes there too. The staged files stay in the cache after the upload (MLflow logs them
    from there).
    """
    if not is_remote(output_dir):
        local = Path(output_dir)
        local.mkdir(parents=True, exist_ok=True)
        yield local
        return
    fs, remote = filesystem(output_dir)
    remote = remote.rstrip("/")
    local = CACHE_DIR / "evaluate" / hashlib.sha256(output_dir.encode()).hexdigest()[:16]
    # The remote folder is the truth: a previous run's staged files must not leak into this one.
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True)
    for name in journals:
        if fs.exists(f"{remote}/{name}"):
            fs.get(f"{remote}/{name}", str(local / name))
    try:
        yield local
    finally:
        # Uploaded even when scoring fails part-way: the reviews made so far are the resume point.
        for path in local.iterdir():
            if path.is_file():
                fs.put(str(path), f"{remote}/{path.name}")
