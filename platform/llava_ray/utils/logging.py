"""The package's console: one ``llava_ray`` logger, configured here, and third-party noise quieted.

Modules log with ``logging.getLogger(__name__)``; :func:`setup_logging` is the one place that
decides what reaches the console:

- ``llava_ray`` lines go to the process's real standard output (``sys.__stdout__``), one handler,
  no propagation. In Ray Train 2.60's workers ``print`` is patched to write the line to stdout
  *and* log it to the root logger, whose Ray handler writes it to stderr: Ray streams both to the
  driver, so every printed line arrives twice. ``sys.__stdout__`` is left alone by the patch, and
  Ray streams the worker's stdout to the driver (and keeps it in the worker's ``.out`` log) once.
- In a training worker (``rank`` given) only rank 0 logs at INFO; other ranks log warnings only,
  unless ``verbose``.
- Unless ``verbose``: Ray's, Ray Data's, Ray Train's, Ray Tune's, DeepSpeed's, transformers' and
  MLflow's loggers at WARNING, Ray Train's per-report "Reporting training result" lines off,
  torch's FutureWarnings about the collectives DeepSpeed ZeRO-3 calls every step filtered out, and
  transformers' warnings that torchvision is not installed dropped: without it transformers falls
  back to its PIL image processors, which is what llava-ray uses anyway (its own preprocessing,
  ``data/images.py``); ``--verbose`` shows them.

The CLI calls it with ``--verbose``; the training driver passes :func:`verbose_logging` on to the
workers, which call it with their rank.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
import warnings

PACKAGE_LOGGER = "llava_ray"
QUIET_LOGGERS = (
    "ray",  # reset to INFO by `import ray`
    "ray.data",  # reset by `import ray.data`
    "ray.train",
    "ray.tune",
    "DeepSpeed",  # deepspeed.utils.logging's logger
    "deepspeed",
    "transformers",
    "mlflow",
    "alembic",  # MLflow's SQL store migrations
    "torch.distributed",
)
# Warns once per process that progress bars are off: the training driver turns Ray Data's bars off
# on purpose (per-worker bars flood job logs; the progress line says it all).
RAY_DATA_PROGRESS_LOGGER = "ray.data._internal.progress"
# Ray Train 2.60 logs every ray.train.report at INFO on a logger named after its module's file.
RAY_TRAIN_REPORT_MODULE = "ray.train.v2._internal.execution.context"
# torch 2.13 deprecates the collectives DeepSpeed's ZeRO-3 calls twice per step (hundreds per run).
COLLECTIVE_DEPRECATIONS = r"`torch\.distributed\.\S+` is (deprecated|a private function)"
# transformers 5 without torchvision: "`CLIPImageProcessor` requires torchvision (not installed);
# falling back to `CLIPImageProcessorPil` ..." (on first use of such a class name) and "Requested
# torchvision backend is not available. Falling back to pil backend." (AutoImageProcessor).
TORCHVISION_FALLBACK_LOGGERS = (
    "transformers.utils.import_utils",
    "transformers.models.auto.image_processing_auto",
)
TORCHVISION_FALLBACK = re.compile(
    r"requires torchvision \(not installed\)|torchvision backend is not available"
)
_HANDLER_NAME = "llava_ray.console"


class _DropTorchvisionFallback(logging.Filter):
    """Drops transformers' notes that it uses a PIL image processor because torchvision is missing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not TORCHVISION_FALLBACK.search(record.getMessage())


_TORCHVISION_FILTER = _DropTorchvisionFallback()


def setup_logging(verbose: bool = False, rank: int | None = None) -> logging.Logger:
    """Configure the console (see the module docstring); calling it again reconfigures it."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    quiet_rank = rank not in (None, 0) and not verbose
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet_rank else logging.INFO)
    logger.propagate = False
    for handler in [h for h in logger.handlers if h.get_name() == _HANDLER_NAME]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.__stdout__ or sys.stdout)
    handler.set_name(_HANDLER_NAME)
    prefix = f"[rank {rank}] " if verbose and rank not in (None, 0) else ""
    handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
    logger.addHandler(handler)
    if not verbose:
        warnings.filterwarnings("ignore", message=COLLECTIVE_DEPRECATIONS, category=FutureWarning)
        # MLflow sets its loggers' level from this when first imported, here or in a Ray worker
        # (which inherits this process's environment when it starts the local cluster).
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    quiet_third_party()
    return logger


def ensure_logging() -> logging.Logger:
    """The package logger, set up with the defaults unless it was set up already; third-party
    loggers quieted again.

    ``import ray`` and ``import ray.data`` set their loggers' levels when first imported, which
    may be after :func:`setup_logging` ran (the CLI imports them lazily): entry points call this
    once they have imported them. Job scripts that bypass the CLI get the default console from it.
    """
    logger = logging.getLogger(PACKAGE_LOGGER)
    if not any(handler.get_name() == _HANDLER_NAME for handler in logger.handlers):
        return setup_logging()
    quiet_third_party()
    return logger


def quiet_third_party() -> None:
    """Third-party loggers at WARNING, or at INFO when the console is verbose."""
    level = logging.INFO if verbose_logging() else logging.WARNING
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(level)
    logging.getLogger(RAY_DATA_PROGRESS_LOGGER).setLevel(logging.INFO if verbose_logging() else logging.ERROR)
    for name in TORCHVISION_FALLBACK_LOGGERS:  # logger filters see the records logged on that logger
        if verbose_logging():
            logging.getLogger(name).removeFilter(_TORCHVISION_FILTER)
        else:
            logging.getLogger(name).addFilter(_TORCHVISION_FILTER)
    if "transformers" in sys.modules:  # its save/load progress bars ("Writing model shards")
        from transformers.utils import logging as transformers_logging

        if verbose_logging():
            transformers_logging.enable_progress_bar()
        else:
            transformers_logging.disable_progress_bar()
    if "ray.train" in sys.modules:  # never import Ray Train just for this
        report_logger = _module_logger(RAY_TRAIN_REPORT_MODULE)
        if report_logger is not None:
            report_logger.setLevel(level)


def verbose_logging() -> bool:
    """Whether this process's console was set up verbose (for passing on to Ray workers)."""
    return logging.getLogger(PACKAGE_LOGGER).isEnabledFor(logging.DEBUG)


def _module_logger(module: str) -> logging.Logger | None:
    """The logger a module names after its own file (``logging.getLogger(__file__)``)."""
    try:
        spec = importlib.util.find_spec(module)
    except ImportError:
        return None
    return logging.getLogger(spec.origin) if spec is not None and spec.origin else None
