"""Hugging Face Jinja chat templates derived from the template declarations in ``conversation.templates``.

:func:`jinja_chat_template` writes a template's declared strings into Jinja, so the chat template
an exported model serves with renders exactly the text training rendered (the tests render both
ways and compare). The tiny tokenizer's own chat template is the ChatML declaration rendered with
``{% generation %}`` markers and no default system prompt.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from llava_ray.conversation.templates import IMAGE_TOKEN, Template, get_template

# Each message's text as training renders it: a list content's image items become <image>, and in
# any turn holding one it moves to the front as "<image>\n", the text stripped (templates.conform_turns).
_MESSAGE_TEXT = (
    "{%- if message['content'] is string -%}{%- set raw = message['content'] -%}"
    "{%- else -%}{%- set parts = namespace(text='', images=0) -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set parts.images = parts.images + 1 -%}"
    "{%- elif item['type'] == 'text' -%}{%- set parts.text = parts.text + item['text'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set raw = image * parts.images + parts.text -%}{%- endif -%}"
    "{%- if image in raw -%}"
    "{%- set text = (image + '\\n' + (raw | replace(image, '') | trim)) | trim -%}"
    "{%- else -%}{%- set text = raw -%}{%- endif -%}"
)

# A system message replaces the default system prompt.
_SYSTEM = (
    "{%- set ns = namespace(system=default_system) -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set ns.system = messages[0]['content'] if messages[0]['content'] is string "
    "else messages[0]['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}"
    "{%- endif -%}"
)


def _literal(text: str) -> str:
    """``text`` as a Jinja string literal."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return f"'{escaped}'"


def _output(*parts: str) -> str:
    """A Jinja output of the concatenated expressions, leaving out empty literals."""
    kept = [part for part in parts if part != "''"]
    return "{{ " + " + ".join(kept) + " }}" if kept else ""


def jinja_chat_template(
    template: Template, default_system: str | None = None, generation_markers: bool = False
) -> str:
    """A Jinja chat template rendering ``template`` exactly as :meth:`Template.render` does.

    ``default_system`` replaces the declared system prompt; with ``""`` the system block appears only
    when the messages start with a system message. ``generation_markers`` wraps each answer in
    ``{% generation %}`` so ``apply_chat_template(..., return_assistant_tokens_mask=True)`` marks the
    assistant's tokens. A generation prompt (``add_generation_prompt``) ends with the assistant prefix.
    """
    system = template.system if default_system is None else default_system
    block = _output(_literal(template.system_prefix), "ns.system", _literal(template.system_suffix))
    # Without a default system prompt the block appears only when a system message gives one.
    if not system:
        block = f"{{%- if ns.system -%}}{block}{{%- endif -%}}"
    if template.caption_only:  # 'plain' drops the instruction (and any system text): only its <image> stays
        user = "{%- if image in text -%}{{ image }}{%- endif -%}"
        answer = _output("text", _literal(template.end_marker))
    else:
        user = (
            ("{%- if not loop.first -%}" + _output(_literal(template.turn_separator)) + "{%- endif -%}")
            if template.turn_separator
            else ""
        )
        user += _output(_literal(template.user_prefix))
        if template.system_in_first_user:
            user += f"{{%- if loop.first -%}}{block}{{%- endif -%}}"
        user += _output("text", _literal(template.user_suffix))
        answer = _output(
            _literal(template.answer_prefix),
            "text",
            _literal(template.answer_suffix),
            _literal(template.end_marker),
        )
    if generation_markers:
        answer = f"{{% generation %}}{answer}{{% endgeneration %}}"
    assistant_prefix = _output(_literal(template.assistant_prefix))
    before = "" if template.system_in_first_user or template.caption_only else block
    generation_prompt = (
        "{%- if add_generation_prompt and messages and messages[-1]['role'] == 'user' -%}"
        f"{assistant_prefix}{{%- endif -%}}"
        if assistant_prefix
        else ""
    )
    return (
        f"{{%- set default_system = {_literal(system)} -%}}{{%- set image = {_literal(IMAGE_TOKEN)} -%}}"
        f"{_SYSTEM}{before}"
        "{%- for message in messages if message['role'] != 'system' -%}"
        f"{_MESSAGE_TEXT}"
        f"{{%- if message['role'] == 'user' -%}}{user}"
        f"{{%- else -%}}{assistant_prefix}{answer}{{%- endif -%}}"
        "{%- endfor -%}"
        f"{generation_prompt}"
    )


def chat_template_for(template_name: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """A Jinja chat template rendering ``template_name`` exactly as training does.

    ``apply_chat_template(messages, add_generation_prompt=True)`` on a conversation ending with the
    user's turn gives ``Template.prompt_text``. The ``tokenizer`` template is the tokenizer's own.
    """
    if template_name == "tokenizer":
        if not tokenizer.chat_template:
            raise ValueError("template 'tokenizer' needs a tokenizer with a chat template; this one has none")
        return tokenizer.chat_template
    return jinja_chat_template(get_template(template_name))
