"""Typed configuration of every llava-ray job.

One root model, :class:`LlavaRayConfig`, with a section per concern. Every field carries a
one-line description (``llava-ray validate`` shows the resolved values). Unknown keys are
errors, never ignored. Defaults follow LLaVA-1.5's recipe; the stage-dependent ones (learning
rate, global batch, ZeRO stage, template, what trains) are filled from :data:`STAGE_RECIPES`
for whatever the YAML leaves unset, so a config states only what differs from the paper.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llava_ray.config.datasets import registered_sources
from llava_ray.config.evaluation import EvaluateConfig
from llava_ray.config.generation import GenerateConfig
from llava_ray.config.presets import PRESETS
from llava_ray.config.serve import ServeConfig

PROJECTOR_PATTERN = re.compile(r"^(linear|identity|mlp([1-9][0-9]*)x_gelu)$")
# The names a config may use. Presets are declared in config.presets; conversation.templates declares one
# template per TEMPLATE_NAMES entry and checks at import that the two lists agree.
PresetName = Literal.__getitem__(tuple(PRESETS))
TEMPLATE_NAMES = ("plain", "vicuna_v1", "llava_v1", "llava_llama_2", "chatml", "tokenizer")
TemplateName = Literal.__getitem__(TEMPLATE_NAMES)
# How a rendered conversation becomes ids (conversation.templates.tokenize_conversation): 'joined' tokenizes
# the whole text once; 'llava' tokenizes the text on each side of <image> apart, as the reference does.
Tokenization = Literal["joined", "llava"]

# LLaVA-1.5's recipe (../shared/LLAVA_REFERENCE.md), keyed by (stage, trainable).
STAGE_RECIPES: dict[tuple[str, str], dict[str, dict[str, Any]]] = {
    ("pretrain", "projector"): {
        "train": {"learning_rate": 1e-3, "global_batch_size": 256},
        "deepspeed": {"zero_stage": 2},
        # The reference's stage 1 sets no image_aspect_ratio: CLIP's resize, then centre crop.
        "data": {"template": "plain", "image_aspect": "crop"},
    },
    ("finetune", "full"): {
        "train": {"learning_rate": 2e-5, "global_batch_size": 128},
        "deepspeed": {"zero_stage": 3},
        "data": {"template": "vicuna_v1"},
    },
    ("finetune", "lora"): {
        "train": {"learning_rate": 2e-4, "projector_learning_rate": 2e-5, "global_batch_size": 128},
        "deepspeed": {"zero_stage": 3},
        "data": {"template": "vicuna_v1"},
    },
}
DEFAULT_TRAINABLE = {"pretrain": "projector", "finetune": "full"}


class Section(BaseModel):
    """Base of every section: unknown keys are errors and assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Section):
    name: str = Field("llava-ray", description="Run name; a rerun with the same name resumes it.")
    root: str | None = Field(
        None,
        description="Storage root (s3://bucket/prefix or a folder) that other keys reference as ${run.root}/...; "
        "the shipped LLaVA-1.5 recipes take it from $LLAVA_ROOT, so one value moves all their paths.",
    )
    storage_path: str = Field(
        "./llava_ray_runs",
        description="Where checkpoints and results go: a local folder or s3://bucket/prefix.",
    )
    seed: int = Field(42, description="Seed for model init, data order and sampling.")

    @field_validator("name")
    @classmethod
    def _name_is_a_path_component(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
            raise ValueError("use letters, digits, '.', '_' and '-' only (it names a folder)")
        return value


class ModelConfig(Section):
    preset: PresetName = Field(
        "llava-1.5-7b", description="Model preset: 'tiny' (random init, offline) or LLaVA-1.5's 7B/13B parts."
    )
    init: Literal["pretrained", "random"] = Field(
        "pretrained", description="Load pretrained vision/LM weights, or build the preset's shapes at random."
    )
    vision_tower: str | None = Field(
        None, description="Vision encoder: hub name, local folder or s3:// URL (default: the preset's)."
    )
    language_model: str | None = Field(
        None, description="Causal LM: hub name, local folder or s3:// URL (default: the preset's)."
    )
    tokenizer: str | None = Field(None, description="Tokenizer source (default: the language model's).")
    projector: str = Field("mlp2x_gelu", description="Projector: linear, identity or mlp{N}x_gelu.")
    vision_select_layer: int = Field(-2, description="Which vision hidden state feeds the projector.")
    vision_select_feature: Literal["patch", "cls_patch"] = Field(
        "patch", description="'patch' drops the CLS token (LLaVA-1.5); 'cls_patch' keeps it."
    )
    model_max_length: int = Field(
        2048, gt=0, description="Maximum sequence length, image positions included."
    )
    vision_config_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Keys set on the vision config before building (e.g. num_hidden_layers).",
    )
    lm_config_overrides: dict[str, Any] = Field(
        default_factory=dict, description="Keys set on the LM config before building."
    )
    init_from: str | None = Field(
        None, description="Start from this checkpoint or Hugging Face LLaVA folder (e.g. stage 1's output)."
    )
    projector_weights: str | None = Field(
        None, description="A reference stage-1 projector file (mm_projector.bin) to load before sharding."
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the hub; off unless needed.")

    @field_validator("projector")
    @classmethod
    def _known_projector(cls, value: str) -> str:
        if not PROJECTOR_PATTERN.match(value):
            raise ValueError("use 'linear', 'identity' or 'mlp{N}x_gelu' such as 'mlp2x_gelu'")
        return value

    @field_validator("vision_select_layer")
    @classmethod
    def _nonzero_layer(cls, value: int) -> int:
        if value == 0:
            raise ValueError("layer 0 is the patch embedding, not an encoder layer; use -1, -2, ...")
        return value


class DataSource(Section):
    path: str = Field(description="LLaVA JSON array (.json) or JSON lines (.jsonl) file, local or s3://.")
    image_root: str | None = Field(
        None, description="Folder the samples' image paths are relative to (default: the file's folder)."
    )
    weight: float | None = Field(
        None, gt=0, description="Sampling weight: expected copies of each sample (e.g. 0.5 keeps half)."
    )
    repeat: int | None = Field(None, ge=1, description="Exact number of copies of each sample.")
    name: str | None = Field(None, description="Name used in reports (default: the file name).")

    @model_validator(mode="after")
    def _weight_or_repeat(self) -> DataSource:
        if self.weight is not None and self.repeat is not None:
            raise ValueError("set either 'weight' or 'repeat', not both")
        return self


class DataConfig(Section):
    dataset: str | list[str] | None = Field(
        None,
        description="Registered dataset name(s) (llava_ray/assets/datasets.yaml, e.g. llava-v1.5-mix665k) whose "
        "files, under data.root, come first in data.sources.",
    )
    root: str | None = Field(
        None,
        description="Folder or s3:// prefix laid out as LLaVA's playground/data; data.dataset's paths are relative to it.",
    )
    sources: list[DataSource] = Field(default_factory=list, description="Input data sources (LLaVA format).")
    template: TemplateName = Field(
        "vicuna_v1", description="Conversation template (stage default: plain for pretrain, vicuna_v1 after)."
    )
    tokenization: Tokenization = Field(
        "joined",
        description="'joined': the rendered text tokenized at once; 'llava': each side of <image> apart, "
        "LLaVA-1.5's exact ids (the llava-1.5 configs' choice).",
    )
    image_aspect: Literal["pad", "crop", "resize"] = Field(
        "pad",
        description=(
            "pad to a square in the tower's mean colour (LLaVA-1.5 stage 2), centre-crop (stage default "
            "for pretrain, as the reference's CLIP resize-and-crop), or stretch."
        ),
    )
    prepared_path: str | None = Field(
        None, description="Where `prepare` writes parquet shards and report.json, and `train` reads them."
    )
    shard_size_mb: int = Field(256, gt=0, description="Target size of one parquet shard.")
    prepare_workers: int | None = Field(
        None,
        gt=0,
        description=(
            "Most prepare actors (one CPU each); default: the cluster's CPUs when prepare starts. On an "
            "autoscaling cluster set it to the CPUs the CPU node type can grow to (docs/scale.md)."
        ),
    )
    max_image_pixels: int = Field(
        89_478_485, gt=0, description="Images with more pixels are skipped (decompression-bomb guard)."
    )
    image_format: Literal["jpeg", "png"] = Field(
        "jpeg", description="How resized images are stored in shards (jpeg: compact; png: lossless)."
    )
    jpeg_quality: int = Field(95, ge=1, le=100, description="JPEG quality when image_format is jpeg.")

    @model_validator(mode="before")
    @classmethod
    def _expand_registered_datasets(cls, raw: Any) -> Any:
        """data.dataset's files (under data.root) become the first data.sources.

        A file already listed is not added again, so a dumped config validates back to itself.
        """
        if not isinstance(raw, dict) or not raw.get("dataset"):
            return raw
        names = [raw["dataset"]] if isinstance(raw["dataset"], str) else raw["dataset"]
        sources = raw.get("sources") or []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            return raw  # the field's own validation reports it
        if not isinstance(sources, list):
            return raw
        root = raw.get("root") if isinstance(raw.get("root"), str) else None
        listed = {source.get("path") for source in sources if isinstance(source, dict)}
        added = [source for source in registered_sources(names, root) if source["path"] not in listed]
        return {**raw, "sources": [*added, *sources]}


class LoraConfig(Section):
    r: int = Field(128, gt=0, description="LoRA rank (LLaVA-1.5: 128).")
    alpha: int = Field(256, gt=0, description="LoRA alpha (LLaVA-1.5: 256).")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: str | list[str] = Field(
        "all-linear", description="LM modules that get adapters ('all-linear' or a list of names)."
    )


class TrainConfig(Section):
    stage: Literal["pretrain", "finetune"] = Field(
        "pretrain", description="pretrain: projector only on captions; finetune: instruction tuning."
    )
    trainable: Literal["projector", "full", "lora"] | None = Field(
        None, description="What trains: projector (stage 1), full (projector + LM), lora (projector + LoRA)."
    )
    epochs: float = Field(1.0, gt=0, description="Passes over the data.")
    max_steps: int | None = Field(
        None, gt=0, description="Stop after this many optimizer steps (overrides epochs)."
    )
    global_batch_size: int = Field(
        256, gt=0, description="Samples per optimizer step over all workers and accumulation steps."
    )
    micro_batch_size: int = Field(16, gt=0, description="Samples per worker per forward pass.")
    learning_rate: float = Field(1e-3, gt=0, description="Peak learning rate of the trainable LM/projector.")
    projector_learning_rate: float | None = Field(
        None, gt=0, description="Projector's own peak learning rate (default: learning_rate)."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (LLaVA-1.5: 0).")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps with linear warmup.")
    lr_schedule: Literal["cosine", "constant"] = Field("cosine", description="Schedule after warmup.")
    max_grad_norm: float = Field(
        0.0,
        ge=0,
        description="Gradient clipping norm (0 disables; LLaVA-1.5's ZeRO configs set none, so it trained unclipped).",
    )
    tf32: bool = Field(
        True, description="TF32 matmuls on NVIDIA GPUs (LLaVA-1.5: --tf32 True); no effect on CPU."
    )
    gradient_checkpointing: bool = Field(True, description="Recompute LM activations in backward.")
    group_by_modality_length: bool = Field(
        True, description="LLaVA-1.5's batching: batches of one modality, grouped by length."
    )
    shuffle_window: int = Field(
        16384,
        gt=0,
        description=(
            "Rows per shuffle window: each epoch shuffles the shards' row groups and groups batches within "
            "windows of this many rows, so a worker holds at most its share of one window (docs/scale.md)."
        ),
    )
    packing: bool = Field(
        True,
        description="Pack each micro-batch's samples into one row with per-sample attention (no padding, same loss).",
    )
    attention: Literal["segments", "varlen"] = Field(
        "segments",
        description=(
            "Packed rows' per-sample attention: segments (one SDPA call per sample); varlen (one call of "
            "torch's variable-length FlashAttention on CUDA in bf16/fp16, else falls back to segments)."
        ),
    )
    freeze_vision_tower: bool = Field(True, description="Keep the vision encoder frozen (LLaVA: always).")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA settings when trainable is lora.")
    log_every_steps: int = Field(
        1,
        gt=0,
        description="MLflow metrics every N steps; a progress line every N steps or 10 s, whichever is coarser.",
    )
    val_fraction: float = Field(
        0.0, ge=0, lt=1, description="Share of the prepared samples held out for a validation loss (0: none)."
    )
    val_max_samples: int = Field(512, gt=0, description="At most this many held-out validation samples.")
    eval_every_steps: int | None = Field(
        None, gt=0, description="Validation loss every N steps (always at the end) when val_fraction > 0."
    )
    save_final_model: bool = Field(
        True, description="Write the consolidated final model and HF export (sweep trials turn it off)."
    )


class DeepSpeedConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(
        2, description="ZeRO stage (stage default: 2 pretrain, 3 finetune)."
    )
    offload_optimizer: bool = Field(False, description="Keep optimizer state in CPU memory.")
    offload_params: bool = Field(False, description="Keep parameters in CPU memory (ZeRO-3 only).")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 on GPU, fp32 on CPU."
    )

    @model_validator(mode="after")
    def _offload_params_needs_zero3(self) -> DeepSpeedConfig:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(
                "offload_params needs zero_stage 3; set deepspeed.zero_stage=3 or offload_params=false"
            )
        return self


