"""Export to Hugging Face's LlavaForConditionalGeneration: parity, published key layout, processor, chat templates,
errors, and a SigLIP tower's own image settings end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from llava_ray.config.model_sources import TowerInput, tower_input
from llava_ray.config.presets import PRESETS, TINY_TOKENIZER_DIR
from llava_ray.config.schema import LoraConfig, ModelConfig
from llava_ray.conversation.chat_template import chat_template_for
from llava_ray.conversation.templates import TEMPLATES, get_template, normalize_turns, tokenize_conversation
from llava_ray.conversation.tokenizer import image_token_id, load_tokenizer
from llava_ray.data.images import pad_to_square, resize_square
from llava_ray.evaluation.loaded_model import load_pixels
from llava_ray.model.build import build_llava_model
from llava_ray.model.export import export_hf, hf_generation_config, load_hf_llava
from llava_ray.model.generate import cut_at_markers, end_markers, generate, prompt_input_ids
from llava_ray.model.llava import LlavaModel
from llava_ray.training.trainable import set_trainable

TINY = ModelConfig(preset="tiny")
POSITIONS = 16  # the tiny preset: 64 px images in 16 px patches
QUESTION = [{"from": "human", "value": "What is in the picture?\n<image>"}]
MESSAGES = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY)


def perturbed_model(tokenizer, **config):
    """A tiny random model moved off its init (norm weights not 1, biases not 0), so a missed weight shows."""
    model = build_llava_model(ModelConfig(preset="tiny", **config), tokenizer, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def exported(tokenizer, tmp_path_factory):
    """Ours, saved in llava-ray's format and exported from that folder, and the Hugging Face model read back."""
    model = perturbed_model(tokenizer)
    ours_dir = model.save_pretrained(tmp_path_factory.mktemp("ours"), tokenizer, template="vicuna_v1")
    out_dir = export_hf(ours_dir, tmp_path_factory.mktemp("hf"))
    return model, out_dir, LlavaForConditionalGeneration.from_pretrained(out_dir, dtype=torch.float32).eval()


