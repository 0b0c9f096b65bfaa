"""The configs and sweeps llava-ray ships, by name: what ``llava-ray configs list/show/copy`` read.

A shipped YAML is named by its path under ``llava_ray/assets/`` without ``.yaml``; configs drop
the ``configs/`` folder, sweeps keep ``sweeps/``: ``tiny/pretrain``, ``llava-1.5-7b/finetune_lora``,
``generate``, ``sweeps/tiny/projector_lr``. They are package data read with
:mod:`importlib.resources` (:data:`~llava_ray.config.loader.SHIPPED_CONFIGS`), so the names work
from a wheel install as from a checkout.

Each entry's kind comes from its top-level sections (a ``pipeline``, a ``sweep``, a ``serve``
section, a ``generate`` section, a stage with ``train``, an ``evaluate``-only config) and its
description is the first sentence of its leading comment (every shipped YAML starts with one).

Pipelines and sweeps name other YAMLs relative to themselves (a pipeline's ``pretrain:
pretrain.yaml``, a sweep's ``base: ../../configs/tiny/pretrain.yaml``): :func:`copy_config`
writes those files next to the copy, under their own file names, and points the copy at them,
so the copied set validates and runs without the package's folder layout.
"""

from __future__ import annotations

import difflib
import os
import posixpath
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llava_ray.config.loader import SHIPPED_CONFIGS, SHIPPED_SWEEPS

if typing.TYPE_CHECKING:  # importlib.resources.abc is Python >= 3.11
    from importlib.resources.abc import Traversable

# The command that runs each kind of config (shown by `configs list`, and after a copy).
KIND_COMMANDS: dict[str, str] = {
    "stage": "train",
    "pipeline": "pipeline",
    "sweep": "tune",
    "evaluate": "evaluate",
    "serve": "serve",
    "generate": "generate-data",
}
# Keys of a pipeline or sweep section that name another YAML, relative to the file itself.
REFERENCE_KEYS: dict[str, tuple[str, ...]] = {
    "pipeline": ("pretrain", "finetune", "generate", "evaluate"),
    "sweep": ("base",),
}
DESCRIPTION_MAX_CHARS = 110
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


class CatalogError(ValueError):
    """An unknown name, or a copy that would overwrite files; the message is one line with the fix."""


@dataclass(frozen=True)
class ShippedConfig:
    """One shipped YAML."""

    name: str  # tiny/pretrain, sweeps/tiny/projector_lr
    asset_path: str  # its path under llava_ray/assets/: configs/tiny/pretrain.yaml
    kind: str  # a key of KIND_COMMANDS
    stage: str | None  # pretrain / finetune for a stage config
    description: str  # first sentence of its leading comment
    references: tuple[tuple[str, str], ...]  # (key, relative path) of the YAMLs it names
    text: str

    @property
    def kind_label(self) -> str:
        return f"{self.kind} ({self.stage})" if self.stage else self.kind

    @property
    def command(self) -> str:
        return f"llava-ray {KIND_COMMANDS[self.kind]} --config"


def shipped_configs() -> list[ShippedConfig]:
    """Every shipped config, then every sweep, each sorted by name."""
    entries = [_entry(path, resource) for path, resource in _walk(SHIPPED_CONFIGS, "configs")]
    entries += [_entry(path, resource) for path, resource in _walk(SHIPPED_SWEEPS, "sweeps")]
    return entries


