"""Conversation templates: one declaration per format, rendered as spans so label masks come from the text.

Each :class:`Template` declares a format's fixed strings (system prompt and its wrapping, user and
assistant markers, end marker) and two rules (llama_2 folds the system into the first user turn;
``plain`` keeps only the image and the caption). Everything else is derived from that declaration:
the spans here (:meth:`Template.render`) and the Hugging Face Jinja chat template
(``conversation.chat_template``), the tiny tokenizer's ChatML template among them.

:func:`tokenize_conversation` joins the spans, tokenizes the whole text once with character
offsets, and supervises exactly the tokens that fall in supervised spans. Unlike the reference
code there is no re-tokenising of pieces and counting with hard-coded offsets, so there is no
"tokenization mismatch" that silently zeroes a sample. Each ``<image>`` becomes as many
positions as the vision tower yields, so the returned length is the true sequence length.
With ``tokenization="llava"`` the text on each side of ``<image>`` is tokenized apart, as the
reference's ``tokenizer_image_token`` does: LLaVA-1.5's weights were trained on those ids (with a
SentencePiece tokenizer, a ``▁`` after every image and the ``▁`` that starts a first word).

Exact strings (../shared/LLAVA_REFERENCE.md):

- ``plain`` (stage 1): ``<image>`` + caption + ``\\n``; the instruction is dropped.
- ``vicuna_v1``: ``{system} USER: <image>\\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>``.
- ``llava_v1``: vicuna_v1 with "human" for "user" in the system prompt.
- ``llava_llama_2``: ``[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n<image>\\nQ1 [/INST] A1 </s><s>[INST] Q2 [/INST] A2 </s>``.
- ``chatml``: ``<|im_start|>system\\n{system}<|im_end|><|im_start|>user\\nQ<|im_end|><|im_start|>assistant\\nA<|im_end|>``.
- ``tokenizer``: the tokenizer's own chat template; assistant tokens come from its
  ``{% generation %}`` markers.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from tokenizers import pre_tokenizers
from transformers import PreTrainedTokenizerBase

from llava_ray.config.schema import TEMPLATE_NAMES
from llava_ray.utils.skips import Skipped

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)
CHATML_SYSTEM = "A conversation between a user and an LLM-based AI assistant. The assistant gives helpful and honest answers."
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass(frozen=True)
class Span:
    """A piece of rendered text; ``supervised`` spans carry the loss."""

    text: str
    supervised: bool = False


@dataclass(frozen=True)
class Turn:
    role: str  # "user" or "assistant"
    text: str


@dataclass(frozen=True)
class Template:
    """One conversation format, declared by its fixed strings.

    A conversation renders as the system block ``system_prefix + system + system_suffix`` (at the
    start, or right after the first ``user_prefix`` when ``system_in_first_user``), then per user
    turn ``turn_separator`` (not before the first) ``+ user_prefix + text + user_suffix +
    assistant_prefix``, and per answer the supervised ``answer_prefix + text + answer_suffix +
    end_marker``. A generation prompt ends with ``assistant_prefix``.
    """

    name: str
    system: str = ""  # the default system prompt
    system_prefix: str = ""  # text before the system prompt
    system_suffix: str = ""  # text after the system prompt
    system_in_first_user: bool = False  # llama_2: the system block opens the first user turn
    user_prefix: str = ""  # before each user turn's text
    user_suffix: str = ""  # after each user turn's text
    assistant_prefix: str = ""  # after each user turn, unsupervised: where generation starts
    answer_prefix: str = ""  # supervised text before each answer
    answer_suffix: str = ""  # supervised text between an answer and the end marker
    end_marker: str = ""  # generation stops here; ends every supervised answer
    turn_separator: str = ""  # before every user turn but the first (llama_2's "<s>": the first is BOS)
    add_bos: bool = True  # the tokenizer's BOS goes before the text
    caption_only: bool = False  # 'plain' (stage 1): only the instruction's <image> stays, then one answer
    special_tokens: tuple[str, ...] = ()  # markers a matching tokenizer holds as single tokens

    @property
    def system_block(self) -> str:
        return self.system_prefix + self.system + self.system_suffix

    def render(self, turns: Sequence[Turn], generation_prompt: bool = False) -> list[Span]:
        """Spans of the conversation; with ``generation_prompt`` the turns end with a user turn."""
        turns = list(turns)
        if self.caption_only and not generation_prompt and len(turns) != 2:
            raise Skipped(
                "plain_needs_one_answer",
                f"'{self.name}' takes one instruction and one answer, got {len(turns)} turns",
            )
        spans = [] if self.system_in_first_user or not self.system_block else [Span(self.system_block)]
        for index, turn in enumerate(turns):
            if turn.role == "user":
                separator = self.turn_separator if index else ""
                system = self.system_block if self.system_in_first_user and index == 0 else ""
                text = (IMAGE_TOKEN if IMAGE_TOKEN in turn.text else "") if self.caption_only else turn.text
                spans.append(
                    Span(
                        f"{separator}{self.user_prefix}{system}{text}{self.user_suffix}{self.assistant_prefix}"
                    )
                )
            else:
                answer = f"{self.answer_prefix}{turn.text}{self.answer_suffix}{self.end_marker}"
                spans.append(Span(answer, supervised=True))
        return spans

    def prompt_text(self, turns: Sequence[Turn]) -> str:
        """The text the model continues at generation time (turns end with the user's)."""
        return "".join(span.text for span in self.render(turns, generation_prompt=True))


TEMPLATES: dict[str, Template] = {
    "plain": Template("plain", end_marker="\n", caption_only=True),
    **{
        name: Template(
            name,
            system=system,
            system_suffix=" ",
            user_prefix="USER: ",
            user_suffix=" ",
            assistant_prefix="ASSISTANT:",
            answer_prefix=" ",
            end_marker="</s>",
            special_tokens=("</s>",),
        )
        for name, system in (("vicuna_v1", VICUNA_SYSTEM), ("llava_v1", LLAVA_V1_SYSTEM))
    },
    "llava_llama_2": Template(
        "llava_llama_2",
        system=LLAMA_2_SYSTEM,
        system_prefix="<<SYS>>\n",
        system_suffix="\n<</SYS>>\n\n",
        system_in_first_user=True,
        user_prefix="[INST] ",
        user_suffix=" ",
        assistant_prefix="[/INST]",
        answer_prefix=" ",
        answer_suffix=" ",
        end_marker="</s>",
        turn_separator="<s>",
        special_tokens=("<s>", "</s>"),
    ),
    "chatml": Template(
        "chatml",
        system=CHATML_SYSTEM,
        system_prefix="<|im_start|>system\n",
        system_suffix="<|im_end|>",
        user_prefix="<|im_start|>user\n",
        user_suffix="<|im_end|>",
        assistant_prefix="<|im_start|>assistant\n",
        end_marker="<|im_end|>",
        add_bos=False,
        special_tokens=("<|im_start|>", "<|im_end|>"),
    ),
}


def check_template_names(declared: Iterable[str], configurable: Iterable[str]) -> None:
    """Raise unless the declared templates plus 'tokenizer' are exactly the names a config may use."""
    declared, configurable = {*declared, "tokenizer"}, set(configurable)
    if declared != configurable:
        raise ImportError(
            "llava_ray.config.schema.TEMPLATE_NAMES and the templates declared in llava_ray.conversation.templates "
            f"(plus 'tokenizer') differ: only in TEMPLATE_NAMES {sorted(configurable - declared)}, only declared "
            f"{sorted(declared - configurable)}. Declare a Template for every name in TEMPLATE_NAMES and list "
            "every declared template there"
        )


# Configs validate against TEMPLATE_NAMES; the two lists must not drift apart.
check_template_names(TEMPLATES, TEMPLATE_NAMES)


def get_template(name: str, system: str | None = None) -> Template:
    """The template called ``name``; ``system`` replaces its default system prompt."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; choose one of {', '.join([*TEMPLATES, 'tokenizer'])}")
    template = TEMPLATES[name]
    return template if system is None else dataclasses.replace(template, system=system)


@dataclass
class TokenizedConversation:
    """Token ids with image placeholders expanded, labels (IGNORE_INDEX where unsupervised)."""

    input_ids: list[int]
    labels: list[int]
    num_images: int
    text: str
    changes: tuple[str, ...] = ()  # what conforming to the reference's preprocessing changed

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def num_supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


# What normalize_turns changes to match the reference's preprocessing; prepare's report counts each.
LEADING_ANSWER_DROPPED = "leading_answer_dropped"
IMAGE_MOVED_TO_FRONT = "image_moved_to_front"


@dataclass(frozen=True)
class NormalizedTurns:
    """Alternating turns, and the reference's changes that produced them (``LEADING_ANSWER_DROPPED``, ...)."""

    turns: list[Turn]
    changes: tuple[str, ...] = ()


def conform_turns(conversations: Sequence[dict[str, Any]], require_answer: bool = True) -> NormalizedTurns:
    """LLaVA's ``[{"from": "human", "value": ...}, ...]`` as alternating user/assistant turns.

    As the reference's preprocessing does: a conversation opening with an answer loses that turn
    (``LEADING_ANSWER_DROPPED``); in every turn holding ``<image>`` the placeholder moves to the
    front as ``<image>\\n`` and the text is stripped (``IMAGE_MOVED_TO_FRONT`` when that changed
    it), so a turn that is exactly ``<image>`` stays ``<image>``. Training conversations end with
    an answer; a generation prompt (``require_answer=False``) ends with the user's turn.
    """
    parsed: list[Turn] = []
    for index, message in enumerate(conversations):
        if not isinstance(message, dict):
            raise Skipped("malformed_turn", f"turn {index} is not an object")
        role = ROLES.get(str(message.get("from", message.get("role", ""))).lower())
        text = message.get("value", message.get("content"))
        if role is None or not isinstance(text, str):
            raise Skipped("malformed_turn", f"turn {index} has no known role or no text: {message!r}")
        if not text.strip():
            raise Skipped("empty_turn", f"turn {index} ({role}) is empty")
        parsed.append(Turn(role, text))
    changes: list[str] = []
    if parsed and parsed[0].role == "assistant":
        parsed = parsed[1:]
        changes.append(LEADING_ANSWER_DROPPED)
    turns: list[Turn] = []
    for index, turn in enumerate(parsed):
        expected = "user" if index % 2 == 0 else "assistant"
        if turn.role != expected:
            raise Skipped(
                "roles_not_alternating",
                f"turn {index} is from {turn.role}; turns must alternate starting with the user",
            )
        text = turn.text
        if IMAGE_TOKEN in text:
            text = f"{IMAGE_TOKEN}\n{text.replace(IMAGE_TOKEN, '').strip()}".strip()
            if text != turn.text and IMAGE_MOVED_TO_FRONT not in changes:
                changes.append(IMAGE_MOVED_TO_FRONT)
        turns.append(Turn(turn.role, text))
    if not turns:
        raise Skipped("empty_conversation", "the conversation has no turns")
    if require_answer and turns[-1].role != "assistant":
        raise Skipped("no_answer", "the conversation must end with an assistant answer")
    if not require_answer and turns[-1].role != "user":
        raise Skipped("no_question", "a generation prompt must end with the user's turn")
    return NormalizedTurns(turns, tuple(changes))


def normalize_turns(conversations: Sequence[dict[str, Any]], require_answer: bool = True) -> list[Turn]:
    """The turns of :func:`conform_turns`, without the record of what changed."""
    return conform_turns(conversations, require_answer).turns


def tokenize_conversation(
    conversations: Sequence[dict[str, Any]],
    template_name: str,
    tokenizer: PreTrainedTokenizerBase,
    image_positions: int,
    max_length: int | None = None,
    tokenization: str = "joined",
) -> TokenizedConversation:
    """Render, tokenize and mask one conversation; raise :class:`Skipped` with a reason.

    ``image_positions`` is how many sequence positions one image takes (576 for CLIP-L/336).
    ``max_length`` counts image positions; truncation never cuts inside an image, and a sample
    left without a supervised token is rejected rather than trained on at zero loss.
    ``tokenization`` is ``data.tokenization``: "joined" or "llava" (see the module docstring).
    """
    normalized = conform_turns(conversations)
    turns = normalized.turns
    if template_name == "tokenizer":
        _check_chat_template_tokenization(tokenization)
        ids, supervised, text = _tokenize_with_chat_template(turns, tokenizer)
    else:
        template = get_template(template_name)
        ids, supervised, text = _tokenize_spans(
            template.render(turns), tokenizer, template.add_bos, tokenization
        )
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    input_ids, labels = expand_images(ids, supervised, image_id, image_positions)
    num_images = ids.count(image_id)
    if max_length is not None and len(input_ids) > max_length:
        if input_ids[max_length - 1] == image_id and input_ids[max_length] == image_id:
            raise Skipped(
                "truncated_inside_image", f"model_max_length={max_length} would cut inside an image"
            )
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    result = TokenizedConversation(input_ids, labels, num_images, text, normalized.changes)
    if result.num_supervised == 0:
        raise Skipped("no_supervised_tokens", "no answer token is left to train on (truncated or empty)")
    return result


def expand_images(
    ids: Sequence[int], supervised: Sequence[bool], image_id: int, image_positions: int
) -> tuple[list[int], list[int]]:
    """Each ``<image>`` id repeated ``image_positions`` times; labels (IGNORE_INDEX off supervision)."""
    input_ids: list[int] = []
    labels: list[int] = []
    for token, is_supervised in zip(ids, supervised, strict=True):
        if token == image_id:
            input_ids += [image_id] * image_positions
            labels += [IGNORE_INDEX] * image_positions
        else:
            input_ids.append(token)
            labels.append(token if is_supervised else IGNORE_INDEX)
    return input_ids, labels


def tokenize_prompt(
    conversation: Sequence[dict[str, Any]],
    template_name: str,
    tokenizer: PreTrainedTokenizerBase,
    image_positions: int,
    tokenization: str = "joined",
    system: str | None = None,
) -> list[int]:
    """Token ids of a generation prompt (turns end with the user's), tokenized exactly as in training.

    ``system`` replaces the template's default system prompt (a chat template gets it as a system message).
    """
    turns = normalize_turns(conversation, require_answer=False)
    if template_name == "tokenizer":
        _check_chat_template_tokenization(tokenization)
        messages = [{"role": turn.role, "content": turn.text} for turn in turns]
        if system is not None:
            messages = [{"role": "system", "content": system}, *messages]
        ids = list(
            tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        )
    else:
        template = get_template(template_name, system)
        ids, _, _ = _tokenize_spans(
            template.render(turns, generation_prompt=True), tokenizer, template.add_bos, tokenization
        )
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    return expand_images(ids, [False] * len(ids), image_id, image_positions)[0]


def _tokenize_spans(
    spans: Sequence[Span], tokenizer: PreTrainedTokenizerBase, add_bos: bool, tokenization: str = "joined"
) -> tuple[list[int], list[bool], str]:
    """Tokenize the joined text ("joined") or each side of every ``<image>`` apart ("llava").

    A token is supervised when the last character it covers is (a SentencePiece ``▁`` that the
    tokenizer adds covers the character it precedes), so the masks come from the spans either way.
    """
    text = "".join(span.text for span in spans)
    starts, flags = [], []
    position = 0
    for span in spans:
        starts.append(position)
        position += len(span.text)
        flags.append(span.supervised)
    if tokenization == "joined":
        ids, offsets = encode_text(tokenizer, text)
    elif tokenization == "llava":
        ids, offsets = _encode_around_images(tokenizer, text)
    else:
        raise ValueError(f"unknown tokenization {tokenization!r}; choose 'joined' or 'llava'")
    supervised = []
    for start, end in offsets:
        last = end - 1 if end > start else start
        if not text or last >= len(text):
            supervised.append(False)
            continue
        supervised.append(flags[bisect.bisect_right(starts, last) - 1])
    if add_bos and tokenizer.bos_token_id is not None:
        ids, supervised = [tokenizer.bos_token_id, *ids], [False, *supervised]
    return ids, supervised, text


def _encode_around_images(
    tokenizer: PreTrainedTokenizerBase, text: str
) -> tuple[list[int], list[tuple[int, int]]]:
    """The reference's ``tokenizer_image_token`` without its BOS: each chunk between ``<image>``s on its own."""
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    position = 0
    for index, chunk in enumerate(text.split(IMAGE_TOKEN)):
        if index:
            ids.append(image_id)
            offsets.append((position, position + len(IMAGE_TOKEN)))
            position += len(IMAGE_TOKEN)
        chunk_ids, chunk_offsets = encode_text(tokenizer, chunk)
        ids += chunk_ids
        offsets += [(start + position, end + position) for start, end in chunk_offsets]
        position += len(chunk)
    return ids, offsets


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and character offsets of ``text`` (no BOS), as SentencePiece encodes it.

    SentencePiece's dummy prefix puts a ``▁`` before the text whatever it starts with (the
    reference's ``legacy: false`` tokenizer does too); a converted tokenizer's Metaspace skips it
    when the text already starts with a space, so such a text gets one more space here.
    """
    shift = 1 if text[:1] in (" ", "\u2581") and _prefixes_first_text(tokenizer) else 0
    encoding = tokenizer(" " * shift + text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [(max(start - shift, 0), max(end - shift, 0)) for start, end in encoding["offset_mapping"]]
    return list(encoding["input_ids"]), offsets


def _prefixes_first_text(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer's pre-tokenizer adds SentencePiece's ``▁`` prefix (Llama's, Vicuna's)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre_tokenizer = getattr(backend, "pre_tokenizer", None)
    return isinstance(pre_tokenizer, pre_tokenizers.Metaspace) and pre_tokenizer.prepend_scheme != "never"


def _check_chat_template_tokenization(tokenization: str) -> None:
    if tokenization != "joined":
        raise ValueError(
            f"tokenization {tokenization!r} splits the text a llava-ray template renders; template 'tokenizer' "
            "renders with the tokenizer's chat template: use tokenization 'joined' or an explicit template"
        )


def _tokenize_with_chat_template(
    turns: Sequence[Turn], tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[bool], str]:
    if not tokenizer.chat_template or "{% generation %}" not in tokenizer.chat_template:
        raise ValueError(
            "template 'tokenizer' needs a chat template with {% generation %} markers to know which tokens "
            "the assistant wrote; this tokenizer has none. Pick an explicit template such as vicuna_v1 or chatml"
        )
    messages = [{"role": turn.role, "content": turn.text} for turn in turns]
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return list(encoded["input_ids"]), [bool(m) for m in encoded["assistant_masks"]], text