class CheckpointConfig(Section):
    every_n_steps: int | None = Field(
        500, gt=0, description="Save a checkpoint every N optimizer steps (and always at the end)."
    )
    keep_last: int = Field(2, gt=0, description="How many recent checkpoints to keep.")


class ScalingConfig(Section):
    num_workers: int = Field(1, gt=0, description="Training workers (one per GPU on clusters).")
    use_gpu: bool | Literal["auto"] = Field(
        "auto", description="Train on GPUs; auto: when the cluster has any."
    )
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per worker.")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict,
        description="Extra Ray resources per worker (e.g. accelerator_type:H100: 0.001).",
    )
    max_failures: int = Field(
        3, ge=0, description="Worker-group restarts (from the latest checkpoint) before the job fails."
    )
    gpu_peak_tflops: float = Field(
        989.0,
        gt=0,
        description="Dense bf16 peak TFLOP/s of one GPU, the denominator of MFU (H100/H200 SXM: 989; A100: 312).",
    )


class TrackingConfig(Section):
    uri: str | None = Field(
        None, description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlruns local store)."
    )
    experiment: str = Field("llava-ray", description="MLflow experiment name.")
    required: bool = Field(
        True, description="Fail before work if the tracking server is unreachable (false: continue without)."
    )
    register_model: str | None = Field(None, description="Register the exported model under this name.")


