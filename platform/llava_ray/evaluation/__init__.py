"""Evaluation of trained models: benchmarks scored from batched generation on Ray actors, and a chat.

``llava-ray evaluate --config FILE`` (or ``jobs/evaluate.py`` as a Ray job) runs
:func:`run_evaluate` on the config's ``evaluate`` section
(:class:`llava_ray.config.evaluation.EvaluateConfig`); ``llava-ray chat --model DIR`` runs
:func:`chat_main`. The pieces: :mod:`.items` (the evaluation format), :mod:`.inference` (a model
with its template, images as the tower sees them), :mod:`.runner` (batched generation, in
process or on a Ray Data actor pool), the benchmarks :mod:`.synthetic_eval`, :mod:`.scienceqa`
(with :func:`convert_scienceqa`) and :mod:`.judge` (LLaVA-Bench with an LLM judge),
:mod:`.evaluate` (the job) and :mod:`.chat`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llava_ray.evaluation.chat import chat_main, run_chat
    from llava_ray.evaluation.evaluate import run_evaluate
    from llava_ray.evaluation.scienceqa import convert_scienceqa

__all__ = ["chat_main", "convert_scienceqa", "run_chat", "run_evaluate"]

_HOMES = {
    "chat_main": "chat",
    "run_chat": "chat",
    "run_evaluate": "evaluate",
    "convert_scienceqa": "scienceqa",
}


def __getattr__(name: str) -> Any:
    # Imported on first use: Ray actors import this package to unpickle the Predictor class and
    # should not pay for the job's imports (MLflow, the judge client) every time one starts.
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f"llava_ray.evaluation.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
