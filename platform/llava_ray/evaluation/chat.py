"""``llava-ray chat --model DIR [--image PATH] [--system TEXT]``: talk to a trained model in the terminal.

The answer streams token by token. The conversation is kept as LLaVA turns and rendered with the
template stored with the model (``vicuna_v1``, ``chatml``, ...) exactly as in training, so every
turn sees the whole history; ``--system TEXT`` puts TEXT where the template has its system prompt.
Run it as ``llava-ray chat --model RUN/final --image photo.jpg`` or
``python -m llava_ray.evaluation.chat --model RUN/final``. Commands, typed instead of a message:

    /image PATH   attach an image to your next message (as <image> at its start)
    /prompt       show the conversation as the model sees it (rendered with its template)
    /save PATH    write the conversation as JSON: template, system prompt, LLaVA turns, images
    /reset        forget the conversation and its images
    /help         list the commands
    /quit         leave (so does end of input, Ctrl-D)

Only complete exchanges join the conversation: an answer that comes out empty, fails or is stopped
with Ctrl-C is reported in one ``[...]`` line and dropped, and the message can be sent again (an
image attached to it stays attached). No command ends the chat with a traceback; ``llava-ray
--verbose chat`` logs it. On a terminal, lines are edited with the readline module (arrow keys,
Ctrl-R) and earlier ones recalled from ``~/.llava_ray_chat_history``; piped input is read as is.

Images go through the same preprocessing as training (pad to a square in the tower's mean colour,
resize, the tower's normalisation; :func:`llava_ray.evaluation.loaded_model.load_pixels`). LLaVA is trained with one image at
the start of a conversation; later images work but are outside what it was trained on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import torch
from transformers import PreTrainedTokenizerBase
from transformers.generation.streamers import BaseStreamer

from llava_ray.conversation.templates import Template, Turn, get_template, normalize_turns
from llava_ray.conversation.tokenizer import IMAGE_TOKEN
from llava_ray.data.images import Aspect
from llava_ray.evaluation.loaded_model import InferenceModel, load_inference_model, load_pixels
from llava_ray.model.generate import end_markers, generate, prompt_input_ids, visible_answer
from llava_ray.utils.skips import Skipped

logger = logging.getLogger(__name__)

PROMPT = "USER> "
ANSWER_PREFIX = "ASSISTANT> "
HELP = "/image PATH attaches an image to your next message; /prompt, /save PATH, /reset, /help, /quit."
HISTORY_FILE = "~/.llava_ray_chat_history"
HISTORY_LENGTH = 1000


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


def check_system(template_name: str, system: str | None) -> None:
    """Raise ValueError when ``template_name`` renders no system prompt to replace with ``system``."""
    if system is not None and template_name != "tokenizer" and get_template(template_name).caption_only:
        raise ValueError(
            f"--system {system!r}: template {template_name!r} renders no system prompt (stage 1 trains on "
            "captions alone); leave out --system, or chat with a stage-2 model"
        )


class ChatSession:
    """A multi-turn conversation with one model: LLaVA turns plus one pixel tensor per ``<image>``.

    The history only ever holds complete exchanges (a question and a non-empty answer), so it
    always renders; a failed :meth:`ask` leaves it, and any pending image, as it was.
    """

    def __init__(
        self,
        loaded: InferenceModel,
        max_new_tokens: int = 512,
        temperature: float = 0.2,
        top_p: float = 1.0,
        seed: int | None = None,
        image_aspect: Aspect = "pad",
        system: str | None = None,
    ):
        check_system(loaded.template, system)
        self.loaded = loaded
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.image_aspect = image_aspect
        self.system = system  # None: the template's own system prompt
        self.turns: list[dict[str, str]] = []
        self.images: list[torch.Tensor] = []
        self.image_paths: list[str] = []
        self.pending_image: torch.Tensor | None = None
        self.pending_path: str | None = None

    @property
    def system_prompt(self) -> str | None:
        """The system prompt the model sees (None: whatever the tokenizer's chat template puts there)."""
        if self.system is not None or self.loaded.template == "tokenizer":
            return self.system
        return get_template(self.loaded.template).system

    def attach_image(self, path: str) -> None:
        """The image goes with the next message; raises Skipped when it cannot be used."""
        location = path if "://" in path else os.path.abspath(os.path.expanduser(path))
        self.pending_image = load_pixels(location, self.loaded.tower_input, self.image_aspect)
        self.pending_path = location

    def reset(self) -> None:
        self.turns, self.images, self.image_paths = [], [], []
        self.pending_image, self.pending_path = None, None

    def ask(self, text: str, write: Callable[[str], None]) -> str:
        """Answer ``text`` given the history, streaming through ``write``; the exchange joins the history.

        Raises Skipped, the session unchanged, when the message types ``<image>`` itself
        (``image_placeholder``), the conversation no longer fits the model (``prompt_too_long``) or
        the answer cannot join the history (``empty_answer``, ``image_in_answer``). An error inside
        generation propagates and also leaves the session unchanged.
        """
        if IMAGE_TOKEN in text:
            raise Skipped(
                "image_placeholder",
                f"{IMAGE_TOKEN} in a message stands for an attached image; attach one with /image PATH "
                f"and leave {IMAGE_TOKEN} out of the text",
            )
        value = f"{IMAGE_TOKEN}\n{text}" if self.pending_image is not None else text
        conversation = [*self.turns, {"from": "human", "value": value}]
        images = [*self.images, *([self.pending_image] if self.pending_image is not None else [])]
        prompt = self.prompt_ids(conversation)
        limit = self.loaded.max_positions
        if limit is not None and len(prompt) + self.max_new_tokens > limit:
            raise Skipped(
                "prompt_too_long",
                f"the conversation takes {len(prompt)} positions + {self.max_new_tokens} for the answer, over "
                f"the model's {limit}; /save PATH keeps it, /reset starts over",
            )
        model, tokenizer, template = self.loaded.model, self.loaded.tokenizer, self.loaded.template
        streamer = AnswerStreamer(tokenizer, end_markers(template, tokenizer), write)
        pixels = torch.stack(images) if images else None
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
            system=self.system,
            streamer=streamer,
        )
        if not answer.strip():
            raise Skipped(
                "empty_answer", f"the model gave an empty answer; nothing was kept: {self._retry()}"
            )
        if IMAGE_TOKEN in answer:
            raise Skipped(
                "image_in_answer",
                f"the answer holds {IMAGE_TOKEN}, which would stand for an image in the history; nothing "
                f"was kept: {self._retry()}",
            )
        self.turns = [*conversation, {"from": "gpt", "value": answer}]
        self.images = images
        self.image_paths = [*self.image_paths, *([self.pending_path] if self.pending_path else [])]
        self.pending_image, self.pending_path = None, None
        return answer

    def _retry(self) -> str:
        if self.temperature <= 0:
            return "rephrase it (at temperature 0 the same message gets the same answer)"
        if self.seed is not None:
            return f"rephrase it (with seed {self.seed} the same message gets the same answer)"
        return "send it again or rephrase"

    def prompt_ids(self, conversation: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of the generation prompt for ``conversation`` (ending with the user's), images expanded."""
        loaded, model = self.loaded, self.loaded.model
        return prompt_input_ids(
            conversation,
            loaded.template,
            loaded.tokenizer,
            model.image_positions,
            model.tokenization,
            system=self.system,
        )

    def rendered_history(self) -> str:
        """The conversation so far as the model's template renders it in training ("" when empty)."""
        if not self.turns:
            return ""
        turns = normalize_turns(self.turns)
        if self.loaded.template == "tokenizer":
            return str(self.loaded.tokenizer.apply_chat_template(self._messages(turns), tokenize=False))
        return "".join(span.text for span in self._template().render(turns))

    def _template(self) -> Template:
        return get_template(self.loaded.template, self.system)

    def _messages(self, turns: Sequence[Turn]) -> list[dict[str, str]]:
        """Chat-template messages; a system message, when given, replaces the template's default."""
        system = [] if self.system is None else [{"role": "system", "content": self.system}]
        return [*system, *({"role": turn.role, "content": turn.text} for turn in turns)]

    def transcript(self) -> dict[str, Any]:
        """What ``/save`` writes: the conversation as LLaVA turns, with its template, system prompt and images.

        ``images`` lists, in order, each image's path and the index in ``conversations`` of the
        message it was attached to.
        """
        image_turns = [index for index, turn in enumerate(self.turns) if IMAGE_TOKEN in turn["value"]]
        return {
            "model": self.loaded.source,
            "template": self.loaded.template,
            "system": self.system_prompt,
            "conversations": [dict(turn) for turn in self.turns],
            "images": [
                {"turn": turn, "path": path} for turn, path in zip(image_turns, self.image_paths, strict=True)
            ],
            "generation": {
                "max_new_tokens": self.max_new_tokens,
                "temperature": self.temperature,
                "top_p": self.top_p,
                "seed": self.seed,
            },
        }

    def save(self, path: str) -> Path:
        """Write :meth:`transcript` as JSON to ``path``; returns the absolute path written."""
        target = Path(os.path.abspath(os.path.expanduser(path)))
        target.write_text(
            json.dumps(self.transcript(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        return target


def run_chat(
    model_dir: str | InferenceModel,
    image: str | None = None,
    input_stream: TextIO | None = None,
    output_stream: TextIO | None = None,
    history_file: str | None = HISTORY_FILE,
    **session_options: Any,
) -> ChatSession:
    """The interactive loop (commands in the module docstring); returns the session when it ends.

    Streams default to ``sys.stdin`` / ``sys.stdout``; on a terminal lines are read with readline
    and recalled from ``history_file`` (None: no file). ``session_options`` go to
    :class:`ChatSession` (max_new_tokens, temperature, top_p, seed, image_aspect, system).
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
    terminal = input_stream is sys.stdin and output_stream is sys.stdout and input_stream.isatty()
    lines = _terminal_lines(history_file, write) if terminal else _piped_lines(input_stream, write)
    with lines as read_line:
        while (line := read_line()) is not None and handle_line(session, line, write):
            pass
    return session


def handle_line(session: ChatSession, line: str, write: Callable[[str], None]) -> bool:
    """Act on one line of input, a command or a message; False when the user leaves.

    Nothing raised here reaches the user: a failure is one ``[...]`` line and the session stays usable.
    """
    text = line.strip()
    if not text:
        return True
    command, _, argument = text.partition(" ")
    argument = _unquote(argument.strip())
    if command in ("/quit", "/exit"):
        return False
    try:
        if not command.startswith("/") or command == "/":
            _answer(session, text, write)
        elif command == "/reset":
            session.reset()
            write("[conversation cleared]\n")
        elif command == "/image":
            _attach(session, argument, write)
        elif command == "/prompt":
            write((session.rendered_history() or "[no conversation yet]") + "\n")
            if session.pending_path is not None:
                write(f"[image attached to your next message: {session.pending_path}]\n")
        elif command == "/save":
            _save(session, argument, write)
        elif command == "/help":
            write(HELP + "\n")
        else:
            write(f"unknown command {command}; {HELP}\n")
    except KeyboardInterrupt:
        write("\n[interrupted]\n")
    except Exception as error:
        logger.debug("chat: %r failed", text, exc_info=True)
        write(f"[error: {_describe(error)}]\n")
    return True


def _answer(session: ChatSession, text: str, write: Callable[[str], None]) -> None:
    streamed: list[str] = []

    def show(piece: str) -> None:
        streamed.append(piece)
        write(piece)

    write(ANSWER_PREFIX)
    try:
        session.ask(text, show)
    except Skipped as error:
        problem = str(error)
    except KeyboardInterrupt:
        problem = "interrupted; nothing was kept"
    except Exception as error:
        logger.debug("chat: answering %r failed", text, exc_info=True)
        problem = f"error: {_describe(error)}; nothing was kept"
    else:
        write("\n")
        return
    write(("\n" if streamed else "") + f"[{problem}]\n")


def _attach(session: ChatSession, path: str, write: Callable[[str], None]) -> None:
    if not path:
        write("usage: /image PATH\n")
        return
    try:
        session.attach_image(path)
    except Skipped as error:
        write(f"[cannot use image {path}: {error.reason}: {error}]\n")
        return
    except Exception as error:  # a folder, an unreadable file, a remote store refusing, ...
        logger.debug("chat: loading image %s failed", path, exc_info=True)
        write(f"[cannot use image {path}: {_describe(error)}]\n")
        return
    write(f"[image attached to your next message: {path}]\n")


def _save(session: ChatSession, path: str, write: Callable[[str], None]) -> None:
    if not path:
        write("usage: /save PATH (the conversation as JSON)\n")
        return
    try:
        target = session.save(path)
    except OSError as error:
        write(f"[cannot save to {path}: {_describe(error)}]\n")
        return
    write(f"[saved {len(session.turns)} turns and {len(session.image_paths)} images to {target}]\n")


def _unquote(argument: str) -> str:
    """A path as typed, without the quotes a terminal's drag and drop may put around it."""
    if len(argument) >= 2 and argument[0] == argument[-1] and argument[0] in "'\"":
        return argument[1:-1]
    return argument


def _describe(error: BaseException) -> str:
    """One line for the user: our own (ValueError) messages as they are, others with their type."""
    text = " ".join(str(error).split()) or "no message"
    return text if isinstance(error, ValueError) else f"{type(error).__name__}: {text}"


@contextmanager
def _piped_lines(input_stream: TextIO, write: Callable[[str], None]) -> Iterator[Callable[[], str | None]]:
    """Lines read as they come (None at end of input), each echoed after the prompt when no terminal does."""

    def read_line() -> str | None:
        write(PROMPT)
        line = input_stream.readline()
        if not line:  # end of input
            write("\n")
            return None
        if not input_stream.isatty():  # piped input is not echoed by a terminal: keep a readable transcript
            write(line if line.endswith("\n") else line + "\n")
        return line

    yield read_line


@contextmanager
def _terminal_lines(
    history_file: str | None, write: Callable[[str], None]
) -> Iterator[Callable[[], str | None]]:
    """Lines typed at a terminal through ``input()`` with readline editing; the history file is
    read at the start and written at the end, any failure to do either ignored."""
    try:
        # Imported only here: importing readline is what gives input() line editing, and on some
        # terminals it writes control codes, which piped output should never get.
        import readline
    except ImportError:  # a Python built without readline (Windows): input() still reads lines
        readline = None
    history = os.path.expanduser(history_file) if history_file and readline is not None else None
    if history is not None:
        readline.set_history_length(HISTORY_LENGTH)
        with contextlib.suppress(OSError):
            readline.read_history_file(history)

    def read_line() -> str | None:
        try:
            return input(PROMPT)
        except EOFError:
            write("\n")
            return None
        except KeyboardInterrupt:  # Ctrl-C at the prompt drops the line typed so far, as a shell does
            write("\n")
            return ""

    try:
        yield read_line
    finally:
        if history is not None:
            with contextlib.suppress(OSError):
                readline.write_history_file(history)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def chat_main(argv: Sequence[str] | None = None) -> int:
    """``llava-ray chat`` / ``python -m llava_ray.evaluation.chat`` arguments -> :func:`run_chat`."""
    # Plain text for the terminal: the docstring's in-chat commands, none of its reST markup.
    commands = [line.strip() for line in __doc__.splitlines() if line.startswith("    /")]
    parser = argparse.ArgumentParser(
        prog="llava-ray chat",
        description="Talk to a trained model in the terminal; its answers stream token by token. Each turn\n"
        "sees the whole conversation, rendered with the model's own template as in training.",
        epilog="commands, typed instead of a message:\n"
        + "\n".join(f"  {command}" for command in commands)
        + "\n\nexamples:\n"
        "  llava-ray chat --model llava_ray_runs/tiny-finetune/final --image data/synthetic/images/eval_000000.png\n"
        "  echo 'What colour is the shape?' | llava-ray chat --model final/hf --image photo.png --temperature 0",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", required=True, help="llava-ray or Hugging Face LLaVA model folder, or s3:// URL"
    )
    parser.add_argument("--image", help="an image to ask about (attached to the first message)")
    parser.add_argument("--template", help="conversation template (default: the one stored with the model)")
    parser.add_argument(
        "--system", help="the conversation's system prompt (default: the template's, as in training)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=512, help="longest answer (default 512)")
    parser.add_argument("--temperature", type=float, default=0.2, help="0 for greedy (default 0.2, as LLaVA)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed")
    args = parser.parse_args(argv)
    problems = []
    if args.max_new_tokens < 1:
        problems.append(f"--max-new-tokens {args.max_new_tokens}: give at least 1")
    if args.temperature < 0:
        problems.append(f"--temperature {args.temperature}: give 0 (greedy) or more")
    if not 0 < args.top_p <= 1:
        problems.append(f"--top-p {args.top_p}: give a value in (0, 1]")
    if problems:
        parser.error("; ".join(problems))
    try:
        loaded = load_inference_model(args.model, args.template, device=_device())
        check_system(loaded.template, args.system)
    except Exception as error:  # no model, no tokenizer, unknown template, unreadable weights, ...
        logger.debug("chat: loading %s failed", args.model, exc_info=True)
        print(f"error: {_describe(error)}", file=sys.stderr)
        return 2
    run_chat(
        loaded,
        image=args.image,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        system=args.system,
    )
    return 0


if __name__ == "__main__":
    sys.exit(chat_main())
