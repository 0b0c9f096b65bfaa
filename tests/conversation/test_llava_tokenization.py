"""``tokenization="llava"``: the ids LLaVA-1.5 trained on, from the reference's ``tokenizer_image_token`` and its
``legacy: false`` slow Llama tokenizer, re-implemented here on SentencePiece itself (no transformers)."""

import re
from pathlib import Path
from typing import ClassVar

import pytest
import sentencepiece
from sentencepiece import sentencepiece_model_pb2

from llava_ray.config.loader import ConfigError, validate_config
from llava_ray.conversation.templates import (
    IGNORE_INDEX,
    VICUNA_SYSTEM,
    tokenize_conversation,
    tokenize_prompt,
)
from llava_ray.conversation.tokenizer import IMAGE_TOKEN, load_tokenizer_dir

REFERENCE_IMAGE_INDEX = -200  # the reference's IMAGE_TOKEN_INDEX

QA = [
    {"from": "human", "value": "<image>\nWhat is on the left?"},
    {"from": "gpt", "value": "A red circle."},
    {"from": "human", "value": "How many  squares are there?"},
    {"from": "gpt", "value": "def count(self):\n    return  2\n\tdone 2048"},
]
TEXT_ONLY = [
    {"from": "human", "value": "Write code:\n    if value:\n        return self"},
    {"from": "gpt", "value": "    return  self.value  # two spaces\n東京 café"},
]
CAPTIONS = ["the dog on the street", " a man with a bus", "3 red  circles\n", "東京 😀", "\nThe image"]


class ReferenceTokenizer:
    """``LlamaTokenizer(legacy=False)`` (slow) as LLaVA-1.5's training loaded Vicuna's: ``tokenizer(text).input_ids``.

    It prepends ``▁`` to the text, splits it at special tokens, encodes the first piece as SentencePiece does
    (dummy prefix) and every later piece without a prefix (by encoding ``<unk>`` + piece and dropping the
    ``<unk>`` pieces), drops a lone leading ``▁`` before a special token, and starts with BOS.
    """

    SPECIAL: ClassVar[dict[str, int]] = {"<unk>": 0, "<s>": 1, "</s>": 2}

    def __init__(self, model_file: Path):
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(model_file.read_bytes())
        proto.normalizer_spec.add_dummy_prefix = False  # as transformers' get_spm_processor for legacy=False
        self.sp = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.unk_length = len(self.sp.encode("<unk>"))

    def _tokenize(self, piece: str) -> list[int]:
        if not piece.startswith(("\u2581", " ")):
            return self.sp.encode(piece)
        return self.sp.encode("<unk>" + piece)[self.unk_length :]

    def __call__(self, text: str) -> list[int]:
        ids = [1]
        if not text:
            return ids
        text = "\u2581" + text.replace("\u2581", " ")
        pieces = [piece for piece in re.split("(<unk>|<s>|</s>)", text) if piece]
        tokens: list[int | str] = []
        for piece in pieces:
            if piece in self.SPECIAL:
                tokens.append(piece)
            else:
                tokens += self._tokenize(piece)
        if len(tokens) > 1 and tokens[0] == self.sp.piece_to_id("\u2581") and tokens[1] in self.SPECIAL:
            tokens = tokens[1:]
        return ids + [self.SPECIAL[t] if isinstance(t, str) else t for t in tokens]


def tokenizer_image_token(prompt: str, tokenizer: ReferenceTokenizer) -> list[int]:
    """The reference's llava/mm_utils.py function, rewritten."""
    chunks = [tokenizer(chunk) for chunk in prompt.split("<image>")]
    ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == 1:
        offset = 1
        ids.append(chunks[0][0])
    separated: list[list[int]] = []
    for chunk in chunks:
        separated += [chunk, [REFERENCE_IMAGE_INDEX] * (offset + 1)]
    for piece in separated[:-1]:
        ids += piece[offset:]
    return ids


def vicuna_v1_prompt(conversation: list[dict[str, str]], generation: bool = False) -> str:
    """The reference's Conversation.get_prompt for conv_vicuna_v1 (SeparatorStyle.TWO)."""
    roles = {"human": "USER", "gpt": "ASSISTANT"}
    seps = [" ", "</s>"]
    text = VICUNA_SYSTEM + seps[0]
    messages = [(roles[turn["from"]], turn["value"]) for turn in conversation]
    if generation:
        messages.append(("ASSISTANT", None))
    for index, (role, message) in enumerate(messages):
        text += f"{role}: {message}{seps[index % 2]}" if message else f"{role}:"
    return text


@pytest.fixture(scope="module")
def vicuna(vicuna_tokenizer_dir: Path):
    return load_tokenizer_dir(vicuna_tokenizer_dir)


@pytest.fixture(scope="module")
def reference(vicuna_tokenizer_dir: Path) -> ReferenceTokenizer:
    return ReferenceTokenizer(vicuna_tokenizer_dir / "tokenizer.model")


def as_reference(ids: list[int], image_id: int) -> list[int]:
    return [REFERENCE_IMAGE_INDEX if token == image_id else token for token in ids]


