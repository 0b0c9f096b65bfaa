"""Checkpoints as transactions, on real DeepSpeed ZeRO checkpoints written by a one-process gloo engine.

Covers: the manifest catches truncated, changed, planted and missing files; a rerun resumes from the
newest intact checkpoint (Ray's own checkpoint manager reads the rewritten snapshot), moves the corrupt
one aside and deletes half-written folders; an unreadable snapshot recovers from the checkpoints on
storage; a planted pickle never runs; a verified resume restores the exact state. One integration
test reruns a real Ray Train job after damaging its latest checkpoint and snapshot, then reruns it finished.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from ray.train import CheckpointConfig
from ray.train.v2._internal.exceptions import CheckpointManagerInitializationError
from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
    CheckpointManager,
    _CheckpointManagerState,
    _TrainingResultState,
)
from ray.train.v2._internal.execution.storage import StorageContext

from llava_ray.config import load_config
from llava_ray.config.model_sources import build_vision_config, tower_input
from llava_ray.config.schema import ModelConfig
from llava_ray.data.prepare import run_prepare
from llava_ray.data.synthetic import generate
from llava_ray.model.build import build_llava_model
from llava_ray.model.llava import LlavaModel
from llava_ray.training.checkpoint import (
    CORRUPT_SUFFIX,
    SNAPSHOT_FILE,
    CheckpointError,
    prepare_resume,
    read_checkpoint_files,
    verify_local_checkpoint,
    write_checkpoint_files,
    write_manifest,
)
from llava_ray.training.collate import collate_rows
from llava_ray.training.driver import run_train
from llava_ray.training.optim import build_optimizer, build_scheduler, deepspeed_config
from llava_ray.training.step import train_step
from llava_ray.training.trainable import set_trainable
from llava_ray.training.worker import TrainState, rng_state
from llava_ray.utils.compat import skip_deepspeed_cpu_shm_op

CPU = torch.device("cpu")
TINY_TOWER = tower_input(build_vision_config(ModelConfig(preset="tiny")))
RUN = "run"


def tiny_config(zero_stage: int = 2, trainable: str = "full"):
    return load_config(
        None,
        [
            "model.preset=tiny",
            "train.stage=finetune",
            f"train.trainable={trainable}",
            "train.global_batch_size=4",
            "train.micro_batch_size=4",
            "train.learning_rate=1e-3",
            "train.lora.r=4",
            "train.lora.dropout=0",
            f"deepspeed.zero_stage={zero_stage}",
            "scaling.num_workers=1",
        ],
    )


def build_engine(config, tokenizer, seed=0):
    """The worker's engine set-up (``setup_engine``) on one process."""
    import deepspeed

    skip_deepspeed_cpu_shm_op(deepspeed)
    model = build_llava_model(config.model, tokenizer, seed=seed)
    model.template = config.data.template
    set_trainable(model, config.train.trainable, config.train.freeze_vision_tower, config.train.lora)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, total_steps=10)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(config, 1, False),
        dist_init_required=False,
    )
    return engine, model


def train_one_step(engine, rows, tokenizer):
    batch = collate_rows(rows[:4], tokenizer.pad_token_id, TINY_TOWER)
    return train_step(engine, [batch], int(batch["num_supervised"]), 1, CPU)


def save(engine, model, tokenizer, config, directory: Path, step: int) -> Path:
    directory.mkdir(parents=True)
    write_checkpoint_files(
        engine,
        directory,
        0,
        1,
        asdict(TrainState(step=step, samples_seen=4 * step)),
        rng_state(),
        run_config=config.model_dump(mode="json"),
        model=model,
        tokenizer=tokenizer,
        metrics={"step": step},
    )
    return directory


NAMES = ("checkpoint_2026-01-01_00-00-01.000001", "checkpoint_2026-01-01_00-00-02.000002")
EARLIER, LATEST = NAMES


def write_ray_snapshot(run_dir: Path, names) -> None:
    """Ray's own snapshot of registered checkpoints, written with Ray's own model of it."""
    results = [
        _TrainingResultState(checkpoint_dir_name=name, metrics={"step": step})
        for step, name in enumerate(names, start=1)
    ]
    state = _CheckpointManagerState(
        checkpoint_results=results,
        checkpoint_report_indices=list(range(1, len(names) + 1)),
        latest_checkpoint_result=results[-1],
        pending_training_results=[],
        pending_validation_specs=[],
        current_report_index=len(names) + 1,
        validated_checkpoint_dir_names=[],
        timed_out_validation_checkpoint_dir_names=[],
        failed_validation_checkpoint_dir_names=[],
    )
    (run_dir / SNAPSHOT_FILE).write_text(state.model_dump_json())


