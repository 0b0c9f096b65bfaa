"""Tokenizers: loading one as the reference sees it, LLaVA's special tokens, and the tiny preset's.

:func:`load_tokenizer_dir` is the one way llava-ray loads a tokenizer folder (for training, data
preparation, evaluation and chat). Vicuna v1.5, LLaVA-1.5's LM, ships only a SentencePiece
``tokenizer.model``; transformers converts it to a fast tokenizer (``sentencepiece`` must be
installed; without it transformers 5 reports a misleading "tiktoken is required", so the loader
says what is missing first). transformers 5 builds the converted BPE's merges in piece-id order,
while SentencePiece merges by piece score: Llama's whitespace-run pieces (``▁▁``, ``▁▁▁▁``, ...)
have low ids but the lowest scores, so indented code and double spaces got other ids than
SentencePiece's. The loader rebuilds the merges in score order from ``tokenizer.model``, so the
fast tokenizer (with the character offsets label masking needs) gives SentencePiece's ids.

The tiny tokenizer is a byte-level BPE (any text encodes, nothing maps to ``<unk>``) trained with
the ``tokenizers`` library on the synthetic corpus and saved as an ordinary Hugging Face
tokenizer folder, so one loader serves tiny and real models alike. The trained folder ships in
the package (``assets/tiny-tokenizer``) so every machine uses the same ids;
``llava-ray build-tokenizer`` rebuilds it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from llava_ray.config.model_sources import resolve_sources
from llava_ray.config.schema import ModelConfig
from llava_ray.conversation.chat_template import jinja_chat_template
from llava_ray.conversation.templates import (
    CHATML_SYSTEM,
    IMAGE_TOKEN,
    LLAMA_2_SYSTEM,
    LLAVA_V1_SYSTEM,
    TEMPLATES,
    VICUNA_SYSTEM,
)
from llava_ray.utils.storage import local_copy

PAD_TOKEN = "<pad>"
SENTENCEPIECE_FILE = "tokenizer.model"
TINY_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", PAD_TOKEN, IMAGE_TOKEN, "<|im_start|>", "<|im_end|>"]
TINY_VOCAB_SIZE = 1024

# ChatML with generation markers, so `apply_chat_template(..., return_assistant_tokens_mask=True)`
# knows which tokens the assistant wrote (the `tokenizer` conversation template relies on it).
# Besides the synthetic corpus, the texts the shipped tiny tokenizer was trained on. They are its
# training data, frozen with it, not a copy of the template declarations: byte-level BPE encodes any
# template's markers whatever these are; they only shape its merges. Retraining on other texts (the
# templates' derived fixed pieces were tried) moves about 170 ids and changes what the tiny model
# learns: the demo's position questions fell from 0.93 to 0.44 at the same settings.
TINY_TOKENIZER_EXTRA_TEXTS = (
    VICUNA_SYSTEM,
    LLAVA_V1_SYSTEM,
    LLAMA_2_SYSTEM,
    CHATML_SYSTEM,
    "USER: ASSISTANT:",
    "[INST] <<SYS>>\n<</SYS>>\n\n [/INST]",
    "system\nuser\nassistant\n",
)
TINY_CHAT_TEMPLATE = jinja_chat_template(TEMPLATES["chatml"], default_system="", generation_markers=True)


def train_tiny_tokenizer(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int = TINY_VOCAB_SIZE
) -> Path:
    """Train a byte-level BPE on ``texts`` and save it as a Hugging Face tokenizer folder."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(sorted(set(texts)), trainer=trainer)
    # Like Llama's tokenizer: a plain encode starts with <s>.
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IMAGE_TOKEN, "<|im_start|>", "<|im_end|>"],
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = TINY_CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(out_dir)
    return out_dir


