"""``generate.mix``: per-type shares, their validation, and the seeded type assignment (no Ray).

The whole job with a mix (requests, report, resume) runs in ``test_generate.py``.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from pydantic import ValidationError

from llava_ray.config import ConfigError, load_config
from llava_ray.config.generation import RESPONSE_TYPES, GenerateConfig, ResponseMix
from llava_ray.generation.job import plan_pairs
from llava_ray.generation.mix import assign_types, image_order, type_counts

PAPER = {"conversation": 58, "detail": 23, "complex": 77}  # LLaVA-Instruct-158K, in thousands


def shares_of(weights: dict[str, float]) -> dict[str, float]:
    return ResponseMix(**weights).shares()


def per_type(assignment: dict[int, tuple[str, ...]]) -> Counter[str]:
    return Counter(t for types in assignment.values() for t in types)


# --- config -------------------------------------------------------------------------------------


def test_mix_weights_are_normalised_to_shares_and_zero_weights_drop_the_type():
    shares = shares_of(PAPER)
    assert shares == pytest.approx({"conversation": 58 / 158, "detail": 23 / 158, "complex": 77 / 158})
    assert shares_of({"conversation": 3, "complex": 1}) == {"conversation": 0.75, "complex": 0.25}
    config = GenerateConfig(mix={"detail": 0, "complex": 2})
    assert config.response_types() == ["complex"]
    assert GenerateConfig(types=["detail", "conversation"]).response_types() == ["detail", "conversation"]
    assert tuple(ResponseMix.model_fields) == RESPONSE_TYPES


def test_mix_errors_name_the_key_the_value_and_the_fix(tmp_path):
    config_file = tmp_path / "gen.yaml"
    config_file.write_text("generate:\n  model: m\n  mix: {conversation: 58, detail: 23, complex: 77}\n")
    config = load_config(config_file, ["generate.pairs_per_image=1.5"])
    assert config.generate.mix == ResponseMix(**PAPER) and config.generate.pairs_per_image == 1.5

    with pytest.raises(ConfigError, match=r"generate.mix.detial: unknown key. Did you mean 'detail'\?"):
        load_config(config_file, ["generate.mix.detial=5"])
    with pytest.raises(
        ConfigError, match=r"generate.mix.complex = -1: Input should be greater than or equal to 0"
    ):
        load_config(config_file, ["generate.mix.complex=-1"])
    with pytest.raises(
        ConfigError, match=r"generate.mix: every weight is 0; give at least one response type"
    ):
        load_config(config_file, ["generate.mix={conversation: 0, detail: 0}"])
    with pytest.raises(
        ConfigError, match=r"both types = \['detail'\] and mix are set; .*remove generate.types"
    ):
        load_config(config_file, ["generate.types=[detail]"])
    # 77/158 x 2.5 = 1.22 complex pairs per image: an image can have each type only once.
    with pytest.raises(
        ConfigError, match=r"asks for 1.22 complex pairs per image.*pairs_per_image can be at most 2.052"
    ):
        load_config(config_file, ["generate.pairs_per_image=2.5"])
    with pytest.raises(ValidationError, match=r"pairs_per_image = 2.0 needs generate.mix"):
        GenerateConfig(pairs_per_image=2)
    with pytest.raises(ValidationError, match="greater than 0"):
        GenerateConfig(mix=PAPER, pairs_per_image=0)


# --- assignment ---------------------------------------------------------------------------------


def test_type_counts_split_the_total_exactly_by_largest_remainder():
    shares = shares_of(PAPER)
    # 200 x (58, 23, 77) / 158 = 73.42, 29.11, 97.47: complex has the largest remainder.
    assert type_counts(shares, 200) == {"conversation": 73, "detail": 29, "complex": 98}
    # 158000 pairs: exactly the paper's counts.
    assert type_counts(shares, 158_000) == {"conversation": 58_000, "detail": 23_000, "complex": 77_000}
    # A tie in the remainders goes to the earlier type.
    assert type_counts(shares_of({"detail": 1, "complex": 1}), 3) == {"detail": 2, "complex": 1}


@pytest.mark.parametrize("pairs_per_image", [1.0, 1.5, 158 / 81, 0.5])
def test_assignment_gives_the_requested_counts_and_spreads_types_evenly(pairs_per_image):
    image_ids = list(range(1000, 1200))
    shares = shares_of(PAPER)
    assignment = assign_types(image_ids, shares, pairs_per_image, seed=7)
    total = round(len(image_ids) * pairs_per_image)
    assert per_type(assignment) == Counter(type_counts(shares, total))
    assert set(assignment) == set(image_ids)
    sizes = Counter(len(types) for types in assignment.values())
    assert set(sizes) <= {total // len(image_ids), -(-total // len(image_ids))}
    if total >= len(image_ids):  # every image of the pool is used
        assert all(assignment.values())
    for types in assignment.values():  # never the same type twice, always in the canonical order
        assert list(types) == [t for t in RESPONSE_TYPES if t in types]


def test_assignment_is_a_function_of_the_seed_and_the_image_ids_only():
    image_ids = list(range(1, 301))
    shares = shares_of(PAPER)
    first = assign_types(image_ids, shares, 1.3, seed=0)
    shuffled = image_ids[:]
    random.Random(3).shuffle(shuffled)
    assert assign_types(shuffled, shares, 1.3, seed=0) == first  # annotation order does not matter
    assert assign_types(image_ids, shares, 1.3, seed=0) == first  # a rerun assigns the same
    other = assign_types(image_ids, shares, 1.3, seed=1)
    assert other != first and per_type(other) == per_type(first)  # another seed: other images, same counts
    # The order is per image, so a bigger pool keeps the smaller pool's relative order.
    assert [i for i in image_order(image_ids, 0) if i <= 100] == image_order(list(range(1, 101)), 0)


def test_plan_pairs_keeps_every_type_for_every_image_without_a_mix(coco_dir):
    from llava_ray.generation.context import load_coco

    images = load_coco(str(coco_dir / "coco" / "instances.json"), str(coco_dir / "coco" / "captions.json"))
    pairs, mix = plan_pairs(images, GenerateConfig(types=["detail", "complex"]), seed=0)
    assert mix is None
    assert [p.sample_id for p in pairs][:4] == ["1-detail", "1-complex", "2-detail", "2-complex"]
    assert len(pairs) == 2 * len(images) == 24

    pairs, mix = plan_pairs(images, GenerateConfig(mix=PAPER, pairs_per_image=1.5), seed=0)
    counts = Counter(p.response_type for p in pairs)
    assert mix == {
        "images": 12,
        "pairs_per_image": 1.5,
        "shares": {"conversation": 0.367089, "detail": 0.14557, "complex": 0.487342},
        # 18 pairs: 6.61, 2.62, 8.77 -> 6, 2, 8 and the two largest remainders (complex, detail) +1.
        "pairs": {"conversation": 6, "detail": 3, "complex": 9},
    }
    assert counts == Counter(mix["pairs"]) and len(pairs) == 18
    assert {p.image.image_id for p in pairs} == {image.image_id for image in images}
    ids = [p.image.image_id for p in pairs]
    assert ids == sorted(ids)  # pairs stay in annotation order, image by image


def test_the_shipped_config_asks_for_the_papers_mix_on_coco_train2017():
    from llava_ray.config.loader import SHIPPED_CONFIGS

    config = load_config(str(SHIPPED_CONFIGS / "generate.yaml")).generate
    train2017 = 118_287
    counts = type_counts(config.mix.shares(), round(train2017 * config.pairs_per_image))
    for kind, thousands in PAPER.items():
        assert counts[kind] == pytest.approx(thousands * 1000, rel=1e-3), kind
