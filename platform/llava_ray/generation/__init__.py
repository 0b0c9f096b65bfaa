"""Instruction-data generation, LLaVA's key idea: a text-only LLM writes conversations about images
it never sees, from their captions and object boxes.

``llava-ray generate-data --config FILE`` (or ``jobs/generate_data.py`` as a Ray job) runs
:func:`run_generate` on the config's ``generate`` section
(:class:`llava_ray.config.generation.GenerateConfig`); the output is a LLaVA JSON array that
``llava-ray prepare`` reads unchanged. The pieces, in data order: :mod:`.context` (annotations ->
symbolic context), :mod:`.prompting` (prompt files -> messages), :mod:`.client` and
:mod:`.workers` (the LLM backends on Ray actors), :mod:`.journal` (resume), :mod:`.parse`
(replies -> samples), :mod:`.pipeline` (the job).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llava_ray.generation.pipeline import generate_problems, run_generate

__all__ = ["generate_problems", "run_generate"]


def __getattr__(name: str) -> Any:
    # Imported on first use: Ray actors import this package to unpickle the worker classes, and
    # the HTTP backend's actors should not pay for the pipeline's imports (transformers, via
    # the parser's <image> token) every time one starts.
    if name in __all__:
        from llava_ray.generation import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
