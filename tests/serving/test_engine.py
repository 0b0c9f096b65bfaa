"""Batched serving generation without Ray: what batching must not change, and what each row keeps for itself."""

from __future__ import annotations

import json

import pytest
import torch

from llava_ray.evaluation.loaded_model import load_inference_model, load_pixels
from llava_ray.model.generate import generate, prompt_input_ids
from llava_ray.serving.engine import Job, RowUpdate, _nucleus, generate_batch


@pytest.fixture(scope="module")
def loaded(trained_model_dir):
    return load_inference_model(str(trained_model_dir))


@pytest.fixture(scope="module")
def questions(loaded, synthetic_eval_dir):
    """(conversation, pixels) of the first held-out questions."""
    items = json.loads((synthetic_eval_dir / "eval.json").read_text())[:4]
    return [
        (item["conversations"][:1], load_pixels(str(synthetic_eval_dir / item["image"]), loaded.tower_input))
        for item in items
    ]


def job(loaded, conversation, pixels, **settings) -> Job:
    model = loaded.model
    ids = prompt_input_ids(
        conversation, loaded.template, loaded.tokenizer, model.image_positions, model.tokenization
    )
    return Job(ids, None if pixels is None else pixels.unsqueeze(0), **{"max_tokens": 12, **settings})


def run(loaded, jobs: list[Job]) -> tuple[list[str], list[list[RowUpdate]]]:
    steps: list[list[RowUpdate]] = []
    generate_batch(loaded, jobs, steps.append)
    rows = [[step[row] for step in steps] for row in range(len(jobs))]
    return ["".join(update.text for update in row) for row in rows], rows


def test_greedy_answers_are_evaluations_answers_alone_or_batched(loaded, questions):
    expected = generate(loaded.model, loaded.tokenizer, loaded.template, questions, max_new_tokens=12)
    alone = [run(loaded, [job(loaded, *question)])[0][0] for question in questions]
    together, _ = run(loaded, [job(loaded, *question) for question in questions])
    assert alone == expected
    assert together == expected
    assert all(answer.strip() for answer in expected)  # the trained model answers: the check compares text


def test_a_seeded_sampled_row_is_the_same_alone_and_in_a_mixed_batch(loaded, questions):
    sampled = {"temperature": 1.5, "top_p": 0.95, "seed": 7, "max_tokens": 10}
    alone, _ = run(loaded, [job(loaded, *questions[0], **sampled)])
    mixed, _ = run(
        loaded,
        [
            job(loaded, *questions[1]),  # greedy
            job(loaded, *questions[0], **sampled),
            job(loaded, *questions[2], temperature=1.0, seed=3),
        ],
    )
    assert mixed[1] == alone[0]
    assert mixed[0] == run(loaded, [job(loaded, *questions[1])])[0][0], "a greedy row is not sampled"
    others = {
        run(loaded, [job(loaded, *questions[0], **{**sampled, "seed": seed})])[0][0] for seed in range(4)
    }
    assert len(others) > 1, "different seeds draw different answers at temperature 1.5"


def test_each_row_stops_at_its_own_limit_and_says_why(loaded, questions):
    jobs = [job(loaded, *questions[0], max_tokens=1), job(loaded, *questions[1], max_tokens=40)]
    texts, rows = run(loaded, jobs)
    short = rows[0]
    finished = [[u.finish_reason for u in row if u.finish_reason] for row in rows]
    assert finished == [["length"], ["stop"]]
    assert short[-1].completion_tokens == 1
    assert texts[1] == generate(loaded.model, loaded.tokenizer, loaded.template, [questions[1]], 40)[0]
    end = next(i for i, u in enumerate(short) if u.finish_reason)
    assert all(u.text == "" and u.finish_reason is None for u in short[end + 1 :]), "nothing after the finish"
    assert "</s>" not in texts[1]


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    probs = torch.tensor([0.1, 0.5, 0.3, 0.1])
    assert torch.equal(_nucleus(probs, 0.5) > 0, torch.tensor([False, True, False, False]))
    assert torch.equal(_nucleus(probs, 0.6) > 0, torch.tensor([False, True, True, False]))
    assert torch.allclose(_nucleus(probs, 0.8), torch.tensor([0, 0.625, 0.375, 0]))
    assert torch.allclose(_nucleus(probs, 1.0), probs)


def test_updates_arrive_one_decoding_step_at_a_time(tokenizer):
    """An untrained model never stops early: its 8-token answer streams over several steps, in order."""
    from llava_ray.config.schema import ModelConfig
    from llava_ray.evaluation.loaded_model import InferenceModel
    from llava_ray.model.build import build_llava_model

    model = build_llava_model(ModelConfig(preset="tiny"), tokenizer, seed=0).eval()
    untrained = InferenceModel(model, tokenizer, "vicuna_v1", "untrained")
    conversation = [{"from": "human", "value": "Tell me a story."}]
    texts, rows = run(untrained, [job(untrained, conversation, None, max_tokens=8)])
    (expected,) = generate(model, tokenizer, "vicuna_v1", [(conversation, None)], max_new_tokens=8)
    assert texts[0] == expected
    steps_with_text = [update.text for update in rows[0] if update.text]
    assert len(steps_with_text) >= 3, rows[0]
    assert rows[0][-1].completion_tokens == 8 and [u.finish_reason for u in rows[0] if u.finish_reason] == [
        "length"
    ]
