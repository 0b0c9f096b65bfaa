"""train.packing: packed micro-batches train exactly as padded ones, and the loop packs exactly
the scheduled samples. No Ray: the step runs on ``PlainEngine``, the loop streams real shards."""

import copy
import itertools
import json
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from llava_ray.config import load_config
from llava_ray.config.model_sources import build_vision_config, tower_input
from llava_ray.config.schema import ModelConfig
from llava_ray.conversation.templates import IGNORE_INDEX
from llava_ray.conversation.tokenizer import image_token_id
from llava_ray.data.samples import PREPARED_SCHEMA
from llava_ray.model.build import build_llava_model
from llava_ray.training.collate import collate_rows, image_to_tensor
from llava_ray.training.driver import rank_reads, schedule_for
from llava_ray.training.packing import pack_micro_batch, use_segment_attention
from llava_ray.training.step import PlainEngine, train_step
from llava_ray.training.stream import index_prepared
from llava_ray.training.trainable import set_trainable
from llava_ray.training.worker import micro_batches

TINY_VISION = build_vision_config(ModelConfig(preset="tiny"))
TINY_TOWER = tower_input(TINY_VISION)  # 64 px images
IMAGE_POSITIONS = 16  # the tiny preset: 64 px images in 16 px patches
CPU = torch.device("cpu")


class GradientRecorder(PlainEngine):
    """PlainEngine that keeps a copy of the accumulated gradients before its optimizer step."""

    grads: dict[str, torch.Tensor]

    def step(self) -> None:
        if (self.micro_steps + 1) % self.accumulation == 0:
            self.grads = {
                name: p.grad.clone() for name, p in self.module.named_parameters() if p.grad is not None
            }
        super().step()


