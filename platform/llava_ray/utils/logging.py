"""Job output lines that reach the driver once, from Ray Train workers too."""

from __future__ import annotations

import sys


def say(message: str) -> None:
    """Print one line of a job's output to the process's own standard output.

    In Ray Train 2.60's workers ``print`` is patched to write the line to stdout *and* log it to
    the root logger, whose Ray handler writes it to stderr: Ray streams both to the driver, so every
    line arrives twice. A print to ``sys.__stdout__`` is left alone by the patch, and Ray streams the
    worker's stdout to the driver (and keeps it in the worker's ``.out`` log) once. Elsewhere it is
    an ordinary print.
    """
    print(message, file=sys.__stdout__ or sys.stdout, flush=True)
