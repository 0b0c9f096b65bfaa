"""Failure rehearsal: kill a chosen worker after a chosen step, once per run.

Set ``fault.kill_rank`` and ``fault.kill_at_step`` in the config (on the command line:
``fault.kill_rank=1 fault.kill_at_step=3``). The worker exits abruptly (as an OOM-killed or preempted one
would); Ray Train restarts the worker group and the run resumes from its latest checkpoint. A
marker in the run's storage makes the fault fire once, so the resumed run can pass that step.

Before the kill every rank makes two metrics-only reports. A report returns once the Ray Train
controller has taken the rank's previous one (Ray keeps one unread report per worker), and the
second one's barrier across ranks passes only when every rank's first has returned: by then the
controller holds every rank's report of the latest checkpoint, and has registered it, so the
rehearsal always resumes from the latest checkpoint saved at or before the fault's step. A real
crash within one controller poll (about 2 s) of a checkpoint can lose that checkpoint; the run
then resumes from the one before it.
"""

from __future__ import annotations

import logging
import os

import ray.train

from llava_ray.config.schema import LlavaRayConfig
from llava_ray.utils.storage import filesystem

logger = logging.getLogger(__name__)


def fault_target(config: LlavaRayConfig) -> tuple[int, int] | None:
    """(rank, step) to kill, from the ``fault`` section; None when no fault is asked for."""
    if config.fault.kill_rank is None or config.fault.kill_at_step is None:
        return None
    return config.fault.kill_rank, config.fault.kill_at_step


def maybe_inject_fault(config: LlavaRayConfig, rank: int, step: int) -> None:
    """Called by every rank after every step; kills the target rank once (see the module docstring)."""
    target = fault_target(config)
    if target is None or target[1] != step:
        return
    fs, root = filesystem(config.run.storage_path)
    marker = f"{root.rstrip('/')}/{config.run.name}/fault-injected-rank{target[0]}-step{step}"
    if fs.exists(marker):  # every rank looks before the report below, which no rank passes alone
        return
    for _ in range(2):  # see the module docstring
        ray.train.report({"step": step, "fault_injection": 1})
    if rank != target[0]:
        return
    fs.makedirs(marker.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe(marker, b"")
    logger.warning(
        f"[fault] killing worker rank {rank} after step {step} (fault.kill_rank / fault.kill_at_step)"
    )
    os._exit(1)
