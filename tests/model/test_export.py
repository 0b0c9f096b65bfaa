"""Export to Hugging Face's LlavaForConditionalGeneration: parity, processor, chat templates, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from llava_ray.config.schema import LoraConfig, ModelConfig
from llava_ray.conversation.chat_template import chat_template_for
from llava_ray.conversation.templates import TEMPLATES, get_template, normalize_turns, tokenize_conversation
from llava_ray.conversation.tokenizer import image_token_id, load_tokenizer
from llava_ray.model.build import build_llava_model
from llava_ray.model.export import export_hf, hf_generation_config, load_hf_llava
from llava_ray.model.generate import cut_at_markers, end_markers, generate, prompt_input_ids
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
    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor

    from llava_ray.data.images import CLIP_MEAN, CLIP_STD, pad_to_square, resize_square
    from llava_ray.model.export import build_processor

    config = ModelConfig(preset="tiny")
    tokenizer = load_tokenizer(config)
    model = build_llava_model(config, tokenizer)
    build_processor(model, tokenizer, "vicuna_v1").save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    image = Image.new("RGB", (120, 60), (250, 250, 250))
    image.paste((220, 30, 30), (0, 0, 30, 60))  # a red band at the left edge: cropping would cut it off
    served = processor(images=image, return_tensors="pt")["pixel_values"][0].numpy()
    trained = (
        np.asarray(resize_square(pad_to_square(image), 64), dtype=np.float32) / 255 - CLIP_MEAN
    ) / CLIP_STD
    assert np.abs(served - trained.transpose(2, 0, 1)).mean() < 0.05