def ensure_special_tokens(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Add ``<image>`` (as one special token) and a pad token where the tokenizer lacks them.

    The LM's embedding must then grow to ``len(tokenizer)``; ``build_language_model`` does that.
    """
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        # Vicuna has none; Hugging Face's llava-1.5 conversion adds <pad> after <image>.
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


def load_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
    """The config's tokenizer (see :func:`load_tokenizer_dir`), local or fetched from the hub or S3."""
    source = resolve_sources(config).tokenizer
    return load_tokenizer_dir(
        local_copy(source),
        source=source,
        trust_remote_code=config.trust_remote_code,
        model_max_length=config.model_max_length,
    )


def load_tokenizer_dir(path: str | Path, source: str | None = None, **kwargs: Any) -> PreTrainedTokenizerBase:
    """The tokenizer in folder ``path`` with ``<image>`` and a pad token present.

    A SentencePiece BPE ``tokenizer.model`` in the folder sets the merges (score order, as
    SentencePiece applies them). ``kwargs`` go to ``AutoTokenizer.from_pretrained``; ``source``
    names the folder in errors (default: ``path``).
    """
    # transformers' Auto classes import torch; data workers import this module without needing them.
    from transformers import AutoTokenizer

    path = Path(path)
    model_file = path / SENTENCEPIECE_FILE
    if model_file.is_file():
        _require_sentencepiece(source or str(path))
    tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
    if model_file.is_file():
        use_sentencepiece_merges(tokenizer, model_file)
    return ensure_special_tokens(tokenizer)


def _require_sentencepiece(source: str) -> None:
    try:
        import sentencepiece  # noqa: F401  (only imported to see that it is installed)
        from google import protobuf  # noqa: F401
    except ImportError as error:
        raise ValueError(
            f"the tokenizer at {source} is a SentencePiece model ({SENTENCEPIECE_FILE}), which needs the "
            f"'sentencepiece' and 'protobuf' packages, and {error.name!r} is not installed; install "
            "llava-ray's dependencies (pip install 'sentencepiece>=0.2' protobuf) in this environment "
            "and in the cluster image"
        ) from None


def sentencepiece_merges(model_file: str | Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and BPE merges of a SentencePiece BPE model, merges in SentencePiece's order.

    SentencePiece merges the adjacent pair whose union is the highest-scoring piece; among merges
    of equal score the longer left part goes first, which reproduces SentencePiece's leftmost-first
    growth of whitespace runs (Llama gives every such piece the same score).
    """
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        raise ValueError(f"{model_file} is not a SentencePiece BPE model; it has no merges")
    vocab = {piece.piece: index for index, piece in enumerate(proto.pieces)}
    # Pieces a merge can produce or consume: not control, unknown, byte or unused pieces.
    normal = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    mergeable = {piece.piece for piece in proto.pieces if piece.type == normal}
    ranked = []
    for piece in proto.pieces:
        if piece.piece not in mergeable:
            continue
        for cut in range(1, len(piece.piece)):
            left, right = piece.piece[:cut], piece.piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((piece.score, len(left), len(right), left, right))
    ranked.sort(key=lambda merge: (merge[0], merge[1], merge[2]), reverse=True)
    return vocab, [(left, right) for *_, left, right in ranked]


def use_sentencepiece_merges(tokenizer: PreTrainedTokenizerBase, model_file: str | Path) -> None:
    """Give ``tokenizer``'s BPE the merges of ``model_file`` (see :func:`sentencepiece_merges`)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not isinstance(backend.model, models.BPE):
        return  # a slow tokenizer runs SentencePiece itself; a Unigram model has no merges
    vocab, merges = sentencepiece_merges(model_file)
    current = backend.get_vocab(with_added_tokens=False)
    if current != vocab:
        differ = sorted(set(current.items()) ^ set(vocab.items()))
        raise ValueError(
            f"{model_file} and the tokenizer's vocabulary beside it disagree ({len(differ)} piece ids differ, "
            f"e.g. {differ[:3]}); remove the stale {SENTENCEPIECE_FILE} or tokenizer.json"
        )
    old = backend.model
    backend.model = models.BPE(
        vocab=vocab,
        merges=merges,
        unk_token=old.unk_token,
        fuse_unk=old.fuse_unk,
        byte_fallback=old.byte_fallback,
        ignore_merges=old.ignore_merges,
    )


def image_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id of LLaVA's ``<image>`` placeholder in this tokenizer."""
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
