"""Conversation templates: exact rendered text and the exact set of supervised tokens."""

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from llava_ray.config.schema import ModelConfig
from llava_ray.conversation.templates import (
    CHATML_SYSTEM,
    IGNORE_INDEX,
    LLAMA_2_SYSTEM,
    LLAVA_V1_SYSTEM,
    VICUNA_SYSTEM,
    get_template,
    normalize_turns,
    tokenize_conversation,
)
from llava_ray.conversation.tokenizer import IMAGE_TOKEN, load_tokenizer
from llava_ray.utils.skips import Skipped

TWO_TURNS = [
    {"from": "human", "value": "<image>\nWhat color are the shapes?"},
    {"from": "gpt", "value": "Red."},
    {"from": "human", "value": "How many are there?"},
    {"from": "gpt", "value": "Three."},
]
CAPTION = [
    {"from": "human", "value": "<image>\nDescribe the image briefly."},
    {"from": "gpt", "value": "Three red circles."},
]
IMAGE_POSITIONS = 5

EXPECTED = {
    "vicuna_v1": (
        f"{VICUNA_SYSTEM} USER: <image>\nWhat color are the shapes? ASSISTANT: Red.</s>"
        "USER: How many are there? ASSISTANT: Three.</s>",
        [" Red.</s>", " Three.</s>"],
    ),
    "llava_v1": (
        f"{LLAVA_V1_SYSTEM} USER: <image>\nWhat color are the shapes? ASSISTANT: Red.</s>"
        "USER: How many are there? ASSISTANT: Three.</s>",
        [" Red.</s>", " Three.</s>"],
    ),
    "llava_llama_2": (
        f"[INST] <<SYS>>\n{LLAMA_2_SYSTEM}\n<</SYS>>\n\n<image>\nWhat color are the shapes? [/INST] Red. </s>"
        "<s>[INST] How many are there? [/INST] Three. </s>",
        [" Red. </s>", " Three. </s>"],
    ),
    "chatml": (
        f"<|im_start|>system\n{CHATML_SYSTEM}<|im_end|><|im_start|>user\n<image>\nWhat color are the shapes?"
        "<|im_end|><|im_start|>assistant\nRed.<|im_end|><|im_start|>user\nHow many are there?<|im_end|>"
        "<|im_start|>assistant\nThree.<|im_end|>",
        ["Red.<|im_end|>", "Three.<|im_end|>"],
    ),
    "tokenizer": (
        "<|im_start|>user\n<image>\nWhat color are the shapes?<|im_end|><|im_start|>assistant\nRed.<|im_end|>"
        "<|im_start|>user\nHow many are there?<|im_end|><|im_start|>assistant\nThree.<|im_end|>",
        ["Red.<|im_end|>", "Three.<|im_end|>"],
    ),
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(preset="tiny"))


def supervised_pieces(tokenizer, result) -> list[str]:
    """Decode each contiguous run of supervised tokens."""
    pieces, run = [], []
    for label in [*result.labels, IGNORE_INDEX]:
        if label == IGNORE_INDEX:
            if run:
                pieces.append(tokenizer.decode(run, skip_special_tokens=False))
            run = []
        else:
            run.append(label)
    return pieces


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_two_turn_text_and_supervised_tokens(tokenizer, name):
    text, answers = EXPECTED[name]
    result = tokenize_conversation(TWO_TURNS, name, tokenizer, IMAGE_POSITIONS)
    assert result.text == text
    assert supervised_pieces(tokenizer, result) == answers
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert result.input_ids.count(image_id) == IMAGE_POSITIONS and result.num_images == 1
    first = result.input_ids.index(image_id)
    assert all(label == IGNORE_INDEX for label in result.labels[first : first + IMAGE_POSITIONS])
    # Supervised labels are the tokens themselves (the model shifts them), nothing else is.
    assert all(
        label in (IGNORE_INDEX, token) for token, label in zip(result.input_ids, result.labels, strict=True)
    )


@pytest.mark.parametrize("name", ["vicuna_v1", "llava_v1", "llava_llama_2", "plain"])
def test_llama_style_templates_start_with_bos(tokenizer, name):
    conversation = CAPTION if name == "plain" else TWO_TURNS
    result = tokenize_conversation(conversation, name, tokenizer, IMAGE_POSITIONS)
    assert result.input_ids[0] == tokenizer.bos_token_id and result.labels[0] == IGNORE_INDEX
    chatml = tokenize_conversation(TWO_TURNS, "chatml", tokenizer, IMAGE_POSITIONS)
    assert chatml.input_ids[0] != tokenizer.bos_token_id


def test_plain_keeps_only_the_caption_and_newline(tokenizer):
    result = tokenize_conversation(CAPTION, "plain", tokenizer, IMAGE_POSITIONS)
    assert result.text == "<image>Three red circles.\n"
    assert supervised_pieces(tokenizer, result) == ["Three red circles.\n"]
    with pytest.raises(Skipped, match=r"'plain' takes one instruction and one answer, got 4 turns"):
        tokenize_conversation(TWO_TURNS, "plain", tokenizer, IMAGE_POSITIONS)


def test_whole_text_is_tokenized_once(tokenizer):
    result = tokenize_conversation(TWO_TURNS, "vicuna_v1", tokenizer, 1)
    assert result.input_ids == [
        tokenizer.bos_token_id,
        *tokenizer(result.text, add_special_tokens=False).input_ids,
    ]


