"""Conversation templates, rendered from spans so that label masks come from the rendering itself.

A template turns a LLaVA conversation into a list of :class:`Span` (text, supervised or not).
:func:`tokenize_conversation` joins the spans, tokenizes the whole text once with character
offsets, and supervises exactly the tokens that fall in supervised spans. Unlike the reference
code there is no re-tokenising of pieces and counting with hard-coded offsets, so there is no
"tokenization mismatch" that silently zeroes a sample. Each ``<image>`` becomes as many
positions as the vision tower yields, so the returned length is the true sequence length.

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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from llava_ray.conversation.tokenizer import IMAGE_TOKEN

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


class TemplateError(ValueError):
    """A conversation the template cannot render; ``reason`` is the skip reason counted in reports."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Span:
    """A piece of rendered text; ``supervised`` spans carry the loss."""

    text: str
    supervised: bool = False


@dataclass(frozen=True)
class Turn:
    role: str  # "user" or "assistant"
    text: str


@dataclass
class TokenizedConversation:
    """Token ids with image placeholders expanded, labels (IGNORE_INDEX where unsupervised)."""

    input_ids: list[int]
    labels: list[int]
    num_images: int
    text: str

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def num_supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def normalize_turns(conversations: Sequence[dict[str, Any]], require_answer: bool = True) -> list[Turn]:
    """LLaVA's ``[{"from": "human", "value": ...}, ...]`` as alternating user/assistant turns.

    ``<image>`` is moved to the front of the first user turn as ``<image>\\n``, as the reference does.
    Training conversations end with an answer; a generation prompt (``require_answer=False``)
    ends with the user's turn.
    """
    turns: list[Turn] = []
    for index, message in enumerate(conversations):
        if not isinstance(message, dict):
            raise TemplateError("malformed_turn", f"turn {index} is not an object")
        role = ROLES.get(str(message.get("from", message.get("role", ""))).lower())
        text = message.get("value", message.get("content"))
        if role is None or not isinstance(text, str):
            raise TemplateError("malformed_turn", f"turn {index} has no known role or no text: {message!r}")
        expected = "user" if index % 2 == 0 else "assistant"
        if role != expected:
            raise TemplateError(
                "roles_not_alternating",
                f"turn {index} is from {role}; turns must alternate starting with the user",
            )
        if not text.strip() or text.strip() == IMAGE_TOKEN:
            raise TemplateError("empty_turn", f"turn {index} ({role}) is empty")
        turns.append(Turn(role, text))
    if not turns:
        raise TemplateError("empty_conversation", "the conversation has no turns")
    if require_answer and turns[-1].role != "assistant":
        raise TemplateError("no_answer", "the conversation must end with an assistant answer")
    if not require_answer and turns[-1].role != "user":
        raise TemplateError("no_question", "a generation prompt must end with the user's turn")
    if IMAGE_TOKEN in turns[0].text:
        question = turns[0].text.replace(IMAGE_TOKEN, "").strip()
        turns[0] = Turn("user", f"{IMAGE_TOKEN}\n{question}")
    return turns


@dataclass(frozen=True)
class Template:
    """One conversation format: how turns become spans, and where an answer ends."""

    name: str
    system: str
    add_bos: bool
    end_marker: str  # generation stops here; part of every supervised answer

    def render(self, turns: Sequence[Turn], generation_prompt: bool = False) -> list[Span]:
        """Spans of the conversation; with ``generation_prompt`` the turns end with a user turn."""
        render = _RENDERERS[self.name]
        return render(self, list(turns), generation_prompt)

    def prompt_text(self, turns: Sequence[Turn]) -> str:
        """The text the model continues at generation time (turns end with the user's)."""
        return "".join(span.text for span in self.render(turns, generation_prompt=True))


def _render_plain(template: Template, turns: list[Turn], generation_prompt: bool) -> list[Span]:
    if generation_prompt:
        return [Span(IMAGE_TOKEN if IMAGE_TOKEN in turns[0].text else "")]
    if len(turns) != 2:
        raise TemplateError(
            "plain_needs_one_answer", f"'plain' takes one instruction and one answer, got {len(turns)} turns"
        )
    image = IMAGE_TOKEN if IMAGE_TOKEN in turns[0].text else ""
    return [Span(image), Span(turns[1].text.strip() + template.end_marker, supervised=True)]


def _render_vicuna(template: Template, turns: list[Turn], generation_prompt: bool) -> list[Span]:
    spans = [Span(template.system + " ")]
    for turn in turns:
        if turn.role == "user":
            spans.append(Span(f"USER: {turn.text} ASSISTANT:"))
        else:
            spans.append(Span(f" {turn.text}{template.end_marker}", supervised=True))
    return spans


def _render_llama_2(template: Template, turns: list[Turn], generation_prompt: bool) -> list[Span]:
    spans: list[Span] = []
    for index, turn in enumerate(turns):
        if turn.role == "user":
            system = f"<<SYS>>\n{template.system}\n<</SYS>>\n\n" if index == 0 else ""
            opener = "" if index == 0 else "<s>"  # the first <s> is the tokenizer's BOS
            spans.append(Span(f"{opener}[INST] {system}{turn.text} [/INST]"))
        else:
            spans.append(Span(f" {turn.text} {template.end_marker}", supervised=True))
    return spans


