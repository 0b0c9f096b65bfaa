"""Relative paths in a config, made absolute on the driver before any worker starts.

Ray Train runs each worker in its own working directory (and Ray Data's, Serve's and evaluation's
actors may run on other nodes), so a relative ``data/synthetic/stage1.json`` or ``./llava_ray_runs``
means nothing there. :func:`resolve_paths` makes every relative path of a loaded config absolute
against the directory the command started in (for ``ray job submit --working-dir .``: the job's
unpacked working directory, where its driver starts), so a stage writes its final model where the
user looks for it and the next stage finds it.

The rule (docs/configuration.md, "Paths"):

- URLs (``s3://``, ``gs://``, ``file://``, ``http://``...) and absolute paths are left alone;
  ``~`` is expanded.
- :data:`PATH_FIELDS` are declared paths: a relative value is always resolved, whether or not it
  exists yet (an output folder, a model stage 1 has yet to write).
- :data:`HUB_OR_PATH_FIELDS` also take Hugging Face hub names (``lmsys/vicuna-7b-v1.5``): a relative
  value is resolved only when it exists here or starts with ``./`` or ``../``; anything else stays
  a hub name.
- ``tracking.uri``: a ``sqlite:///`` database or a plain store folder given relative is resolved;
  server URLs are left alone.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from llava_ray.config.schema import LlavaRayConfig

# Dotted field paths; "*" steps into every item of a list.
PATH_FIELDS: tuple[str, ...] = (
    "run.root",
    "run.storage_path",
    "model.init_from",
    "model.projector_weights",
    "data.sources.*.path",
    "data.sources.*.image_root",
    "data.root",
    "data.prepared_path",
    "evaluate.data_path",
    "evaluate.reference_answers",
    "evaluate.context",
    "evaluate.image_root",
    "evaluate.output_dir",
    "evaluate.scienceqa_ensemble.scienceqa_dir",
    "evaluate.scienceqa_ensemble.results",
    "generate.annotations_path",
    "generate.captions_path",
    "generate.image_root",
    "generate.output_path",
    "generate.prompts_dir",
)
HUB_OR_PATH_FIELDS: tuple[str, ...] = (
    "model.vision_tower",
    "model.language_model",
    "model.tokenizer",
    "evaluate.model",
    "generate.hf_model",
    "serve.model",
)
TRACKING_URI_FIELD = "tracking.uri"


def is_url(value: str) -> bool:
    """True for ``scheme://...`` (s3, gs, file, http, ...): never a local relative path."""
    scheme, sep, _ = value.partition("://")
    return bool(sep) and scheme.isidentifier()


def resolve_path(value: str, base: Path) -> str:
    """A declared path made absolute against ``base``; URLs and absolute paths unchanged."""
    if is_url(value):
        return value
    expanded = os.path.expanduser(value)
    if os.path.isabs(expanded):
        return expanded
    return os.path.normpath(os.path.join(base, expanded))


def resolve_hub_or_path(value: str, base: Path) -> str:
    """A path made absolute when it is one here (it exists, or starts with ./ or ../); else a hub name."""
    if is_url(value):
        return value
    expanded = os.path.expanduser(value)
    explicit = expanded.startswith(("./", "../", ".\\", "..\\")) or expanded in (".", "..")
    if os.path.isabs(expanded) or explicit or (base / expanded).exists():
        return resolve_path(value, base)
    return value


def resolve_tracking_uri(value: str, base: Path) -> str:
    """``sqlite:///mlflow.db`` -> ``sqlite:////abs/mlflow.db``; a plain folder made absolute; URLs unchanged."""
    prefix = "sqlite:///"
    if value.startswith(prefix):
        database = value.removeprefix(prefix)
        return (
            value
            if database.startswith("/") or database == ":memory:"
            else prefix + resolve_path(database, base)
        )
    if ":" in value.split("/", 1)[0]:  # any other scheme: a server or a URL
        return value
    return resolve_path(value, base)


def resolve_paths(config: LlavaRayConfig, base: str | Path | None = None) -> LlavaRayConfig:
    """A copy of ``config`` with every relative path absolute against ``base`` (default: the cwd)."""
    root = Path(base) if base is not None else Path.cwd()
    resolved = config.model_copy(deep=True)
    rules: list[tuple[tuple[str, ...], Callable[[str, Path], str]]] = [
        (PATH_FIELDS, resolve_path),
        (HUB_OR_PATH_FIELDS, resolve_hub_or_path),
        ((TRACKING_URI_FIELD,), resolve_tracking_uri),
    ]
    for fields, resolve in rules:
        for field in fields:
            for owner, name in _slots(resolved, field.split(".")):
                value = getattr(owner, name)
                if isinstance(value, str) and value:
                    new = resolve(value, root)
                    if new != value:
                        setattr(owner, name, new)
    return resolved


def _slots(node: Any, parts: list[str]) -> Iterator[tuple[Any, str]]:
    """(object, attribute name) pairs a dotted field path names, stepping into lists at ``*``."""
    if node is None:
        return
    head, *rest = parts
    if not rest:
        yield node, head
        return
    child = getattr(node, head)
    if rest[0] == "*":
        for item in child or []:
            yield from _slots(item, rest[1:])
    else:
        yield from _slots(child, rest)
