"""A tokenizer folder in Vicuna v1.5's layout (only a SentencePiece ``tokenizer.model``) loads, and its ids are
SentencePiece's own for every string."""

import random
import sys
from pathlib import Path

import pytest
import sentencepiece
from transformers import AutoTokenizer

from llava_ray.config.loader import ConfigError
from llava_ray.config.schema import LlavaRayConfig, ModelConfig
from llava_ray.conversation.templates import encode_text
from llava_ray.conversation.tokenizer import IMAGE_TOKEN, load_tokenizer, load_tokenizer_dir
from llava_ray.data.samples import load_checked_tokenizer

# Pieces of the strings compared: whitespace runs (indented code, double spaces), tabs, newlines,
# Unicode outside the training corpus (byte fallback), digits (split one by one) and words.
PARTS = [
    *" " * 12,
    "  ",
    "    ",
    "        ",
    "\t",
    "\t\t",
    "\n",
    "\n\n",
    "\n    ",
    "\r\n",
    *"0123456789",
    "2048",
    *"abcdefghijklmnopqrstuvwxyz",
    *"ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    *".,:;!?()[]{}<>=+-_*/'\"#@",
    "é",
    "東京",
    "Привет",
    "😀",
    "ß",
    "\u2581",
    "the",
    " the",
    "image",
    "def",
    "return",
    "value",
    "self",
    "USER",
    "ASSISTANT",
    "café",
]
FIXED = [
    "",
    " ",
    "  ",
    "   ",
    "hello world",
    "what  is",
    "a  b   c    d     e",
    "  the image",
    "def f(x):\n    return x\n\n\tprint(x)  # two spaces",
    "\n\n  the",
    "    if value:\n        return self.value  ",
    "12345 67890",
    "café  東京 😀",
    "trailing spaces   ",
    "\u2581\u2581the",
]


def random_strings(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(PARTS) for _ in range(rng.randint(1, 40))) for _ in range(count)]


@pytest.fixture(scope="module")
def vicuna(vicuna_tokenizer_dir: Path):
    return load_tokenizer_dir(vicuna_tokenizer_dir)


@pytest.fixture(scope="module")
def spm(vicuna_tokenizer_dir: Path) -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(vicuna_tokenizer_dir / "tokenizer.model"))


def test_vicuna_layout_loads_for_a_llava_15_config(vicuna_tokenizer_dir: Path, spm):
    assert sorted(path.name for path in vicuna_tokenizer_dir.iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    tokenizer = load_tokenizer(ModelConfig(preset="llava-1.5-7b", tokenizer=str(vicuna_tokenizer_dir)))
    assert tokenizer.is_fast and tokenizer.legacy is False
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == spm.get_piece_size()  # added after the pieces
    code = "USER: def f(self):\n    return  self.value"
    assert tokenizer(code).input_ids == [1, *spm.encode(code)]


def test_missing_sentencepiece_is_named_with_the_fix(vicuna_tokenizer_dir: Path, monkeypatch):
    # A None entry makes `import sentencepiece` fail as in an environment without the package.
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    with pytest.raises(
        ValueError,
        match=r"SentencePiece model \(tokenizer.model\).*'sentencepiece' is not "
        r"installed; install llava-ray's dependencies \(pip install 'sentencepiece>=0.2'",
    ):
        load_tokenizer_dir(vicuna_tokenizer_dir)
    # The job's preflight (prepare's first step, before any data is read) reports it as a config problem.
    config = LlavaRayConfig.model_validate(
        {
            "model": {"preset": "llava-1.5-7b", "tokenizer": str(vicuna_tokenizer_dir)},
            "data": {"tokenization": "llava"},
        }
    )
    with pytest.raises(
        ConfigError,
        match=r"model.tokenizer = '.*vicuna-tokenizer.*' \(model.preset='llava-1.5-7b'\) "
        r"does not load: .*pip install 'sentencepiece>=0.2'",
    ):
        load_checked_tokenizer(config)


def test_ids_equal_sentencepiece_for_every_string(vicuna_tokenizer_dir: Path, vicuna, spm):
    strings = FIXED + random_strings(2000)
    # What the loader repairs: transformers 5's own conversion orders the merges by piece id, and the
    # fixture, like Llama's model, scores its whitespace-run pieces last.
    converted = AutoTokenizer.from_pretrained(vicuna_tokenizer_dir)
    assert (
        sum(converted(text, add_special_tokens=False).input_ids != spm.encode(text) for text in strings) > 100
    )
    wrong = [
        (text, vicuna.convert_ids_to_tokens(encode_text(vicuna, text)[0]), spm.encode(text, out_type=str))
        for text in strings
        if encode_text(vicuna, text)[0] != spm.encode(text)
    ]
    assert not wrong, f"{len(wrong)} of {len(strings)} strings differ, e.g. {wrong[:3]}"


def test_the_tokenizer_itself_agrees_unless_the_text_starts_with_a_space(vicuna, spm):
    """Everything else llava-ray encodes with the tokenizer (markers, chat templates) gets SentencePiece's ids;
    only a text starting with a space needs encode_text's extra space (Metaspace drops the dummy prefix)."""
    strings = [text for text in FIXED + random_strings(500, seed=1) if not text.startswith((" ", "\u2581"))]
    assert all(vicuna(text, add_special_tokens=False).input_ids == spm.encode(text) for text in strings)


def test_offsets_cover_the_text_in_order(vicuna):
    for text in FIXED + random_strings(200, seed=2):
        _, offsets = encode_text(vicuna, text)
        assert all(0 <= start <= end <= len(text) for start, end in offsets)
        assert [end for _, end in offsets] == sorted(end for _, end in offsets)
        if text:
            assert offsets[-1][1] == len(text)


def test_saved_tokenizer_reloads_with_the_same_ids(vicuna, spm, tmp_path: Path):
    vicuna.save_pretrained(tmp_path)
    reloaded = load_tokenizer_dir(tmp_path)
    plain = AutoTokenizer.from_pretrained(tmp_path)  # tokenizer.json now holds the score-ordered merges
    for text in random_strings(300, seed=3):
        assert encode_text(reloaded, text)[0] == spm.encode(text)
        if not text.startswith((" ", "\u2581")):
            assert plain(text, add_special_tokens=False).input_ids == spm.encode(text)