def one_step(model, batches):
    """Loss, step counts and gradients of one optimizer step over ``batches`` (token-mean loss)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    engine = GradientRecorder(model, optimizer, None, accumulation=len(batches), max_grad_norm=1.0)
    step_tokens = sum(int(batch["num_supervised"]) for batch in batches)
    return train_step(engine, batches, step_tokens, world_size=1, device=CPU), engine.grads


@pytest.fixture(scope="module")
def stock_model(tiny_tokenizer):
    return set_trainable(build_llava_model(ModelConfig(preset="tiny"), tiny_tokenizer, seed=0), "full")


def micro_batch_rows(rows, micro):
    """Consecutive micro-batches of length-sorted rows, as the schedule cuts a global batch."""
    ordered = sorted(rows, key=lambda row: -len(row["input_ids"]))
    return [ordered[i : i + micro] for i in range(0, len(ordered), micro)]


@pytest.mark.parametrize("kind", ["image_and_text", "text_only", "image_only"])
def test_packed_and_padded_steps_give_the_same_loss_and_gradients(
    stage2_rows, tiny_tokenizer, stock_model, kind
):
    text = [row for row in stage2_rows if not row["images"]]
    image = [row for row in stage2_rows if row["images"]]
    assert len(text) >= 3, "the synthetic stage-2 data has text-only samples"
    rows = {"image_and_text": image[:5] + text[:3], "text_only": text[:4], "image_only": image[:6]}[kind]
    groups = micro_batch_rows(rows, micro=3)
    pad_id = tiny_tokenizer.pad_token_id
    padded = [collate_rows(group, pad_id, TINY_TOWER) for group in groups]
    packed = [pack_micro_batch(group, pad_id, TINY_TOWER) for group in groups]
    # As the loop sets up packed training: per-sample attention without any mask.
    packed_model = copy.deepcopy(stock_model)
    use_segment_attention(packed_model.language_model)

    padded_result, padded_grads = one_step(copy.deepcopy(stock_model), padded)
    packed_result, packed_grads = one_step(packed_model, packed)

    assert all(batch["input_ids"].shape[0] == 1 for batch in packed)
    assert packed_result.samples == padded_result.samples == len(rows)
    assert packed_result.supervised == padded_result.supervised
    assert packed_result.tokens == packed_result.padded_tokens == padded_result.tokens
    assert packed_result.image_positions == padded_result.image_positions
    assert packed_result.loss_sum == pytest.approx(padded_result.loss_sum, rel=1e-5)
    assert packed_result.grad_norm == pytest.approx(padded_result.grad_norm, rel=1e-4)
    assert packed_grads.keys() == padded_grads.keys()
    assert any(name.startswith("projector.") for name in packed_grads)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


# ---- the loop -------------------------------------------------------------------------------------


def write_prepared(rows, root):
    """``rows`` as prepared shards (row keys 0..n-1, row groups of 4) with a report that counts them."""
    supervised = [sum(label != IGNORE_INDEX for label in row["labels"][1:]) for row in rows]
    table = pa.table(
        {
            "row": list(range(len(rows))),
            "id": [row["id"] for row in rows],
            "source": ["synthetic"] * len(rows),
            "modality": ["image" if row["images"] else "text" for row in rows],
            "input_ids": [list(row["input_ids"]) for row in rows],
            "labels": [list(row["labels"]) for row in rows],
            "length": [len(row["input_ids"]) for row in rows],
            "num_supervised": supervised,
            "images": [list(row["images"]) for row in rows],
        },
        schema=PREPARED_SCHEMA,
    )
    root.mkdir()
    pq.write_table(table, root / "part-0.parquet", row_group_size=4)
    (root / "report.json").write_text(json.dumps({"written": len(rows)}))
    return str(root)


def test_the_loop_packs_exactly_the_scheduled_samples(stage2_rows, tiny_tokenizer, tmp_path):
    world_size, micro, global_batch = 2, 3, 12
    config = load_config(
        None,
        [
            "model.preset=tiny",
            "train.packing=true",
            f"train.global_batch_size={global_batch}",
            f"train.micro_batch_size={micro}",
            f"scaling.num_workers={world_size}",
            "train.shuffle_window=16",  # several windows of row groups
        ],
    )
    prepared = index_prepared(write_prepared(stage2_rows, tmp_path / "prepared"))
    schedule = schedule_for(config, prepared.rows)
    supervised = prepared.rows["num_supervised"].to_numpy()
    reads = rank_reads(prepared.rows, schedule)
    model = SimpleNamespace(vision_tower=SimpleNamespace(config=TINY_VISION))
    pad_id = tiny_tokenizer.pad_token_id
    accumulation = global_batch // (micro * world_size)

    def loop_batches(rank, skip_steps):
        return list(
            micro_batches(
                config,
                prepared.units,
                reads[rank],
                pad_id,
                model,
                skip_steps,
                world_size,
                schedule.steps_per_epoch,
            )
        )

    step_supervised = np.zeros(schedule.steps, dtype=np.int64)
    for rank in range(world_size):
        batches = loop_batches(rank, skip_steps=0)
        scheduled = schedule.rank_rows(rank).reshape(-1, micro)
        assert len(batches) == len(scheduled) == schedule.steps * accumulation
        for k, (batch, rows) in enumerate(zip(batches, scheduled, strict=True)):
            assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # one packed row
            assert int(batch["num_samples"]) == micro
            expected = [stage2_rows[r] for r in rows]
            found = split_packed_row(batch, image_token_id(tiny_tokenizer))
            # The scheduled samples, whole, each with its own image; only their order in the row differs.
            assert sorted(sample["input_ids"] for sample in found) == sorted(
                list(row["input_ids"]) for row in expected
            )
            for sample in found:
                row = next(row for row in expected if list(row["input_ids"]) == sample["input_ids"])
                assert sample["labels"] == [IGNORE_INDEX, *row["labels"][1:]]
                assert len(sample["images"]) == len(row["images"])
                for tensor, data in zip(sample["images"], row["images"], strict=True):
                    torch.testing.assert_close(tensor, image_to_tensor(data, TINY_TOWER), rtol=0, atol=0)
            assert int(batch["num_supervised"]) == int(supervised[rows].sum())
            step_supervised[k // accumulation] += int(batch["num_supervised"])
        # Resuming after a step skips exactly that step's micro-batches.
        resumed = loop_batches(rank, skip_steps=1)
        assert len(resumed) == len(batches) - accumulation
        for batch, original in zip(resumed, batches[accumulation:], strict=True):
            assert torch.equal(batch["input_ids"], original["input_ids"])
    # The loss normalisation (the schedule's supervised tokens per step) still matches the batches.
    assert step_supervised.tolist() == schedule.step_tokens.tolist()


def split_packed_row(batch, placeholder_id):
    """The samples of a one-row packed micro-batch (positions restart at each): input_ids, labels and
    the image tensors its placeholders take, in the order the model splices them."""
    (input_ids,), (labels,), (positions,) = batch["input_ids"], batch["labels"], batch["position_ids"]
    starts = [*torch.nonzero(positions == 0).flatten().tolist(), len(positions)]
    images = list(batch.get("pixel_values", []))
    samples = []
    for start, end in itertools.pairwise(starts):
        ids = input_ids[start:end].tolist()
        count = ids.count(placeholder_id) // IMAGE_POSITIONS
        samples.append({"input_ids": ids, "labels": labels[start:end].tolist(), "images": images[:count]})
        images = images[count:]
    assert not images
    return samples
