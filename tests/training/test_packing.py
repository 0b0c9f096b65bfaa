"""Packing: packed and padded micro-batches train identically, and no sample sees another."""

import copy
import itertools

import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from llava_ray.config.model_sources import build_vision_config, tower_input
from llava_ray.config.schema import ModelConfig
from llava_ray.conversation.templates import IGNORE_INDEX
from llava_ray.model.build import build_llava_model
from llava_ray.training.collate import collate_rows, image_to_tensor
from llava_ray.training.packing import (
    first_fit_decreasing,
    pack_micro_batch,
    pack_rows,
    segment_attention_forward,
    segment_lengths,
    use_segment_attention,
    varlen_applies,
    varlen_segments,
)
from llava_ray.training.stream import table_rows
from llava_ray.training.trainable import set_trainable

TINY_TOWER = tower_input(build_vision_config(ModelConfig(preset="tiny")))  # 64 px images
MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values", "position_ids")


def model_inputs(batch):
    return {key: batch[key] for key in MODEL_INPUTS if key in batch}


@pytest.fixture(scope="module")
def tiny_model(tiny_tokenizer):
    torch.manual_seed(0)
    model = build_llava_model(ModelConfig(preset="tiny"), tiny_tokenizer)
    return set_trainable(model, "full").float()


@pytest.fixture(scope="module")
def segment_model(tiny_model):
    model = copy.deepcopy(tiny_model)
    use_segment_attention(model.language_model)
    return model


@pytest.fixture(scope="module")
def mixed_rows(stage2_rows):
    """Image and text-only rows of different lengths, in data order."""
    with_image = [row for row in stage2_rows if row["images"]][:5]
    text_only = [row for row in stage2_rows if not row["images"]][:2]
    assert len(text_only) == 2, "the synthetic stage-2 data has text-only samples"
    return [with_image[0], text_only[0], *with_image[1:3], text_only[1], *with_image[3:]]


def test_first_fit_decreasing_fills_rows_and_never_splits_a_sample():
    assert first_fit_decreasing([5, 9, 3, 4, 12, 2], token_budget=10) == [[4], [1], [0, 3], [2, 5]]
    # Longer than the budget: a row of its own, whole.
    assert first_fit_decreasing([3, 25, 4], token_budget=10) == [[1], [2, 0]]
    with pytest.raises(ValueError, match=r"token_budget=0 must be positive"):
        first_fit_decreasing([1], token_budget=0)


def test_pack_rows_keys_counts_positions_and_boundary_labels(mixed_rows, tiny_tokenizer):
    lengths = [len(row["input_ids"]) for row in mixed_rows]
    budget = 2 * max(lengths)
    packed = pack_rows(mixed_rows, budget, tiny_tokenizer.pad_token_id, TINY_TOWER)
    padded = collate_rows(mixed_rows, tiny_tokenizer.pad_token_id, TINY_TOWER)
    rows, width = packed["input_ids"].shape
    assert rows < len(mixed_rows) and width <= budget
    assert "attention_mask" not in packed  # per-sample attention comes from position_ids
    assert packed["position_ids"].shape == packed["labels"].shape == (rows, width)
    assert int(packed["num_samples"]) == len(mixed_rows)
    assert int(packed["num_tokens"]) == int(padded["num_tokens"]) == sum(lengths)
    assert int(packed["num_supervised"]) == int(padded["num_supervised"])

    bins = first_fit_decreasing(lengths, budget)
    images = []
    for r, members in enumerate(bins):
        start = 0
        for i in members:
            n = lengths[i]
            assert packed["input_ids"][r, start : start + n].tolist() == list(mixed_rows[i]["input_ids"])
            assert packed["position_ids"][r, start : start + n].tolist() == list(range(n))
            # The first label of a sample would be predicted from the previous sample's last token.
            assert packed["labels"][r, start] == IGNORE_INDEX
            assert packed["labels"][r, start + 1 : start + n].tolist() == list(mixed_rows[i]["labels"][1:])
            images += mixed_rows[i]["images"]
            start += n
        assert (packed["input_ids"][r, start:] == tiny_tokenizer.pad_token_id).all()
        assert (packed["labels"][r, start:] == IGNORE_INDEX).all()
    # Images in packed order: the order in which the model meets their placeholders.
    expected = torch.stack([image_to_tensor(data, TINY_TOWER) for data in images])
    torch.testing.assert_close(packed["pixel_values"], expected, rtol=0, atol=0)


