"""The Ray Serve application: an OpenAI-compatible chat API and a web chat page over one model per replica.

Routes (under ``serve.route_prefix``):

- ``POST /v1/chat/completions``: streamed (server-sent events, ending ``data: [DONE]``) or not;
  the request format and error codes are :mod:`llava_ray.serving.protocol`'s.
- ``GET /v1/models``: the one model served, under ``serve.model_name``.
- ``GET /``: the chat page (``serve.chat_page``); ``GET /health``; ``GET /stats``: this replica's
  requests and batch sizes (how batching across callers is seen).

Every request, streamed or not, joins :meth:`LlavaServer.decode`, a ``@serve.batch`` async
generator: requests arriving within ``serve.batch_wait_timeout_s`` of each other (up to
``serve.max_batch_size``) are decoded together by :func:`llava_ray.serving.engine.generate_batch`
in a worker thread, each row's text streamed back as it is produced. Bad input is refused with a
4xx before it joins a batch, so it never costs the others or the replica.

:func:`build_app` is the application builder ``serveConfigV2``, ``serve run`` and ``llava-ray
serve`` use: its ``args`` are the ``serve`` config section.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' parameter types (Request) at run time,
# and through serve.ingress's class wrapper string annotations are not resolved. For the same wrapper,
# everything the class uses is defined above it.

import asyncio
import html
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import PurePosixPath
from typing import Any

import ray
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve

from llava_ray.config.serve import ServeConfig, serve_problems
from llava_ray.evaluation.loaded_model import InferenceModel, load_inference_model, pixels_from_bytes
from llava_ray.model.generate import prompt_input_ids
from llava_ray.serving.engine import Job, RowUpdate, generate_batch
from llava_ray.serving.protocol import (
    ChatRequest,
    ParsedChat,
    RequestError,
    check_request,
    chunk_body,
    completion_body,
    completion_id,
    image_bytes,
    parse_messages,
    usage,
)
from llava_ray.utils.skips import Skipped

logger = logging.getLogger("llava_ray.serving")

api = FastAPI(title="llava-ray", docs_url=None, redoc_url=None)


def served_model_name(config: ServeConfig) -> str:
    """The id clients send: ``serve.model_name``, else the model folder's name (its run's, for final/)."""
    if config.model_name:
        return config.model_name
    parts = [p for p in PurePosixPath(str(config.model).replace("s3://", "")).parts if p not in ("/", "")]
    while parts and parts[-1] in ("final", "hf"):
        parts.pop()
    return parts[-1] if parts else "llava-ray"


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _validation_message(error: Exception) -> str:
    errors = getattr(error, "errors", None)
    if callable(errors):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors())
    return f"the body is not valid JSON: {error}"


@api.exception_handler(RequestError)
async def _request_error(request: Request, error: RequestError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in error.errors()
    )
    return JSONResponse(RequestError(400, problems, "invalid_request").body(), status_code=400)


@serve.deployment(name="LlavaServer")
@serve.ingress(api)
class LlavaServer:
    """One replica: one model on its device, batching the requests that reach it."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.name = served_model_name(config)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.loaded: InferenceModel = load_inference_model(str(config.model), config.template, device=device)
        self.decode.set_max_batch_size(config.max_batch_size)
        self.decode.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llava-generate")
        self.batch_sizes: Counter[int] = Counter()
        self.requests = Counter()
        logger.info(
            "serving %s as %r on %s (template %s)", config.model, self.name, device, self.loaded.template
        )

    # --- routes -------------------------------------------------------------------------------

    @api.get("/", response_class=HTMLResponse)
    async def page(self, request: Request) -> HTMLResponse:
        if not self.config.chat_page:
            raise RequestError(404, "the chat page is off (serve.chat_page: false)", "not_found")
        page = resources.files("llava_ray.serving").joinpath("static/chat.html").read_text()
        base = request.scope.get("root_path", "").rstrip("/")
        return HTMLResponse(
            page.replace("{{MODEL}}", html.escape(self.name)).replace("{{BASE}}", html.escape(base))
        )

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        replica = serve.get_replica_context().replica_id.unique_id
        return {"status": "ok", "model": self.name, "replica": replica}

    @api.get("/stats")
    async def stats(self) -> dict[str, Any]:
        return {
            "requests": dict(self.requests),
            "batches": sum(self.batch_sizes.values()),
            "batch_sizes": {str(size): count for size, count in sorted(self.batch_sizes.items())},
            "largest_batch": max(self.batch_sizes, default=0),
        }

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": self.name, "object": "model", "created": 0, "owned_by": "llava-ray"}],
        }

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        await self._check_size(request)
        try:
            body = ChatRequest.model_validate_json(await request.body())
        except ValueError as error:  # pydantic's ValidationError, or a body that is no JSON
            raise RequestError(400, _validation_message(error), "invalid_request") from None
        check_request(body, self.name)
        parsed = parse_messages(body.messages, self.config)
        job = await asyncio.get_running_loop().run_in_executor(None, self._job, body, parsed)
        self.requests["stream" if body.stream else "complete"] += 1
        id_ = completion_id()
        prompt_tokens = len(job.prompt_ids)
        if body.stream:
            return StreamingResponse(
                self._events(id_, job, prompt_tokens, body.include_usage), media_type="text/event-stream"
            )
        text, finish_reason, completion_tokens = [], "stop", 0
        async for update in self.decode(job):
            text.append(update.text)
            finish_reason = update.finish_reason or finish_reason
            completion_tokens = update.completion_tokens
        return completion_body(id_, self.name, "".join(text), finish_reason, prompt_tokens, completion_tokens)

    # --- request -> job ---------------------------------------------------------------------------

    async def _check_size(self, request: Request) -> None:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.config.max_request_bytes:
            raise RequestError(
                413,
                f"the request is {length} bytes, over this server's {self.config.max_request_bytes} "
                "(serve.max_request_bytes)",
                "request_too_large",
            )

    def _job(self, body: ChatRequest, parsed: ParsedChat) -> Job:
        """Images decoded and the prompt rendered as in training; the answer's room checked."""
        config, loaded = self.config, self.loaded
        pixels = []
        for index, url in enumerate(parsed.image_urls):
            data = image_bytes(url, config, param=f"image {index + 1}")
            try:
                pixels.append(pixels_from_bytes(data, loaded.tower_input, max_pixels=config.max_image_pixels))
            except Skipped as error:
                code = "image_too_large" if error.reason == "image_too_large" else "invalid_image"
                raise RequestError(
                    400, f"image {index + 1} cannot be used: {error}", code, "messages"
                ) from None
        model = loaded.model
        try:
            prompt_ids = prompt_input_ids(
                parsed.conversation,
                loaded.template,
                loaded.tokenizer,
                model.image_positions,
                model.tokenization,
                system=parsed.system,
            )
        except Skipped as error:
            raise RequestError(400, str(error), error.reason, "messages") from None
        asked = body.max_completion_tokens or body.max_tokens
        limit = loaded.max_positions
        room = config.max_tokens if limit is None else min(config.max_tokens, limit - len(prompt_ids))
        if room < 1 or (asked is not None and limit is not None and len(prompt_ids) + asked > limit):
            raise RequestError(
                400,
                f"This model's maximum context length is {limit} positions. However, the messages take "
                f"{len(prompt_ids)} (each image {model.image_positions})"
                + (f" and max_tokens asks {asked}" if asked else "")
                + ". Shorten the conversation or lower max_tokens.",
                "context_length_exceeded",
                "messages",
            )
        return Job(
            prompt_ids=prompt_ids,
            pixels=torch.stack(pixels) if pixels else None,
            max_tokens=min(asked or room, room),
            temperature=config.temperature if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
        )

    # --- batched decoding -------------------------------------------------------------------------

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def decode(self, jobs: list[Job]) -> AsyncIterator[list[RowUpdate | type[StopIteration]]]:
        """Decode ``jobs`` together (the batch size and wait are set from the config in ``__init__``)."""
        self.batch_sizes[len(jobs)] += 1
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[list[RowUpdate] | None] = asyncio.Queue()

        def emit(updates: list[RowUpdate]) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, updates)

        def run() -> None:
            try:
                generate_batch(self.loaded, jobs, emit)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        work = loop.run_in_executor(self.executor, run)
        ended = [False] * len(jobs)
        while (updates := await queue.get()) is not None:
            out: list[RowUpdate | type[StopIteration]] = []
            for row, update in enumerate(updates):
                out.append(StopIteration if ended[row] else update)
                ended[row] = ended[row] or update.finish_reason is not None
            yield out
        await work  # a failure in generation reaches every caller of the batch

    async def _events(
        self, id_: str, job: Job, prompt_tokens: int, include_usage: bool
    ) -> AsyncIterator[str]:
        """The SSE stream of one answer: a role chunk, content chunks, the finish chunk, [usage], [DONE]."""
        yield _sse(chunk_body(id_, self.name, {"role": "assistant", "content": ""}))
        completion_tokens = 0
        try:
            async for update in self.decode(job):
                completion_tokens = update.completion_tokens
                if update.text:
                    yield _sse(chunk_body(id_, self.name, {"content": update.text}))
                if update.finish_reason:
                    yield _sse(chunk_body(id_, self.name, {}, update.finish_reason))
        except Exception as error:  # headers are sent: report in the stream, as OpenAI does
            logger.exception("generation failed for %s", id_)
            yield _sse(
                {"error": {"message": f"generation failed: {error}", "type": "server_error", "code": None}}
            )
        if include_usage:
            body = chunk_body(id_, self.name, {})
            body["choices"], body["usage"] = [], usage(prompt_tokens, completion_tokens)
            yield _sse(body)
        yield "data: [DONE]\n\n"


def deployment_options(config: ServeConfig) -> dict[str, Any]:
    """Replicas, autoscaling and resources of the deployment, from the config (GPU per replica: see the field)."""
    gpus = config.num_gpus_per_replica
    if gpus == "auto":
        gpus = 1 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0
    options: dict[str, Any] = {
        "max_ongoing_requests": config.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": config.num_cpus_per_replica, "num_gpus": gpus},
    }
    if config.autoscaling is not None:
        options["autoscaling_config"] = config.autoscaling.model_dump()
    else:
        options["num_replicas"] = config.num_replicas
    return options


def build_app(args: dict[str, Any] | ServeConfig) -> serve.Application:
    """The application of ``serve`` settings ``args`` (the RayService's ``serveConfigV2`` args)."""
    config = args if isinstance(args, ServeConfig) else ServeConfig.model_validate(args)
    problems = serve_problems(config)
    if problems:
        raise ValueError("the serve settings cannot serve:\n  - " + "\n  - ".join(problems))
    return LlavaServer.options(**deployment_options(config)).bind(config)
