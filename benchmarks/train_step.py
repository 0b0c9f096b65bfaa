"""Training-step benchmark: stock Hugging Face LLaVA training vs llava-ray's step, same process.

    python benchmarks/run.py train                                   # tiny preset, CPU
    python benchmarks/run.py train --preset stage2-1b --device cuda --steps 10
    python benchmarks/run.py train --preset llava-7b-stage1 --device cuda --packing off

Both contenders train the same model shape (random init, same seed) on the same global batch of
synthetic samples, one optimizer step repeated; warm-up steps are excluded and the contenders'
measured steps alternate (a, b, a, b, ...) so that load from other processes weighs on both.

(a) ``baseline``: ``transformers.LlavaForConditionalGeneration`` (our model converted with
    ``export.to_hf_model``, so the shapes and weights are identical), its own loss (mean over a
    micro-batch's supervised tokens, divided by the accumulation steps), plain ``torch.optim.AdamW``,
    gradient clipping at 1.0, stock SDPA attention. Batches are padded and grouped as LLaVA-1.5
    does, by modality and length: each modality's samples are sorted by length and cut into
    micro-batches (``--grouping sorted``, the default). LLaVA's own sampler then spreads each
    sorted mega-batch over its micro-batches to balance them (``split_to_even_chunks``, copied
    here), which pads more; ``--grouping llava`` reproduces that. The default is the kinder of the
    two, so the ratio is conservative.
(b) ``llava_ray``: ``train_step`` with ``PlainEngine`` over our ``LlavaModel`` and the same AdamW,
    as the training loop runs it: with ``--packing on`` (default, as ``train.packing``) each of
    (a)'s micro-batches becomes one packed row (``packing.pack_micro_batch``: the same samples per
    micro-batch, no padding, never more positions than (a)'s micro-batch). Attention runs per
    sample (``packing.use_segment_attention``) and the LM head and cross-entropy run only at
    supervised positions (``LlavaModel.forward`` with ``return_logits=False``: no full
    [tokens, vocab] fp32 logits). ``--attention varlen`` (as ``train.attention=varlen``) runs a
    packed row's samples through torch's variable-length FlashAttention kernel in one call on CUDA
    in half precision. ``--packing off`` trains (a)'s padded micro-batches with the
    same attention and loss, which shows what packing itself adds; ``--lm-head full`` computes the
    logits everywhere, which shows what the supervised-only head adds.

The data: LLaVA-1.5's 665K mix, by sample kind (shares of the 665K, lengths in Llama tokens at
``length_scale`` 1; the vicuna_v1 system prompt is 36 tokens and each turn adds 7 role tokens):

- ``vqa`` 70% (VQAv2, GQA, OKVQA, OCR-VQA, A-OKVQA, TextCaps, RefCOCO, VG; questions of one image
  merged into one conversation): an image, 1-8 turns, questions of 20-32 tokens (with the "Answer
  the question using a single word or phrase." suffix), answers of 1-8 tokens.
- ``instruct`` 24% (LLaVA-Instruct-158K: conversation, detailed description, complex reasoning):
  an image, 1-4 turns (half of them single-turn), questions of 8-30 tokens, answers log-normal
  around 120 tokens (sigma 0.5, 20-600).
- ``sharegpt`` 6% (40K text-only ShareGPT conversations): no image, 1-8 turns, questions log-normal
  around 60 tokens (5-800), answers around 250 (20-1200), cut at ``max_length``.

Images take the vision tower's positions (576 for CLIP-L/336). ``tiny`` scales text lengths by 1/4
and cuts at 512 tokens (its images are 16 positions), so sample lengths keep LLaVA's spread.

Figures per contender: supervised tokens/s (labels that carry a loss), samples/s, padding
fraction (padding / all positions), peak memory of one untimed step after the warm-up (GPU:
``torch.cuda.max_memory_allocated``; CPU: the process's resident-set high-water mark, VmHWM, reset
through ``/proc/self/clear_refs`` after glibc returned its free heap, so each contender's peak is
its own; both the absolute peak, which includes both models, and the rise over the step's start:
activations, gradients, temporaries), and MFU against ``llava_ray.training.metrics.peak_flops``
(an H100's 989 TFLOP/s bf16 by default) on GPU (``None`` on CPU). ``ratio`` is (b)/(a) in supervised tokens/s; ``ratio_cpu_time`` the same
per process CPU second, since on a loaded machine wall-clock figures move with others' load. The
last line printed is one JSON object with every figure. Measured figures, with the commit and the
machine they were taken on: ``benchmarks/README.md``.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

from llava_ray.config.model_sources import tower_input
from llava_ray.config.presets import TINY_TOKENIZER_DIR
from llava_ray.config.schema import ModelConfig
from llava_ray.conversation.templates import IGNORE_INDEX
from llava_ray.conversation.tokenizer import load_tokenizer
from llava_ray.model.build import build_llava_model
from llava_ray.model.export import to_hf_model
from llava_ray.model.llava import LlavaModel, LlavaOutput
from llava_ray.training.collate import collate_rows
from llava_ray.training.metrics import FlopsModel, peak_flops
from llava_ray.training.packing import pack_micro_batch, use_segment_attention
from llava_ray.training.step import PlainEngine, allow_tf32, move_inputs, train_step
from llava_ray.training.trainable import set_trainable

GOAL_RATIO = 1.5
SYSTEM_TOKENS = 36  # vicuna_v1's system prompt with BOS, in Llama tokens
ROLE_TOKENS = 7  # "USER: " and " ASSISTANT:" around each question
LEARNING_RATE = 2e-5  # LLaVA-1.5 stage 2; the value does not change the speed
MAX_GRAD_NORM = 1.0


# ---- the data mix ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogNormal:
    """Token counts log-normal around ``median``, clipped to ``[low, high]``."""

    median: float
    sigma: float
    low: int
    high: int

    def draw(self, rng: np.random.Generator) -> int:
        return int(np.clip(round(rng.lognormal(np.log(self.median), self.sigma)), self.low, self.high))


@dataclass(frozen=True)
class Uniform:
    low: int
    high: int  # inclusive

    def draw(self, rng: np.random.Generator) -> int:
        return int(rng.integers(self.low, self.high + 1))


@dataclass(frozen=True)
class SampleKind:
    """One kind of sample in the mix (see the module docstring)."""

    name: str
    share: float
    image: bool
    turns: Uniform
    question: Uniform | LogNormal
    answer: Uniform | LogNormal
    single_turn_share: float = 0.0


LLAVA_665K_MIX = (
    SampleKind("vqa", 0.70, True, Uniform(1, 8), Uniform(20, 32), Uniform(1, 8)),
    SampleKind("instruct", 0.24, True, Uniform(1, 4), Uniform(8, 30), LogNormal(120, 0.5, 20, 600), 0.5),
    SampleKind(
        "sharegpt", 0.06, False, Uniform(1, 8), LogNormal(60, 0.8, 5, 800), LogNormal(250, 0.7, 20, 1200)
    ),
)


def synthetic_rows(
    count: int,
    *,
    image_positions: int,
    image_size: int,
    image_token_id: int,
    text_ids: np.ndarray,
    length_scale: float,
    max_length: int,
    seed: int,
) -> list[dict[str, Any]]:
    """``count`` prepared-style rows (``input_ids``, ``labels``, ``images``, ``kind``) of the mix."""
    rng = np.random.default_rng(seed)
    kinds = rng.choice(len(LLAVA_665K_MIX), size=count, p=[kind.share for kind in LLAVA_665K_MIX])
    image = _noise_png(rng, image_size)  # pixels do not change the cost; one encoded image serves all

    def text(n: float) -> list[int]:
        return rng.choice(text_ids, size=max(1, round(n * length_scale))).tolist()

    rows = []
    for kind in (LLAVA_665K_MIX[k] for k in kinds):
        input_ids = text(SYSTEM_TOKENS)
        if kind.image:
            input_ids += [image_token_id] * image_positions
        labels = [IGNORE_INDEX] * len(input_ids)
        turns = 1 if rng.random() < kind.single_turn_share else kind.turns.draw(rng)
        for _ in range(turns):
            question = text(ROLE_TOKENS + kind.question.draw(rng))
            answer = text(kind.answer.draw(rng) + 1)  # + the end marker, which is supervised too
            input_ids += question + answer
            labels += [IGNORE_INDEX] * len(question) + answer
        # As prepare truncates at model_max_length; the image sits at the start, so it is never cut.
        input_ids, labels = input_ids[:max_length], labels[:max_length]
        rows.append(
            {
                "input_ids": input_ids,
                "labels": labels,
                "images": [image] if kind.image else [],
                "kind": kind.name,
            }
        )
    return rows


def _noise_png(rng: np.random.Generator, size: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
        buffer, format="PNG", compress_level=1
    )
    return buffer.getvalue()


# ---- presets -----------------------------------------------------------------------------------

# TinyLlama-1.1B's shapes (Llama-2 vocabulary, grouped-query attention).
LLAMA_1B = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
}
LLAVA_VOCAB = 32064  # Vicuna's 32000 + <image> + pad, padded to a multiple of 64 as llava-hf's
# GPU presets build at random (nothing downloads) with the packaged tiny tokenizer supplying the
# token ids; the embedding and LM head keep Vicuna's vocabulary size, which is what costs.


@dataclass(frozen=True)
class TrainBenchPreset:
    """A model shape, what trains, and the batch the step runs on."""

    model: dict[str, Any]
    trainable: Literal["projector", "full"]
    global_batch_size: int
    micro_batch_size: int
    length_scale: float
    max_length: int
    activation_checkpointing: bool
    needs_gpu: bool
    notes: str


TRAIN_PRESETS: dict[str, TrainBenchPreset] = {
    "tiny": TrainBenchPreset(
        model={"preset": "tiny"},
        trainable="full",
        global_batch_size=32,
        micro_batch_size=8,
        length_scale=0.25,
        max_length=512,
        activation_checkpointing=False,
        needs_gpu=False,
        notes="tiny preset (ViT 2x64, Llama 4x128), full fine-tune, fp32; runs on a CPU",
    ),
    "llava-7b-stage1": TrainBenchPreset(
        model={
            "preset": "llava-1.5-7b",
            "init": "random",
            "tokenizer": str(TINY_TOKENIZER_DIR),
            "lm_config_overrides": {"vocab_size": LLAVA_VOCAB},
        },
        trainable="projector",
        global_batch_size=16,
        micro_batch_size=4,
        length_scale=1.0,
        max_length=2048,
        activation_checkpointing=True,
        needs_gpu=True,
        notes="CLIP ViT-L/14-336 + Vicuna-7B shapes, projector-only (stage 1 recipe), bf16",
    ),
    "stage2-1b": TrainBenchPreset(
        model={
            "preset": "llava-1.5-7b",
            "init": "random",
            "tokenizer": str(TINY_TOKENIZER_DIR),
            "lm_config_overrides": {**LLAMA_1B, "vocab_size": LLAVA_VOCAB},
        },
        trainable="full",
        global_batch_size=32,
        micro_batch_size=8,
        length_scale=1.0,
        max_length=2048,
        activation_checkpointing=False,
        needs_gpu=True,
        notes="CLIP ViT-L/14-336 + a 1.1B Llama (TinyLlama shapes), full fine-tune (stage 2 recipe), bf16",
    ),
}


@dataclass(frozen=True)
class TrainBenchOptions:
    preset: str = "tiny"
    steps: int = 5
    warmup: int = 1
    device: str = "cpu"
    packing: bool = True
    grouping: Literal["sorted", "llava"] = "sorted"
    lm_head: Literal["supervised", "full"] = "supervised"  # (b)'s LM head: supervised positions or all
    attention: Literal["segments", "varlen"] = "segments"  # (b)'s per-sample attention, as train.attention
    smoke: bool = False  # shrink model and batch (SMOKE), bf16: checks a GPU preset's code path anywhere
    seed: int = 0


# --smoke: one narrow LM layer (head and key/value head counts kept), one vision layer, two samples.
SMOKE = {
    "lm": {"num_hidden_layers": 1, "hidden_size": 256, "intermediate_size": 512},
    "vision": {"num_hidden_layers": 1},
    "global_batch_size": 2,
    "micro_batch_size": 1,
}


# ---- batches -----------------------------------------------------------------------------------


def grouped_micro_batches(
    lengths: Sequence[int], is_image: Sequence[bool], micro_batch_size: int, grouping: str
) -> list[list[int]]:
    """Row indices of (a)'s padded micro-batches: one modality each, grouped by length.

    ``sorted``: each modality's rows longest first, cut into consecutive micro-batches.
    ``llava``: the same sorted rows dealt out by LLaVA-1.5's :func:`split_to_even_chunks`.
    """
    batches: list[list[int]] = []
    for modality in (True, False):
        rows = sorted((i for i in range(len(lengths)) if is_image[i] == modality), key=lambda i: -lengths[i])
        if not rows:
            continue
        if grouping == "sorted":
            chunks = [rows[k : k + micro_batch_size] for k in range(0, len(rows), micro_batch_size)]
        else:
            chunks = split_to_even_chunks(rows, lengths, -(-len(rows) // micro_batch_size))
        batches += [chunk for chunk in chunks if chunk]
    return batches


def split_to_even_chunks(indices: Sequence[int], lengths: Sequence[int], count: int) -> list[list[int]]:
    """LLaVA-1.5's balancing of a length-sorted mega-batch over ``count`` micro-batches: each row
    goes to the micro-batch with the least total length so far, so every micro-batch gets long and
    short rows (and pads to its long one); rows that do not divide evenly are dealt out in turn."""
    if len(indices) % count:
        return [list(indices[k::count]) for k in range(count)]
    size = len(indices) // count
    chunks: list[list[int]] = [[] for _ in range(count)]
    totals = [0.0] * count
    for index in indices:
        shortest = totals.index(min(totals))
        chunks[shortest].append(index)
        totals[shortest] += lengths[index]
        if len(chunks[shortest]) == size:
            totals[shortest] = float("inf")
    return chunks


# ---- (b)'s LM head ------------------------------------------------------------------------------


class FullLogits(nn.Module):
    """``LlavaModel`` with the LM head at every position (``--lm-head full``), to measure what the
    supervised-only head that training uses (``return_logits=False``) saves."""

    def __init__(self, model: LlavaModel):
        super().__init__()
        self.model = model
        self.image_positions = model.image_positions

    def forward(self, **inputs: Any) -> LlavaOutput:
        return self.model(**{**inputs, "return_logits": True})


# ---- memory ------------------------------------------------------------------------------------


class PeakMemory:
    """Peak memory of a step: the CUDA allocator's on GPU, the resident set's high-water mark on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.source = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "VmHWM"
        self._libc = ctypes.CDLL("libc.so.6") if device.type == "cpu" else None

    def reset(self) -> int:
        """Free what can be freed, restart the high-water mark; returns the bytes in use now."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        self._libc.malloc_trim(0)  # glibc keeps freed heap resident; the next peak must not hide in it
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
        except OSError:
            self.source = "ru_maxrss (process-wide high-water mark: the clear_refs reset was refused)"
        return self._status_kib("VmRSS") * 1024

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return self._status_kib("VmHWM") * 1024

    @staticmethod
    def _status_kib(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
        raise RuntimeError(f"/proc/self/status has no {key}")


# ---- contenders --------------------------------------------------------------------------------


@dataclass
class StepCounts:
    """What one optimizer step trains (the same for every step: the batch is fixed)."""

    samples: int
    tokens: int
    positions: int  # tokens plus padding
    supervised: int
    image_positions: int
    micro_batches: int


@dataclass
class Contender:
    """A training step to time, and what it trains per step."""

    name: str
    step: Callable[[], float]  # runs one optimizer step, returns its loss
    counts: StepCounts
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    peak_bytes: int = 0
    peak_over_start_bytes: int = 0
    loss: float | None = None


def counts_of(batches: Sequence[dict[str, torch.Tensor]], image_positions: int) -> StepCounts:
    return StepCounts(
        samples=sum(int(b.get("num_samples", b["input_ids"].shape[0])) for b in batches),
        tokens=sum(int(b["num_tokens"]) for b in batches),
        positions=sum(b["input_ids"].numel() for b in batches),
        supervised=sum(int(b["num_supervised"]) for b in batches),
        image_positions=sum(b["pixel_values"].shape[0] for b in batches if "pixel_values" in b)
        * image_positions,
        micro_batches=len(batches),
    )


def hf_contender(
    model: LlavaModel, batches: list[dict[str, torch.Tensor]], device: torch.device
) -> Contender:
    """(a): stock ``LlavaForConditionalGeneration`` with its own mean loss and plain AdamW."""
    hf_model = to_hf_model(model).train()
    trainable = [p for p in hf_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE)
    inputs = [move_inputs(batch, device) for batch in batches]

    def step() -> float:
        total = 0.0
        for batch in inputs:
            loss = hf_model(**batch, use_cache=False).loss / len(inputs)
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    return Contender("baseline", step, counts_of(batches, model.image_positions))


def llava_ray_contender(
    model: LlavaModel, batches: list[dict[str, torch.Tensor]], device: torch.device, lm_head: str
) -> Contender:
    """(b): ``train_step`` over ``PlainEngine``, as the training loop runs it."""
    module = FullLogits(model) if lm_head == "full" else model
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE)
    engine = PlainEngine(
        module.train(), optimizer, None, accumulation=len(batches), max_grad_norm=MAX_GRAD_NORM
    )
    counts = counts_of(batches, model.image_positions)

    def step() -> float:
        return train_step(engine, batches, counts.supervised, world_size=1, device=device).loss_sum

    return Contender("llava_ray", step, counts)


# ---- running -----------------------------------------------------------------------------------


def resolve_preset(options: TrainBenchOptions) -> TrainBenchPreset:
    """The named preset, shrunk by ``--smoke``."""
    preset = TRAIN_PRESETS[options.preset]
    if not options.smoke:
        return preset
    model = {
        **preset.model,
        "lm_config_overrides": {**preset.model.get("lm_config_overrides", {}), **SMOKE["lm"]},
        "vision_config_overrides": SMOKE["vision"],
    }
    return replace(
        preset,
        model=model,
        global_batch_size=SMOKE["global_batch_size"],
        micro_batch_size=SMOKE["micro_batch_size"],
    )


def build_model(
    preset: TrainBenchPreset, options: TrainBenchOptions, device: torch.device
) -> tuple[Any, LlavaModel]:
    """The tokenizer and a model of the preset's shape at random init, on ``device``.

    bf16 on GPU (and with ``--smoke``, to run the GPU dtype path on a CPU too), fp32 on CPU.
    """
    config = ModelConfig(**preset.model)
    tokenizer = load_tokenizer(config)
    dtype = torch.bfloat16 if device.type == "cuda" or options.smoke else torch.float32
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in place on the device: a 7B fp32 copy on the host is slow
    try:
        with torch.device(device):
            model = build_llava_model(config, tokenizer, seed=options.seed)
    finally:
        torch.set_default_dtype(default_dtype)
    set_trainable(model, preset.trainable)
    if preset.activation_checkpointing:
        model.enable_activation_checkpointing()
    return tokenizer, model.to(device=device, dtype=dtype)


def run_train_benchmark(options: TrainBenchOptions) -> dict[str, Any]:
    """Build both contenders, time them alternately and return every figure (see ``format_summary``)."""
    if options.steps < 1 or options.warmup < 0:
        raise ValueError(
            f"--steps {options.steps} --warmup {options.warmup}: time at least one step, warm up >= 0"
        )
    preset = resolve_preset(options)
    device = torch.device(options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no CUDA device; use --device cpu (with --preset tiny)")
    if preset.needs_gpu and device.type != "cuda" and not options.smoke:
        raise ValueError(
            f"preset {options.preset!r} is sized for a GPU; run it with --device cuda, or add --smoke to "
            "check its code path on the CPU with a shrunken model"
        )
    torch.manual_seed(options.seed)
    allow_tf32(True, device)  # both loops, as LLaVA-1.5 trains (--tf32 True)
    tokenizer, model = build_model(preset, options, device)
    tower = tower_input(model.vision_tower.config)
    image_size = tower.size
    special = {*tokenizer.all_special_ids, model.image_token_id}
    rows = synthetic_rows(
        preset.global_batch_size,
        image_positions=model.image_positions,
        image_size=image_size,
        image_token_id=model.image_token_id,
        text_ids=np.array([i for i in range(len(tokenizer)) if i not in special]),
        length_scale=preset.length_scale,
        max_length=preset.max_length,
        seed=options.seed,
    )
    lengths = [len(row["input_ids"]) for row in rows]
    groups = grouped_micro_batches(
        lengths, [bool(row["images"]) for row in rows], preset.micro_batch_size, options.grouping
    )
    padded = [collate_rows([rows[i] for i in group], tokenizer.pad_token_id, tower) for group in groups]

    # (b) trains a copy with its own attention implementation; (a) stays stock.
    ours = copy.deepcopy(model)
    # Exact on padded batches too (it defers to SDPA there); varlen falls back to segments off CUDA.
    use_segment_attention(ours.language_model, options.attention)
    if options.packing:  # as train.packing: each of (a)'s micro-batches as one packed row
        ours_batches = [
            pack_micro_batch([rows[i] for i in group], tokenizer.pad_token_id, tower) for group in groups
        ]
    else:
        ours_batches = padded
    contenders = [
        hf_contender(model, padded, device),
        llava_ray_contender(ours, ours_batches, device, options.lm_head),
    ]
    memory = PeakMemory(device)
    for contender in contenders:  # warm-up: allocator, kernels, optimizer state
        for _ in range(options.warmup):
            contender.step()
    for contender in contenders:
        _memory_step(contender, memory)
    for _ in range(options.steps):
        for contender in contenders:
            _timed_step(contender, device)
    return _figures(options, preset, contenders, FlopsModel.of(model), device, memory, lengths, rows)


def _memory_step(contender: Contender, memory: PeakMemory) -> None:
    """One untimed step for the peak: the reset frees cached memory, which the next step would
    have to fault in or allocate again inside the clock."""
    start_bytes = memory.reset()
    contender.loss = contender.step()
    contender.peak_bytes = memory.peak()
    contender.peak_over_start_bytes = contender.peak_bytes - start_bytes


def _timed_step(contender: Contender, device: torch.device) -> None:
    started, started_cpu = time.perf_counter(), time.process_time()
    contender.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    contender.seconds.append(time.perf_counter() - started)
    contender.cpu_seconds.append(time.process_time() - started_cpu)


def _figures(
    options: TrainBenchOptions,
    preset: TrainBenchPreset,
    contenders: Sequence[Contender],
    flops: FlopsModel,
    device: torch.device,
    memory: PeakMemory,
    lengths: Sequence[int],
    rows: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for contender in contenders:
        counts = contender.counts
        seconds = sum(contender.seconds) / len(contender.seconds)
        cpu_seconds = sum(contender.cpu_seconds) / len(contender.cpu_seconds)
        step_flops = flops.step_flops(counts.tokens, counts.image_positions)
        results[contender.name] = {
            "supervised_tokens_per_s": counts.supervised / seconds,
            "samples_per_s": counts.samples / seconds,
            "tokens_per_s": counts.tokens / seconds,
            "padding_fraction": 1 - counts.tokens / counts.positions,
            "peak_memory_gib": contender.peak_bytes / 2**30,
            "peak_over_start_gib": contender.peak_over_start_bytes / 2**30,
            "mfu": step_flops / seconds / peak_flops(1) if device.type == "cuda" else None,
            "seconds_per_step": seconds,
            "step_seconds": contender.seconds,
            "supervised_tokens_per_cpu_s": counts.supervised / cpu_seconds,
            "loss": contender.loss,
            **{f"step_{key}": value for key, value in asdict(counts).items()},
        }
    baseline, ours = results["baseline"], results["llava_ray"]
    kinds = [row["kind"] for row in rows]
    return {
        "benchmark": "train",
        "preset": options.preset,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "preset_notes": preset.notes,
        "packing": options.packing,
        "smoke": options.smoke,
        "grouping": options.grouping,
        "lm_head": options.lm_head,
        "attention": options.attention,
        "steps": options.steps,
        "warmup": options.warmup,
        "global_batch_size": preset.global_batch_size,
        "micro_batch_size": preset.micro_batch_size,
        "mix": {kind.name: kinds.count(kind.name) for kind in LLAVA_665K_MIX},
        "lengths": {"min": min(lengths), "median": float(np.median(lengths)), "max": max(lengths)},
        "memory_source": memory.source,
        "baseline": baseline,
        "llava_ray": ours,
        "ratio": ours["supervised_tokens_per_s"] / baseline["supervised_tokens_per_s"],
        "ratio_cpu_time": ours["supervised_tokens_per_cpu_s"] / baseline["supervised_tokens_per_cpu_s"],
        "goal_ratio": GOAL_RATIO,
    }


def format_summary(figures: dict[str, Any]) -> str:
    """Three lines for people: each contender's figures, then the ratio."""
    lines = []
    for name, label in (
        ("baseline", "(a) HF LlavaForConditionalGeneration, padded"),
        ("llava_ray", "(b) llava-ray"),
    ):
        f = figures[name]
        mfu = "n/a" if f["mfu"] is None else f"{f['mfu']:.1%}"
        lines.append(
            f"{label}: {f['supervised_tokens_per_s']:.0f} supervised tok/s, {f['samples_per_s']:.1f} samples/s, "
            f"padding {f['padding_fraction']:.0%}, peak memory {f['peak_memory_gib']:.2f} GiB "
            f"(+{f['peak_over_start_gib']:.2f} over the step's start), MFU {mfu}, {f['seconds_per_step']:.3f} s/step"
        )
    lines.append(
        f"ratio b/a = {figures['ratio']:.2f} (goal >= {GOAL_RATIO}); by CPU time {figures['ratio_cpu_time']:.2f}"
    )
    return "\n".join(lines)
