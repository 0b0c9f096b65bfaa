"""The terminal chat: scripted sessions through run_chat and chat_main, streaming, commands, history."""

from __future__ import annotations

import io
import sys

import pytest
import torch

from llava_ray.conversation.templates import VICUNA_SYSTEM, get_template, normalize_turns
from llava_ray.evaluation.chat import (
    ANSWER_PREFIX,
    PROMPT,
    AnswerStreamer,
    chat_main,
    run_chat,
    visible_answer,
)
from llava_ray.evaluation.loaded_model import load_inference_model
from llava_ray.model.generate import generate

# One line each (a message is one line of input); training put a newline before the instruction.
COLOR_QUESTION = "What color is the shape? Answer the question using a single word or phrase."
COUNT_QUESTION = "How many shapes are there? Answer the question using a single word or phrase."


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


def answers_in(output: str) -> list[str]:
    return [
        line.removeprefix(ANSWER_PREFIX) for line in output.splitlines() if line.startswith(ANSWER_PREFIX)
    ]


def test_two_turns_with_images_stream_and_render_with_the_models_template(loaded, synthetic_eval_dir):
    first_image = str(synthetic_eval_dir / "images" / "eval_000000.png")
    second_image = str(synthetic_eval_dir / "images" / "eval_000001.png")
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
    rendered = "".join(span.text for span in get_template("vicuna_v1").render(normalize_turns(session.turns)))
    assert session.rendered_history() == rendered
    assert rendered == (
        f"{VICUNA_SYSTEM} USER: {asked[0]} ASSISTANT: {first}</s>USER: {asked[1]} ASSISTANT: {second}</s>"
    )
    assert rendered in text  # /prompt showed it
    assert "never read" not in text and text.endswith(PROMPT + "/quit\n")


def test_the_second_turn_sees_the_first(loaded, synthetic_eval_dir):
    """The chat's answer to turn 2 is what generate() gives for the whole two-turn conversation."""
    image = str(synthetic_eval_dir / "images" / "eval_000002.png")
    script = f"{COLOR_QUESTION}\n{COUNT_QUESTION}\n"
    session = run_chat(
        loaded, image=image, input_stream=io.StringIO(script), output_stream=io.StringIO(), temperature=0
    )
    assert len(session.turns) == 4 and len(session.images) == 1
    expected = generate(
        loaded.model, loaded.tokenizer, "vicuna_v1", [(session.turns[:3], session.images[0])], 512
    )
    assert session.turns[3]["value"] == expected[0]


def test_reset_bad_images_and_unknown_commands(loaded, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    script = (
        f"Hello?\n/reset\n/image {broken}\n/image {tmp_path / 'absent.png'}\n/image\n/frobnicate\n/prompt\n"
    )
    output = io.StringIO()
    session = run_chat(loaded, input_stream=io.StringIO(script), output_stream=output, temperature=0)
    text = output.getvalue()
    assert "[conversation cleared]" in text and session.turns == [] and session.pending_image is None
    assert f"[cannot use image {broken}: corrupt_image:" in text
    assert "absent.png: image_missing:" in text
    assert "usage: /image PATH" in text and "unknown command /frobnicate" in text
    assert text.endswith(f"{PROMPT}/prompt\n\n{PROMPT}\n")  # /prompt of an empty history, then end of input


def test_chat_main_reads_stdin(trained_model_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is 2 plus 3?\n/quit\n"))
    assert chat_main(["--model", str(trained_model_dir), "--temperature", "0", "--max-new-tokens", "8"]) == 0
    assert len(answers_in(capsys.readouterr().out)) == 1
    assert chat_main(["--model", str(trained_model_dir.parent / "nothing")]) == 2
    assert "is neither a llava-ray model folder" in capsys.readouterr().err


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
