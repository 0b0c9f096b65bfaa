"""The generate-data job: COCO-style annotations -> LLaVA instruction data, through a text-only LLM.

Run it with ``llava-ray generate-data --config FILE [generate.key=value ...]`` or as a Ray job
(``jobs/generate_data.py``); from Python, :func:`run_generate` takes the ``generate`` section.

1. Before any request, every problem (unset or missing paths, no model, a bad prompt file, an
   unreadable annotations file) is collected into one :class:`~llava_ray.config.ConfigError`.
2. The (image, response type) pairs: every type of ``generate.types`` for every image, or with
   ``generate.mix`` each type's share of ``round(images x pairs_per_image)`` pairs, spread over
   the images by a seeded, rerun-stable assignment (:mod:`llava_ray.generation.mix`). One
   request per pair: the symbolic context
   (:mod:`llava_ray.generation.context`) wrapped in the type's prompt
   (:mod:`llava_ray.generation.prompting`). Pairs that cannot be asked are skipped on the spot:
   ``no_captions``, and ``image_missing`` when ``image_root`` is set and lacks the image.
3. Pairs already in the journal (``{output_path}.partial.jsonl``, see
   :mod:`llava_ray.endpoints.journal`) are not asked again (with ``retry_failed``, failed ones
   are). The rest run as a Ray Data pipeline: request rows -> ``map_batches`` over an actor pool
   (:mod:`llava_ray.generation.workers`; for the HTTP backend N actors each get 1/N of
   ``max_concurrency`` and ``requests_per_second``) -> the driver appends each reply to the
   journal as its batch arrives. A crash loses at most the batches in flight. An endpoint that
   refuses a request outright (HTTP 401/403/404: key, URL or model) stops the run with a
   :class:`~llava_ray.config.ConfigError`; what arrived before stays in the journal.
4. The output is rebuilt from the journal: replies are parsed (:mod:`llava_ray.generation.parse`),
   rejected ones counted by reason, identical conversations dropped as ``duplicate``, and the
   samples written as one JSON array (LLaVA's shipped format; image paths relative to
   ``image_root``, ready for ``llava-ray prepare``) with ``report.json`` beside it::

       input     (image, type) pairs asked for by this config
       written   samples in the output
       skipped   {reason: count}: empty_reply, truncated, leaking, unparsable, duplicate,
                 request_failed, prompt_too_long (hf), no_captions, image_missing
       examples  {reason: [up to 5 "id: detail" strings]}
       by_type   {type: {input, written, skipped}}: input is the pairs asked of that type
       mix       {images, pairs_per_image, shares, pairs: {type: count}}, or null without a mix
       requests  {this_run, from_journal, attempts_this_run, journal_unused}: journal_unused
                 counts replies of pairs this config no longer asks for (another mix or limit)
       backend, model, seed, output_path, journal, elapsed_s

   ``input == written + sum(skipped)`` holds overall and per type, or the job fails.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from llava_ray.config.generation import GenerateConfig
from llava_ray.config.loader import ConfigError
from llava_ray.data.report import check_balance
from llava_ray.endpoints.client import ClientSettings
from llava_ray.endpoints.journal import JOURNAL_SUFFIX, Journal
from llava_ray.generation.context import AnnotationError, ImageAnnotations, build_context, load_coco
from llava_ray.generation.mix import assign_types
from llava_ray.generation.parse import detail_instruction, llava_sample, parse_reply
from llava_ray.generation.prompting import USES_BOXES, PromptError, PromptSet, build_messages, load_prompts
from llava_ray.generation.workers import ENDPOINT_REFUSED, EndpointWorker, LocalModelWorker
from llava_ray.utils.skips import SkipCounter, Skipped
from llava_ray.utils.storage import filesystem, is_remote

logger = logging.getLogger(__name__)

REPORT_FILE = "report.json"
HF_BATCH_SIZE = 8
# HTTP actors mostly wait on the network; a quarter CPU each leaves the cores to other work.
ENDPOINT_ACTOR_CPUS = 0.25


@dataclass(frozen=True)
class PairRequest:
    """One (image, response type) pair: the unit that is requested, journaled and counted."""

    sample_id: str
    response_type: str
    image: ImageAnnotations
    image_path: str  # relative to image_root, as written to the output


@dataclass(frozen=True)
class ActorPlan:
    """How the request rows run: which callable class, how many actors, their resources."""

    worker: type
    constructor_kwargs: dict[str, Any]
    actors: int
    batch_size: int
    num_cpus: float
    num_gpus: float


def run_generate(config: GenerateConfig, seed: int = 0) -> dict[str, Any]:
    """Generate (or resume) the data of ``config``; write the output and report; return the report.

    ``seed`` (normally ``run.seed``) is used unless ``config.seed`` is set.
    """
    started = time.perf_counter()
    seed = config.seed if config.seed is not None else seed
    images, prompts = _check_and_load(config)
    output = Path(config.output_path or "")  # set: _check_and_load refuses a config without it
    journal = Journal(f"{output}{JOURNAL_SUFFIX}")

    pairs, mix = plan_pairs(images[: config.limit], config, seed)
    preflight = _preflight_skips(pairs, config.image_root)
    done = journal.load()
    todo = [
        pair
        for pair in pairs
        if pair.sample_id not in preflight
        and (
            pair.sample_id not in done
            or (config.retry_failed and done[pair.sample_id].get("error") == "request_failed")
        )
    ]
    attempts = _request_replies(todo, prompts, config, seed, journal) if todo else 0
    records = journal.load()

    samples, counts = _assemble(pairs, config.response_types(), preflight, records, prompts, seed)
    asked = {pair.sample_id for pair in pairs}
    report = {
        **counts,
        "mix": mix,
        "requests": {
            "this_run": len(todo),
            "from_journal": len(pairs) - len(preflight) - len(todo),
            "attempts_this_run": attempts,
            "journal_unused": sum(1 for sample_id in records if sample_id not in asked),
        },
        "backend": config.backend,
        "model": config.model if config.backend == "openai" else config.hf_model,
        "seed": seed,
        "output_path": str(output),
        "journal": str(journal.path),
        "elapsed_s": round(time.perf_counter() - started, 3),
    }
    check_balance(report, parts="by_type", job="generate", unit="requests")
    _write_json_atomically(output, samples)
    _write_json_atomically(output.parent / REPORT_FILE, report)
    logger.info(f"{format_generate_summary(report)} -> {output}")
    return report


def plan_pairs(
    images: list[ImageAnnotations], config: GenerateConfig, seed: int
) -> tuple[list[PairRequest], dict[str, Any] | None]:
    """The pairs to ask for, image by image in annotation order, and the report's ``mix`` entry.

    Without ``config.mix``: every type of ``config.types`` for every image (``mix`` is None).
    """
    if config.mix is None:
        types_of = {image.image_id: tuple(config.types) for image in images}
        mix = None
    else:
        shares = config.mix.shares()
        per_image = config.pairs_per_image or 1.0
        types_of = assign_types([image.image_id for image in images], shares, per_image, seed)
        chosen = [t for types in types_of.values() for t in types]
        mix = {
            "images": len(images),
            "pairs_per_image": per_image,
            "shares": {name: round(share, 6) for name, share in shares.items()},
            "pairs": {name: chosen.count(name) for name in shares},
        }
    pairs = [
        PairRequest(
            f"{image.image_id}-{response_type}",
            response_type,
            image,
            posixpath.join(config.image_prefix, image.file_name) if config.image_prefix else image.file_name,
        )
        for image in images
        for response_type in types_of[image.image_id]
    ]
    return pairs, mix


def generate_problems(config: GenerateConfig) -> list[str]:
    """Problems that stop a run before any request, each naming the key, its value and the fix."""
    problems = []
    for key, example in (
        ("annotations_path", "instances_train2017.json"),
        ("captions_path", "captions_train2017.json"),
    ):
        if getattr(config, key) is None:
            problems.append(f"generate.{key} is not set; point it at a COCO file such as {example}")
    output = config.output_path
    if output is None:
        problems.append(
            "generate.output_path is not set; name the JSON file to write, e.g. data/llava_instruct.json"
        )
    elif is_remote(output):
        problems.append(
            f"generate.output_path = {output!r} is remote, but the resume journal is appended line by line "
            "and needs a local file; write locally and copy the result"
        )
    elif Path(output).is_dir():
        problems.append(f"generate.output_path = {output!r} is a folder; name a .json file inside it")
    if config.backend == "openai" and not config.model:
        problems.append(
            "generate.model is not set; name the model the endpoint serves (e.g. gpt-4o-mini, "
            "or vLLM's --served-model-name)"
        )
    if config.backend == "hf" and not config.hf_model:
        problems.append("generate.hf_model is not set; name a chat model folder, hub name or s3:// URL")
    if config.image_root is not None:
        fs, root = filesystem(config.image_root)
        if not fs.isdir(root):
            problems.append(
                f"generate.image_root = {config.image_root!r} is not a folder; point it at the images"
            )
    return problems


def endpoint_settings(config: GenerateConfig) -> ClientSettings:
    """Client settings from the config, the environment filling what it leaves unset."""
    return ClientSettings.from_config(config, config.temperature)


def actor_plan(config: GenerateConfig, requests: int, seed: int) -> ActorPlan:
    """Actors and batches for ``requests`` rows; HTTP limits are split evenly between the actors."""
    if config.backend == "hf":
        batch_size = config.batch_size or HF_BATCH_SIZE
        return ActorPlan(
            worker=LocalModelWorker,
            constructor_kwargs={
                "model_path": config.hf_model,
                "max_tokens": config.max_tokens,
                "temperature": config.temperature,
                "seed": seed,
                "use_gpu": config.hf_num_gpus > 0,
            },
            actors=max(1, min(config.num_actors, math.ceil(requests / batch_size))),
            batch_size=batch_size,
            num_cpus=1,
            num_gpus=config.hf_num_gpus,
        )
    # Never more actors than concurrent requests, so every actor gets at least one thread.
    actors = min(config.num_actors, config.max_concurrency)
    batch_size = config.batch_size or config.max_concurrency // actors
    actors = max(1, min(actors, math.ceil(requests / batch_size)))
    return ActorPlan(
        worker=EndpointWorker,
        constructor_kwargs={
            "settings": endpoint_settings(config),
            "concurrency": config.max_concurrency // actors,
            "requests_per_second": config.requests_per_second / actors
            if config.requests_per_second
            else None,
        },
        actors=actors,
        batch_size=batch_size,
        num_cpus=ENDPOINT_ACTOR_CPUS,
        num_gpus=0,
    )


def format_generate_summary(report: dict[str, Any]) -> str:
    """One line: pairs in by type, requests made, written, skips by reason."""
    skipped = report["skipped"]
    reasons = ", ".join(f"{reason} {count}" for reason, count in skipped.items())
    requests = report["requests"]
    per_type = ", ".join(f"{name} {numbers['input']}" for name, numbers in report["by_type"].items())
    return (
        f"generate-data: {report['input']} pairs in ({per_type}; {requests['this_run']} requested now, "
        f"{requests['from_journal']} from the journal), {report['written']} written, "
        f"{sum(skipped.values())} skipped{f' ({reasons})' if reasons else ''}; {report['elapsed_s']} s"
    )


def _check_and_load(config: GenerateConfig) -> tuple[list[ImageAnnotations], dict[str, PromptSet]]:
    problems = generate_problems(config)
    prompts: dict[str, PromptSet] = {}
    try:
        prompts = load_prompts(config.response_types(), config.prompts_dir)
    except PromptError as error:
        problems.append(f"generate.prompts_dir = {config.prompts_dir!r}: {error}")
    images: list[ImageAnnotations] = []
    if config.annotations_path and config.captions_path:
        try:
            images = load_coco(config.annotations_path, config.captions_path)
        except AnnotationError as error:
            problems.append(f"generate.annotations_path / captions_path: {error}")
    if problems:
        raise ConfigError(problems)
    return images, prompts


def _preflight_skips(pairs: list[PairRequest], image_root: str | None) -> dict[str, tuple[str, str]]:
    """{sample id: (reason, detail)} for pairs not worth a request."""
    present: set[str] | None = None
    if image_root is not None:
        fs, root = filesystem(image_root)
        root = root.rstrip("/")
        # One listing instead of one existence check per image: on s3:// that is a request each.
        present = {posixpath.relpath(path, root) for path in fs.find(root)}
    skips = {}
    for pair in pairs:
        if not pair.image.captions:
            skips[pair.sample_id] = ("no_captions", f"image {pair.image.image_id} has no captions")
        elif present is not None and pair.image_path not in present:
            skips[pair.sample_id] = ("image_missing", f"{pair.image_path} not under {image_root}")
    return skips


def _request_replies(
    pairs: list[PairRequest],
    prompts: dict[str, PromptSet],
    config: GenerateConfig,
    seed: int,
    journal: Journal,
) -> int:
    """Ask for every pair through Ray Data; journal each reply as it arrives; return the attempts made."""
    rows = [
        {
            "id": pair.sample_id,
            "messages": json.dumps(
                build_messages(
                    prompts[pair.response_type], build_context(pair.image, USES_BOXES[pair.response_type])
                )
            ),
        }
        for pair in pairs
    ]
    plan = actor_plan(config, len(rows), seed)
    if not ray.is_initialized():
        ray.init()
    results = ray.data.from_items(
        rows, override_num_blocks=math.ceil(len(rows) / plan.batch_size)
    ).map_batches(
        plan.worker,
        fn_constructor_kwargs=plan.constructor_kwargs,
        batch_size=plan.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=plan.actors),
        num_cpus=plan.num_cpus,
        num_gpus=plan.num_gpus,
    )
    attempts, refusal = 0, None
    with journal.appender() as append:
        for row in results.iter_rows():
            if row["error"] == ENDPOINT_REFUSED:
                # Every later request would be refused too: stop now (leaving the loop ends the
                # Ray Data execution); the pair is not an outcome and is asked again next run.
                refusal = row["detail"]
                break
            append({key: value for key, value in row.items() if value is not None})
            attempts += row["attempts"]
    if refusal is not None:
        raise ConfigError([f"{refusal}. The replies received so far are in {journal.path}; rerun to resume."])
    return attempts


def _assemble(
    pairs: list[PairRequest],
    types: list[str],
    preflight: dict[str, tuple[str, str]],
    records: dict[str, dict[str, Any]],
    prompts: dict[str, PromptSet],
    seed: int,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The output samples in pair order, and the report's counts (every type of ``types``, even with 0 pairs)."""
    inputs = dict.fromkeys(types, 0)
    written = dict.fromkeys(types, 0)
    skips = {t: SkipCounter() for t in types}
    samples: list[dict[str, Any]] = []
    first_with: dict[str, str] = {}

    def skip(pair: PairRequest, reason: str, detail: str) -> None:
        skips[pair.response_type].add(reason, f"{pair.sample_id}: {detail}" if detail else pair.sample_id)

    for pair in pairs:
        inputs[pair.response_type] += 1
        if pair.sample_id in preflight:
            skip(pair, *preflight[pair.sample_id])
            continue
        record = records.get(pair.sample_id)
        if record is None:  # the balance check reports it
            continue
        if record.get("error"):
            skip(pair, record["error"], record.get("detail", ""))
            continue
        try:
            turns = parse_reply(pair.response_type, record.get("reply"), record.get("finish_reason"))
        except Skipped as rejected:
            skip(pair, rejected.reason, rejected.detail)
            continue
        content = json.dumps(turns)
        if content in first_with:
            skip(pair, "duplicate", f"same as {first_with[content]}")
            continue
        first_with[content] = pair.sample_id
        instruction = (
            detail_instruction(prompts["detail"].instructions, seed, pair.sample_id)
            if pair.response_type == "detail"
            else None
        )
        samples.append(llava_sample(pair.sample_id, pair.image_path, turns, instruction))
        written[pair.response_type] += 1

    total = SkipCounter()
    for per_type in skips.values():
        total.merge(per_type)
    counts = {
        "input": len(pairs),
        "written": len(samples),
        **total.to_dict(),
        "by_type": {
            t: {"input": inputs[t], "written": written[t], "skipped": skips[t].counts} for t in types
        },
    }
    return samples, counts


def _write_json_atomically(path: Path, content: Any) -> None:
    """Write beside ``path`` and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    partial.write_text(json.dumps(content, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(partial, path)
