"""The terminal chat: scripted sessions through run_chat, handle_line and chat_main, streaming, commands,
history, answers that cannot be kept, the system prompt, transcripts and terminal line editing."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from llava_ray.conversation.templates import (
    VICUNA_SYSTEM,
    encode_text,
    expand_images,
    get_template,
    normalize_turns,
    tokenize_prompt,
)
from llava_ray.evaluation.chat import (
    ANSWER_PREFIX,
    HELP,
    PROMPT,
    AnswerStreamer,
    ChatSession,
    chat_main,
    handle_line,
    run_chat,
    visible_answer,
)
from llava_ray.evaluation.loaded_model import InferenceModel, load_inference_model
from llava_ray.model.generate import generate

# One line each (a message is one line of input); training put a newline before the instruction.
COLOR_QUESTION = "What color is the shape? Answer the question using a single word or phrase."
COUNT_QUESTION = "How many shapes are there? Answer the question using a single word or phrase."
WHERE_QUESTION = "Where is the shape? Answer the question using a single word or phrase."
OWN_SYSTEM = "You are a terse assistant. You name colours and counts in one word."


class RecordingOutput(io.StringIO):
    """An output stream that also keeps every write, to see the answer arrive piece by piece."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


@pytest.fixture(scope="module")
def loaded(trained_model_dir):
    return load_inference_model(str(trained_model_dir))


@pytest.fixture(scope="module")
def images(synthetic_eval_dir) -> list[str]:
    return [str(synthetic_eval_dir / "images" / f"eval_00000{index}.png") for index in range(3)]


def answers_in(output: str) -> list[str]:
    return [
        line.removeprefix(ANSWER_PREFIX) for line in output.splitlines() if line.startswith(ANSWER_PREFIX)
    ]


def said(session: ChatSession, line: str) -> str:
    """What the chat writes for one line of input."""
    output = io.StringIO()
    assert handle_line(session, line, output.write) is True
    return output.getvalue()


@contextmanager
def always_saying(loaded: InferenceModel, token: str) -> Iterator[None]:
    """The model's LM head biased so that ``token`` wins every step."""
    head = loaded.model.language_model.get_output_embeddings()
    bias = torch.zeros(head.out_features)
    bias[loaded.tokenizer.convert_tokens_to_ids(token)] = 1e4
    head.bias = torch.nn.Parameter(bias, requires_grad=False)
    try:
        yield
    finally:
        head.bias = None


def answering_empty(loaded: InferenceModel):
    """The end of text wins the first step: every answer is empty."""
    return always_saying(loaded, loaded.tokenizer.eos_token)


@contextmanager
def failing_generation(loaded: InferenceModel) -> Iterator[None]:
    """An LM head bias of the wrong size: the first generation step raises inside the LM."""
    head = loaded.model.language_model.get_output_embeddings()
    head.bias = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    try:
        yield
    finally:
        head.bias = None


def rendered(turns: list[dict[str, str]], system: str | None = None) -> str:
    """The turns as training renders vicuna_v1 (with ``system`` in place of its own)."""
    template = get_template("vicuna_v1")
    template = template if system is None else replace(template, system=system)
    return "".join(span.text for span in template.render(normalize_turns(turns)))


def check_history(session: ChatSession) -> None:
    """The history holds complete exchanges only, one pixel tensor and one path per <image>."""
    if session.turns:
        turns = normalize_turns(session.turns)
        assert all(turn.text.strip() for turn in turns)
    placeholders = sum(turn["value"].count("<image>") for turn in session.turns)
    assert placeholders == len(session.images) == len(session.image_paths)


# ---- whole sessions ------------------------------------------------------------------------------