def test_segments_follow_restarting_positions():
    assert segment_lengths(torch.tensor([[0, 1, 2, 0, 1, 0]])) == [3, 2, 1]
    assert segment_lengths(torch.tensor([[0, 1, 0], [0, 1, 2]])) == [2, 1, 3]


def loss_and_grads(model, batches):
    model.zero_grad(set_to_none=True)
    total = torch.zeros(())
    for batch in batches:
        output = model(**model_inputs(batch), loss_reduction="sum")
        output.loss.backward()
        total += output.loss.detach()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return total, grads


@pytest.mark.parametrize("kernel", ["sdpa", "segments"])
def test_packed_and_padded_batches_give_the_same_loss_and_gradients(
    mixed_rows, tiny_tokenizer, tiny_model, segment_model, kernel
):
    """As ``train.packing`` trains: each padded micro-batch of three samples becomes one packed row."""
    model = segment_model if kernel == "segments" else tiny_model
    pad_id = tiny_tokenizer.pad_token_id
    micro_batches = [mixed_rows[i : i + 3] for i in range(0, len(mixed_rows), 3)]
    padded = [collate_rows(rows, pad_id, TINY_TOWER) for rows in micro_batches]
    packed = [pack_micro_batch(rows, pad_id, TINY_TOWER) for rows in micro_batches]
    assert all(batch["input_ids"].shape[0] == 1 for batch in packed)
    loss_padded, grads_padded = loss_and_grads(tiny_model, padded)
    loss_packed, grads_packed = loss_and_grads(model, packed)
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=1e-4)
    assert grads_packed.keys() == grads_padded.keys()
    for name, grad in grads_padded.items():
        torch.testing.assert_close(grads_packed[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def per_sample_logits(model, batch, lengths, bins):
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits
    pieces = {}
    for r, members in enumerate(bins):
        start = 0
        for i in members:
            pieces[i] = logits[r, start : start + lengths[i]]
            start += lengths[i]
    return pieces


@pytest.mark.parametrize("kernel", ["sdpa", "segments"])
def test_each_packed_sample_sees_only_itself(mixed_rows, tiny_tokenizer, tiny_model, segment_model, kernel):
    model = segment_model if kernel == "segments" else tiny_model
    lengths = [len(row["input_ids"]) for row in mixed_rows]
    budget = 3 * max(lengths)
    packed = pack_rows(mixed_rows, budget, tiny_tokenizer.pad_token_id, TINY_TOWER)
    pieces = per_sample_logits(model, packed, lengths, first_fit_decreasing(lengths, budget))
    for i, row in enumerate(mixed_rows):
        alone = collate_rows([row], tiny_tokenizer.pad_token_id, TINY_TOWER)
        with torch.no_grad():
            expected = tiny_model(**model_inputs(alone)).logits[0]
        torch.testing.assert_close(pieces[i], expected, rtol=1e-4, atol=1e-4, msg=f"sample {i}")


def test_cross_sample_attention_would_be_caught(mixed_rows, tiny_tokenizer, tiny_model):
    """With a KV cache transformers ignores the restarting positions: packed rows then attend across
    samples, and both the logits check and the loss check above fail on it."""
    lengths = [len(row["input_ids"]) for row in mixed_rows]
    budget = 3 * max(lengths)
    bins = first_fit_decreasing(lengths, budget)
    packed = pack_rows(mixed_rows, budget, tiny_tokenizer.pad_token_id, TINY_TOWER)
    with torch.no_grad():
        leaky = tiny_model(**model_inputs(packed), use_cache=True).logits
        exact = tiny_model(**model_inputs(packed)).logits
    second = bins[0][1]  # the second sample of the first row: it follows another sample
    start, end = lengths[bins[0][0]], lengths[bins[0][0]] + lengths[second]
    assert (leaky[0, start:end] - exact[0, start:end]).abs().max() > 1e-2
    first = slice(0, lengths[bins[0][0]])  # the first sample has nothing before it either way
    torch.testing.assert_close(leaky[0, first], exact[0, first], rtol=1e-4, atol=1e-4)


def test_segment_attention_leaves_padded_batches_and_generation_alone(
    mixed_rows, tiny_tokenizer, tiny_model, segment_model
):
    padded = collate_rows(mixed_rows[:3], tiny_tokenizer.pad_token_id, TINY_TOWER)
    with torch.no_grad():
        stock = tiny_model(**model_inputs(padded)).logits
        ours = segment_model(**model_inputs(padded)).logits
    real = padded["attention_mask"].bool()
    torch.testing.assert_close(ours[real], stock[real], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # a KV cache and a padding mask: transformers' own SDPA path
        cached = segment_model(**model_inputs(padded), use_cache=True).logits
    torch.testing.assert_close(cached[real], stock[real], rtol=1e-5, atol=1e-5)


def test_segment_attention_refuses_what_it_cannot_compute_exactly(tiny_model):
    hybrid = copy.deepcopy(tiny_model.language_model)
    hybrid.config.layer_types = ["full_attention", "sliding_attention"] * 2
    with pytest.raises(
        ValueError, match=r"mixes attention layer types .* train this LM with train.packing=false"
    ):
        use_segment_attention(hybrid)

    windowed = torch.nn.Module()
    windowed.sliding_window = 2
    query = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match=r"a packed sample of 3 tokens exceeds the LM's sliding window of 2"):
        segment_attention_forward(
            windowed, query, query, query, None, position_ids=torch.tensor([[0, 1, 2, 0, 1]])
        )


def test_pack_rows_takes_rows_as_the_shard_stream_hands_them_over(mixed_rows, tiny_tokenizer):
    table = pa.table(
        {
            "row": list(range(len(mixed_rows))),
            "input_ids": [list(row["input_ids"]) for row in mixed_rows],
            "labels": [list(row["labels"]) for row in mixed_rows],
            "images": [list(row["images"]) for row in mixed_rows],
        }
    )
    streamed = table_rows(table, list(range(len(mixed_rows))))
    from_stream = pack_rows(streamed, 512, tiny_tokenizer.pad_token_id, TINY_TOWER)
    from_lists = pack_rows(mixed_rows, 512, tiny_tokenizer.pad_token_id, TINY_TOWER)
    assert from_stream.keys() == from_lists.keys()
    for key, value in from_lists.items():
        assert torch.equal(from_stream[key], value), key


def reference_varlen(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)
):
    """torch's ``varlen_attn`` contract ([tokens, heads, dim], cumulative starts) on any device."""
    assert torch.equal(cu_seq_q, cu_seq_k) and cu_seq_q.dtype == torch.int32 and window_size == (-1, 0)
    bounds = cu_seq_q.tolist()
    assert max_q == max_k == max(b - a for a, b in itertools.pairwise(bounds))
    pieces = [
        F.scaled_dot_product_attention(
            *(t[a:b].transpose(0, 1) for t in (query, key, value)), is_causal=True, scale=scale
        ).transpose(0, 1)
        for a, b in itertools.pairwise(bounds)
    ]
    return torch.cat(pieces)


def test_varlen_layout_matches_the_per_segment_calls():
    torch.manual_seed(0)
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 0, 1, 0, 1]])
    query, key, value = (torch.randn(2, 4, 9, 8) for _ in range(3))
    module = torch.nn.Module()
    expected, _ = segment_attention_forward(module, query, key, value, None, position_ids=position_ids)
    got = varlen_segments(query, key, value, segment_lengths(position_ids), 8**-0.5, kernel=reference_varlen)
    torch.testing.assert_close(got, expected)
    assert not varlen_applies(query, 0.0, None)  # a CPU tensor: the per-segment calls


def test_varlen_attention_falls_back_to_the_per_segment_calls_off_cuda(
    tiny_model, segment_model, mixed_rows, tiny_tokenizer
):
    """``train.attention=varlen`` where the kernel cannot run (a CPU): exactly the segments' result."""
    varlen_model = copy.deepcopy(tiny_model)
    use_segment_attention(varlen_model.language_model, "varlen")
    assert varlen_model.language_model.config._attn_implementation == "llava_ray_varlen"
    batch = pack_micro_batch(mixed_rows[:4], tiny_tokenizer.pad_token_id, TINY_TOWER)
    with torch.no_grad():
        expected = segment_model(**model_inputs(batch)).loss
        got = varlen_model(**model_inputs(batch)).loss
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"attention='flash' is unknown; use one of segments, varlen"):
        use_segment_attention(varlen_model.language_model, "flash")