def pixels(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def image_and_text_batch(tokenizer):
    """Right-padded rows: one with an image, one text-only."""
    rows = [
        tokenize_conversation(
            [*QUESTION, {"from": "gpt", "value": "A red square."}], "vicuna_v1", tokenizer, POSITIONS
        ),
        tokenize_conversation(
            [{"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "Hi."}],
            "vicuna_v1",
            tokenizer,
            POSITIONS,
        ),
    ]
    width = max(r.length for r in rows)
    input_ids = torch.tensor([r.input_ids + [tokenizer.pad_token_id] * (width - r.length) for r in rows])
    attention_mask = torch.tensor([[1] * r.length + [0] * (width - r.length) for r in rows])
    return input_ids, attention_mask


def test_exported_logits_match_ours(exported, tokenizer):
    model, _, hf_model = exported
    input_ids, attention_mask = image_and_text_batch(tokenizer)
    with torch.no_grad():
        ours = model(input_ids, attention_mask=attention_mask, pixel_values=pixels(1)).logits
        theirs = hf_model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels(1)).logits
    valid = attention_mask.bool()
    assert (ours[valid] - theirs[valid]).abs().max() < 1e-4
    assert ours.abs().max() > 0.1  # not trivially equal


def test_exported_greedy_generation_matches_ours(exported, tokenizer):
    model, _, hf_model = exported
    ids = prompt_input_ids(QUESTION, "vicuna_v1", tokenizer, POSITIONS)
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        output = hf_model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            pixel_values=pixels(1),
            max_new_tokens=12,
        )
    theirs = cut_at_markers(tokenizer.decode(output[0, len(ids) :]), end_markers("vicuna_v1", tokenizer))
    ours = generate(model, tokenizer, "vicuna_v1", [(QUESTION, pixels(1)[0])], max_new_tokens=12)
    assert ours == [theirs] and theirs


def saved_weight_names(out_dir) -> set[str]:
    names: set[str] = set()
    for file in out_dir.glob("model*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            names.update(handle.keys())
    return names


def test_exported_weights_use_the_published_llava_hf_layout(exported):
    """llava-hf/llava-1.5-7b-hf's names, which transformers 4.x and serving engines read; transformers 5 loads them too."""
    model, out_dir, _ = exported
    names = saved_weight_names(out_dir)
    assert {
        re.sub(
            r"^(language_model\.model|language_model\.lm_head|vision_tower\.vision_model|multi_modal_projector)\..*",
            r"\1",
            name,
        )
        for name in names
    } == {
        "language_model.model",
        "language_model.lm_head",
        "vision_tower.vision_model",
        "multi_modal_projector",
    }
    for name in (
        "vision_tower.vision_model.embeddings.patch_embedding.weight",
        "vision_tower.vision_model.encoder.layers.1.self_attn.q_proj.weight",
        "vision_tower.vision_model.post_layernorm.weight",
        "language_model.model.layers.0.self_attn.q_proj.weight",
        "language_model.model.embed_tokens.weight",
        "language_model.lm_head.weight",
        "multi_modal_projector.linear_1.weight",
        "multi_modal_projector.linear_2.bias",
    ):
        assert name in names
    # Every weight of ours is there once; transformers 5 reads each back (no key missing, none left over).
    assert len(names) == len(model.state_dict())
    _, info = LlavaForConditionalGeneration.from_pretrained(out_dir, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))


def test_exported_config_and_processor(exported, tokenizer):
    _, out_dir, hf_model = exported
    config = hf_model.config
    assert (config.image_token_id, config.vision_feature_layer) == (image_token_id(tokenizer), -2)
    assert (config.vision_feature_select_strategy, config.projector_hidden_act) == ("default", "gelu")
    processor = AutoProcessor.from_pretrained(out_dir)
    assert processor.image_processor.crop_size == {"height": 64, "width": 64}
    assert list(processor.image_processor.image_mean) == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert prompt == get_template("vicuna_v1").prompt_text(normalize_turns(QUESTION, require_answer=False))
    image = Image.fromarray(np.full((48, 80, 3), 200, dtype=np.uint8))
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    # The processor's <image> expansion and tokenization are training's, token for token.
    assert inputs["input_ids"][0].tolist() == prompt_input_ids(QUESTION, "vicuna_v1", tokenizer, POSITIONS)
    assert inputs["pixel_values"].shape == (1, 3, 64, 64)


def test_load_hf_llava_reads_the_export_back(exported):
    model, out_dir, _ = exported
    loaded = load_hf_llava(out_dir)
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[key], restored[key]) for key in original)
    assert (loaded.projector_name, loaded.vision_select_feature, loaded.image_positions) == (
        "mlp2x_gelu",
        "patch",
        POSITIONS,
    )


