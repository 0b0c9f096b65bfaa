"""Shared test set-up: nothing downloads, everything runs on the CPU."""

import contextlib
import json
import os
import threading

# Tests build tiny models from configs and a tokenizer shipped in the package; any hub access is a bug.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads, and on 2 cores shared with Ray workers spinning
# OpenMP threads make a step 20-50x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Ray starts its workers at niceness 15: beside any other work on the machine (CI shares its machine)
# they starve while the test waits on them, at load 8 18x slower. Every Ray the suite starts, itself
# or through a command, a job or a scenario it runs, inherits this (as the CLI's own Ray does).
os.environ.setdefault("RAY_worker_niceness", "0")

import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import ray
import torch
import torch.distributed as dist

from llava_ray.config.model_sources import tower_input
from llava_ray.config.schema import ModelConfig
from llava_ray.conversation.templates import IGNORE_INDEX, tokenize_conversation
from llava_ray.conversation.tokenizer import load_tokenizer
from llava_ray.data.synthetic import generate
from llava_ray.evaluation.loaded_model import load_pixels
from llava_ray.model.build import build_llava_model
from llava_ray.training.trainable import set_trainable

torch.set_num_threads(1)

# Every process this test session starts, Ray's included, inherits this mark (xdist workers share
# the main process's): it tells this session's orphaned Ray workers from anyone else's.
SESSION_MARK = "LLAVA_RAY_TEST_SESSION"
os.environ.setdefault(SESSION_MARK, uuid.uuid4().hex)


def _process_environment(pid: str) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone, or not ours to read
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _comm_and_state(pid: str) -> tuple[str, str]:
    """A process's command name and state letter (``Z`` for a zombie); empty when it is gone."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "", ""
    return comm, state


def orphaned_ray_workers(mark: str) -> list[int]:
    """Pids of Ray worker processes started under the test session ``mark`` whose raylet is gone.

    Ray starts each worker with ``RAY_RAYLET_PID`` in its environment. A worker whose cluster has
    stopped should have exited with it, but Ray 2.60's core worker can deadlock in its own exit
    (``~CoreWorkerProcessImpl`` destroying its io context, see docs/reliability.md); such a process
    outlives its cluster, asleep, holding its memory, and nothing else will ever stop it."""
    orphans = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or entry.name == str(os.getpid()):
            continue
        environment = _process_environment(entry.name)
        raylet = environment.get("RAY_RAYLET_PID")
        if environment.get(SESSION_MARK) != mark or not raylet or _comm_and_state(raylet)[0] == "raylet":
            continue
        if _comm_and_state(entry.name)[1] not in ("", "Z"):
            orphans.append(int(entry.name))
    return orphans


REAPED: list[str] = []  # "pid command" of each orphan the fixture below stopped, for the session's summary


def reap_orphaned_ray_workers(mark: str) -> dict[int, str]:
    """SIGKILL the orphaned Ray workers of session ``mark`` (:func:`orphaned_ray_workers`); a deadlocked
    exit answers no gentler signal. Returns each one's pid and command line."""
    reaped = {}
    for pid in orphaned_ray_workers(mark):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            os.kill(pid, signal.SIGKILL)
        except OSError:
            continue
        reaped[pid] = command
    return reaped


@pytest.fixture(scope="module", autouse=True)
def no_orphaned_ray_workers() -> Iterator[None]:
    """After each module, stop the Ray workers its clusters left behind (see :func:`orphaned_ray_workers`)."""
    yield
    REAPED.extend(
        f"{pid} {command}" for pid, command in reap_orphaned_ray_workers(os.environ[SESSION_MARK]).items()
    )


@pytest.fixture(scope="session")
def ray_orphans() -> tuple[Callable[[str], list[int]], Callable[[str], dict[int, str]]]:
    """(:func:`orphaned_ray_workers`, :func:`reap_orphaned_ray_workers`), for their test."""
    return orphaned_ray_workers, reap_orphaned_ray_workers


