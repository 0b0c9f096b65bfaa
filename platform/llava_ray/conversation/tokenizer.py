"""Tokenizers: LLaVA's special tokens, and the tiny preset's tokenizer trained locally.

The tiny tokenizer is a byte-level BPE (any text encodes, nothing maps to ``<unk>``) trained with
the ``tokenizers`` library on the synthetic corpus and saved as an ordinary Hugging Face
tokenizer folder, so ``AutoTokenizer.from_pretrained`` serves tiny and real models alike. The
trained folder ships in the package (``assets/tiny-tokenizer``) so every machine uses the same
ids; ``llava-ray build-tokenizer`` rebuilds it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

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
    """The tokenizer with LLaVA's ``<image>`` placeholder and a pad token present."""
    # transformers' Auto classes import torch; data workers import this module without needing them.
    from transformers import AutoTokenizer

    source = resolve_sources(config).tokenizer
    tokenizer = AutoTokenizer.from_pretrained(
        local_copy(source),
        trust_remote_code=config.trust_remote_code,
        model_max_length=config.model_max_length,
    )
    return ensure_special_tokens(tokenizer)


def image_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id of LLaVA's ``<image>`` placeholder in this tokenizer."""
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