def ray_resumes_from(storage: Path) -> str | None:
    """The checkpoint Ray Train's own checkpoint manager would hand the workers on a rerun."""
    manager = CheckpointManager(CheckpointConfig(), StorageContext(str(storage), RUN))
    latest = manager.latest_checkpoint_result
    return Path(latest.checkpoint.path).name if latest else None


@pytest.fixture(scope="module")
def trained(process_group, stage2_rows, tiny_tokenizer, tmp_path_factory):
    """A run folder as Ray leaves it: checkpoints after steps 1 and 2 of a real ZeRO-2 engine, registered."""
    config = tiny_config()
    engine, model = build_engine(config, tiny_tokenizer)
    storage = tmp_path_factory.mktemp("runs")
    for step, name in enumerate(NAMES, start=1):
        train_one_step(engine, stage2_rows, tiny_tokenizer)
        save(engine, model, tiny_tokenizer, config, storage / RUN / name, step)
    write_ray_snapshot(storage / RUN, NAMES)
    return engine, storage


@pytest.fixture
def storage(trained, tmp_path) -> Path:
    """A private copy of the run folder to damage."""
    copy = tmp_path / "runs"
    shutil.copytree(trained[1], copy)
    return copy


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


MODEL_STATES = "state/mp_rank_00_model_states.pt"


def test_the_manifest_names_each_damage(storage):
    checkpoint = storage / RUN / LATEST
    assert verify_local_checkpoint(checkpoint).step == 2
    target = checkpoint / MODEL_STATES
    original = target.read_bytes()
    truncate(target)
    with pytest.raises(
        CheckpointError, match=r"mp_rank_00_model_states.pt: \d+ bytes, the manifest says \d+ \(truncated\?\)"
    ):
        verify_local_checkpoint(checkpoint)
    target.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(
        CheckpointError, match=r"mp_rank_00_model_states.pt: SHA-256 differs from the manifest"
    ):
        verify_local_checkpoint(checkpoint)
    target.write_bytes(original)
    (checkpoint / "state" / "extra.pt").write_bytes(b"planted")
    with pytest.raises(CheckpointError, match=r"file\(s\) no manifest lists .*: state/extra.pt"):
        verify_local_checkpoint(checkpoint)
    (checkpoint / "state" / "extra.pt").unlink()
    manifest = checkpoint / "manifest_rank0.json"
    record = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**record, "world_size": 2}))
    with pytest.raises(CheckpointError, match=r"no manifest of rank\(s\) \[1\] of 2"):
        verify_local_checkpoint(checkpoint)


def test_a_rerun_resumes_from_the_newest_intact_checkpoint(storage):
    run_dir = storage / RUN
    truncate(run_dir / LATEST / MODEL_STATES)
    half_written = run_dir / "checkpoint_2026-01-01_00-00-03.000003"  # an upload a crash cut short
    shutil.copytree(run_dir / EARLIER / "state", half_written / "state")
    assert ray_resumes_from(storage) == LATEST  # what Ray alone would load: the truncated one
    plan = prepare_resume(str(storage), RUN)
    assert (plan.resume_from, plan.step) == (EARLIER, 1)
    assert list(plan.corrupt) == [LATEST] and "truncated" in plan.corrupt[LATEST][0]
    assert plan.removed_unregistered == [half_written.name] and not half_written.exists()
    assert (run_dir / f"{LATEST}{CORRUPT_SUFFIX}").is_dir() and not (run_dir / LATEST).exists()
    assert f"resuming from {EARLIER} (step 1)" in plan.describe()
    assert ray_resumes_from(storage) == EARLIER
    again = prepare_resume(str(storage), RUN)  # nothing left to repair
    assert again.resume_from == EARLIER and not again.corrupt and not again.snapshot_rebuilt


def test_a_deleted_checkpoint_folder_no_longer_blocks_the_run(storage):
    shutil.rmtree(storage / RUN / LATEST)
    with pytest.raises(CheckpointManagerInitializationError, match="does not exist anymore"):
        ray_resumes_from(storage)
    plan = prepare_resume(str(storage), RUN)
    assert plan.corrupt[LATEST] == [f"{storage / RUN / LATEST} holds no files (missing or empty)"]
    assert ray_resumes_from(storage) == EARLIER


def test_an_unreadable_snapshot_recovers_from_the_checkpoints_on_storage(storage):
    truncate(storage / RUN / SNAPSHOT_FILE)  # a crash while Ray wrote it
    with pytest.raises(CheckpointManagerInitializationError):
        ray_resumes_from(storage)
    plan = prepare_resume(str(storage), RUN)
    assert plan.snapshot_problem.startswith("is unreadable") and plan.resume_from == LATEST
    manager = CheckpointManager(CheckpointConfig(), StorageContext(str(storage), RUN))
    assert Path(manager.latest_checkpoint_result.checkpoint.path).name == LATEST
    assert manager.latest_checkpoint_result.metrics == {"step": 2}  # from the checkpoint's own manifest


