"""Model presets build offline; the tiny tokenizer round-trips every text the project produces."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from llava_ray.config.model_sources import image_positions, resolve_sources
from llava_ray.config.presets import PRESETS, TINY_TOKENIZER_DIR
from llava_ray.config.schema import ModelConfig
from llava_ray.conversation.templates import TEMPLATES, Turn
from llava_ray.conversation.tokenizer import IMAGE_TOKEN, image_token_id, load_tokenizer, train_tiny_tokenizer
from llava_ray.data.synthetic import corpus_texts, tiny_corpus
from llava_ray.model.presets import (
    build_language_model,
    build_lm_config,
    build_vision_tower,
    sincos_position_embedding,
)


def test_tiny_preset_builds_offline_with_its_shapes():
    config = ModelConfig(preset="tiny")
    tokenizer = load_tokenizer(config)
    vision = build_vision_tower(config)
    lm = build_language_model(config, tokenizer)
    assert vision.config.hidden_size == 64 and vision.config.num_hidden_layers == 2
    assert lm.config.hidden_size == 128 and lm.config.num_hidden_layers == 4
    assert lm.get_input_embeddings().num_embeddings == len(tokenizer)
    assert image_positions(vision.config) == 16 and image_positions(vision.config, "cls_patch") == 17
    assert lm.config.pad_token_id == tokenizer.pad_token_id


def test_tiny_init_is_deterministic_for_a_seed():
    config = ModelConfig(preset="tiny")
    first, second, other = (build_vision_tower(config, seed=s) for s in (1, 1, 2))
    weight = "encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(first.state_dict()[weight], second.state_dict()[weight])
    assert not torch.equal(first.state_dict()[weight], other.state_dict()[weight])


def test_tiny_tower_has_fixed_sine_cosine_positions():
    """Random learned positions would be some 20x smaller than the patch embeddings; these are not."""
    towers = [build_vision_tower(ModelConfig(preset="tiny"), seed=seed) for seed in (1, 2)]
    weights = [tower.embeddings.position_embedding.weight.detach() for tower in towers]
    assert torch.equal(weights[0], weights[1])  # fixed, whatever the seed
    assert not weights[0][0].any()  # CLS
    table = sincos_position_embedding(4, 64)
    torch.testing.assert_close(weights[0][1:], table)
    # Row 0 / column 0: sines 0, cosines 1; a patch's first half names its row, the second its column.
    assert torch.equal(table[0], torch.tensor(([0.0] * 16 + [1.0] * 16) * 2))
    torch.testing.assert_close(table[1, :32], table[0, :32])
    torch.testing.assert_close(table[4, 32:], table[0, 32:])
    distances = torch.cdist(table, table) + torch.eye(16) * 1e9
    assert distances.min() > 0.5  # every patch position is told apart
    with pytest.raises(ValueError, match="width divisible by 4, got 30"):
        sincos_position_embedding(4, 30)


def test_config_overrides_reach_the_built_model():
    config = ModelConfig(
        preset="tiny",
        lm_config_overrides={"num_hidden_layers": 2},
        vision_config_overrides={"patch_size": 8},
    )
    lm = build_language_model(config, load_tokenizer(config))
    assert lm.config.num_hidden_layers == 2 and len(lm.model.layers) == 2
    assert image_positions(build_vision_tower(config).config) == 64


@pytest.mark.parametrize(
    ("preset", "lm_params"), [("llava-1.5-7b", 6_738_415_616), ("llava-1.5-13b", 13_015_864_320)]
)
def test_real_presets_have_llava_1_5_shapes(preset, lm_params):
    config = ModelConfig(preset=preset, init="random")
    with torch.device("meta"):  # shapes only: no memory, no download
        vision = build_vision_tower(config)
        lm = AutoModelForCausalLM.from_config(build_lm_config(config, 32000))
    assert sum(p.numel() for p in vision.parameters()) == 303_507_456  # CLIP ViT-L/14-336 vision tower
    assert sum(p.numel() for p in lm.parameters()) == lm_params
    assert image_positions(vision.config) == 576


def test_sources_resolve_from_preset_and_explicit_keys():
    pretrained = resolve_sources(ModelConfig(preset="llava-1.5-7b"))
    assert pretrained.vision_tower == "openai/clip-vit-large-patch14-336"
    assert pretrained.language_model == pretrained.tokenizer == "lmsys/vicuna-7b-v1.5"
    custom = resolve_sources(ModelConfig(preset="llava-1.5-7b", language_model="s3://bucket/my-lm"))
    assert custom.language_model == custom.tokenizer == "s3://bucket/my-lm"
    random = resolve_sources(ModelConfig(preset="llava-1.5-13b", init="random"))
    assert random.vision_tower is None and random.language_model is None
    assert resolve_sources(ModelConfig(preset="tiny")).tokenizer == str(TINY_TOKENIZER_DIR)
    assert set(PRESETS) == {"tiny", "llava-1.5-7b", "llava-1.5-13b"}


def test_tiny_tokenizer_round_trips_the_corpus_without_unknowns():
    tokenizer = load_tokenizer(ModelConfig(preset="tiny"))
    rendered = [
        template.prompt_text([Turn("user", f"{IMAGE_TOKEN}\nWhat is it?")]) for template in TEMPLATES.values()
    ]
    for text in [*corpus_texts(), *rendered, "Unseen words: ünïcödé, 日本語 & emoji 🙂"]:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text
    assert tokenizer(IMAGE_TOKEN, add_special_tokens=False).input_ids == [image_token_id(tokenizer)]
    assert tokenizer("red").input_ids[0] == tokenizer.bos_token_id
    # The synthetic task's words are single tokens, so answers are short to learn.
    assert len(tokenizer(" red", add_special_tokens=False).input_ids) == 1


def test_shipped_tiny_tokenizer_matches_a_fresh_training(tmp_path):
    fresh = load_tokenizer(
        ModelConfig(preset="tiny", tokenizer=str(train_tiny_tokenizer(tiny_corpus(), tmp_path)))
    )
    shipped = load_tokenizer(ModelConfig(preset="tiny"))
    assert fresh.get_vocab() == shipped.get_vocab()
    assert fresh.chat_template == shipped.chat_template
