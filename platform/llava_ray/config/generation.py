"""The ``generate`` config section: instruction data from COCO-style annotations and a text-only LLM.

Read by :func:`llava_ray.generation.run_generate` (``llava-ray generate-data``,
``jobs/generate_data.py``). Every field has a default so the root config builds without the
section; what a run needs (paths, a model) is checked by
:func:`llava_ray.generation.job.generate_problems` before any request is made.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llava_ray.config.endpoint import EndpointConfig

ResponseType = Literal["conversation", "detail", "complex"]
RESPONSE_TYPES: tuple[ResponseType, ...] = ("conversation", "detail", "complex")


class ResponseMix(BaseModel):
    """Relative share of each response type, e.g. LLaVA-Instruct-158K's 58 / 23 / 77 (thousands).

    The weights are normalised to shares; a type left out (or 0) is not generated. How the shares
    become per-type counts and which image gets which type: :mod:`llava_ray.generation.mix`.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    conversation: float = Field(
        0, ge=0, allow_inf_nan=False, description="Weight of multi-turn conversations."
    )
    detail: float = Field(0, ge=0, allow_inf_nan=False, description="Weight of detailed descriptions.")
    complex: float = Field(0, ge=0, allow_inf_nan=False, description="Weight of complex-reasoning questions.")

    @model_validator(mode="after")
    def _one_positive(self) -> ResponseMix:
        if not any(self.weights().values()):
            raise ValueError(
                "every weight is 0; give at least one response type a positive weight, "
                "e.g. {conversation: 58, detail: 23, complex: 77} (the paper's mix)"
            )
        return self

    def weights(self) -> dict[ResponseType, float]:
        """Every type's weight, in :data:`RESPONSE_TYPES` order."""
        return {name: getattr(self, name) for name in RESPONSE_TYPES}

    def shares(self) -> dict[ResponseType, float]:
        """The types with a positive weight and their share of all pairs (summing to 1)."""
        weights = self.weights()
        total = sum(weights.values())
        return {name: weight / total for name, weight in weights.items() if weight > 0}


# One declaration per concept: the mix names exactly the response types, in the same order.
if tuple(ResponseMix.model_fields) != RESPONSE_TYPES:
    raise RuntimeError(
        f"ResponseMix fields {tuple(ResponseMix.model_fields)} != RESPONSE_TYPES {RESPONSE_TYPES}"
    )


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
        description="Response types to generate for every image (without generate.mix): conversation, detail, complex.",
    )
    mix: ResponseMix | None = Field(
        None,
        description="Per-type weights, e.g. {conversation: 58, detail: 23, complex: 77}; each image then "
        "gets some of the types, not all (None: every image gets every type of generate.types).",
    )
    pairs_per_image: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="With generate.mix: (image, type) pairs per image on average, so round(images x this) "
        "in all (default 1: one type per image).",
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

    @model_validator(mode="after")
    def _mix_fits(self) -> GenerateConfig:
        if self.mix is None:
            if self.pairs_per_image is not None:
                raise ValueError(
                    f"pairs_per_image = {self.pairs_per_image} needs generate.mix (without it every image gets "
                    "every type of generate.types); set generate.mix or remove pairs_per_image"
                )
            return self
        if "types" in self.model_fields_set:
            raise ValueError(
                f"both types = {self.types} and mix are set; the mix alone names the types (a type with "
                "weight 0 or left out is not generated): remove generate.types"
            )
        shares = self.mix.shares()
        per_image = self.pairs_per_image or 1.0
        most = max(shares, key=shares.__getitem__)
        if shares[most] * per_image > 1 + 1e-9:
            raise ValueError(
                f"pairs_per_image = {per_image} asks for {shares[most] * per_image:.2f} {most} pairs per image, "
                f"but an image gets each type at most once; with this mix pairs_per_image can be at most "
                f"{1 / shares[most]:.4g}"
            )
        return self

    def response_types(self) -> list[ResponseType]:
        """The types this config generates: the mix's positive-weight types, else :attr:`types`."""
        return list(self.mix.shares()) if self.mix is not None else list(self.types)
