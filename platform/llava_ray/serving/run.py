"""Start the serving application on a Ray cluster and keep it up while the command (or Ray job) runs.

``llava-ray serve --model RUN/final`` and ``jobs/serve.py`` call :func:`run_serve`. It checks the
``serve`` settings (every problem at once, before Ray starts), connects to the cluster named by
``RAY_ADDRESS`` (set inside a Ray job) or starts a local Ray, starts Serve's HTTP proxy on
``serve.host:serve.port`` and deploys the app under ``serve.app_name``. Blocking, it then waits for
Ctrl-C or SIGTERM (``ray job stop``): on a cluster it deletes the app, and a local Ray ends with the
process, so the app lives as long as its command. On Kubernetes a RayService deploys
:func:`build_app` instead (``cluster/kuberay/rayservice.yaml``).

``serve.backend: vllm`` deploys Ray's ``ray.serve.llm`` OpenAI app (vLLM) on the Hugging Face export
instead: :func:`vllm_llm_config` builds its ``LLMConfig`` from the same section.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import ray
from ray import serve

from llava_ray.config.loader import ConfigError
from llava_ray.config.serve import ServeConfig, serve_problems
from llava_ray.serving.app import build_app, served_model_name

logger = logging.getLogger("llava_ray.serving")


def vllm_llm_config(config: ServeConfig) -> dict[str, Any]:
    """The ``ray.serve.llm`` ``LLMConfig`` (as a dict) serving ``config.model`` with vLLM."""
    vllm = config.vllm
    deployment: dict[str, Any] = {"max_ongoing_requests": config.max_ongoing_requests}
    if config.autoscaling is not None:
        deployment["autoscaling_config"] = config.autoscaling.model_dump(
            include={"min_replicas", "max_replicas", "target_ongoing_requests"}
        )
    else:
        deployment["num_replicas"] = config.num_replicas
    engine = {
        "tensor_parallel_size": vllm.tensor_parallel_size,
        "gpu_memory_utilization": vllm.gpu_memory_utilization,
        **({"max_model_len": vllm.max_model_len} if vllm.max_model_len else {}),
        **vllm.engine_kwargs,
    }
    model = str(config.model)
    # ray.serve.llm downloads a bucket's model through a mirror config; a local path or hub id goes as it is.
    source: str | dict[str, str] = {"bucket_uri": model} if model.startswith(("s3://", "gs://")) else model
    llm_config: dict[str, Any] = {
        "model_loading_config": {"model_id": served_model_name(config), "model_source": source},
        "deployment_config": deployment,
        "engine_kwargs": engine,
    }
    if vllm.accelerator_type:
        llm_config["accelerator_type"] = vllm.accelerator_type
    return llm_config


def check_vllm_config(config: ServeConfig) -> None:
    """Validate :func:`vllm_llm_config` with Ray's own ``LLMConfig`` model, which imports without vLLM."""
    # Private path: the public ray.serve.llm re-exports it but imports vLLM first.
    from pydantic import ValidationError
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig

    try:
        LLMConfig(**vllm_llm_config(config))
    except ValidationError as error:
        raise ConfigError(
            [
                f"serve.vllm / serve settings as ray.serve.llm.LLMConfig: {e['loc']}: {e['msg']}"
                for e in error.errors()
            ]
        ) from None


def serve_deploy_config(config: ServeConfig) -> dict[str, Any]:
    """The Serve config (``serve deploy`` file, a RayService's ``serveConfigV2``) of these settings."""
    problems = serve_problems(config)
    if problems:
        raise ConfigError(problems)
    http = {"host": config.host, "port": config.port}
    if config.backend == "vllm":
        check_vllm_config(config)
        import_path, args = "ray.serve.llm:build_openai_app", {"llm_configs": [vllm_llm_config(config)]}
    else:
        cli_only = {"host", "port", "app_name", "route_prefix", "vllm", "backend"}
        import_path = "llava_ray.serving.app:build_app"
        args = config.model_dump(mode="json", exclude=cli_only)
    return {
        "http_options": http,
        "applications": [
            {
                "name": config.app_name,
                "import_path": import_path,
                "route_prefix": config.route_prefix,
                "args": args,
            }
        ],
    }


def _application(config: ServeConfig) -> serve.Application:
    if config.backend == "llava-ray":
        return build_app(config)
    try:
        from ray.serve.llm import LLMConfig, build_openai_app
    except ImportError as error:
        raise ConfigError(
            [f"serve.backend=vllm needs vLLM on the cluster (pip install 'ray[llm]'): {error}"]
        ) from None
    return build_openai_app({"llm_configs": [LLMConfig(**vllm_llm_config(config))]})


def run_serve(config: ServeConfig, block: bool = True) -> str:
    """Deploy the app (see the module docstring); returns its base URL. Raises ConfigError on bad settings."""
    serve_deploy_config(config)  # every problem, before Ray starts
    on_a_cluster = bool(os.environ.get("RAY_ADDRESS"))  # a Ray job, or a cluster named by the user
    if not ray.is_initialized():
        ray.init(address=None if on_a_cluster else "local")
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(_application(config), name=config.app_name, route_prefix=config.route_prefix, blocking=False)
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    url = f"http://{host}:{config.port}{config.route_prefix.rstrip('/')}"
    logger.info(
        "serving %r from %s: chat page %s/, OpenAI API %s/v1 (model %r)",
        config.app_name,
        config.model,
        url,
        url,
        served_model_name(config),
    )
    if block:
        _wait_for_stop()
        if on_a_cluster:  # the cluster outlives this process: take the app down with it
            serve.delete(config.app_name)
        # A local instance ends with this process (and Ctrl-C has already reached its processes).
        logger.info("stopped %r", config.app_name)
    return url


def _wait_for_stop() -> None:
    """Until Ctrl-C or SIGTERM."""
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