def test_generation_prompt_is_the_training_prefix(tokenizer):
    for name in ("vicuna_v1", "llava_v1", "llava_llama_2", "chatml"):
        template = get_template(name)
        prompt = template.prompt_text(normalize_turns(TWO_TURNS[:1], require_answer=False))
        full = tokenize_conversation(TWO_TURNS, name, tokenizer, 1).text
        assert full.startswith(prompt) and full[len(prompt) :].startswith(EXPECTED[name][1][0])
    vicuna = get_template("vicuna_v1").prompt_text(normalize_turns(TWO_TURNS[:1], require_answer=False))
    assert vicuna.endswith("What color are the shapes? ASSISTANT:")


def test_image_placeholder_moves_to_the_front(tokenizer):
    moved = [
        {"from": "human", "value": "What color are the shapes?\n<image>"},
        {"from": "gpt", "value": "Red."},
    ]
    result = tokenize_conversation(moved, "vicuna_v1", tokenizer, 1)
    assert "USER: <image>\nWhat color are the shapes? ASSISTANT:" in result.text


@pytest.mark.parametrize(
    ("conversation", "reason"),
    [
        ([{"from": "gpt", "value": "Hi"}, {"from": "human", "value": "Hello"}], "no_answer"),
        ([{"from": "gpt", "value": "A"}, {"from": "gpt", "value": "A"}], "roles_not_alternating"),
        ([{"from": "human", "value": "Q"}, {"from": "human", "value": "Q"}], "roles_not_alternating"),
        ([{"from": "human", "value": " \n "}, {"from": "gpt", "value": "A"}], "empty_turn"),
        ([{"from": "human", "value": "Q"}, {"from": "gpt", "value": "  "}], "empty_turn"),
        ([{"from": "human", "value": "Q"}], "no_answer"),
        ([], "empty_conversation"),
        ([{"from": "robot", "value": "Q"}, {"from": "gpt", "value": "A"}], "malformed_turn"),
        (["not a turn"], "malformed_turn"),
    ],
)
def test_malformed_conversations_raise_with_a_reason(tokenizer, conversation, reason):
    with pytest.raises(Skipped) as caught:
        tokenize_conversation(conversation, "vicuna_v1", tokenizer, 1)
    assert caught.value.reason == reason


def test_truncation_counts_image_positions_and_never_cuts_an_image(tokenizer):
    full = tokenize_conversation(TWO_TURNS, "vicuna_v1", tokenizer, 64)
    with pytest.raises(Skipped, match="would cut inside an image") as caught:
        tokenize_conversation(TWO_TURNS, "vicuna_v1", tokenizer, 64, max_length=40)
    assert caught.value.reason == "truncated_inside_image"
    image_end = (
        max(i for i, t in enumerate(full.input_ids) if t == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)) + 1
    )
    with pytest.raises(Skipped, match="no answer token is left") as caught:
        tokenize_conversation(TWO_TURNS, "vicuna_v1", tokenizer, 64, max_length=image_end + 3)
    assert caught.value.reason == "no_supervised_tokens"
    second_answer_start = max(i for i, label in enumerate(full.labels) if label == IGNORE_INDEX) + 1
    cut = tokenize_conversation(TWO_TURNS, "vicuna_v1", tokenizer, 64, max_length=second_answer_start + 1)
    assert cut.length == second_answer_start + 1
    assert supervised_pieces(tokenizer, cut)[0] == " Red.</s>" and cut.num_supervised < full.num_supervised


def test_template_tokenizer_needs_generation_markers(tokenizer):
    bare = load_tokenizer(ModelConfig(preset="tiny"))
    bare.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match=r"needs a chat template with \{% generation %\} markers"):
        tokenize_conversation(TWO_TURNS, "tokenizer", bare, 1)


def sentencepiece_style_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama/Vicuna-like tokenizer (Metaspace, '▁' for spaces) trained here, so no download."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = [
        EXPECTED["vicuna_v1"][0],
        VICUNA_SYSTEM,
        "What color are the shapes? Red. Three. How many are there?",
    ]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<image>"], show_progress=False
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<image>"],
    )


def test_masks_hold_for_sentencepiece_style_tokenizers():
    tokenizer = sentencepiece_style_tokenizer()
    result = tokenize_conversation(TWO_TURNS, "vicuna_v1", tokenizer, 3)
    pieces = [p.replace("▁", " ") for p in supervised_pieces(tokenizer, result)]
    assert [p.strip() for p in pieces] == ["Red.</s>", "Three.</s>"]
    assert result.text == EXPECTED["vicuna_v1"][0]


@pytest.mark.parametrize("name", ["vicuna_v1", "llava_v1", "llava_llama_2", "chatml", "tokenizer"])
def test_prompt_ids_are_the_training_ids_up_to_the_answer(tokenizer, name):
    from llava_ray.conversation.templates import tokenize_prompt

    prompt = tokenize_prompt(TWO_TURNS[:1], name, tokenizer, IMAGE_POSITIONS)
    full = tokenize_conversation(TWO_TURNS, name, tokenizer, IMAGE_POSITIONS)
    assert full.input_ids[: len(prompt)] == prompt
    assert full.labels[len(prompt)] != IGNORE_INDEX  # the answer starts right after the prompt