def _render_chatml(template: Template, turns: list[Turn], generation_prompt: bool) -> list[Span]:
    end = template.end_marker
    spans = [Span(f"<|im_start|>system\n{template.system}{end}")]
    for turn in turns:
        if turn.role == "user":
            spans.append(Span(f"<|im_start|>user\n{turn.text}{end}<|im_start|>assistant\n"))
        else:
            spans.append(Span(f"{turn.text}{end}", supervised=True))
    return spans


_RENDERERS = {
    "plain": _render_plain,
    "vicuna_v1": _render_vicuna,
    "llava_v1": _render_vicuna,
    "llava_llama_2": _render_llama_2,
    "chatml": _render_chatml,
}

TEMPLATES: dict[str, Template] = {
    "plain": Template("plain", system="", add_bos=True, end_marker="\n"),
    "vicuna_v1": Template("vicuna_v1", system=VICUNA_SYSTEM, add_bos=True, end_marker="</s>"),
    "llava_v1": Template("llava_v1", system=LLAVA_V1_SYSTEM, add_bos=True, end_marker="</s>"),
    "llava_llama_2": Template("llava_llama_2", system=LLAMA_2_SYSTEM, add_bos=True, end_marker="</s>"),
    "chatml": Template("chatml", system=CHATML_SYSTEM, add_bos=False, end_marker="<|im_end|>"),
}


def template_fixed_texts() -> list[str]:
    """The templates' own text (system prompts, role markers), for training the tiny tokenizer."""
    texts = [t.system for t in TEMPLATES.values() if t.system]
    return [*texts, "USER: ASSISTANT:", "[INST] <<SYS>>\n<</SYS>>\n\n [/INST]", "system\nuser\nassistant\n"]


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; choose one of {', '.join([*TEMPLATES, 'tokenizer'])}")
    return TEMPLATES[name]


def tokenize_conversation(
    conversations: Sequence[dict[str, Any]],
    template_name: str,
    tokenizer: PreTrainedTokenizerBase,
    image_positions: int,
    max_length: int | None = None,
) -> TokenizedConversation:
    """Render, tokenize and mask one conversation; raise :class:`TemplateError` with a reason.

    ``image_positions`` is how many sequence positions one image takes (576 for CLIP-L/336).
    ``max_length`` counts image positions; truncation never cuts inside an image, and a sample
    left without a supervised token is rejected rather than trained on at zero loss.
    """
    turns = normalize_turns(conversations)
    if template_name == "tokenizer":
        ids, supervised, text = _tokenize_with_chat_template(turns, tokenizer)
    else:
        template = get_template(template_name)
        ids, supervised, text = _tokenize_spans(template.render(turns), tokenizer, template.add_bos)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    input_ids, labels = expand_images(ids, supervised, image_id, image_positions)
    num_images = ids.count(image_id)
    if max_length is not None and len(input_ids) > max_length:
        if input_ids[max_length - 1] == image_id and input_ids[max_length] == image_id:
            raise TemplateError(
                "truncated_inside_image", f"model_max_length={max_length} would cut inside an image"
            )
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    result = TokenizedConversation(input_ids, labels, num_images, text)
    if result.num_supervised == 0:
        raise TemplateError(
            "no_supervised_tokens", "no answer token is left to train on (truncated or empty)"
        )
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
) -> list[int]:
    """Token ids of a generation prompt (turns end with the user's), tokenized exactly as in training."""
    turns = normalize_turns(conversation, require_answer=False)
    if template_name == "tokenizer":
        messages = [{"role": turn.role, "content": turn.text} for turn in turns]
        ids = list(
            tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        )
    else:
        template = get_template(template_name)
        ids, _, _ = _tokenize_spans(
            template.render(turns, generation_prompt=True), tokenizer, template.add_bos
        )
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    return expand_images(ids, [False] * len(ids), image_id, image_positions)[0]


def _tokenize_spans(
    spans: Sequence[Span], tokenizer: PreTrainedTokenizerBase, add_bos: bool
) -> tuple[list[int], list[bool], str]:
    """Tokenize the joined text once; a token is supervised when its last character is."""
    text = "".join(span.text for span in spans)
    starts, ends, flags = [], [], []
    position = 0
    for span in spans:
        starts.append(position)
        position += len(span.text)
        ends.append(position)
        flags.append(span.supervised)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    supervised = []
    for start, end in encoding["offset_mapping"]:
        if end <= start:
            supervised.append(False)
            continue
        span_index = bisect.bisect_right(starts, end - 1) - 1
        supervised.append(flags[span_index])
    if add_bos and tokenizer.bos_token_id is not None:
        ids, supervised = [tokenizer.bos_token_id, *ids], [False, *supervised]
    return ids, supervised, text


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
