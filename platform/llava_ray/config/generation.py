"""The ``generate`` config section: instruction data from COCO-style annotations and a text-only LLM.

Read by :func:`llava_ray.generation.run_generate` (``llava-ray generate-data``,
``jobs/generate_data.py``). Every field has a default so the root config builds without the
section; what a run needs (paths, a model) is checked by
:func:`llava_ray.generation.pipeline.generate_problems` before any request is made.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

ResponseType = Literal["conversation", "detail", "complex"]
RESPONSE_TYPES: tuple[ResponseType, ...] = ("conversation", "detail", "complex")


class GenerateConfig(BaseModel):
    """LLaVA-Instruct-style data generation (conversation, detailed description, complex reasoning)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

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
    base_url: str | None = Field(
        None,
        description="API root such as http://host:8000/v1 (default: $OPENAI_BASE_URL, else OpenAI's).",
    )
    model: str | None = Field(None, description="Model name sent to the endpoint (backend openai).")
    api_key: SecretStr | None = Field(
        None, description="API key (default: $OPENAI_API_KEY); never printed or logged."
    )
    temperature: float = Field(0.7, ge=0, le=2, description="Sampling temperature (0: greedy).")
    max_tokens: int = Field(1024, gt=0, description="Most tokens per reply; longer replies are skipped.")
    request_timeout_s: float = Field(120.0, gt=0, description="Timeout of one HTTP request attempt.")
    max_retries: int = Field(
        5, ge=0, description="Retries on 429, 5xx, timeouts and connection errors, after the first try."
    )
    backoff_initial_s: float = Field(
        1.0, ge=0, description="First retry wait; doubles each retry, with jitter (Retry-After wins)."
    )
    backoff_max_s: float = Field(60.0, ge=0, description="Longest wait between two attempts.")
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

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("use an http:// or https:// URL such as http://127.0.0.1:8000/v1")
        return value