def test_no_intact_checkpoint_starts_afresh_instead_of_failing(storage):
    for name in NAMES:
        truncate(storage / RUN / name / MODEL_STATES)
    plan = prepare_resume(str(storage), RUN)
    assert plan.resume_from is None and set(plan.corrupt) == set(NAMES)
    assert "no intact checkpoint is left" in plan.describe()
    assert ray_resumes_from(storage) is None


class Planted:
    """A pickle that runs code when unpickled: it creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.fixture(scope="module")
def fresh_engine(process_group, tiny_tokenizer):
    return build_engine(tiny_config(), tiny_tokenizer, seed=1)[0]


def test_a_planted_pickle_never_runs(storage, fresh_engine, tmp_path):
    checkpoint = storage / RUN / LATEST
    marker = tmp_path / "code-ran"
    torch.save({"module": Planted(marker)}, checkpoint / MODEL_STATES)
    with pytest.raises(CheckpointError, match=r"SHA-256 differs|bytes, the manifest says"):
        read_checkpoint_files(fresh_engine, checkpoint, 0)
    assert not marker.exists()
    write_manifest(checkpoint, 0, 1, 2)  # someone who can write the storage rewrites the manifest too
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        read_checkpoint_files(fresh_engine, checkpoint, 0)
    assert not marker.exists()
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # weights_only_loads put it back


def test_a_verified_resume_restores_the_exact_state(trained, fresh_engine, stage2_rows, tiny_tokenizer):
    engine, storage = trained
    state, _ = read_checkpoint_files(fresh_engine, storage / RUN / LATEST, 0)
    assert state["step"] == 2
    for (name, a), b in zip(
        engine.module.state_dict().items(), fresh_engine.module.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    # One more step on each: equal only if the optimizer's moments and the schedule were restored too.
    assert train_one_step(engine, stage2_rows[4:], tiny_tokenizer).loss_sum == pytest.approx(
        train_one_step(fresh_engine, stage2_rows[4:], tiny_tokenizer).loss_sum, rel=1e-6
    )
    for (name, a), b in zip(
        engine.module.state_dict().items(), fresh_engine.module.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.integration
def test_a_job_rerun_after_damage_falls_back_and_a_finished_one_reruns_cleanly(ray_cluster, tmp_path):
    """Real Ray Train, one worker: truncate a file of the latest checkpoint and Ray's snapshot, rerun; then
    rerun the finished job, whose restarted loop resumes at the last step and runs none."""
    generate(tmp_path / "data", samples=40, seed=0)
    prepared = str(tmp_path / "prepared")
    config = load_config(
        "jobs/configs/tiny/pretrain.yaml",
        [
            f"data.sources.0.path={tmp_path / 'data' / 'stage1.json'}",
            f"data.prepared_path={prepared}",
            f"run.storage_path={tmp_path / 'runs'}",
            "run.name=damaged",
            "scaling.num_workers=1",
            "train.global_batch_size=8",
            "train.micro_batch_size=8",
            "train.max_steps=4",
            "checkpoint.every_n_steps=2",
        ],
    )
    run_prepare(config)
    first = run_train(config)
    run_dir = tmp_path / "runs" / "damaged"
    steps = {
        p.name: json.loads((p / "train_state.json").read_text())["step"]
        for p in run_dir.glob("checkpoint_*")
        if p.is_dir()
    }
    assert first.metrics["step"] == 4 and sorted(steps.values()) == [2, 4], steps
    latest = max(steps, key=steps.__getitem__)
    weights = LlavaModel.from_pretrained(first.final_model).state_dict()
    truncate(run_dir / latest / MODEL_STATES)
    truncate(run_dir / SNAPSHOT_FILE)

    resumed = run_train(config)  # before: four retries on the truncated file, then TrainingFailedError
    assert resumed.metrics["step"] == 4 and resumed.metrics["resumed_from_step"] == 2
    assert (run_dir / f"{latest}{CORRUPT_SUFFIX}").is_dir()
    again = LlavaModel.from_pretrained(resumed.final_model).state_dict()
    for key, value in weights.items():
        torch.testing.assert_close(again[key], value, rtol=1e-4, atol=1e-6, msg=key)

    finished = run_train(config)  # before: UnboundLocalError 'report' in the loop that ran no step
    assert finished.metrics["step"] == 4 and (run_dir / "final" / "model.safetensors").is_file()