def test_two_turns_with_images_stream_and_render_with_the_models_template(loaded, images):
    first_image, second_image = images[0], images[1]
    script = f"{COLOR_QUESTION}\n/image {second_image}\n{COUNT_QUESTION}\n/prompt\n/quit\nnever read\n"
    output = RecordingOutput()
    session = run_chat(
        loaded, image=first_image, input_stream=io.StringIO(script), output_stream=output, temperature=0
    )
    text = output.getvalue()

    assert "(template vicuna_v1)" in text
    assert f"[image attached to your next message: {first_image}]" in text
    assert f"[image attached to your next message: {second_image}]" in text
    first, second = answers_in(text)
    assert [turn["value"] for turn in session.turns[1::2]] == [first, second]
    assert first and second and len(session.images) == 2 and session.pending_image is None
    # The streamed pieces make up the answer, without the end marker.
    start = output.writes.index(ANSWER_PREFIX)
    end = output.writes.index("\n", start)
    assert "".join(output.writes[start + 1 : end]) == first
    assert "</s>" not in text.split("/prompt")[0]

    # History: each question carries its image, rendered exactly as training renders vicuna_v1.
    asked = [turn["value"] for turn in session.turns[0::2]]
    assert asked == [
        f"<image>\n{COLOR_QUESTION}",
        f"<image>\n{COUNT_QUESTION}",
    ]
    assert session.rendered_history() == rendered(session.turns)
    assert rendered(session.turns) == (
        f"{VICUNA_SYSTEM} USER: {asked[0]} ASSISTANT: {first}</s>USER: {asked[1]} ASSISTANT: {second}</s>"
    )
    assert rendered(session.turns) in text  # /prompt showed it
    assert "never read" not in text and text.endswith(PROMPT + "/quit\n")


def test_the_second_turn_sees_the_first(loaded, images):
    """The chat's answer to turn 2 is what generate() gives for the whole two-turn conversation."""
    script = f"{COLOR_QUESTION}\n{COUNT_QUESTION}\n"
    session = run_chat(
        loaded, image=images[2], input_stream=io.StringIO(script), output_stream=io.StringIO(), temperature=0
    )
    assert len(session.turns) == 4 and len(session.images) == 1
    expected = generate(
        loaded.model, loaded.tokenizer, "vicuna_v1", [(session.turns[:3], session.images[0])], 512
    )
    assert session.turns[3]["value"] == expected[0]


# ---- answers that cannot be kept -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("temperature", "seed", "hint"),
    [
        (0.0, None, "rephrase it (at temperature 0 the same message gets the same answer)"),
        (0.2, 4, "rephrase it (with seed 4 the same message gets the same answer)"),  # the run
    ],
)
def test_an_empty_answer_is_not_kept_and_the_message_can_be_sent_again(
    loaded, images, temperature, seed, hint
):
    """The issue: an empty answer mid-conversation (a second image attached) poisoned the history."""
    options = {"temperature": temperature, "seed": seed, "max_new_tokens": 16}
    script = [f"/image {images[0]}", COLOR_QUESTION, f"/image {images[1]}"]
    session = ChatSession(loaded, **options)
    for line in script:
        said(session, line)
    history = list(session.turns)
    with answering_empty(loaded):
        asked = [*history, {"from": "human", "value": f"<image>\n{WHERE_QUESTION}"}]
        pixels = torch.stack([*session.images, session.pending_image])
        assert generate(loaded.model, loaded.tokenizer, "vicuna_v1", [(asked, pixels)], 16) == [""]
        assert said(session, WHERE_QUESTION) == (
            f"{ANSWER_PREFIX}[the model gave an empty answer; nothing was kept: {hint}]\n"
        )
    assert session.turns == history and len(session.images) == 1
    assert session.pending_path == images[1] and session.pending_image is not None  # kept for the retry
    check_history(session)
    assert said(session, "/prompt") == (
        f"{rendered(history)}\n[image attached to your next message: {images[1]}]\n"
    )

    retry = said(session, WHERE_QUESTION)
    (answer,) = answers_in(retry)
    assert answer and session.turns[-1] == {"from": "gpt", "value": answer}
    assert session.turns[-2] == {"from": "human", "value": f"<image>\n{WHERE_QUESTION}"}
    assert session.image_paths == images[:2] and session.pending_image is None
    # As if the empty answer had never happened.
    clean = ChatSession(loaded, **options)
    for line in [*script, WHERE_QUESTION]:
        said(clean, line)
    assert session.turns == clean.turns