class FaultConfig(Section):
    kill_rank: int | None = Field(None, ge=0, description="Fault injection: the worker rank to kill.")
    kill_at_step: int | None = Field(
        None, gt=0, description="Fault injection: kill after this optimizer step."
    )

    @model_validator(mode="after")
    def _both_or_neither(self) -> FaultConfig:
        if (self.kill_rank is None) != (self.kill_at_step is None):
            raise ValueError("set both kill_rank and kill_at_step to inject a failure, or neither")
        return self


class LlavaRayConfig(Section):
    """The whole configuration of a llava-ray job."""

    run: RunConfig = Field(default_factory=RunConfig, description="Run identity and storage.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Vision tower, projector and LM.")
    data: DataConfig = Field(default_factory=DataConfig, description="Data sources and preprocessing.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Stage and optimisation.")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig, description="DeepSpeed engine.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpointing.")
    scaling: ScalingConfig = Field(default_factory=ScalingConfig, description="Ray Train workers.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    fault: FaultConfig = Field(default_factory=FaultConfig, description="Failure rehearsal.")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="Evaluation and benchmarks.")
    generate: GenerateConfig = Field(
        default_factory=GenerateConfig, description="Instruction-data generation."
    )
    serve: ServeConfig = Field(
        default_factory=ServeConfig, description="Serving a trained model (llava-ray serve)."
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_stage_recipe(cls, raw: Any) -> Any:
        """Fill stage-dependent defaults that the YAML leaves unset from LLaVA-1.5's recipe."""
        if not isinstance(raw, dict):
            return raw
        train = raw.get("train") or {}
        if not isinstance(train, dict):
            return raw
        stage = train.get("stage", "pretrain")
        trainable = train.get("trainable") or DEFAULT_TRAINABLE.get(stage)
        recipe = STAGE_RECIPES.get((stage, trainable))
        if recipe is None:
            return raw  # an invalid stage/trainable pair is reported by the field validators
        filled = dict(raw)
        for section, values in recipe.items():
            current = filled.get(section)
            if current is None:
                current = {}
            if not isinstance(current, dict):
                continue
            filled[section] = {**values, **current}
        filled["train"] = {**filled["train"], "trainable": trainable}
        return filled


def cross_section_problems(config: LlavaRayConfig) -> list[str]:
    """Problems that no single field can see; each names the keys and the fix.

    Run by the loader once every field is valid.
    """
    problems = []
    train, data = config.train, config.data
    if train.stage == "pretrain" and train.trainable != "projector":
        problems.append(
            f"train.trainable={train.trainable!r} with train.stage='pretrain': stage 1 trains only the "
            "projector; set train.trainable=projector or train.stage=finetune"
        )
    if train.stage == "finetune" and train.trainable == "projector":
        problems.append(
            "train.trainable='projector' with train.stage='finetune': stage 2 trains the LM too; "
            "use train.trainable=full or lora"
        )
    if train.stage == "finetune" and data.template == "plain":
        problems.append(
            "data.template='plain' with train.stage='finetune': 'plain' drops the instructions; "
            "use vicuna_v1 (LLaVA-1.5) or another chat template"
        )
    if data.tokenization == "llava" and data.template == "tokenizer":
        problems.append(
            "data.tokenization='llava' with data.template='tokenizer': 'llava' splits the text a llava-ray "
            "template renders; set data.template (e.g. vicuna_v1) or data.tokenization=joined"
        )
    if train.eval_every_steps and not train.val_fraction:
        problems.append(
            f"train.eval_every_steps={train.eval_every_steps} without a validation split; "
            "set train.val_fraction (e.g. 0.05) or remove train.eval_every_steps"
        )
    per_step = train.micro_batch_size * config.scaling.num_workers
    if train.global_batch_size % per_step:
        problems.append(
            f"train.global_batch_size={train.global_batch_size} is not a multiple of "
            f"train.micro_batch_size x scaling.num_workers = {per_step}; "
            f"use a multiple such as {per_step * max(1, round(train.global_batch_size / per_step))}"
        )
    return problems