def supervised_runs(labels: list[int]) -> list[list[int]]:
    runs, run = [], []
    for label in [*labels, IGNORE_INDEX]:
        if label == IGNORE_INDEX:
            if run:
                runs.append(run)
            run = []
        else:
            run.append(label)
    return runs


@pytest.mark.parametrize("conversation", [QA, TEXT_ONLY], ids=["image", "text-only"])
def test_vicuna_v1_ids_are_the_references(vicuna, reference, conversation):
    result = tokenize_conversation(conversation, "vicuna_v1", vicuna, image_positions=1, tokenization="llava")
    expected = tokenizer_image_token(vicuna_v1_prompt(conversation), reference)
    assert as_reference(result.input_ids, vicuna.convert_tokens_to_ids(IMAGE_TOKEN)) == expected
    # Masked by the rendered spans: exactly each answer (with the space before it) and its </s>.
    answers = [turn["value"] for turn in conversation[1::2]]
    assert supervised_runs(result.labels) == [[*reference.sp.encode(" " + answer), 2] for answer in answers]


def reference_v1_labels(prompt: str, tokenizer: ReferenceTokenizer) -> tuple[list[int], bool]:
    """preprocess_v1's counting mask (legacy=False branch) and whether its count held (else it zeroes the sample)."""
    ids = tokenizer_image_token(prompt, tokenizer)
    target = list(ids)
    separator = " ASSISTANT: "
    current = 1
    target[:1] = [IGNORE_INDEX]
    for index, turn in enumerate(prompt.split("</s>")):
        if not turn:
            break
        parts = turn.split(separator)
        if len(parts) != 2:
            break
        parts[0] += separator
        turn_length = len(tokenizer_image_token(turn, tokenizer))
        instruction_length = len(tokenizer_image_token(parts[0], tokenizer)) - 2
        if index:
            turn_length, instruction_length = turn_length - 1, instruction_length - 1
        target[current : current + instruction_length] = [IGNORE_INDEX] * instruction_length
        current += turn_length
    target[current:] = [IGNORE_INDEX] * (len(target) - current)
    return target, current == len(ids)


def test_labels_are_the_references_where_its_count_holds(vicuna, reference):
    target, held = reference_v1_labels(vicuna_v1_prompt(TEXT_ONLY), reference)
    assert held
    result = tokenize_conversation(TEXT_ONLY, "vicuna_v1", vicuna, image_positions=1, tokenization="llava")
    assert result.labels == target


def test_a_space_follows_every_image_as_in_the_reference(vicuna, reference):
    space = reference.sp.piece_to_id("\u2581")  # Llama's 29871
    image_id = vicuna.convert_tokens_to_ids(IMAGE_TOKEN)
    llava = tokenize_conversation(QA, "vicuna_v1", vicuna, image_positions=3, tokenization="llava")
    joined = tokenize_conversation(QA, "vicuna_v1", vicuna, image_positions=3, tokenization="joined")
    after = llava.input_ids.index(image_id) + 3
    assert llava.input_ids[after] == space and llava.input_ids[after + 1] == reference.sp.piece_to_id(
        "<0x0A>"
    )
    assert joined.input_ids[after] != space  # the old, joined ids: the newline follows the image directly
    assert llava.input_ids[:after] == joined.input_ids[:after]


@pytest.mark.parametrize("caption", CAPTIONS)
def test_plain_ids_and_labels_are_the_references(vicuna, reference, caption):
    sample = [
        {"from": "human", "value": "Describe the image briefly.\n<image>"},
        {"from": "gpt", "value": caption},
    ]
    result = tokenize_conversation(sample, "plain", vicuna, image_positions=1, tokenization="llava")
    # preprocess_plain: the instruction becomes "<image>"; text = "<image>" + caption + "\n"; the first
    # len(tokenizer_image_token("<image>")) = 2 labels are masked, everything after is supervised.
    expected = tokenizer_image_token(f"<image>{caption}\n", reference)
    assert as_reference(result.input_ids, vicuna.convert_tokens_to_ids(IMAGE_TOKEN)) == expected
    assert result.labels == [IGNORE_INDEX, IGNORE_INDEX, *expected[2:]]
    if not caption.startswith(("\n", " ")):  # the caption's first word keeps its ▁, as in the reference
        first = vicuna.convert_ids_to_tokens(result.input_ids[2])
        assert first.startswith("\u2581")


@pytest.mark.parametrize(
    "conversation", [QA[:1], QA[:3], TEXT_ONLY[:1]], ids=["image", "two-turns", "text-only"]
)
def test_generation_prompts_are_the_references(vicuna, reference, conversation):
    ids = tokenize_prompt(conversation, "vicuna_v1", vicuna, image_positions=1, tokenization="llava")
    expected = tokenizer_image_token(vicuna_v1_prompt(conversation, generation=True), reference)
    assert as_reference(ids, vicuna.convert_tokens_to_ids(IMAGE_TOKEN)) == expected