def pytest_terminal_summary(terminalreporter) -> None:
    if REAPED:
        terminalreporter.section(
            "orphaned Ray workers stopped (their cluster had stopped; see docs/reliability.md)"
        )
        for line in REAPED:
            terminalreporter.write_line(line[:200])


@pytest.fixture(scope="session", autouse=True)
def local_mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Jobs in tests track to a private local store, never to the repository's working directory."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


MOTO_SERVER = Path(sys.executable).with_name("moto_server")
SERVER_START_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_http(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto_server exited with {process.returncode}:\n{log.read_text()}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(
        f"moto_server did not answer at {url} within {SERVER_START_TIMEOUT_S} s:\n{log.read_text()}"
    )


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server on a free loopback port; the environment points s3fs at it."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)], stdout=output, stderr=subprocess.STDOUT
        )
    try:
        _wait_for_http(endpoint, process, log)
        with pytest.MonkeyPatch.context() as patch:
            for key, value in aws_environment(endpoint).items():
                patch.setenv(key, value)
            yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def aws_environment(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint: str) -> Iterator[None]:
    """A small local Ray cluster for the whole session (2 CPUs, 500 MB object store)."""
    if ray.is_initialized():  # another test module's session already started one
        yield
        return
    ray.init(
        address="local",  # a private instance, even when someone's `ray start` cluster runs here
        num_cpus=2,
        object_store_memory=500 * 2**20,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": aws_environment(s3_endpoint)},
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def get_free_port():
    """A function returning a free loopback port (conftest modules are not importable)."""
    return free_port


ChatReply = Callable[[dict, str | None], tuple[int, dict]]


@contextlib.contextmanager
def chat_completions_server(reply: ChatReply) -> Iterator[str]:
    """A loopback OpenAI-compatible endpoint: each POSTed body and Authorization header go to ``reply``,
    whose ``(status, payload)`` is sent back (a 429 with ``Retry-After: 0``). Yields the base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status, payload = reply(body, self.headers.get("Authorization"))
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 429:
                self.send_header("Retry-After", "0")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:  # keep test output quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="session")
def serve_chat_completions() -> Callable[[ChatReply], contextlib.AbstractContextManager[str]]:
    """:func:`chat_completions_server`, for tests (conftest modules are not importable)."""
    return chat_completions_server


@pytest.fixture(scope="session")
def vicuna_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer folder in Vicuna v1.5's layout, built here: ``tokenizer.model``, ``tokenizer_config.json``
    (``LlamaTokenizer``, ``legacy: false``) and ``special_tokens_map.json``, nothing else.

    The SentencePiece model is trained as Llama's was: BPE with byte fallback, split digits, a dummy
    prefix, whitespace kept as is and whitespace-only pieces allowed; then, as in Llama's
    ``tokenizer.model``, the whitespace-run pieces (``▁▁``, ``▁▁▁▁``, ...) keep their low ids but get
    score -1e9, so SentencePiece merges them last. Trains in well under a second.
    """
    import io
    import json
    import random

    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2

    from llava_ray.conversation.templates import LLAVA_V1_SYSTEM, VICUNA_SYSTEM

    rng = random.Random(0)
    vocabulary = (
        "The the a an image shows red blue green circle square triangle left right top bottom What "
        "How many is are there of in on with and def return print for if else class import self value "
        "data list Describe photo briefly dog cat bus street man woman USER ASSISTANT Answer yes no"
    )
    words = vocabulary.split()
    lines = [VICUNA_SYSTEM, LLAVA_V1_SYSTEM, "USER: ASSISTANT:", "Describe the image briefly."]
    for index in range(4000):
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 14)))
        if index % 3 == 0:
            line += rng.choice([".", "?", "!", ",", ":"])
        if index % 5 == 0:
            line = "    " * rng.randint(1, 3) + line  # indented code
        if index % 7 == 0:
            line = line.replace(" ", "  ", 2)
        if index % 11 == 0:
            line += f" {rng.randint(0, 99999)}"
        if index % 13 == 0:
            line += " café naïve 東京 Привет"
        lines.append(line)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=800,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        character_coverage=0.9995,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    for piece in proto.pieces:
        if len(piece.piece) > 1 and set(piece.piece) == {"\u2581"}:
            piece.score = -1e9
    folder = tmp_path_factory.mktemp("vicuna-tokenizer")
    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())

    def token(content: str) -> dict[str, object]:
        return {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        }

    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": {"__type": "AddedToken", **token("<s>")},
        "eos_token": {"__type": "AddedToken", **token("</s>")},
        "unk_token": {"__type": "AddedToken", **token("<unk>")},
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": 4096,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {
        "bos_token": token("<s>"),
        "eos_token": token("</s>"),
        "unk_token": token("<unk>"),
        "pad_token": "<unk>",
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return folder


