"""The suite's reaper of orphaned Ray workers (tests/conftest.py) stops exactly this session's orphans.

Real processes stand in for Ray's: each carries ``RAY_RAYLET_PID`` as Ray's workers do, pointing at a
process named ``raylet`` that runs (a live cluster) or at one that has exited (a stopped cluster).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

SLEEP = "import time; time.sleep(120)"
NAMED_RAYLET = "open('/proc/self/comm', 'w').write('raylet'); import time; time.sleep(120)"


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


def start(processes: list[subprocess.Popen], code: str, **env: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **env})
    processes.append(process)
    return process


def test_only_this_sessions_workers_of_a_stopped_raylet_are_reaped(processes, ray_orphans):
    orphaned, reap = ray_orphans
    mark, other_mark = uuid.uuid4().hex, uuid.uuid4().hex
    exited = subprocess.Popen(["true"])
    exited.wait()
    stopped_raylet = str(exited.pid)  # a raylet that has exited (pids are not reused this soon)
    live_raylet = start(processes, NAMED_RAYLET)
    while Path(f"/proc/{live_raylet.pid}/comm").read_text().strip() != "raylet":  # until renamed
        pass
    orphan = start(processes, SLEEP, LLAVA_RAY_TEST_SESSION=mark, RAY_RAYLET_PID=stopped_raylet)
    live_worker = start(processes, SLEEP, LLAVA_RAY_TEST_SESSION=mark, RAY_RAYLET_PID=str(live_raylet.pid))
    someone_elses = start(processes, SLEEP, LLAVA_RAY_TEST_SESSION=other_mark, RAY_RAYLET_PID=stopped_raylet)
    not_ray = start(processes, SLEEP, LLAVA_RAY_TEST_SESSION=mark)

    assert orphaned(mark) == [orphan.pid]
    assert list(reap(mark)) == [orphan.pid]
    assert orphan.wait(timeout=30) == -9
    assert all(p.poll() is None for p in (live_raylet, live_worker, someone_elses, not_ray))
    assert orphaned(mark) == []
