"""The ``evaluate`` config section: which model, which benchmark, how to generate, and the LLM judge.

Read by :func:`llava_ray.evaluation.run_evaluate` (``llava-ray evaluate``, ``jobs/evaluate.py``).
Every field has a default so the root config builds without the section; what a run needs (a
model, a data file, a judge model for ``llava_bench``) is checked by
:func:`llava_ray.evaluation.job.evaluate_problems` before any model is loaded.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from llava_ray.config.endpoint import EndpointConfig

Benchmark = Literal["synthetic", "scienceqa", "llava_bench"]
BENCHMARKS: tuple[Benchmark, ...] = ("synthetic", "scienceqa", "llava_bench")
# Answers are one word (synthetic) or one letter (ScienceQA); LLaVA-Bench answers are paragraphs.
DEFAULT_MAX_NEW_TOKENS: dict[str, int] = {"synthetic": 16, "scienceqa": 128, "llava_bench": 1024}


class JudgeConfig(EndpointConfig):
    """The LLM judge of ``llava_bench``: any OpenAI-compatible chat-completions endpoint."""

    temperature: float = Field(0.2, ge=0, le=2, description="Judge sampling temperature (LLaVA: 0.2).")
    max_concurrency: int = Field(4, gt=0, description="Review requests in flight at once.")


class ReferenceConfig(EndpointConfig):
    """The text-only LLM that writes ``llava_bench`` reference answers from the symbolic context."""

    temperature: float = Field(
        0.2, ge=0, le=2, description="Sampling temperature of reference answers (not published; the judge's)."
    )
    max_concurrency: int = Field(4, gt=0, description="Reference-answer requests in flight at once.")


class ScienceQAEnsembleConfig(EndpointConfig):
    """The text-only LLM of ``llava-ray scienceqa-ensemble`` (the paper's GPT-4 answerer and judge)."""

    scienceqa_dir: str | None = Field(
        None,
        description="ScienceQA release folder holding problems.json and pid_splits.json (data/scienceqa).",
    )
    split: str = Field("test", description="Split of pid_splits.json the model's results.jsonl answers.")
    results: str | None = Field(
        None, description="The model's results.jsonl of a scienceqa evaluate run (default: output_dir's)."
    )
    shots: int = Field(
        2,
        ge=0,
        description="Worked train-split examples before each question (the paper's number is not published).",
    )
    shot_seed: int = Field(10, description="Seed of the shots' random choice from the train split.")
    temperature: float = Field(
        0.0, ge=0, le=2, description="Sampling temperature (not published; 0: greedy)."
    )
    max_concurrency: int = Field(4, gt=0, description="Requests in flight at once.")


class EvaluateConfig(BaseModel):
    """Evaluation of a trained model: batched generation on Ray actors, scoring, MLflow."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str | None = Field(
        None,
        description="Model to evaluate: llava-ray model folder, Hugging Face LLaVA folder, or s3:// URL.",
    )
    benchmark: Benchmark = Field(
        "synthetic", description="synthetic (llava-ray synth's eval.json), scienceqa, or llava_bench."
    )
    data_path: str | None = Field(
        None,
        description="Eval file: eval.json, convert_scienceqa's output, or LLaVA-Bench questions.jsonl.",
    )
    reference_answers: str | None = Field(
        None,
        description="llava_bench only: reference answers, JSON lines {question_id, text} (reference-answers writes it).",
    )
    context: str | None = Field(
        None,
        description="llava_bench only: the images' descriptions: context.jsonl (In-the-Wild) or caps_boxes (COCO).",
    )
    image_root: str | None = Field(
        None, description="Folder the items' image paths are relative to (default: data_path's folder)."
    )
    output_dir: str = Field(
        "eval_results",
        description="Where results.jsonl, summary.json (and reviews.jsonl) go: a folder or s3:// URL.",
    )
    template: Literal["plain", "vicuna_v1", "llava_v1", "llava_llama_2", "chatml", "tokenizer"] | None = (
        Field(None, description="Conversation template (default: the one stored with the model).")
    )
    image_aspect: Literal["pad", "crop", "resize"] = Field(
        "pad",
        description="How images become square, as in training (pad: the tower's mean colour, LLaVA-1.5).",
    )
    batch_size: int = Field(16, gt=0, description="Prompts generated together by one actor.")
    max_new_tokens: int | None = Field(
        None, gt=0, description="Longest answer (default: 16 synthetic, 128 scienceqa, 1024 llava_bench)."
    )
    temperature: float = Field(0.0, ge=0, le=2, description="Sampling temperature (0: greedy, as LLaVA).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold when temperature > 0.")
    seed: int | None = Field(None, description="Sampling seed (default: run.seed, else 0).")
    num_actors: int = Field(
        1, ge=0, description="Ray actors, one model each (0: generate in this process, without Ray)."
    )
    num_gpus_per_actor: float = Field(0, ge=0, description="GPUs per actor (0: CPU actors).")
    num_cpus_per_actor: float = Field(1, gt=0, description="CPUs reserved per actor.")
    limit: int | None = Field(None, gt=0, description="Evaluate only the first N items.")
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="LLM judge of llava_bench.")
    reference: ReferenceConfig = Field(
        default_factory=ReferenceConfig, description="Text-only LLM of `llava-ray reference-answers`."
    )
    scienceqa_ensemble: ScienceQAEnsembleConfig = Field(
        default_factory=ScienceQAEnsembleConfig,
        description="Text-only LLM and judge of `llava-ray scienceqa-ensemble` (ScienceQA with GPT-4 as judge).",
    )

    def resolved_max_new_tokens(self) -> int:
        """``max_new_tokens``, or the benchmark's default."""
        return self.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[self.benchmark]