def test_cls_patch_exports_as_full_with_one_more_image_token(tokenizer, tmp_path):
    model = perturbed_model(tokenizer, vision_select_feature="cls_patch")
    out_dir = export_hf(model, tmp_path, tokenizer=tokenizer, template="vicuna_v1")
    hf_model = LlavaForConditionalGeneration.from_pretrained(out_dir, dtype=torch.float32).eval()
    assert hf_model.config.vision_feature_select_strategy == "full"
    processor = AutoProcessor.from_pretrained(out_dir)
    image = Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8))
    inputs = processor(images=image, text="<image>\nHi", return_tensors="pt")
    assert int((inputs["input_ids"] == image_token_id(tokenizer)).sum()) == POSITIONS + 1
    with torch.no_grad():
        ours = model(inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits
        theirs = hf_model(**inputs).logits
    assert (ours - theirs).abs().max() < 1e-4


def test_only_the_two_layer_gelu_projector_exports(tokenizer, tmp_path):
    model = build_llava_model(ModelConfig(preset="tiny", projector="linear"), tokenizer)
    with pytest.raises(
        ValueError, match=r"holds only the 2-layer GELU MLP \(mlp2x_gelu\).*llava-ray's own format"
    ):
        export_hf(model, tmp_path, tokenizer=tokenizer, template="vicuna_v1")


def test_lora_must_be_merged_before_export(tokenizer, tmp_path):
    model = set_trainable(build_llava_model(TINY, tokenizer), "lora", lora=LoraConfig(r=2, alpha=4))
    with pytest.raises(ValueError, match=r"call merge_lora\(model\) before exporting"):
        export_hf(model, tmp_path, tokenizer=tokenizer, template="vicuna_v1")


def test_generation_config_stops_at_single_token_end_markers(tokenizer):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert hf_generation_config(tokenizer, "chatml").eos_token_id == [tokenizer.eos_token_id, im_end]
    assert hf_generation_config(tokenizer, "vicuna_v1").eos_token_id == tokenizer.eos_token_id


CONVERSATION = [
    {"from": "human", "value": "What is in the picture?\n<image>"},
    {"from": "gpt", "value": "A red square."},
    {"from": "human", "value": "And its colour's name?"},
]


def as_messages(conversation, image_as_item: bool):
    """LLaVA turns as chat messages; the image either as a content item or as text."""
    messages = []
    for turn in conversation:
        role = "user" if turn["from"] == "human" else "assistant"
        text = turn["value"]
        if image_as_item and "<image>" in text:
            content = [{"type": "image"}, {"type": "text", "text": text.replace("<image>", "")}]
            messages.append({"role": role, "content": content})
        else:
            messages.append({"role": role, "content": text})
    return messages


@pytest.mark.parametrize("template_name", sorted(TEMPLATES))
@pytest.mark.parametrize("image_as_item", [True, False])
def test_chat_template_renders_the_training_template(tokenizer, template_name, image_as_item):
    template = get_template(template_name)
    chat_template = chat_template_for(template_name, tokenizer)
    conversation = CONVERSATION[:1] if template_name == "plain" else CONVERSATION
    prompt = tokenizer.apply_chat_template(
        as_messages(conversation, image_as_item),
        chat_template=chat_template,
        add_generation_prompt=True,
        tokenize=False,
    )
    assert prompt == template.prompt_text(normalize_turns(conversation, require_answer=False))
    answered = [*conversation, {"from": "gpt", "value": "It is called red."}]
    full = tokenizer.apply_chat_template(
        as_messages(answered, image_as_item), chat_template=chat_template, tokenize=False
    )
    assert full == "".join(span.text for span in template.render(normalize_turns(answered)))


def test_chat_template_takes_a_system_message(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = tokenizer.apply_chat_template(
        messages,
        chat_template=chat_template_for("chatml", tokenizer),
        add_generation_prompt=True,
        tokenize=False,
    )
    assert (
        prompt
        == "<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\nHi<|im_end|><|im_start|>assistant\n"
    )


def test_exported_image_processor_pads_like_prepare(tmp_path):
    """Serving through the exported processor sees the image as training did: padded, not cropped."""
    from llava_ray.model.export import build_processor

    config = ModelConfig(preset="tiny")
    tokenizer = load_tokenizer(config)
    model = build_llava_model(config, tokenizer)
    build_processor(model, tokenizer, "vicuna_v1").save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    image = Image.new("RGB", (120, 60), (250, 250, 250))
    image.paste((220, 30, 30), (0, 0, 30, 60))  # a red band at the left edge: cropping would cut it off
    served = processor(images=image, return_tensors="pt")["pixel_values"][0].numpy()
    tower = tower_input(model.vision_tower.config)
    resized = np.asarray(resize_square(pad_to_square(image, tower.pad_color), 64), dtype=np.float32) / 255
    trained = (resized - np.asarray(tower.mean, dtype=np.float32)) / np.asarray(tower.std, dtype=np.float32)
    assert np.abs(served - trained.transpose(2, 0, 1)).mean() < 0.05


# ---- a SigLIP tower: its own size, mean, std and pad colour, from its folder to the export ----------

# google/siglip-*'s preprocessor_config.json, at the tiny preset's 64 px.
SIGLIP_PROCESSOR = json.loads(
    (Path(__file__).resolve().parents[1] / "assets/siglip/preprocessor_config.json").read_text()
)


@pytest.fixture(scope="module")
def siglip_model(tokenizer, tmp_path_factory):
    """A tiny LLaVA built from local "pretrained" folders: a SigLIP tower (with its preprocessor_config.json) and a Llama."""
    tower_dir = tmp_path_factory.mktemp("siglip-tower")
    torch.manual_seed(0)
    tower = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=64,
            patch_size=16,
        )
    )
    tower.save_pretrained(tower_dir)
    (tower_dir / "preprocessor_config.json").write_text(json.dumps(SIGLIP_PROCESSOR))
    lm_dir = tmp_path_factory.mktemp("lm")
    LlamaForCausalLM(
        LlamaConfig(**{**PRESETS["tiny"].lm_config, "vocab_size": len(tokenizer)})
    ).save_pretrained(lm_dir)
    config = ModelConfig(
        preset="tiny",
        vision_tower=str(tower_dir),
        language_model=str(lm_dir),
        tokenizer=str(TINY_TOKENIZER_DIR),
    )
    model = build_llava_model(config, tokenizer, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def test_siglip_export_pads_and_normalises_with_siglips_numbers(siglip_model, tokenizer, tmp_path):
    """Training's input (prepare + collate, as load_pixels gives it) and the exported processor's agree, and are SigLIP's."""
    model = siglip_model
    tower = tower_input(model.vision_tower.config)
    assert tower == TowerInput(size=64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    out_dir = export_hf(model, tmp_path / "hf", tokenizer=tokenizer, template="vicuna_v1")
    written = json.loads((out_dir / "preprocessor_config.json").read_text())
    assert (written["image_mean"], written["image_std"], written["crop_size"]) == (
        [0.5] * 3,
        [0.5] * 3,
        {"height": 64, "width": 64},
    )
    image = Image.new("RGB", (120, 60), (250, 250, 250))
    image.paste((220, 30, 30), (0, 0, 30, 60))
    image.save(tmp_path / "wide.png")
    ours = load_pixels(str(tmp_path / "wide.png"), tower).numpy()
    # The pad bands are SigLIP's grey (127 -> (127/255 - 0.5) / 0.5), not CLIP's (122, 116, 104).
    np.testing.assert_allclose(ours[:, :10, 32], (127 / 255 - 0.5) / 0.5, atol=1e-6)
    served = AutoImageProcessor.from_pretrained(out_dir)(images=image, return_tensors="pt")["pixel_values"][0]
    assert np.abs(served.numpy() - ours).mean() < 0.02
    # And the exported model answers as ours does on those pixels.
    hf_model = LlavaForConditionalGeneration.from_pretrained(out_dir, dtype=torch.float32).eval()
    assert hf_model.config.vision_feature_select_strategy == "full"  # SigLIP has no CLS to drop
    ids = torch.tensor([prompt_input_ids(QUESTION, "vicuna_v1", tokenizer, POSITIONS)])
    with torch.no_grad():
        difference = (
            model(ids, pixel_values=served[None]).logits
            - hf_model(input_ids=ids, pixel_values=served[None]).logits
        )
    assert difference.abs().max() < 1e-4


def test_siglip_settings_survive_saving_and_loading(siglip_model, tokenizer, tmp_path):
    """llava-ray's own folder and a Hugging Face folder both bring the tower's numbers back (eval and chat read them)."""
    expected = tower_input(siglip_model.vision_tower.config)
    ours_dir = siglip_model.save_pretrained(tmp_path / "ours", tokenizer, template="vicuna_v1")
    assert tower_input(LlavaModel.from_pretrained(ours_dir).vision_tower.config) == expected
    hf_dir = export_hf(ours_dir, tmp_path / "hf")
    assert tower_input(load_hf_llava(hf_dir).vision_tower.config) == expected
    # A published-style folder whose vision config records nothing: its preprocessor_config.json decides.
    config = json.loads((hf_dir / "config.json").read_text())
    for key in ("image_mean", "image_std"):
        del config["vision_config"][key]
    (hf_dir / "config.json").write_text(json.dumps(config))
    processor = json.loads((hf_dir / "preprocessor_config.json").read_text())
    processor["image_mean"] = processor["image_std"] = [0.25, 0.25, 0.25]
    (hf_dir / "preprocessor_config.json").write_text(json.dumps(processor))
    (hf_dir / "processor_config.json").unlink()  # transformers 5 would read its nested copy first
    assert tower_input(load_hf_llava(hf_dir).vision_tower.config).mean == (0.25, 0.25, 0.25)