def find_config(name: str) -> ShippedConfig:
    """The shipped config called ``name`` (a trailing ``.yaml`` and a leading ``configs/`` are allowed)."""
    catalog = {entry.name: entry for entry in shipped_configs()}
    wanted = name.strip().removesuffix(".yaml").removeprefix("jobs/").removeprefix("configs/")
    if wanted in catalog:
        return catalog[wanted]
    close = difflib.get_close_matches(wanted, catalog, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise CatalogError(f"no shipped config named {name!r}; {hint}`llava-ray configs list` names them all")


def copy_config(name: str, dest: str | Path, force: bool = False) -> list[Path]:
    """Write the shipped config ``name`` to ``dest`` (a file, or an existing folder to write
    ``<name's file name>`` into) with every YAML it names next to it; the paths written, the copy first.

    Nothing is written when any target exists, unless ``force``.
    """
    entry = find_config(name)
    into_folder = Path(dest).is_dir() or str(dest).endswith(("/", os.sep))  # Path() drops a trailing /
    target = Path(dest) / posixpath.basename(entry.asset_path) if into_folder else Path(dest)
    plan = _copy_plan(entry, target)
    existing = [str(path) for path in plan if path.exists()]
    if existing and not force:
        raise CatalogError(
            f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; "
            "pass --force to overwrite, or copy to another DEST"
        )
    for path, text in plan.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return list(plan)


def _copy_plan(entry: ShippedConfig, target: Path) -> dict[Path, str]:
    """Target path -> text for ``entry`` and, recursively, the YAMLs it names (written beside it)."""
    by_path = {shipped.asset_path: shipped for shipped in shipped_configs()}
    plan: dict[Path, str] = {}
    sources: dict[Path, str] = {}

    def add(shipped: ShippedConfig, path: Path) -> None:
        if path in sources:
            if sources[path] != shipped.asset_path:  # two different files would land on one name
                raise CatalogError(
                    f"{shipped.name} names {shipped.asset_path} and {sources[path]}, which would both be "
                    f"copied to {path}; copy them one by one with `llava-ray configs copy`"
                )
            return
        sources[path] = shipped.asset_path
        text = shipped.text
        for key, reference in shipped.references:
            named = by_path[_resolve(shipped.asset_path, reference)]
            file_name = posixpath.basename(named.asset_path)
            if reference != file_name:
                text = _point_reference(text, key, reference, file_name)
            add(named, path.parent / file_name)
        plan[path] = text

    add(entry, target)
    return {target: plan.pop(target), **plan}  # the copy first, then what it names


def _point_reference(text: str, key: str, old: str, new: str) -> str:
    """``text`` with the line ``key: old`` now reading ``key: new`` (comments and layout kept)."""
    line = re.compile(rf"^(\s*{re.escape(key)}:\s*)(['\"]?){re.escape(old)}\2(\s*(#.*)?)$", re.MULTILINE)
    rewritten, count = line.subn(lambda match: f"{match[1]}{match[2]}{new}{match[2]}{match[3]}", text)
    if count != 1:  # a layout this does not know: better no copy than a copy pointing nowhere
        raise CatalogError(f"cannot repoint {key}: {old} to {new} in a copy; copy the files one by one")
    return rewritten


def _resolve(asset_path: str, reference: str) -> str:
    return posixpath.normpath(posixpath.join(posixpath.dirname(asset_path), reference))


def _walk(folder: Traversable, prefix: str) -> list[tuple[str, Traversable]]:
    found = []
    for child in folder.iterdir():
        path = f"{prefix}/{child.name}"
        if child.is_dir():
            found += _walk(child, path)
        elif child.name.endswith(".yaml"):
            found.append((path, child))
    return sorted(found)


def _entry(asset_path: str, resource: Traversable) -> ShippedConfig:
    text = resource.read_text(encoding="utf-8")
    raw: dict[str, Any] = yaml.safe_load(text) or {}
    kind, stage = _kind(raw)
    section = raw.get(kind) if kind in REFERENCE_KEYS else None
    references = tuple(
        (key, str(section[key]))
        for key in REFERENCE_KEYS.get(kind, ())
        if isinstance(section, dict) and section.get(key)
    )
    name = asset_path.removesuffix(".yaml").removeprefix("configs/")
    return ShippedConfig(name, asset_path, kind, stage, _description(text), references, text)


def _kind(raw: dict[str, Any]) -> tuple[str, str | None]:
    for kind in ("pipeline", "sweep", "serve", "generate"):
        if kind in raw:
            return kind, None
    if "train" in raw:
        return "stage", (raw["train"] or {}).get("stage")
    return "evaluate", None


def _description(text: str) -> str:
    """The first sentence of the leading comment, cut to :data:`DESCRIPTION_MAX_CHARS`."""
    comment = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("#").strip())
    sentence = _SENTENCE_END.split(" ".join(comment).strip(), maxsplit=1)[0]
    if len(sentence) <= DESCRIPTION_MAX_CHARS:
        return sentence
    return sentence[: DESCRIPTION_MAX_CHARS - 3].rsplit(" ", 1)[0] + "..."
