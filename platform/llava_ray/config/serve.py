"""The ``serve`` config section: the model behind ``llava-ray serve``, its replicas, batching and input limits.

Read by :mod:`llava_ray.serving` (``llava-ray serve``, ``jobs/serve.py``, the RayService manifest's
``serveConfigV2`` args). Two backends:

- ``llava-ray`` (default): our own Ray Serve deployment: any llava-ray or Hugging Face LLaVA folder,
  CPU or GPU, requests batched across callers with ``@serve.batch``.
- ``vllm``: Ray's ``ray.serve.llm`` OpenAI app with vLLM, for GPU clusters; it takes the Hugging Face
  export (``final/hf``) and needs ``ray[llm]`` (vLLM) in the image. Validated here, run by Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MiB = 2**20


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ServeAutoscaling(_Section):
    """Ray Serve's replica autoscaling (``autoscaling_config``), used when set instead of ``num_replicas``."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas (0 lets an idle app release its GPUs).")
    max_replicas: int = Field(4, ge=1, description="Most replicas.")
    target_ongoing_requests: float = Field(
        4.0, gt=0, description="Requests in flight per replica that autoscaling aims at."
    )
    upscale_delay_s: float = Field(30.0, ge=0, description="Load must stay high this long before a scale-up.")
    downscale_delay_s: float = Field(
        600.0, ge=0, description="Load must stay low this long before a scale-down."
    )

    @model_validator(mode="after")
    def _ordered(self) -> ServeAutoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas={self.min_replicas} > max_replicas={self.max_replicas}; raise max_replicas"
            )
        return self


class VllmConfig(_Section):
    """``backend: vllm``: what ``ray.serve.llm.LLMConfig`` gets (see docs/serving.md)."""

    accelerator_type: str | None = Field(
        None, description="GPU type the replicas need, as Ray names it (H100, A100, L4, ...)."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one replica spans.")
    max_model_len: int | None = Field(None, gt=0, description="Context length (default: the model's).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of GPU memory vLLM takes.")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Further vLLM engine arguments, passed as they are."
    )


class ServeConfig(_Section):
    """How ``llava-ray serve`` serves a model: OpenAI-compatible ``/v1/chat/completions`` plus a chat page."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    model: str | None = Field(
        None, description="Model folder or s3:// URL: a run's final/ (or final/hf); `serve --model` sets it."
    )
    model_name: str | None = Field(
        None, description="Model id clients send and /v1/models lists (default: the folder's name)."
    )
    template: str | None = Field(
        None, description="Conversation template (default: the one stored with the model)."
    )
    backend: Literal["llava-ray", "vllm"] = Field(
        "llava-ray", description="llava-ray (any device, batched) or vllm (ray.serve.llm on GPUs)."
    )
    app_name: str = Field("llava-ray", description="Ray Serve application name.")
    host: str = Field("127.0.0.1", description="HTTP address (0.0.0.0 to listen on every interface).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    route_prefix: str = Field("/", description="Path the app is mounted at.")
    num_replicas: int = Field(1, ge=1, description="Replicas (one model each), when autoscaling is unset.")
    autoscaling: ServeAutoscaling | None = Field(
        None, description="Autoscale replicas instead of num_replicas."
    )
    max_ongoing_requests: int = Field(32, gt=0, description="Requests one replica takes at once.")
    num_gpus_per_replica: float | Literal["auto"] = Field(
        "auto", description="GPUs per replica: auto = 1 where the cluster has GPUs, else 0."
    )
    num_cpus_per_replica: float = Field(1.0, ge=0, description="CPUs reserved per replica.")
    max_batch_size: int = Field(8, gt=0, description="Requests decoded together in one batch.")
    batch_wait_timeout_s: float = Field(
        0.05, ge=0, description="How long a batch waits for more requests before it starts."
    )
    max_tokens: int = Field(512, gt=0, description="Longest answer; a request asking more is cut to this.")
    temperature: float = Field(
        0.2, ge=0, le=2, description="Temperature when a request sets none (LLaVA: 0.2)."
    )
    max_images_per_request: int = Field(
        1, ge=0, description="Images one request may carry (LLaVA is trained with one per conversation)."
    )
    max_image_bytes: int = Field(10 * MiB, gt=0, description="Largest image file accepted, in bytes.")
    max_image_pixels: int = Field(
        40_000_000, gt=0, description="Largest image accepted, width x height (guards decompression bombs)."
    )
    max_request_bytes: int = Field(
        32 * MiB,
        gt=0,
        description="Largest request body; a larger one is refused with 413 before it is read.",
    )
    allow_remote_images: bool = Field(
        False, description="Fetch http(s) image URLs; off: only base64 data URLs are accepted."
    )
    remote_image_hosts: list[str] = Field(
        default_factory=list, description="With allow_remote_images: the hosts allowed (empty: any)."
    )
    remote_image_timeout_s: float = Field(10.0, gt=0, description="Timeout of one remote image download.")
    chat_page: bool = Field(True, description="Serve the web chat page at the app's root.")
    vllm: VllmConfig = Field(default_factory=VllmConfig, description="Settings of backend: vllm.")

    @field_validator("route_prefix")
    @classmethod
    def _route_prefix(cls, value: str) -> str:
        if not value.startswith("/") or (len(value) > 1 and value.endswith("/")):
            raise ValueError("start with '/' and end without one, e.g. / or /llava")
        return value

    @field_validator("remote_image_hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        bad = [host for host in value if "/" in host or not host]
        if bad:
            raise ValueError(f"give bare host names such as images.example.com, not {bad}")
        return value


def serve_problems(config: ServeConfig) -> list[str]:
    """What keeps ``config`` from serving, found before anything starts; each names the key and the fix."""
    problems = []
    if not config.model:
        problems.append("serve.model is unset; pass --model DIR (a training run's final/ folder)")
    if config.remote_image_hosts and not config.allow_remote_images:
        problems.append(
            "serve.remote_image_hosts is set but serve.allow_remote_images is false; "
            "set serve.allow_remote_images=true or drop the hosts"
        )
    if config.max_ongoing_requests < config.max_batch_size:
        problems.append(
            f"serve.max_ongoing_requests={config.max_ongoing_requests} < serve.max_batch_size="
            f"{config.max_batch_size}: a replica could never fill a batch; raise max_ongoing_requests"
        )
    if config.backend == "vllm":
        if config.num_gpus_per_replica == 0:
            problems.append(
                "serve.backend=vllm with serve.num_gpus_per_replica=0: vLLM runs on GPUs; "
                "use backend llava-ray on CPUs"
            )
        if config.model and (Path(config.model) / "llava_ray_config.json").is_file():
            problems.append(
                f"serve.backend=vllm with serve.model={config.model!r}: vLLM loads the Hugging Face export; "
                "point serve.model at the run's final/hf folder"
            )
        if config.template not in (None, "tokenizer"):
            problems.append(
                f"serve.template={config.template!r} with serve.backend=vllm: vLLM renders with the export's "
                "chat template (the training template, written by the export); unset serve.template"
            )
    return problems
