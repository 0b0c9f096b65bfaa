"""The dataset registry: LLaVA's published datasets by name, so a config says ``data.dataset: llava-v1.5-mix665k``.

The registry is package data (``llava_ray/assets/datasets.yaml``). An entry names its annotation
files and image folders relative to ``data.root``, the folder or ``s3://`` prefix laid out as
LLaVA's ``./playground/data`` (docs/data.md: where each file comes from, how to stage it, counts).
:func:`registered_sources` turns names into ``data.sources`` entries; the data section's validator
(``config.schema.DataConfig``) calls it, so everything downstream sees ordinary sources.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from functools import cache
from importlib.resources import files
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llava_ray.utils.safe_yaml import load_yaml

REGISTRY = files("llava_ray") / "assets" / "datasets.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RegisteredFile(_Strict):
    path: str = Field(description="Annotation file, relative to data.root.")
    image_root: str | None = Field(
        None, description="Folder its image paths are relative to, relative to data.root ('.': data.root)."
    )


class RegisteredDataset(_Strict):
    description: str = Field(description="What it is and which stage trains on it.")
    homepage: str = Field(description="Where its annotation file is published.")
    format: Literal["array", "lines"] = Field(description="One JSON list (array) or JSON lines.")
    files: list[RegisteredFile] = Field(min_length=1, description="Annotation files, each a source.")
    samples: int | None = Field(None, description="Records in the published file, where known.")
    images: list[str] = Field(default_factory=list, description="Image folders its samples name.")


@cache
def dataset_registry() -> dict[str, RegisteredDataset]:
    """Every registered dataset by name (read once; a malformed registry is a packaging bug and raises)."""
    raw: dict[str, Any] = load_yaml(REGISTRY.read_text(encoding="utf-8"))
    return {name: RegisteredDataset.model_validate(entry) for name, entry in raw.items()}


def join_root(root: str, relative: str) -> str:
    """``relative`` under ``root`` (a folder or URL); ``.`` is the root itself."""
    relative = relative.strip("/")
    if relative in ("", "."):
        return root
    return f"{root.rstrip('/')}/{relative}"


def registered_sources(names: Sequence[str], root: str | None) -> list[dict[str, Any]]:
    """``data.sources`` entries for the registered ``names`` under ``root``; ValueError names any problem."""
    registry = dataset_registry()
    unknown = [name for name in names if name not in registry]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, list(registry), n=1, cutoff=0.6)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(
            f"data.dataset: unknown dataset {', '.join(hints)}; registered: {', '.join(registry)} "
            "(llava_ray/assets/datasets.yaml), or list the files under data.sources"
        )
    if not root:
        raise ValueError(
            f"data.dataset {', '.join(names)} needs data.root, the folder or s3:// prefix laid out as LLaVA's "
            "playground/data (docs/data.md); set data.root (e.g. data.root=${run.root}/data)"
        )
    sources = []
    for name in names:
        entry = registry[name]
        for registered in entry.files:
            source: dict[str, Any] = {"path": join_root(root, registered.path)}
            if registered.image_root is not None:
                source["image_root"] = join_root(root, registered.image_root)
            stem = registered.path.rsplit("/", 1)[-1].split(".", 1)[0]
            source["name"] = name if len(entry.files) == 1 else f"{name}/{stem}"
            sources.append(source)
    return sources
