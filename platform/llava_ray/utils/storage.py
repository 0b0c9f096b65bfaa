"""Local paths and remote URLs (``s3://``, any fsspec protocol) behind one interface.

Remote weights and tokenizers are copied once into a cache folder, ``~/.cache/llava-ray``, or
``$LLAVA_RAY_CACHE`` when set. That is an environment setting on purpose, not a config field: it
says where this machine keeps downloads (like ``HF_HOME``), changes nothing a run computes, and
must hold for every job on the node, including ones that read no llava-ray config.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import fsspec

CACHE_DIR = Path(os.environ.get("LLAVA_RAY_CACHE", Path.home() / ".cache" / "llava-ray"))


def is_remote(uri: str) -> bool:
    """True for URLs with a protocol other than the local file system (``s3://``, ``gs://``, ...)."""
    protocol, _, rest = uri.partition("://")
    return bool(rest) and protocol not in ("file", "local")


def filesystem(uri: str, **storage_options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec file system for ``uri`` and the path within it.

    ``s3://`` honours ``AWS_ENDPOINT_URL`` (a loopback S3 server in tests, MinIO on premises).
    """
    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    return fs, path


def local_copy(uri: str) -> str:
    """A local path for ``uri``: remote files and folders are copied once into the cache.

    Hub names (``openai/clip-vit-large-patch14-336``) and local paths are returned unchanged.
    Concurrent callers (several workers on one node) each download to a private folder and the
    first to finish publishes it with an atomic rename.
    """
    if not is_remote(uri):
        return uri
    fs, path = filesystem(uri)
    slot = CACHE_DIR / "remote" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    target = slot / Path(path.rstrip("/")).name
    if not slot.exists():
        partial = slot.with_name(f"{slot.name}.partial-{os.getpid()}")
        partial.mkdir(parents=True, exist_ok=True)
        if fs.isdir(path):
            fs.get(path.rstrip("/") + "/", str(partial / target.name), recursive=True)
        else:
            fs.get(path, str(partial / target.name))
        try:
            partial.rename(slot)
        except OSError:  # another process published it first
            shutil.rmtree(partial, ignore_errors=True)
    return str(target)


def join_uri(base: str, *parts: str) -> str:
    """``join_uri("s3://b/runs", "x", "final")`` -> ``s3://b/runs/x/final``; local paths likewise."""
    return "/".join([base.rstrip("/"), *(part.strip("/") for part in parts)])


def ray_storage(storage_path: str) -> tuple[str, Any]:
    """Ray Train's storage path and file system; a custom S3 endpoint needs an explicit fsspec bridge."""
    if not is_remote(storage_path):
        return str(Path(storage_path).resolve()), None
    if storage_path.startswith("s3://") and os.environ.get("AWS_ENDPOINT_URL"):
        import pyarrow.fs
        import s3fs

        handler = pyarrow.fs.FSSpecHandler(s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"]))
        return storage_path.removeprefix("s3://"), pyarrow.fs.PyFileSystem(handler)
    return storage_path, None