# --- a tiny model overfit on the synthetic held-out questions (evaluation and serving tests) -------
# The model is built in-process from the tiny preset and trained with plain torch for a few dozen steps on
# the synthetic ``eval.json`` items themselves, through the same image preprocessing the evaluation uses,
# so that its greedy answers are mostly right and the scoring has something to count. It is saved in
# llava-ray's format with the ``vicuna_v1`` template.


TINY = ModelConfig(preset="tiny")
TEMPLATE = "vicuna_v1"
TRAIN_STEPS = 60


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(TINY)


@pytest.fixture(scope="session")
def synthetic_eval_dir(tmp_path_factory) -> Path:
    """``llava-ray synth`` output with 4 held-out images (about 14 eval.json questions)."""
    out = tmp_path_factory.mktemp("synthetic")
    generate(out, samples=4, eval_samples=4, seed=0)
    return out


def _batch(samples, pad_id):
    width = max(sample.length for sample in samples)
    input_ids = torch.full((len(samples), width), pad_id)
    labels = torch.full((len(samples), width), IGNORE_INDEX)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, sample in enumerate(samples):
        input_ids[row, : sample.length] = torch.tensor(sample.input_ids)
        labels[row, : sample.length] = torch.tensor(sample.labels)
        attention_mask[row, : sample.length] = 1
    return input_ids, labels, attention_mask


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory, tokenizer, synthetic_eval_dir) -> Path:
    """A tiny model overfit on the synthetic eval questions, saved with its template and tokenizer."""
    torch.manual_seed(0)
    model = set_trainable(build_llava_model(TINY, tokenizer, seed=0), "full").train()
    items = json.loads((synthetic_eval_dir / "eval.json").read_text())
    positions = model.image_positions
    samples = [tokenize_conversation(item["conversations"], TEMPLATE, tokenizer, positions) for item in items]
    tower = tower_input(model.vision_tower.config)
    pixels = torch.stack([load_pixels(str(synthetic_eval_dir / item["image"]), tower) for item in items])
    input_ids, labels, attention_mask = _batch(samples, tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0
    )
    for _ in range(TRAIN_STEPS):
        loss = model(input_ids, attention_mask=attention_mask, labels=labels, pixel_values=pixels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out = tmp_path_factory.mktemp("model")
    model.eval().save_pretrained(out, tokenizer, template=TEMPLATE)
    return out


@pytest.fixture(scope="session")
def process_group(tmp_path_factory):
    """A one-process gloo group, as Ray Train sets up for each worker (DeepSpeed needs one).

    Session-scoped: DeepSpeed caches the group, so a second group in the same process would not be its
    own; whichever module starts it first stops it at the end of the session."""
    started = not dist.is_initialized()
    with (
        pytest.MonkeyPatch.context() as patch
    ):  # what a launcher sets; DeepSpeed reads it (Ray Train sets its own)
        for key, value in {
            "LOCAL_RANK": "0",
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_WORLD_SIZE": "1",
        }.items():
            patch.setenv(key, value)
        if started:
            store = tmp_path_factory.mktemp("process-group") / "store"
            dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        yield
        if started:
            dist.destroy_process_group()
