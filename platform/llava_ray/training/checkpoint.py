"""Checkpoints as transactions: what a checkpoint holds, its manifest, how a resume chooses and trusts one.

A checkpoint folder (``{run.storage_path}/{run.name}/checkpoint_<timestamp>/``, Ray merges every rank's
files into it) holds DeepSpeed's ZeRO files (``latest``, ``state/*.pt``, DeepSpeed's ``zero_to_*.py``),
each rank's RNG state (``rng_rank{r}.pt``), and from rank 0 the progress (``train_state.json``), the
resolved run config (``run_config.json``) and the model's architecture and tokenizer (``model/``), which
make it self-describing (``llava-ray export`` rebuilds the model from them). Each rank writes
``manifest_rank{r}.json`` last: the size and SHA-256 of every file it wrote, the world size and step.

A checkpoint is *intact* when every rank's manifest is there and every file matches it, with no file
that no manifest lists. Before Ray Train starts, :func:`prepare_resume` checks the run folder: it reads
Ray's ``checkpoint_manager_snapshot.json`` (or, when that is missing or unreadable, takes every
checkpoint folder on storage), verifies the newest checkpoints until one is intact, moves the corrupt
ones aside (``<name>.corrupt``), deletes folders Ray never registered (half-written uploads), and
rewrites the snapshot so that Ray resumes from the intact one. Each worker verifies its copy again
before DeepSpeed reads a byte (:func:`verify_local_checkpoint`) and loads every pickle with
``weights_only`` (:func:`weights_only_loads`).

Trust boundary: a manifest detects damage (truncation, a crash mid-write, a file dropped in); it is
not a signature, so whoever can write the checkpoint storage can rewrite a manifest too and change the
weights. What they can no longer do is run code: no file is unpickled outside ``weights_only``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import torch

from llava_ray.utils.storage import filesystem, join_uri

logger = logging.getLogger(__name__)

CHECKPOINT_TAG = "state"  # DeepSpeed's tag: its files go to <checkpoint>/state/
STATE_FILE = "train_state.json"
RUN_CONFIG_FILE = "run_config.json"
MODEL_DIR = "model"  # the architecture record (llava_ray_config.json) and the tokenizer
MANIFEST_PREFIX = "manifest_rank"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's record of the registered checkpoints
CHECKPOINT_PREFIX = "checkpoint_"
CORRUPT_SUFFIX = ".corrupt"
HASH_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that must not be loaded: its problems, each naming the file."""


def manifest_name(rank: int) -> str:
    return f"{MANIFEST_PREFIX}{rank}.json"


def is_manifest(relative: str) -> bool:
    return "/" not in relative and relative.startswith(MANIFEST_PREFIX) and relative.endswith(".json")


