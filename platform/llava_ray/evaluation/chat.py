"""``llava-ray chat --model DIR [--image PATH]``: talk to a trained model in the terminal.

The answer streams token by token. The conversation is kept as LLaVA turns and rendered with the
template stored with the model (``vicuna_v1``, ``chatml``, ...) exactly as in training, so every
turn sees the whole history. Run it as ``llava-ray chat --model RUN/final --image photo.jpg`` or
``python -m llava_ray.evaluation.chat --model RUN/final``. Commands, typed instead of a message:

    /image PATH   attach an image to your next message (as <image> at its start)
    /reset        forget the conversation and its images
    /prompt       show the conversation as the model sees it (rendered with its template)
    /quit         leave (so does end of input, Ctrl-D)

Images go through the same preprocessing as training (pad to a square in the tower's mean colour,
resize, the tower's normalisation; :func:`llava_ray.evaluation.loaded_model.load_pixels`). LLaVA is trained with one image at
the start of a conversation; later images work but are outside what it was trained on.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TextIO

import torch
from transformers import PreTrainedTokenizerBase
from transformers.generation.streamers import BaseStreamer

from llava_ray.conversation.templates import get_template, normalize_turns
from llava_ray.conversation.tokenizer import IMAGE_TOKEN
from llava_ray.data.images import Aspect
from llava_ray.evaluation.loaded_model import InferenceModel, load_inference_model, load_pixels
from llava_ray.model.generate import end_markers, generate
from llava_ray.utils.skips import Skipped

PROMPT = "USER> "
ANSWER_PREFIX = "ASSISTANT> "
HELP = "/image PATH attaches an image to your next message; /reset, /prompt, /quit."


class AnswerStreamer(BaseStreamer):
    """Writes an answer as it is generated, up to the template's end marker (never the marker itself).

    Text that may be the beginning of a marker (``</`` of ``</s>``) or half of a multi-byte
    character is held back until the next token shows what it is.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, markers: Sequence[str], write: Callable[[str], None]
    ):
        self.tokenizer = tokenizer
        self.markers = list(markers)
        self.write = write
        self.ids: list[int] = []
        self.shown = 0
        self.prompt_skipped = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_skipped:  # generate() first hands over the prompt (empty: it is embeddings)
            self.prompt_skipped = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        self._show(final=False)

    def end(self) -> None:
        self._show(final=True)

    def _show(self, final: bool) -> None:
        visible = visible_answer(
            self.tokenizer.decode(self.ids, skip_special_tokens=False), self.markers, final
        )
        if len(visible) > self.shown:
            self.write(visible[self.shown :])
            self.shown = len(visible)


def visible_answer(text: str, markers: Sequence[str], final: bool) -> str:
    """The part of generated ``text`` that can be shown: before any marker, minus an unsure tail."""
    ends = [text.find(marker) for marker in markers if marker in text]
    if ends:
        text = text[: min(ends)]
    elif not final:
        hold = max(
            (k for marker in markers for k in range(1, len(marker)) if text.endswith(marker[:k])), default=0
        )
        text = text[: len(text) - hold].rstrip("\ufffd")
    return text.lstrip()


@contextmanager
def streaming_into(model: InferenceModel, streamer: BaseStreamer) -> Iterator[None]:
    """Pass ``streamer`` to the LM's ``generate`` for the calls made inside the block.

    :func:`llava_ray.model.llava.generate` takes no streamer; wrapping the LM's method for one
    answer keeps the chat on exactly the same generation code as evaluation.
    """
    language_model = model.model.language_model
    language_model.generate = functools.partial(language_model.generate, streamer=streamer)
    try:
        yield
    finally:
        del language_model.generate


