"""TODO docstring."""

from __future__ import annotations

from transformers import (
    PreTrainedTokenizerBase,
)

from llava_ray.conversation.templates import Template, get_template

# Each message's text as training renders it: a list content's image items become <image>, and an
# <image> in the first turn moves to its front as "<image>\n" (templates.normalize_turns).
_MESSAGE_TEXT = (
    "{%- if message['content'] is string -%}{%- set raw = message['content'] -%}"
    "{%- else -%}{%- set parts = namespace(text='', images=0) -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set parts.images = parts.images + 1 -%}"
    "{%- elif item['type'] == 'text' -%}{%- set parts.text = parts.text + item['text'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set raw = '<image>' * parts.images + parts.text -%}{%- endif -%}"
    "{%- if loop.first and '<image>' in raw -%}"
    "{%- set text = '<image>\\n' + (raw | replace('<image>', '') | trim) -%}"
    "{%- else -%}{%- set text = raw -%}{%- endif -%}"
)


def _literal(text: str) -> str:
    """``text`` as a Jinja string literal."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return f"'{escaped}'"


def _turns(user: str, assistant: str, before: str = "") -> str:
    """A Jinja template: ``before`` once, then each non-system message rendered by role."""
    return (
        "{%- set ns = namespace(system=default_system) -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set ns.system = messages[0]['content'] if messages[0]['content'] is string "
        "else messages[0]['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}"
        "{%- endif -%}"
        f"{before}"
        "{%- for message in messages if message['role'] != 'system' -%}"
        f"{_MESSAGE_TEXT}"
        f"{{%- if message['role'] == 'user' -%}}{user}{{%- else -%}}{assistant}{{%- endif -%}}"
        "{%- endfor -%}"
    )


def _vicuna_template(end: str) -> str:
    return _turns(
        before="{{ ns.system + ' ' }}",
        user="{{ 'USER: ' + text + ' ASSISTANT:' }}",
        assistant=f"{{{{ ' ' + text + {_literal(end)} }}}}",
    )


def _llama_2_template(end: str) -> str:
    system = "'<<SYS>>\\n' + ns.system + '\\n<</SYS>>\\n\\n'"
    return _turns(
        user=f"{{{{ ('[INST] ' + {system} if loop.first else '<s>[INST] ') + text + ' [/INST]' }}}}",
        assistant=f"{{{{ ' ' + text + ' ' + {_literal(end)} }}}}",
    )


def _chatml_template(end: str) -> str:
    return _turns(
        before=f"{{{{ '<|im_start|>system\\n' + ns.system + {_literal(end)} }}}}",
        user=f"{{{{ '<|im_start|>user\\n' + text + {_literal(end)} + '<|im_start|>assistant\\n' }}}}",
        assistant=f"{{{{ text + {_literal(end)} }}}}",
    )


def _plain_template(end: str) -> str:
    # Stage 1 drops the instruction: only the image (if any) precedes the caption.
    return _turns(
        user="{%- if loop.first and '<image>' in text -%}{{ '<image>' }}{%- endif -%}",
        assistant=f"{{{{ (text | trim) + {_literal(end)} }}}}",
    )


_CHAT_TEMPLATES = {
    "vicuna_v1": _vicuna_template,
    "llava_v1": _vicuna_template,
    "llava_llama_2": _llama_2_template,
    "chatml": _chatml_template,
    "plain": _plain_template,
}


def chat_template_for(template_name: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """A Jinja chat template rendering ``template_name`` exactly as training does.

    ``apply_chat_template(messages, add_generation_prompt=True)`` on a conversation ending with the
    user's turn gives ``Template.prompt_text``. The ``tokenizer`` template is the tokenizer's own.
    """
    if template_name == "tokenizer":
        if not tokenizer.chat_template:
            raise ValueError("template 'tokenizer' needs a tokenizer with a chat template; this one has none")
        return tokenizer.chat_template
    template: Template = get_template(template_name)
    body = _CHAT_TEMPLATES[template_name](template.end_marker)
    return f"{{%- set default_system = {_literal(template.system)} -%}}{body}"