def file_digest(fs: fsspec.AbstractFileSystem, path: str) -> tuple[int, str]:
    """Size and SHA-256 of one file, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def write_manifest(
    directory: Path, rank: int, world_size: int, step: int, metrics: dict[str, Any] | None = None
) -> Path:
    """Record every file this rank wrote under ``directory`` (call it last: it seals the rank's part).

    Written to a temporary name and renamed, so a crash leaves no manifest rather than half of one.
    ``metrics`` (rank 0) are what the rank reported with the checkpoint; a rebuilt snapshot reuses them.
    """
    fs = fsspec.filesystem("file")
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        relative = path.relative_to(directory).as_posix()
        if is_manifest(relative):
            continue
        size, sha256 = file_digest(fs, str(path))
        files[relative] = {"size": size, "sha256": sha256}
    record = {"rank": rank, "world_size": world_size, "step": step, "files": files}
    if metrics is not None:
        record["metrics"] = metrics
    target = directory / manifest_name(rank)
    partial = target.with_suffix(".partial")
    partial.write_text(json.dumps(record, indent=1, sort_keys=True, default=str))
    partial.rename(target)
    return target


@dataclass
class Verification:
    """The outcome of checking one checkpoint folder against its manifests."""

    path: str
    problems: list[str] = field(default_factory=list)
    step: int | None = None
    world_size: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def intact(self) -> bool:
        return not self.problems


def verify_checkpoint(fs: fsspec.AbstractFileSystem, path: str) -> Verification:
    """Check a checkpoint folder: every rank's manifest present, every file's size and SHA-256 as listed,
    no file that no manifest lists. Never raises for bad content: the problems say what is wrong."""
    path = path.rstrip("/")
    result = Verification(path)
    try:
        present = {Path(found).relative_to(path).as_posix() for found in fs.find(path) if not fs.isdir(found)}
    except (FileNotFoundError, ValueError):
        present = set()
    if not present:
        result.problems.append(f"{path} holds no files (missing or empty)")
        return result
    manifests: dict[int, dict[str, Any]] = {}
    for relative in sorted(filter(is_manifest, present)):
        try:
            record = json.loads(fs.cat_file(f"{path}/{relative}"))
            manifests[int(record["rank"])] = record
        except (ValueError, KeyError, TypeError) as error:
            result.problems.append(f"{relative} is unreadable ({type(error).__name__}: {error})")
    if not manifests:
        result.problems.append(
            f"no manifest ({MANIFEST_PREFIX}<rank>.json): the checkpoint was never completed, or was "
            "written by a llava-ray without manifests"
        )
        return result
    world_size = max(int(record.get("world_size", 0)) for record in manifests.values())
    result.world_size = world_size
    result.step = manifests.get(0, next(iter(manifests.values()))).get("step")
    result.metrics = manifests.get(0, {}).get("metrics") or {}
    missing_ranks = sorted(set(range(world_size)) - set(manifests))
    if missing_ranks:
        result.problems.append(
            f"no manifest of rank(s) {missing_ranks} of {world_size}: some rank's part is missing"
        )
    expected: dict[str, dict[str, Any]] = {}
    for _, record in sorted(manifests.items()):
        for relative, entry in record.get("files", {}).items():
            if relative in expected and expected[relative] != entry:
                result.problems.append(f"{relative}: ranks' manifests disagree about it")
            expected[relative] = entry
    for relative, entry in sorted(expected.items()):
        if relative not in present:
            result.problems.append(f"{relative}: missing")
            continue
        size, sha256 = file_digest(fs, f"{path}/{relative}")
        if size != entry["size"]:
            result.problems.append(
                f"{relative}: {size} bytes, the manifest says {entry['size']} (truncated?)"
            )
        elif sha256 != entry["sha256"]:
            result.problems.append(f"{relative}: SHA-256 differs from the manifest (the file was changed)")
    extra = sorted(relative for relative in present if relative not in expected and not is_manifest(relative))
    if extra:
        result.problems.append(
            f"file(s) no manifest lists (planted, or left by an older run): {', '.join(extra[:8])}"
        )
    return result


def verify_local_checkpoint(directory: str | Path) -> Verification:
    """Verify a local checkpoint folder; raise :class:`CheckpointError` listing its problems unless intact."""
    result = verify_checkpoint(fsspec.filesystem("file"), str(Path(directory).resolve()))
    if not result.intact:
        raise CheckpointError(
            f"refusing to load the checkpoint at {directory}: "
            + "; ".join(result.problems)
            + ". Its files do not match the manifests the run wrote; resume from an intact checkpoint "
            "(rerunning the job chooses the newest intact one) or start a new run.name"
        )
    return result


def deepspeed_safe_globals() -> list[Any]:
    """The only classes DeepSpeed 0.19's ZeRO checkpoints pickle besides tensors and containers.

    Found with ``torch.serialization.get_unsafe_globals_in_checkpoint`` on ZeRO-2 and ZeRO-3 files: an
    enum, the loss scaler's plain-data object and a fragment-address dataclass. None runs code when
    rebuilt by the ``weights_only`` unpickler.
    """
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside uses the ``weights_only`` unpickler, even DeepSpeed's, which asks for
    ``weights_only=False``; only :func:`deepspeed_safe_globals` are allowed beyond tensors and containers.

    torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` overrides an explicit ``weights_only=False`` (torch >= 2.4);
    it is restored on exit.
    """
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


# ---- the driver: choose the checkpoint a rerun resumes from ----------------------------------------


@dataclass
class ResumePlan:
    """What :func:`prepare_resume` found and did in a run folder."""

    run_dir: str
    resume_from: str | None = None
    step: int | None = None
    corrupt: dict[str, list[str]] = field(default_factory=dict)  # checkpoint name -> problems
    removed_unregistered: list[str] = field(default_factory=list)
    snapshot_rebuilt: bool = False
    snapshot_problem: str | None = None

    def describe(self) -> str:
        parts = []
        if self.snapshot_problem:
            parts.append(
                f"Ray's {SNAPSHOT_FILE} {self.snapshot_problem}; rebuilt it from the checkpoints on storage"
            )
        for name, problems in self.corrupt.items():
            parts.append(f"{name} is corrupt ({'; '.join(problems[:3])}), moved to {name}{CORRUPT_SUFFIX}")
        if self.removed_unregistered:
            parts.append(
                f"deleted {len(self.removed_unregistered)} half-written checkpoint folder(s) Ray never "
                f"registered: {', '.join(self.removed_unregistered)}"
            )
        if self.resume_from:
            parts.append(f"resuming from {self.resume_from} (step {self.step}), the newest intact checkpoint")
        elif self.corrupt or self.snapshot_problem:
            parts.append("no intact checkpoint is left: training starts from step 0")
        return "; ".join(parts)


def checkpoint_folders(fs: fsspec.AbstractFileSystem, run_path: str) -> list[str]:
    """Names of the run's checkpoint folders, oldest first (Ray names them by timestamp)."""
    if not fs.exists(run_path):
        return []
    names = [
        Path(entry["name"]).name for entry in fs.ls(run_path, detail=True) if entry["type"] == "directory"
    ]
    return sorted(n for n in names if n.startswith(CHECKPOINT_PREFIX) and not n.endswith(CORRUPT_SUFFIX))


def read_snapshot(fs: fsspec.AbstractFileSystem, run_path: str) -> tuple[dict[str, Any] | None, str | None]:
    """Ray's snapshot as a dict, or None and why it cannot be used."""
    snapshot_path = f"{run_path}/{SNAPSHOT_FILE}"
    if not fs.exists(snapshot_path):
        return None, "is missing"
    try:
        snapshot = json.loads(fs.cat_file(snapshot_path))
        names = [result["checkpoint_dir_name"] for result in snapshot["checkpoint_results"]]
        if len(names) != len(snapshot["checkpoint_report_indices"]):
            raise ValueError("checkpoint_results and checkpoint_report_indices differ in length")
    except (ValueError, KeyError, TypeError) as error:
        return None, f"is unreadable ({type(error).__name__}: {error})"
    return snapshot, None


def prepare_resume(storage_path: str, run_name: str) -> ResumePlan:
    """Make Ray Train resume the run from its newest intact checkpoint; returns what was found and done.

    Registered checkpoints (those in Ray's snapshot; every checkpoint folder when the snapshot is missing
    or unreadable) are verified newest first until one is intact. Corrupt ones, including registered
    folders that are gone, leave the snapshot and move to ``<name>.corrupt``; folders Ray never
    registered are deleted. The snapshot is rewritten when anything changed (or removed when no intact
    checkpoint is left, so Ray starts afresh instead of refusing the run folder).
    """
    run_uri = join_uri(storage_path, run_name)
    fs, run_path = filesystem(run_uri)
    run_path = run_path.rstrip("/")
    plan = ResumePlan(run_dir=run_uri)
    folders = checkpoint_folders(fs, run_path)
    snapshot, snapshot_problem = read_snapshot(fs, run_path)
    if snapshot is None and not folders:
        return plan  # a new run
    if snapshot is None:
        plan.snapshot_problem = snapshot_problem
        registered = list(folders)
        results = [{"version": 0, "checkpoint_dir_name": name, "metrics": {}} for name in registered]
        indices = list(range(len(registered)))
    else:
        results = list(snapshot["checkpoint_results"])
        indices = list(snapshot["checkpoint_report_indices"])
        registered = [result["checkpoint_dir_name"] for result in results]
    for name in sorted(set(folders) - set(registered)):
        fs.rm(f"{run_path}/{name}", recursive=True)
        plan.removed_unregistered.append(name)
    keep = [True] * len(registered)
    for position in reversed(range(len(registered))):
        name = registered[position]
        verification = verify_checkpoint(fs, f"{run_path}/{name}")
        if verification.intact:
            plan.resume_from, plan.step = name, verification.step
            if snapshot is None:
                results[position]["metrics"] = verification.metrics
            break
        keep[position] = False
        plan.corrupt[name] = verification.problems
        if fs.exists(f"{run_path}/{name}"):
            fs.mv(f"{run_path}/{name}", f"{run_path}/{name}{CORRUPT_SUFFIX}", recursive=True)
    if snapshot is not None and all(keep):
        return plan  # nothing to change: Ray resumes from its own latest
    write_snapshot(
        fs,
        run_path,
        snapshot,
        [r for r, k in zip(results, keep, strict=True) if k],
        [i for i, k in zip(indices, keep, strict=True) if k],
    )
    plan.snapshot_rebuilt = True
    return plan


def write_snapshot(
    fs: fsspec.AbstractFileSystem,
    run_path: str,
    snapshot: dict[str, Any] | None,
    results: list[dict[str, Any]],
    indices: list[int],
) -> None:
    """Write Ray's snapshot (Ray 2.60's ``_CheckpointManagerState``) naming only ``results``.

    Without results the snapshot is removed: Ray then starts the run from scratch.
    """
    snapshot_path = f"{run_path}/{SNAPSHOT_FILE}"
    if not results:
        if fs.exists(snapshot_path):
            fs.rm(snapshot_path)
        return
    import ray

    kept = {result["checkpoint_dir_name"] for result in results}
    previous = snapshot or {}
    pending = [
        (result, spec)
        for result, spec in zip(
            previous.get("pending_training_results", []),
            previous.get("pending_validation_specs", []),
            strict=False,
        )
        if result["checkpoint_dir_name"] in kept
    ]
    record = {
        "ray_version": previous.get("ray_version", ray.__version__),
        "checkpoint_results": results,
        "checkpoint_report_indices": indices,
        "latest_checkpoint_result": results[-1],
        "pending_training_results": [result for result, _ in pending],
        "pending_validation_specs": [spec for _, spec in pending],
        "current_report_index": max(previous.get("current_report_index", 0), indices[-1] + 1),
        **{
            key: [name for name in previous.get(key, []) if name in kept]
            for key in (
                "validated_checkpoint_dir_names",
                "timed_out_validation_checkpoint_dir_names",
                "failed_validation_checkpoint_dir_names",
            )
        },
    }
    with fs.open(snapshot_path, "wb") as handle:
        handle.write(json.dumps(record).encode())


def newest_intact_checkpoint(source: str) -> tuple[str, Verification]:
    """The newest intact checkpoint of a run folder (read only: nothing is moved or rewritten)."""
    fs, run_path = filesystem(source)
    run_path = run_path.rstrip("/")
    # Newest first by name (Ray names them by timestamp); an intact folder is complete whether or not
    # Ray's snapshot lists it, since every rank's manifest matched.
    names = list(reversed(checkpoint_folders(fs, run_path)))
    skipped = []
    for name in names:
        verification = verify_checkpoint(fs, f"{run_path}/{name}")
        if verification.intact:
            if skipped:
                logger.info(f"[export] skipped corrupt checkpoint(s): {'; '.join(skipped)}")
            return join_uri(source, name), verification
        skipped.append(f"{name}: {verification.problems[0]}")
    raise CheckpointError(
        f"{source} holds no intact checkpoint"
        + (f" ({'; '.join(skipped)})" if skipped else f" (no {CHECKPOINT_PREFIX}* folder)")
        + "; pass a run folder ({run.storage_path}/{run.name}) or one of its checkpoint_* folders"
    )


# ---- what a worker writes and reads ---------------------------------------------------------------


def architecture_record(model: Any, template: str | None) -> dict[str, Any]:
    """The model's ``llava_ray_config.json`` record (as ``LlavaModel.save_pretrained`` writes it), with the
    LM's own config under LoRA: enough to rebuild the model without its weights."""
    from llava_ray.model.weights import FORMAT_NAME, FORMAT_VERSION

    lm = model.language_model
    lm_config = lm.get_base_model().config if model.has_lora else lm.config
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "vision_config": model.vision_tower.config.to_dict(),
        "lm_config": lm_config.to_dict(),
        "projector": model.projector_name,
        "vision_select_layer": model.vision_select_layer,
        "vision_select_feature": model.vision_select_feature,
        "image_token_id": model.image_token_id,
        "image_positions": model.image_positions,
        "template": template or model.template,
        "tokenization": model.tokenization,
    }