def test_a_session_that_only_gets_empty_answers_keeps_going(loaded, images, tmp_path):
    """Through run_chat with sampling as by default: every command still works, nothing is kept."""
    transcript = tmp_path / "empty.json"
    script = (
        f"/image {images[1]}\n{WHERE_QUESTION}\n/prompt\n{WHERE_QUESTION}\n/save {transcript}\n"
        f"/image {tmp_path}\n/reset\n/prompt\n"
    )
    output = io.StringIO()
    with answering_empty(loaded):
        session = run_chat(loaded, input_stream=io.StringIO(script), output_stream=output, history_file=None)
    text = output.getvalue()
    empty = f"{ANSWER_PREFIX}[the model gave an empty answer; nothing was kept: send it again or rephrase]\n"
    assert text.count(empty) == 2 and "Traceback" not in text and "empty]" not in text
    assert (
        f"{PROMPT}/prompt\n[no conversation yet]\n[image attached to your next message: {images[1]}]\n"
        in text
    )
    assert f"[saved 0 turns and 0 images to {transcript}]" in text
    assert json.loads(transcript.read_text())["conversations"] == []
    assert f"[cannot use image {tmp_path}: " in text
    assert text.endswith(f"{PROMPT}/prompt\n[no conversation yet]\n{PROMPT}\n")
    assert session.turns == [] and session.pending_image is None


def test_an_answer_holding_an_image_placeholder_is_not_kept(loaded, images):
    """An answer with <image> in it would stand for an image nobody attached, breaking every later turn."""
    session = ChatSession(loaded, temperature=0, max_new_tokens=3)
    said(session, f"/image {images[0]}")
    with always_saying(loaded, "<image>"):
        out = said(session, COLOR_QUESTION)
    assert out == (
        f"{ANSWER_PREFIX}<image><image><image>\n[the answer holds <image>, which would stand for an image in "
        "the history; nothing was kept: rephrase it (at temperature 0 the same message gets the same answer)]\n"
    )
    assert session.turns == [] and session.pending_path == images[0]
    assert answers_in(said(session, COLOR_QUESTION))[0] and len(session.turns) == 2
    check_history(session)


# ---- every command in every state ----------------------------------------------------------------

LIMIT = 1024  # the tiny LM's max_position_embeddings


def _fresh(session, loaded, images):
    pass


def _image_pending(session, loaded, images):
    said(session, f"/image {images[0]}")


def _one_exchange(session, loaded, images):
    said(session, f"/image {images[0]}")
    assert answers_in(said(session, COLOR_QUESTION))[0]


def _after_empty_answer(session, loaded, images):
    _one_exchange(session, loaded, images)
    said(session, f"/image {images[1]}")
    with answering_empty(loaded):
        assert "[the model gave an empty answer" in said(session, WHERE_QUESTION)


def _after_generation_error(session, loaded, images):
    _one_exchange(session, loaded, images)
    said(session, f"/image {images[1]}")
    with failing_generation(loaded):
        out = said(session, WHERE_QUESTION)
    assert out.startswith(f"{ANSWER_PREFIX}[error: RuntimeError: ") and out.endswith("; nothing was kept]\n")
    assert out.count("\n") == 1


def _too_long(session, loaded, images):
    _one_exchange(session, loaded, images)
    session.max_new_tokens = LIMIT  # no room left for any answer
    assert "[the conversation takes " in said(session, COUNT_QUESTION)


