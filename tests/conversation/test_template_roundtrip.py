"""Each template's spans and its derived Jinja chat template render the same text, for any conversation."""

import random
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from llava_ray.config.presets import TINY_TOKENIZER_DIR
from llava_ray.config.schema import TEMPLATE_NAMES
from llava_ray.conversation.chat_template import chat_template_for
from llava_ray.conversation.templates import (
    IMAGE_TOKEN,
    TEMPLATES,
    check_template_names,
    get_template,
    normalize_turns,
)
from llava_ray.conversation.tokenizer import TINY_CHAT_TEMPLATE, TINY_SPECIAL_TOKENS

CONVERSATIONS_PER_TEMPLATE = 60
# Text that could break a Jinja template or a string literal if any of it were pasted in unescaped.
AWKWARD = [
    "It's \"quoted\" and 'single'.",
    "back\\slash \\n not a newline",
    "line one\nline two\n\n",
    "{{ messages }} {% if true %}x{% endif %} {# comment #}",
    "' + raise_exception('no') + '",
    "tabs\tand  double  spaces",
    "</s> <|im_end|> [INST] USER: ASSISTANT:",
    "ünïcödé 日本語 🙂",
    "plain words",
]
ODD_SPACE = ["", " ", "  ", "\n", "\t", " \n "]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)


def random_text(rng: random.Random) -> str:
    words = " ".join(rng.choice(AWKWARD) for _ in range(rng.randint(1, 3)))
    return rng.choice(ODD_SPACE) + words + rng.choice(ODD_SPACE)


def random_conversation(rng: random.Random, exchanges: int) -> list[dict[str, str]]:
    """LLaVA turns; the first may carry <image> at its start or end, with odd whitespace around it."""
    conversation = []
    for _ in range(exchanges):
        conversation.append({"from": "human", "value": random_text(rng)})
        conversation.append({"from": "gpt", "value": random_text(rng)})
    placement = rng.choice(["none", "front", "end", "middle"])
    question = conversation[0]["value"]
    if placement == "front":
        conversation[0]["value"] = IMAGE_TOKEN + rng.choice(["\n", "", " \n"]) + question
    elif placement == "end":
        conversation[0]["value"] = question + rng.choice(["\n", "", " "]) + IMAGE_TOKEN
    elif placement == "middle":
        conversation[0]["value"] = question + IMAGE_TOKEN + question
    return conversation


def as_messages(conversation: list[dict[str, str]], image_as_item: bool) -> list[dict]:
    messages = []
    for turn in conversation:
        role = "user" if turn["from"] == "human" else "assistant"
        text = turn["value"]
        if image_as_item and IMAGE_TOKEN in text:
            content = [{"type": "image"}, {"type": "text", "text": text.replace(IMAGE_TOKEN, "")}]
            messages.append({"role": role, "content": content})
        else:
            messages.append({"role": role, "content": text})
    return messages


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_spans_and_jinja_render_the_same_text(tokenizer, name):
    template = get_template(name)
    chat_template = chat_template_for(name, tokenizer)
    rng = random.Random(name)
    for _ in range(CONVERSATIONS_PER_TEMPLATE):
        exchanges = 1 if template.caption_only else rng.randint(1, 4)
        conversation = random_conversation(rng, exchanges)
        image_as_item = rng.random() < 0.3
        messages = as_messages(conversation, image_as_item)

        spans = template.render(normalize_turns(conversation))
        jinja = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False)
        assert jinja == "".join(span.text for span in spans), conversation

        question = conversation[:-1]
        prompt = template.prompt_text(normalize_turns(question, require_answer=False))
        jinja_prompt = tokenizer.apply_chat_template(
            messages[:-1], chat_template=chat_template, add_generation_prompt=True, tokenize=False
        )
        assert jinja_prompt == prompt, question


def test_tiny_tokenizer_template_is_chatml_with_generation_markers(tokenizer):
    chatml = get_template("chatml")
    conversation = [
        {"from": "human", "value": "What color are the shapes?\n<image>"},
        {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "How many are there?"},
        {"from": "gpt", "value": "Three, in a row."},
    ]
    messages = as_messages(conversation, image_as_item=False)
    assert tokenizer.chat_template == TINY_CHAT_TEMPLATE
    spans = chatml.render(normalize_turns(conversation))
    without_system = "".join(span.text for span in spans[1:])  # the tiny template has no default system
    assert tokenizer.apply_chat_template(messages, tokenize=False) == without_system
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    answers = [span.text for span in spans if span.supervised]
    assert tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m]) == "".join(answers)
    with_system = [{"role": "system", "content": "Be brief."}, *messages]
    assert tokenizer.apply_chat_template(with_system, tokenize=False).startswith(
        "<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\n"
    )


def test_every_templates_markers_are_tiny_tokenizer_special_tokens():
    """A template's special markers (</s>, <|im_end|>, ...) must each be one token of the tiny tokenizer."""
    for template in TEMPLATES.values():
        assert set(template.special_tokens) <= set(TINY_SPECIAL_TOKENS), template.name


def test_declared_templates_match_the_config_vocabulary():
    assert {*TEMPLATES, "tokenizer"} == set(TEMPLATE_NAMES)
    check_template_names(TEMPLATES, TEMPLATE_NAMES)
    with pytest.raises(ImportError, match=r"only in TEMPLATE_NAMES \['mistral'\], only declared \[\]"):
        check_template_names(TEMPLATES, [*TEMPLATE_NAMES, "mistral"])
    with pytest.raises(ImportError, match=r"only in TEMPLATE_NAMES \[\], only declared \['chatml'\]"):
        check_template_names(TEMPLATES, [n for n in TEMPLATE_NAMES if n != "chatml"])


def test_conversation_package_does_not_import_torch():
    modules = ["templates", "chat_template", "tokenizer"]
    code = (
        "import sys\n"
        + "".join(f"import llava_ray.conversation.{module}\n" for module in modules)
        + "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