def write_checkpoint_files(
    engine: Any,
    directory: Path,
    rank: int,
    world_size: int,
    state: dict[str, Any],
    rng: dict[str, Any],
    *,
    run_config: dict[str, Any] | None = None,
    model: Any = None,
    tokenizer: Any = None,
    metrics: dict[str, Any] | None = None,
) -> None:
    """Write this rank's part of a checkpoint into ``directory``; its manifest last.

    Every rank: its ZeRO files and RNG state. Rank 0 also: ``train_state.json``, ``run_config.json`` and
    ``model/`` (architecture record and tokenizer), which make the checkpoint self-describing.
    """
    from llava_ray.model.weights import CONFIG_FILE

    engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG)
    torch.save(rng, directory / f"rng_rank{rank}.pt")
    if rank == 0:
        (directory / STATE_FILE).write_text(json.dumps(state))
        if run_config is not None:
            (directory / RUN_CONFIG_FILE).write_text(json.dumps(run_config, indent=1))
        if model is not None:
            model_dir = directory / MODEL_DIR
            model_dir.mkdir(exist_ok=True)
            template = (run_config or {}).get("data", {}).get("template")
            (model_dir / CONFIG_FILE).write_text(json.dumps(architecture_record(model, template), indent=1))
            if tokenizer is not None:
                tokenizer.save_pretrained(model_dir)
    write_manifest(directory, rank, world_size, int(state["step"]), metrics if rank == 0 else None)


def read_checkpoint_files(engine: Any, directory: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify the checkpoint against its manifests, then load it: (train state, this rank's RNG state).

    Nothing is unpickled before every file matched, and then only with ``weights_only``.
    """
    verify_local_checkpoint(directory)
    with weights_only_loads():
        engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG, load_module_strict=False)
        rng = torch.load(directory / f"rng_rank{rank}.pt", weights_only=True)
    return json.loads((directory / STATE_FILE).read_text()), rng