STATES: dict[str, Callable[..., None]] = {
    "fresh": _fresh,
    "image_pending": _image_pending,
    "one_exchange": _one_exchange,
    "after_empty_answer": _after_empty_answer,
    "after_generation_error": _after_generation_error,
    "too_long": _too_long,
}
COMMANDS = [
    "/prompt",
    "/image {good}",
    "/image '{good}'",
    "/image {missing}",
    "/image {corrupt}",
    "/image {folder}",
    "/image",
    "/reset",
    "/save {saved}",
    "/save {no_folder}",
    "/save",
    "/help",
    "/frobnicate",
    "{message}",
    "<image> {message}",
]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("state", list(STATES))
def test_every_command_in_every_state(loaded, images, tmp_path, state, command):
    session = ChatSession(loaded, temperature=0, max_new_tokens=16)
    STATES[state](session, loaded, images)
    check_history(session)
    before = (list(session.turns), list(session.image_paths), session.pending_path)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image")
    paths = {
        "good": images[2],
        "missing": str(tmp_path / "absent.png"),
        "corrupt": str(corrupt),
        "folder": str(tmp_path),
        "no_folder": str(tmp_path / "absent" / "chat.json"),
        "saved": str(tmp_path / "chat.json"),
    }
    line = command.format(**paths, message=COUNT_QUESTION)

    out = said(session, line)

    check_history(session)
    assert "Traceback" not in out and out.endswith("\n")
    unchanged = (list(session.turns), list(session.image_paths), session.pending_path) == before
    if command == "/prompt":
        history = rendered(session.turns) if session.turns else "[no conversation yet]"
        pending = f"[image attached to your next message: {before[2]}]\n" if before[2] else ""
        assert out == f"{history}\n{pending}" and unchanged
    elif command in ("/image {good}", "/image '{good}'"):
        assert out == f"[image attached to your next message: {images[2]}]\n"
        assert session.pending_path == images[2] and session.turns == before[0]
    elif command.startswith("/image "):
        reason = {"{missing}": "image_missing: ", "{corrupt}": "corrupt_image: ", "{folder}": ""}[
            command.split()[1]
        ]
        assert out.startswith(f"[cannot use image {line.split()[1]}: {reason}") and out.count("\n") == 1
        assert unchanged
    elif command == "/image":
        assert out == "usage: /image PATH\n" and unchanged
    elif command == "/reset":
        assert out == "[conversation cleared]\n"
        assert session.turns == session.images == session.image_paths == [] and session.pending_image is None
    elif command == "/save {saved}":
        images_saved = len(session.image_paths)
        assert out == f"[saved {len(session.turns)} turns and {images_saved} images to {paths['saved']}]\n"
        saved = json.loads(Path(paths["saved"]).read_text())
        assert saved["conversations"] == session.turns and saved["system"] == VICUNA_SYSTEM
        assert saved["images"] == ([{"turn": 0, "path": images[0]}] if session.turns else [])
        assert unchanged
    elif command == "/save {no_folder}":
        assert out.startswith(f"[cannot save to {paths['no_folder']}: FileNotFoundError: ") and unchanged
    elif command == "/save":
        assert out.startswith("usage: /save PATH") and unchanged
    elif command == "/help":
        assert out == HELP + "\n" and unchanged
    elif command == "/frobnicate":
        assert out == f"unknown command /frobnicate; {HELP}\n" and unchanged
    elif command == "<image> {message}":
        assert out == (
            f"{ANSWER_PREFIX}[<image> in a message stands for an attached image; attach one with /image PATH "
            "and leave <image> out of the text]\n"
        )
        assert unchanged
    elif state == "too_long":
        assert out.startswith(f"{ANSWER_PREFIX}[the conversation takes ") and "over the model's 1024" in out
        assert unchanged
    else:  # a message is answered and joins the history, with the image waiting for it
        (answer,) = answers_in(out)
        asked = f"<image>\n{COUNT_QUESTION}" if before[2] else COUNT_QUESTION
        assert answer and session.turns == [
            *before[0],
            {"from": "human", "value": asked},
            {"from": "gpt", "value": answer},
        ]
        assert (
            session.image_paths == before[1] + ([before[2]] if before[2] else [])
            and session.pending_path is None
        )


# ---- transcripts and the system prompt -----------------------------------------------------------


def test_save_writes_the_conversation_its_template_system_prompt_and_images(
    loaded, images, tmp_path, monkeypatch
):
    monkeypatch.setenv("HOME", str(tmp_path))
    script = f"{COLOR_QUESTION}\n/image {images[1]}\n{COUNT_QUESTION}\n/save ~/chat.json\n"
    output = io.StringIO()
    session = run_chat(
        loaded,
        image=images[0],
        input_stream=io.StringIO(script),
        output_stream=output,
        temperature=0,
        max_new_tokens=16,
        system=OWN_SYSTEM,
    )
    target = tmp_path / "chat.json"
    assert f"[saved 4 turns and 2 images to {target}]" in output.getvalue()
    first, second = answers_in(output.getvalue())
    assert json.loads(target.read_text()) == {
        "model": str(loaded.source),
        "template": "vicuna_v1",
        "system": OWN_SYSTEM,
        "conversations": [
            {"from": "human", "value": f"<image>\n{COLOR_QUESTION}"},
            {"from": "gpt", "value": first},
            {"from": "human", "value": f"<image>\n{COUNT_QUESTION}"},
            {"from": "gpt", "value": second},
        ],
        "images": [{"turn": 0, "path": images[0]}, {"turn": 2, "path": images[1]}],
        "generation": {"max_new_tokens": 16, "temperature": 0, "top_p": 1.0, "seed": None},
    }
    assert session.turns == json.loads(target.read_text())["conversations"]


