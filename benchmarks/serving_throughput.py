"""Serving: requests decoded one at a time (a replica without batching) vs together (``@serve.batch``'s batches).

Both contenders run :func:`llava_ray.serving.engine.generate_batch`, the replica's own generation, on the
same model in the same process, with the same requests: each request has an image and a question, and a
fixed answer length (the random-init model rarely meets its end marker; both contenders get the same
rows). Baseline (a): ``requests`` calls of one row. (b): the same requests in batches of ``batch``. Reported:
requests/s and generated tokens/s of each, the ratio b/a, and each request's latency in (b) relative
to (a) (batching trades a little latency for throughput). No Ray and no HTTP: the engine alone, so the
figure holds on any device; the HTTP path adds the same per-request cost to both.

    python benchmarks/run.py serve [--preset tiny] [--requests 32] [--batch 8] [--tokens 32] [--device cpu]
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from llava_ray.config.schema import ModelConfig
from llava_ray.conversation.tokenizer import load_tokenizer
from llava_ray.evaluation.loaded_model import InferenceModel
from llava_ray.model.build import build_llava_model
from llava_ray.model.generate import prompt_input_ids
from llava_ray.serving.engine import Job, RowUpdate, generate_batch

QUESTIONS = ["What color is the shape?", "How many shapes are there?", "Where is the circle?", "Describe it."]


@dataclass
class ServeBenchOptions:
    preset: str = "tiny"
    requests: int = 32
    batch: int = 8
    tokens: int = 32
    device: str = "cpu"
    seed: int = 0


def _jobs(loaded: InferenceModel, options: ServeBenchOptions) -> list[Job]:
    model, size = loaded.model, loaded.tower_input.size
    generator = torch.Generator().manual_seed(options.seed)
    jobs = []
    for index in range(options.requests):
        conversation = [{"from": "human", "value": f"<image>\n{QUESTIONS[index % len(QUESTIONS)]}"}]
        ids = prompt_input_ids(conversation, loaded.template, loaded.tokenizer, model.image_positions)
        pixels = torch.randn(1, 3, size, size, generator=generator).to(options.device)
        jobs.append(Job(ids, pixels, max_tokens=options.tokens))
    return jobs


def _run(loaded: InferenceModel, jobs: list[Job], batch: int) -> tuple[float, int, list[float]]:
    """Seconds, tokens generated, and each request's latency from the start of its batch's wait."""
    tokens, latencies = 0, []
    start = time.perf_counter()
    for first in range(0, len(jobs), batch):
        steps: list[list[RowUpdate]] = []
        generate_batch(loaded, jobs[first : first + batch], steps.append)
        tokens += sum(update.completion_tokens for update in steps[-1])  # the last step counts every row
        # Every request of this batch was waiting since the run began: the queue a busy replica has.
        latencies += [time.perf_counter() - start] * len(steps[-1])
    return time.perf_counter() - start, tokens, latencies


def run_serve_benchmark(options: ServeBenchOptions) -> dict[str, Any]:
    torch.manual_seed(options.seed)
    config = ModelConfig(preset=options.preset, init="random")
    tokenizer = load_tokenizer(config)
    model = build_llava_model(config, tokenizer, seed=options.seed).to(options.device).eval()
    loaded = InferenceModel(model, tokenizer, "vicuna_v1", f"random {options.preset}")
    jobs = _jobs(loaded, options)
    _run(loaded, jobs[: options.batch], options.batch)  # warm-up: kernels, allocator
    one_seconds, one_tokens, one_latency = _run(loaded, jobs, 1)
    batch_seconds, batch_tokens, batch_latency = _run(loaded, jobs, options.batch)
    return {
        "benchmark": "serve",
        "preset": options.preset,
        "device": options.device,
        "requests": options.requests,
        "batch": options.batch,
        "max_tokens": options.tokens,
        "threads": torch.get_num_threads(),
        "one_at_a_time": {
            "seconds": round(one_seconds, 2),
            "requests_per_s": round(options.requests / one_seconds, 2),
            "tokens_per_s": round(one_tokens / one_seconds, 1),
            "mean_latency_s": round(sum(one_latency) / len(one_latency), 2),
        },
        "batched": {
            "seconds": round(batch_seconds, 2),
            "requests_per_s": round(options.requests / batch_seconds, 2),
            "tokens_per_s": round(batch_tokens / batch_seconds, 1),
            "mean_latency_s": round(sum(batch_latency) / len(batch_latency), 2),
        },
        "throughput_ratio": round(one_seconds / batch_seconds, 2),
        "tokens": {"one_at_a_time": one_tokens, "batched": batch_tokens},
    }
