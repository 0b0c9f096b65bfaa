"""Stage jobs on a real local Ray: 2 CPU workers, gloo, real DeepSpeed ZeRO-2 and ZeRO-3.

Covers: both stages and LoRA train and their loss falls; 1 worker equals 2 workers; a worker
killed mid-run resumes and ends with the same weights as an uninterrupted run; a job restarted
with the same name resumes from its latest checkpoint, on S3; stage 2 starts from stage 1.
"""

from __future__ import annotations

import pytest
import ray.train
import s3fs
import torch

from llava_ray.config import load_config
from llava_ray.conversation.tokenizer import load_tokenizer
from llava_ray.data.prepare import run_prepare
from llava_ray.data.synthetic import generate
from llava_ray.model.build import build_llava_model
from llava_ray.model.llava import LlavaModel
from llava_ray.training.driver import run_train

pytestmark = pytest.mark.integration

TINY = "jobs/configs/tiny"
COMMON = [
    "train.global_batch_size=8",
    "train.micro_batch_size=4",
    "checkpoint.every_n_steps=2",
    "train.warmup_ratio=0",
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, ray_cluster):
    """Synthetic data prepared for both stages with the real prepare pipeline."""
    root = tmp_path_factory.mktemp("train")
    generate(root / "data", samples=40, seed=0)
    paths = {}
    for stage, data in (("pretrain", "stage1.json"), ("finetune", "stage2.json")):
        paths[stage] = str(root / "prepared" / stage)
        run_prepare(
            load_config(
                f"{TINY}/{stage}.yaml",
                [f"data.sources.0.path={root / 'data' / data}", f"data.prepared_path={paths[stage]}"],
            )
        )
    return root, paths


def stage_config(stage, root, paths, name, *overrides):
    """A tiny stage config (``pretrain``, ``finetune`` or ``finetune_lora``) on the prepared data."""
    data = "pretrain" if stage == "pretrain" else "finetune"
    return load_config(
        f"{TINY}/{stage}.yaml",
        [
            f"data.prepared_path={paths[data]}",
            f"run.storage_path={root / 'runs'}",
            f"run.name={name}",
            *COMMON,
            *overrides,
        ],
    )


def final_weights(uri: str) -> dict[str, torch.Tensor]:
    return LlavaModel.from_pretrained(uri).state_dict()


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def stage1(prepared):
    """Stage 1 with 2 workers and ZeRO-2: the baseline several tests compare against."""
    root, paths = prepared
    return run_train(stage_config("pretrain", root, paths, "s1-two-workers", "train.max_steps=6"))


def test_stage1_zero2_trains_projector_and_loss_falls(stage1, prepared):
    root, _ = prepared
    assert stage1.steps == 6 and stage1.metrics["step"] == 6
    assert stage1.metrics["loss_last"] < stage1.metrics["loss_first"]
    assert (root / "runs" / "s1-two-workers" / "final" / "hf" / "config.json").exists()
    trained = final_weights(stage1.final_model)
    config = stage_config("pretrain", root, prepared[1], "unused")
    initial = build_llava_model(config.model, load_tokenizer(config.model), seed=config.run.seed).state_dict()
    changed = {key for key in trained if not torch.equal(trained[key], initial[key])}
    assert changed and all(key.startswith("projector.") for key in changed), changed


def test_one_worker_equals_two_workers(stage1, prepared):
    root, paths = prepared
    one = run_train(
        stage_config("pretrain", root, paths, "s1-one-worker", "train.max_steps=6", "scaling.num_workers=1")
    )
    assert one.metrics["loss_last"] == pytest.approx(stage1.metrics["loss_last"], rel=1e-5)
    assert_same_weights(final_weights(one.final_model), final_weights(stage1.final_model))


def test_killed_worker_resumes_to_the_same_weights(stage1, prepared):
    root, paths = prepared
    faulted = run_train(
        stage_config(
            "pretrain",
            root,
            paths,
            "s1-fault",
            "train.max_steps=6",
            "fault.kill_rank=1",
            "fault.kill_at_step=3",
        )
    )
    assert (root / "runs" / "s1-fault" / "fault-injected-rank1-step3").exists()
    assert faulted.metrics["step"] == 6 and faulted.metrics["resumed_from_step"] == 2
    assert_same_weights(final_weights(faulted.final_model), final_weights(stage1.final_model))


def test_stage2_full_zero3_starts_from_stage1(stage1, prepared):
    root, paths = prepared
    result = run_train(
        stage_config(
            "finetune",
            root,
            paths,
            "s2-full",
            "train.max_steps=6",
            f"model.init_from={stage1.final_model}",
            # A negligible projector rate shows where the projector started.
            "train.projector_learning_rate=1e-12",
        )
    )
    assert result.metrics["loss_last"] < result.metrics["loss_first"]
    stage1_weights, stage2_weights = final_weights(stage1.final_model), final_weights(result.final_model)
    for key in [k for k in stage1_weights if k.startswith("projector.")]:
        torch.testing.assert_close(stage2_weights[key], stage1_weights[key], rtol=0, atol=1e-6)
    lm_key = "language_model.model.layers.0.mlp.up_proj.weight"
    assert not torch.allclose(stage2_weights[lm_key], stage1_weights[lm_key])


def test_stage2_lora_zero3_trains_and_merges(stage1, prepared):
    root, paths = prepared
    result = run_train(
        stage_config(
            "finetune_lora",
            root,
            paths,
            "s2-lora",
            "train.max_steps=6",
            f"model.init_from={stage1.final_model}",
        )
    )
    assert result.metrics["loss_last"] < result.metrics["loss_first"]
    weights = final_weights(result.final_model)
    assert not any("lora_" in key for key in weights)
    lm_key = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(weights[lm_key], final_weights(stage1.final_model)[lm_key])


def test_restarted_job_resumes_from_its_latest_checkpoint_on_s3(prepared, s3_endpoint):
    root, paths = prepared
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    fs.mkdir("llava-runs")
    config = stage_config(
        "pretrain",
        root,
        paths,
        "s1-restart",
        "train.max_steps=6",
        "run.storage_path=s3://llava-runs/runs",
        "fault.kill_rank=0",
        "fault.kill_at_step=3",
        "scaling.max_failures=0",
        "scaling.num_workers=1",  # what is under test is the storage, not the group: one process less to start
    )
    with pytest.raises(ray.train.TrainingFailedError):
        run_train(config)  # the whole job dies after step 3; step 2's checkpoint is on S3
    assert any("checkpoint_" in path for path in fs.ls("llava-runs/runs/s1-restart"))
    resumed = run_train(config)
    assert resumed.metrics["step"] == 6 and resumed.metrics["resumed_from_step"] == 2
    assert fs.exists("llava-runs/runs/s1-restart/final/model.safetensors")


def test_training_streams_from_the_sources_without_shards(prepared):
    root, _ = prepared
    config = load_config(
        f"{TINY}/pretrain.yaml",
        [
            f"data.sources.0.path={root / 'data' / 'stage1.json'}",
            "data.prepared_path=null",
            f"run.storage_path={root / 'runs'}",
            "run.name=s1-streamed",
            "scaling.num_workers=1",
            "train.global_batch_size=8",
            "train.micro_batch_size=8",
            "train.max_steps=2",
        ],
    )
    result = run_train(config)
    assert (
        result.metrics["step"] == 2
        and (root / "runs" / "s1-streamed" / "final" / "model.safetensors").exists()
    )
    assert not any((root / "runs" / "s1-streamed").rglob("*.parquet"))  # nothing was written as shards
