"""The ``generate`` config section: instruction data from COCO-style annotations and a text-only LLM.

Read by :func:`llava_ray.generation.run_generate` (``llava-ray generate-data``,
``jobs/generate_data.py``). Every field has a default so the root config builds without the
section; what a run needs (paths, a model) is checked by
:func:`llava_ray.generation.job.generate_problems` before any request is made.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from llava_ray.config.endpoint import EndpointConfig

ResponseType = Literal["conversation", "detail", "complex"]
RESPONSE_TYPES: tuple[ResponseType, ...] = ("conversation", "detail", "complex")


class GenerateConfig(EndpointConfig):
    """LLaVA-Instruct-style data generation (conversation, detailed description, complex reasoning)."""

    annotations_path: str | None = Field(
        None, description="COCO instances file (images, categories, pixel boxes), local or s3://."
    )
    captions_path: str | None = Field(
        None, description="COCO captions file (five per image), local or s3://."
    )
    image_root: str | None = Field(
        None,
        description="Image folder the output's paths are relative to; if set, missing images are skipped.",
    )
    image_prefix: str = Field(
        "",
        description="Folder prepended to each COCO file_name in the output's image paths (e.g. train2017).",
    )
    output_path: str | None = Field(
        None, description="LLaVA JSON array to write (local); report.json and the journal go beside it."
    )
    types: list[ResponseType] = Field(
        default_factory=lambda: list(RESPONSE_TYPES),
        description="Response types to generate: conversation, detail, complex.",
    )
    limit: int | None = Field(None, gt=0, description="Use only the first N images of the annotations.")
    backend: Literal["openai", "hf"] = Field(
        "openai", description="openai: any OpenAI-compatible endpoint; hf: a local causal LM on Ray actors."
    )
    temperature: float = Field(0.7, ge=0, le=2, description="Sampling temperature (0: greedy).")
    max_concurrency: int = Field(8, gt=0, description="Requests in flight at once, over all actors.")
    requests_per_second: float | None = Field(
        None, gt=0, description="Request rate limit over all actors, retries included (None: no limit)."
    )
    num_actors: int = Field(
        2, gt=0, description="Ray actors making requests or running the model; limits are split between them."
    )
    batch_size: int | None = Field(
        None, gt=0, description="Requests per actor call (default: the actor's share of max_concurrency)."
    )
    retry_failed: bool = Field(
        False, description="On a rerun, request again the pairs whose request failed (not only missing ones)."
    )
    prompts_dir: str | None = Field(
        None, description="Folder of {type}.yaml prompt files replacing the shipped ones."
    )
    hf_model: str | None = Field(
        None, description="Causal LM with a chat template for backend hf: local folder, hub name or s3://."
    )
    hf_num_gpus: float = Field(0, ge=0, description="GPUs per hf actor (0: run on the CPU).")
    seed: int | None = Field(
        None, description="Seed of the detail instructions and hf sampling (default: run.seed)."
    )

    @field_validator("types")
    @classmethod
    def _types_nonempty_and_unique(cls, value: list[ResponseType]) -> list[ResponseType]:
        if not value:
            raise ValueError(f"name at least one response type of {list(RESPONSE_TYPES)}")
        if len(set(value)) != len(value):
            raise ValueError("each response type may appear once; remove the repeated one")
        return value