class ChatSession:
    """A multi-turn conversation with one model: LLaVA turns plus one pixel tensor per ``<image>``."""

    def __init__(
        self,
        loaded: InferenceModel,
        max_new_tokens: int = 512,
        temperature: float = 0.2,
        top_p: float = 1.0,
        seed: int | None = None,
        image_aspect: Aspect = "pad",
    ):
        self.loaded = loaded
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.image_aspect = image_aspect
        self.turns: list[dict[str, str]] = []
        self.images: list[torch.Tensor] = []
        self.pending_image: torch.Tensor | None = None

    def attach_image(self, path: str) -> None:
        """The image goes with the next message; raises Skipped when it cannot be used."""
        self.pending_image = load_pixels(path, self.loaded.tower_input, self.image_aspect)

    def reset(self) -> None:
        self.turns, self.images, self.pending_image = [], [], None

    def ask(self, text: str, write: Callable[[str], None]) -> str:
        """Answer ``text`` given the history, streaming through ``write``; the turn joins the history.

        Raises Skipped (``prompt_too_long``) when the conversation no longer fits the model.
        """
        value = f"{IMAGE_TOKEN}\n{text}" if self.pending_image is not None else text
        conversation = [*self.turns, {"from": "human", "value": value}]
        images = [*self.images, *([self.pending_image] if self.pending_image is not None else [])]
        length, limit = self.loaded.prompt_length(conversation), self.loaded.max_positions
        if limit is not None and length + self.max_new_tokens > limit:
            raise Skipped(
                "prompt_too_long",
                f"the conversation takes {length} positions + {self.max_new_tokens} for the answer, over the "
                f"model's {limit}; /reset to start over",
            )
        model, tokenizer, template = self.loaded.model, self.loaded.tokenizer, self.loaded.template
        streamer = AnswerStreamer(tokenizer, end_markers(template, tokenizer), write)
        pixels = torch.stack(images) if images else None
        with streaming_into(self.loaded, streamer):
            (answer,) = generate(
                model,
                tokenizer,
                template,
                [(conversation, pixels)],
                max_new_tokens=self.max_new_tokens,
                do_sample=self.temperature > 0,
                temperature=self.temperature or 1.0,
                top_p=self.top_p,
                seed=self.seed,
            )
        self.turns = [*conversation, {"from": "gpt", "value": answer}]
        self.images, self.pending_image = images, None
        return answer

    def rendered_history(self) -> str:
        """The conversation so far as the model's template renders it in training."""
        if not self.turns:
            return ""
        turns = normalize_turns(self.turns)
        if self.loaded.template == "tokenizer":
            messages = [{"role": turn.role, "content": turn.text} for turn in turns]
            return str(self.loaded.tokenizer.apply_chat_template(messages, tokenize=False))
        return "".join(span.text for span in get_template(self.loaded.template).render(turns))


def run_chat(
    model_dir: str | InferenceModel,
    image: str | None = None,
    input_stream: TextIO | None = None,
    output_stream: TextIO | None = None,
    **session_options: Any,
) -> ChatSession:
    """The interactive loop (commands in the module docstring); returns the session when it ends.

    Streams default to ``sys.stdin`` / ``sys.stdout``. ``session_options`` go to
    :class:`ChatSession` (max_new_tokens, temperature, top_p, seed, image_aspect).
    """
    input_stream = sys.stdin if input_stream is None else input_stream
    output_stream = sys.stdout if output_stream is None else output_stream

    def write(text: str) -> None:
        output_stream.write(text)
        output_stream.flush()

    loaded = (
        model_dir
        if isinstance(model_dir, InferenceModel)
        else load_inference_model(model_dir, device=_device())
    )
    session = ChatSession(loaded, **session_options)
    write(f"llava-ray chat with {loaded.source} (template {loaded.template}). {HELP}\n")
    if image is not None:
        _attach(session, image, write)
    while True:
        write(PROMPT)
        line = input_stream.readline()
        if not line:  # end of input
            write("\n")
            break
        if not input_stream.isatty():  # piped input is not echoed by a terminal: keep a readable transcript
            write(line if line.endswith("\n") else line + "\n")
        text = line.strip()
        if not text:
            continue
        command, _, argument = text.partition(" ")
        if command in ("/quit", "/exit"):
            break
        if command == "/reset":
            session.reset()
            write("[conversation cleared]\n")
        elif command == "/image":
            _attach(session, argument.strip(), write)
        elif command == "/prompt":
            write(session.rendered_history() + "\n")
        elif command.startswith("/") and command != "/":
            write(f"unknown command {command}; {HELP}\n")
        else:
            write(ANSWER_PREFIX)
            try:
                session.ask(text, write)
            except Skipped as error:
                write(f"[{error}]")
            write("\n")
    return session


def _attach(session: ChatSession, path: str, write: Callable[[str], None]) -> None:
    if not path:
        write("usage: /image PATH\n")
        return
    try:
        session.attach_image(path)
    except Skipped as error:
        write(f"[cannot use image {path}: {error.reason}: {error}]\n")
        return
    write(f"[image attached to your next message: {path}]\n")


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def chat_main(argv: Sequence[str] | None = None) -> int:
    """``llava-ray chat`` / ``python -m llava_ray.evaluation.chat`` arguments -> :func:`run_chat`."""
    parser = argparse.ArgumentParser(prog="llava-ray chat", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", required=True, help="llava-ray or Hugging Face LLaVA model folder, or s3:// URL"
    )
    parser.add_argument("--image", help="an image to ask about (attached to the first message)")
    parser.add_argument("--template", help="conversation template (default: the one stored with the model)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="longest answer (default 512)")
    parser.add_argument("--temperature", type=float, default=0.2, help="0 for greedy (default 0.2, as LLaVA)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed")
    args = parser.parse_args(argv)
    try:
        loaded = load_inference_model(args.model, args.template, device=_device())
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    run_chat(
        loaded,
        image=args.image,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    return 0


if __name__ == "__main__":
    sys.exit(chat_main())