@contextmanager
def prompts_seen(loaded: InferenceModel) -> Iterator[list[torch.Tensor]]:
    """The prompt embeddings the LM is given at the first step of each answer."""
    seen: list[torch.Tensor] = []

    def record(module, args, kwargs):
        if kwargs.get("inputs_embeds") is not None:
            seen.append(kwargs["inputs_embeds"].clone())

    handle = loaded.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def training_prompt_ids(loaded: InferenceModel, turns: list[dict[str, str]], system: str) -> list[int]:
    """vicuna_v1's generation prompt with ``system``, tokenized as training does (BOS, joined text)."""
    text = replace(get_template("vicuna_v1"), system=system).prompt_text(normalize_turns(turns, False))
    ids = [loaded.tokenizer.bos_token_id, *encode_text(loaded.tokenizer, text)[0]]
    image_id = loaded.tokenizer.convert_tokens_to_ids("<image>")
    return expand_images(ids, [False] * len(ids), image_id, loaded.model.image_positions)[0]


def test_the_system_prompt_is_what_the_model_sees(loaded, images):
    asked = [{"from": "human", "value": f"<image>\n{COLOR_QUESTION}"}]
    model = loaded.model
    # The reference tokenization is training's own for the template's default system prompt.
    assert training_prompt_ids(loaded, asked, VICUNA_SYSTEM) == tokenize_prompt(
        asked, "vicuna_v1", loaded.tokenizer, model.image_positions
    )
    session = ChatSession(loaded, temperature=0, max_new_tokens=16, system=OWN_SYSTEM)
    said(session, f"/image {images[0]}")
    with prompts_seen(loaded) as seen:
        said(session, COLOR_QUESTION)
        said(session, COUNT_QUESTION)
    first_prompt = training_prompt_ids(loaded, asked, OWN_SYSTEM)
    second_prompt = training_prompt_ids(loaded, [*session.turns[:2], session.turns[2]], OWN_SYSTEM)
    with torch.inference_mode():
        pixels = torch.stack(session.images)
        for prompt, embeds in zip([first_prompt, second_prompt], seen, strict=True):
            assert torch.equal(embeds, model.embed_inputs(torch.tensor([prompt]), pixels))
    assert session.rendered_history() == rendered(session.turns, OWN_SYSTEM)
    assert session.rendered_history().startswith(f"{OWN_SYSTEM} USER: <image>\n{COLOR_QUESTION} ASSISTANT: ")
    assert len(first_prompt) != len(training_prompt_ids(loaded, asked, VICUNA_SYSTEM))


def test_the_templates_own_system_prompt_given_as_system_changes_nothing(loaded, images):
    sessions = [
        ChatSession(loaded, temperature=0, max_new_tokens=16, system=system)
        for system in (None, VICUNA_SYSTEM)
    ]
    seen = []
    for session in sessions:
        with prompts_seen(loaded) as prompts:
            for line in [f"/image {images[1]}", COLOR_QUESTION, COUNT_QUESTION]:
                said(session, line)
        seen.append(prompts)
    default, explicit = sessions
    assert default.turns == explicit.turns and default.rendered_history() == explicit.rendered_history()
    assert all(torch.equal(a, b) for a, b in zip(*seen, strict=True)) and len(seen[0]) == 2


# ---- chat_main -----------------------------------------------------------------------------------


