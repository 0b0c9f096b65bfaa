"""The global schedule: grouping by modality and length, invariance to how work is split."""

import numpy as np
import pytest

from llava_ray.training.schedule import build_schedule, global_batches, split_global_batch


def data(n=100, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(10, 500, n)
    is_image = rng.random(n) < 0.8
    supervised = rng.integers(1, 20, n)
    return lengths, is_image, supervised


def test_global_batches_are_one_modality_sorted_by_length_and_cover_the_data_once():
    lengths, is_image, _ = data(103)
    batches, dropped = global_batches(lengths, is_image, 8, seed=1, group_by_modality_length=True)
    rows = np.concatenate(batches)
    assert len(set(rows.tolist())) == len(rows) == 103 - dropped and dropped < 8
    single_modality = [len(set(is_image[b].tolist())) == 1 for b in batches]
    assert sum(single_modality) >= len(batches) - 1  # only the carried-over leftovers may mix
    assert all((np.diff(lengths[b]) <= 0).all() for b in batches)


def test_same_samples_per_step_whatever_the_split():
    lengths, is_image, supervised = data()
    kwargs = dict(global_batch_size=16, epochs=1, seed=3)
    one = build_schedule(lengths, is_image, supervised, micro_batch_size=16, world_size=1, **kwargs)
    two = build_schedule(lengths, is_image, supervised, micro_batch_size=2, world_size=2, **kwargs)
    accumulate = build_schedule(lengths, is_image, supervised, micro_batch_size=1, world_size=1, **kwargs)
    assert one.steps == two.steps == accumulate.steps == 100 // 16
    for step in range(one.steps):
        expected = sorted(one.order[step].ravel().tolist())
        assert sorted(two.order[step].ravel().tolist()) == expected
        assert sorted(accumulate.order[step].ravel().tolist()) == expected
    assert (one.step_tokens == two.step_tokens).all()
    assert two.order.shape == (6, 2, 4, 2)


def test_split_keeps_similar_lengths_together_and_alternates_ranks():
    batch = np.arange(16)  # already sorted longest first
    split = split_global_batch(batch, world_size=2, accumulation=2)
    assert split.shape == (2, 2, 4)
    assert split[0, 0].tolist() == [0, 1, 2, 3] and split[1, 0].tolist() == [4, 5, 6, 7]
    assert split[0, 1].tolist() == [8, 9, 10, 11]


def test_epochs_reshuffle_and_max_steps_cuts():
    lengths, is_image, supervised = data()
    schedule = build_schedule(
        lengths,
        is_image,
        supervised,
        global_batch_size=10,
        micro_batch_size=5,
        world_size=2,
        epochs=2,
        seed=0,
    )
    assert schedule.steps == 20
    first, second = schedule.order[:10].ravel(), schedule.order[10:].ravel()
    assert sorted(first.tolist()) == sorted(second.tolist()) and first.tolist() != second.tolist()
    capped = build_schedule(
        lengths,
        is_image,
        supervised,
        global_batch_size=10,
        micro_batch_size=5,
        world_size=2,
        epochs=2,
        seed=0,
        max_steps=3,
    )
    assert capped.steps == 3 and (capped.order == schedule.order[:3]).all()


def test_schedule_is_deterministic_for_a_seed():
    lengths, is_image, supervised = data()
    build = lambda seed: build_schedule(  # noqa: E731
        lengths,
        is_image,
        supervised,
        global_batch_size=10,
        micro_batch_size=5,
        world_size=1,
        epochs=1,
        seed=seed,
    )
    assert (build(4).order == build(4).order).all() and not (build(4).order == build(5).order).all()


def test_too_little_data_or_bad_split_is_explained():
    lengths, is_image, supervised = data(5)
    with pytest.raises(ValueError, match="5 samples do not fill one global batch of 8"):
        build_schedule(
            lengths,
            is_image,
            supervised,
            global_batch_size=8,
            micro_batch_size=8,
            world_size=1,
            epochs=1,
            seed=0,
        )
    with pytest.raises(ValueError, match="not a multiple of micro-batch x workers = 6"):
        build_schedule(
            lengths,
            is_image,
            supervised,
            global_batch_size=8,
            micro_batch_size=3,
            world_size=2,
            epochs=1,
            seed=0,
        )


def windowed(world_size=1, micro_batch_size=10, window=100, seed=3, n=1000, **kwargs):
    lengths, is_image, supervised = data(n)
    units = np.repeat(np.arange(n // 10), 10)[np.random.default_rng(1).permutation(n)]  # groups of 10 rows
    schedule = build_schedule(
        lengths,
        is_image,
        supervised,
        global_batch_size=20,
        micro_batch_size=micro_batch_size,
        world_size=world_size,
        epochs=1,
        seed=seed,
        units=units,
        window=window,
        **kwargs,
    )
    return schedule, units


def test_windows_bound_the_row_groups_a_stretch_of_steps_reads():
    schedule, units = windowed()
    # The first window holds 10 row groups (100 rows): its 4-5 global batches read only those.
    assert len(set(units[schedule.order[:4].ravel()].tolist())) <= 10
    assert len(set(units[schedule.order.ravel()].tolist())) == 100
    everything = schedule.order.ravel()
    assert len(set(everything.tolist())) == len(everything) == 1000 - schedule.dropped_per_epoch
    assert schedule.dropped_per_epoch < 20 and schedule.steps == schedule.steps_per_epoch == 1000 // 20


def test_windows_keep_the_same_samples_per_step_whatever_the_split():
    one, _ = windowed(world_size=1, micro_batch_size=20)
    two, _ = windowed(world_size=2, micro_batch_size=5)
    assert one.steps == two.steps
    for step in range(one.steps):
        assert sorted(one.order[step].ravel().tolist()) == sorted(two.order[step].ravel().tolist())
    assert (one.step_tokens == two.step_tokens).all()
    assert not (windowed(seed=4, micro_batch_size=20)[0].order == one.order).all()


def test_one_window_over_all_the_data_is_the_global_schedule():
    lengths, is_image, supervised = data(1000)
    whole, _ = windowed(window=1000)
    plain = build_schedule(
        lengths,
        is_image,
        supervised,
        global_batch_size=20,
        micro_batch_size=10,
        world_size=1,
        epochs=1,
        seed=3,
    )
    assert (whole.order == plain.order).all()