def test_llava_tokenization_needs_a_template_llava_ray_renders(vicuna):
    with pytest.raises(ValueError, match="tokenization 'llava' splits the text a llava-ray template renders"):
        tokenize_prompt(QA[:1], "tokenizer", vicuna, image_positions=1, tokenization="llava")
    with pytest.raises(
        ConfigError,
        match=r"data.tokenization='llava' with data.template='tokenizer'.*set data.template \(e.g. vicuna_v1\) "
        r"or data.tokenization=joined",
    ):
        validate_config(
            {
                "model": {"preset": "tiny"},
                "train": {"stage": "finetune"},
                "data": {"template": "tokenizer", "tokenization": "llava"},
            }
        )


# ---- the shipped LLaVA-1.5 configs prepare real data with LLaVA-1.5's ids ------------------------

ASSETS = Path(__file__).resolve().parents[2] / "platform/llava_ray/assets/configs/llava-1.5-7b"
CLIP_POSITIONS = 16  # the tiny CLIP below: 56 px images in 14 px patches


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local CLIP vision config (no weights: prepare needs only its image geometry)."""
    from transformers import CLIPVisionConfig

    folder = tmp_path_factory.mktemp("tiny-clip")
    CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=56,
        patch_size=14,
    ).save_pretrained(folder)
    return folder


def prepare_with_shipped_config(
    stage_file: str, records: list[dict], folder: Path, tokenizer_dir: Path, clip_dir: Path
) -> list:
    """``records`` through the real per-sample prepare code, configured by a shipped YAML plus the overrides a
    user gives on the command line (local tokenizer, vision tower and data instead of the hub and S3)."""
    import json

    from PIL import Image

    from llava_ray.config.loader import load_config
    from llava_ray.data.samples import SamplePreparer
    from llava_ray.data.sources import WorkItem

    for index, color in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (40 + 10 * index, 30), color).save(folder / f"{index}.png")
    data_file = folder / "data.json"
    data_file.write_text(json.dumps(records))
    config = load_config(
        ASSETS / stage_file,
        [
            f"model.tokenizer={tokenizer_dir}",
            f"model.vision_tower={clip_dir}",
            "data.dataset=null",  # the shipped config's registry entry would add the real 558K/665K files
            f"data.sources=[{{path: {data_file}}}]",
            f"data.prepared_path={folder / 'prepared'}",
        ],
    )
    assert config.data.tokenization == "llava"  # the shipped config's choice
    preparer = SamplePreparer.from_config(config)
    items = [
        WorkItem(row, 0, record["id"], f"data.json[{row}]", json.dumps(record), copies=1)
        for row, record in enumerate(records)
    ]
    return preparer.prepare(items)


def expanded(ids: list[int], image_id: int) -> list[int]:
    out: list[int] = []
    for token in ids:
        out += [image_id] * CLIP_POSITIONS if token == REFERENCE_IMAGE_INDEX else [token]
    return out


def test_llava_15_pretrain_config_prepares_the_references_ids(
    vicuna, reference, vicuna_tokenizer_dir, tiny_clip_dir, tmp_path
):
    records = [
        {
            "id": f"cap{index}",
            "image": f"{index}.png",
            "conversations": [
                {"from": "human", "value": "Describe the image briefly.\n<image>"},
                {"from": "gpt", "value": caption},
            ],
        }
        for index, caption in enumerate(CAPTIONS[:3])
    ]
    rows = prepare_with_shipped_config(
        "pretrain.yaml", records, tmp_path, vicuna_tokenizer_dir, tiny_clip_dir
    )
    image_id = vicuna.convert_tokens_to_ids(IMAGE_TOKEN)
    assert [row.id for row in rows] == ["cap0", "cap1", "cap2"]
    for row, caption in zip(rows, CAPTIONS, strict=False):
        expected = expanded(tokenizer_image_token(f"<image>{caption}\n", reference), image_id)
        assert row.input_ids == expected
        assert row.labels == [IGNORE_INDEX] * (1 + CLIP_POSITIONS) + expected[1 + CLIP_POSITIONS :]
        assert len(row.images) == 1


def test_llava_15_finetune_config_prepares_the_references_ids(
    vicuna, reference, vicuna_tokenizer_dir, tiny_clip_dir, tmp_path
):
    records = [
        {"id": "qa", "image": "0.png", "conversations": QA},
        {"id": "text", "conversations": TEXT_ONLY},
    ]
    rows = prepare_with_shipped_config(
        "finetune.yaml", records, tmp_path, vicuna_tokenizer_dir, tiny_clip_dir
    )
    image_id = vicuna.convert_tokens_to_ids(IMAGE_TOKEN)
    assert [(row.id, row.modality) for row in rows] == [("qa", "image"), ("text", "text")]
    for row, conversation in zip(rows, [QA, TEXT_ONLY], strict=True):
        assert row.input_ids == expanded(
            tokenizer_image_token(vicuna_v1_prompt(conversation), reference), image_id
        )
        answers = [turn["value"] for turn in conversation[1::2]]
        assert supervised_runs(row.labels) == [[*reference.sp.encode(" " + answer), 2] for answer in answers]