def test_chat_main_reads_stdin_and_takes_a_system_prompt(trained_model_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{COLOR_QUESTION}\n/prompt\n/quit\n"))
    argv = ["--model", str(trained_model_dir), "--temperature", "0", "--max-new-tokens", "8"]
    assert chat_main([*argv, "--system", OWN_SYSTEM]) == 0
    out = capsys.readouterr().out
    assert len(answers_in(out)) == 1 and f"\n{OWN_SYSTEM} USER: {COLOR_QUESTION} ASSISTANT: " in out


def test_chat_main_with_a_bad_model_exits_2(trained_model_dir, capsys):
    assert chat_main(["--model", str(trained_model_dir.parent / "nothing")]) == 2
    assert "is neither a llava-ray model folder" in capsys.readouterr().err
    assert chat_main(["--model", str(trained_model_dir), "--template", "plain", "--system", "Hi"]) == 2
    assert "template 'plain' renders no system prompt" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--temperature", "-1"], "--temperature -1.0: give 0 (greedy) or more"),
        (["--top-p", "0"], "--top-p 0.0: give a value in (0, 1]"),
        (["--max-new-tokens", "0"], "--max-new-tokens 0: give at least 1"),
    ],
)
def test_chat_main_rejects_bad_options_before_loading(option, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        chat_main(["--model", "/nowhere", *option])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


# ---- terminal input ------------------------------------------------------------------------------


def _read_until(fd: int, wanted: str, seen: bytearray, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while wanted.encode() not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {wanted!r} in the chat's output: {seen.decode(errors='replace')!r}"
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the chat ended and closed the terminal
                break
            if not chunk:
                break
            seen.extend(chunk)
    return seen.decode(errors="replace")


def test_a_terminal_gets_line_editing_and_a_history_file(trained_model_dir, images, tmp_path):
    """On a real pseudo-terminal: the up arrow recalls the last session's line, left arrows edit."""
    history = tmp_path / ".llava_ray_chat_history"
    history.write_text(f"/image {images[0]}\n")
    controller, terminal = pty.openpty()
    env = {**os.environ, "HOME": str(tmp_path), "TERM": "xterm"}
    chat = subprocess.Popen(
        [sys.executable, "-m", "llava_ray.evaluation.chat", "--model", str(trained_model_dir)],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env=env,
        cwd=tmp_path,
    )
    os.close(terminal)
    seen = bytearray()
    try:
        _read_until(controller, PROMPT, seen, timeout=120)
        os.write(controller, b"\x1b[A\r")  # up arrow, enter: the line from the history file
        _read_until(controller, "[image attached to your next message", seen, timeout=30)
        # "/save b.json", six left arrows (to before "b"), "c", enter: saves cb.json
        os.write(controller, b"/save b.json" + b"\x1b[D" * 6 + b"c\r")
        _read_until(controller, "[saved 0 turns", seen, timeout=30)
        os.write(controller, b"/quit\r")
        assert chat.wait(timeout=30) == 0
    finally:
        if chat.poll() is None:
            chat.kill()
        os.close(controller)
    assert (tmp_path / "cb.json").is_file(), seen.decode(errors="replace")
    assert history.read_text().splitlines()[-2:] == ["/save cb.json", "/quit"]


# ---- streaming -----------------------------------------------------------------------------------


def test_the_streamer_writes_token_by_token_and_stops_at_the_marker(loaded):
    tokenizer = loaded.tokenizer
    ids = tokenizer.encode(" A red square on grey.</s>", add_special_tokens=False)
    writes: list[str] = []
    streamer = AnswerStreamer(tokenizer, ["</s>"], writes.append)
    streamer.put(torch.zeros((1, 0), dtype=torch.long))  # the prompt, which generate() passes first
    for token in ids:
        streamer.put(torch.tensor([token]))
    streamer.end()
    assert "".join(writes) == "A red square on grey."
    assert len(writes) >= 5  # one piece per word-ish token, not one block at the end


@pytest.mark.parametrize(
    ("text", "final", "shown"),
    [
        (" red", False, "red"),
        (" red</", False, "red"),  # may be the start of </s>: held back
        (" red</", True, "red</"),
        (" red</s>more", False, "red"),
        (" red\ufffd", False, "red"),  # half a character
        (" a < b", False, "a < b"),
    ],
)
def test_visible_answer(text, final, shown):
    assert visible_answer(text, ["</s>"], final) == shown
