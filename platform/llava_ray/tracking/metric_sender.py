"""Metrics sent to MLflow from a background thread: training never waits on, or dies of, its tracker.

:class:`MetricSender` takes metric points without blocking (the step loop calls it), and a daemon
thread sends them in batches of up to 1,000 (MLflow's ``log-batch`` limit). To an ``http(s)://``
server it posts MLflow's REST ``runs/log-batch`` itself, with one attempt of at most
``REQUEST_TIMEOUT_S`` per try: MLflow's own client retries each failing call for minutes
(``MLFLOW_HTTP_REQUEST_MAX_RETRIES``), which against a dead server would stall every call.

When the server stops answering, one warning says so and what happens next; the points stay
buffered (at most ``max_buffered`` in memory, older ones beyond that go to a local overflow file)
and the thread retries with a growing pause (``RETRY_PAUSES_S``). When the server answers again
the buffer is replayed in order and one line says how many points were delayed. :meth:`close`
waits up to ``flush_timeout_s`` for the rest; whatever still could not be sent is written as JSON
lines to ``spill_uri`` (beside the run's checkpoints) for :func:`replay_spilled` to send later.

:class:`SystemMetricsSampler` samples CPU, memory, disk, network (and NVIDIA GPUs where ``pynvml``
is installed) with MLflow's own system-metric monitors and sends them through the same sender, as
``system/...`` metrics.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llava_ray.utils.redact import redact_url, redact_urls, split_credentials
from llava_ray.utils.storage import filesystem

logger = logging.getLogger(__name__)

BATCH_SIZE = 1000  # MLflow's limit on metrics per log-batch call
MAX_BUFFERED = 200_000  # points held in memory during an outage (about 40 MB); older ones overflow to disk
REQUEST_TIMEOUT_S = 10.0
RETRY_PAUSES_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # between tries while the server is down, then 30 s
FLUSH_TIMEOUT_S = 60.0  # how long close() waits for a server that is down before spilling to a file
SYSTEM_METRICS_INTERVAL_S = 10.0  # MLflow's default sampling interval


@dataclass
class MetricPoint:
    key: str
    value: float
    timestamp: int  # ms since the epoch, taken when the point was logged (not when sent)
    step: int


class RejectedBatch(Exception):
    """The server answered and refused the batch (4xx): retrying would not help."""


class MetricSender:
    """Buffered, asynchronous metric logging to one MLflow run (see the module docstring)."""

    def __init__(
        self,
        uri: str,
        run_id: str,
        spill_uri: str | None = None,
        max_buffered: int = MAX_BUFFERED,
        flush_timeout_s: float = FLUSH_TIMEOUT_S,
    ):
        self.uri, username, password = split_credentials(uri)
        self.run_id = run_id
        self.spill_uri = spill_uri
        self.max_buffered = max_buffered
        self.flush_timeout_s = flush_timeout_s
        self._auth = _auth_header(username, password)
        self._pending: deque[MetricPoint] = deque()
        self._overflow: Path | None = None  # local JSON lines of points pushed out of memory
        self._overflowed = 0
        self._in_flight = 0
        self._condition = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._client: Any = None
        self.down_since: float | None = None
        self.outages = 0
        self.delayed = 0  # points sent late, after an outage
        self.rejected = 0
        self.sent = 0

    # -- the caller's side ----------------------------------------------------------------------

    def add(self, points: Iterable[MetricPoint]) -> None:
        """Queue points; never blocks on the network, never raises."""
        with self._condition:
            if self._closing:
                return
            self._pending.extend(points)
            overflow = len(self._pending) - self.max_buffered
            if overflow > 0:
                self._spill_overflow([self._pending.popleft() for _ in range(overflow)])
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mlflow-metric-sender", daemon=True)
                self._thread.start()
            self._condition.notify_all()

    def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` until every queued point is sent; True when all were."""
        deadline = time.monotonic() + timeout_s
        with self._condition:
            self._condition.notify_all()
            while self._pending or self._in_flight:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._thread is None or not self._thread.is_alive():
                    return False
                self._condition.wait(min(remaining, 1.0))
        return self._overflowed == 0

    def close(self) -> int:
        """Flush (bounded), stop the thread, spill what is left; returns the number of points not sent."""
        if self._thread is None and not self._overflowed:
            return 0
        self.flush(self.flush_timeout_s)
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=REQUEST_TIMEOUT_S + 5)
        with self._condition:
            unsent = list(self._pending)
            self._pending.clear()
        unsent_count = len(unsent) + self._overflowed
        if unsent_count:
            where = self._write_spill(unsent)
            logger.warning(
                f"[tracking] WARNING: {unsent_count} metric points could not be sent to MLflow at "
                f"{redact_url(self.uri)} (run {self.run_id})"
                + (
                    f"; written to {redact_url(where)}, sent at the end of the job when the server answers"
                    if where
                    else ""
                )
            )
        elif self.delayed:
            logger.info(f"[tracking] every metric reached MLflow ({self.delayed} of them after an outage)")
        return unsent_count

    # -- the thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        replaying = False  # sending what an outage held back
        while True:
            with self._condition:
                while not self._pending and not self._closing:
                    self._condition.wait()
                if not self._pending:
                    return
                batch = [self._pending[i] for i in range(min(BATCH_SIZE, len(self._pending)))]
                self._in_flight = len(batch)
            try:
                self._send(batch)
            except RejectedBatch as error:
                self.rejected += len(batch)
                logger.warning(
                    f"[tracking] WARNING: MLflow refused {len(batch)} metric points ({redact_urls(str(error))}); "
                    "dropped"
                )
                self._done(batch)
            except Exception as error:  # an outage: keep the points, retry
                with self._condition:
                    self._in_flight = 0
                    closing = self._closing
                if self.down_since is None:
                    self.down_since = time.monotonic()
                    self.outages += 1
                    logger.warning(
                        f"[tracking] WARNING: MLflow at {redact_url(self.uri)} does not answer "
                        f"({redact_urls(str(error))[:300]}). Training continues; metrics are kept (up to "
                        f"{self.max_buffered} in memory, the rest on disk) and sent when it answers again."
                    )
                if closing:
                    return
                pause = RETRY_PAUSES_S[min(failures, len(RETRY_PAUSES_S) - 1)]
                failures += 1
                with self._condition:
                    if not self._closing:
                        self._condition.wait(pause)
                continue
            if self.down_since is not None:
                logger.warning(
                    f"[tracking] MLflow at {redact_url(self.uri)} answers again after "
                    f"{time.monotonic() - self.down_since:.0f} s; sending the buffered metrics"
                )
                self.down_since = None
                replaying = True
            self.sent += len(batch)
            if replaying:
                self.delayed += len(batch)
            failures = 0
            replaying = self._done(batch) and replaying

    def _done(self, batch: list[MetricPoint]) -> bool:
        """Drop a handled batch from the queue; True while more points wait."""
        with self._condition:
            for _ in batch:
                self._pending.popleft()
            self._in_flight = 0
            self._condition.notify_all()
            return bool(self._pending)

    def _send(self, batch: list[MetricPoint]) -> None:
        if self.uri.startswith(("http://", "https://")):
            self._post_log_batch(batch)
            return
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        if self._client is None:
            self._client = MlflowClient(self.uri)
        self._client.log_batch(
            self.run_id, metrics=[Metric(p.key, p.value, p.timestamp, p.step) for p in batch]
        )

    def _post_log_batch(self, batch: list[MetricPoint]) -> None:
        body = {
            "run_id": self.run_id,
            "metrics": [
                {"key": p.key, "value": _json_number(p.value), "timestamp": p.timestamp, "step": p.step}
                for p in batch
            ],
        }
        request = urllib.request.Request(
            f"{self.uri.rstrip('/')}/api/2.0/mlflow/runs/log-batch",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **self._auth},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
                response.read()
        except urllib.error.HTTPError as error:
            if 400 <= error.code < 500 and error.code not in (408, 429):
                raise RejectedBatch(f"HTTP {error.code}: {error.read()[:300]!r}") from None
            raise

    # -- what could not be sent -----------------------------------------------------------------

    def _spill_overflow(self, points: list[MetricPoint]) -> None:
        if self._overflow is None:
            handle, path = tempfile.mkstemp(prefix="llava-ray-mlflow-overflow-", suffix=".jsonl")
            os.close(handle)
            self._overflow = Path(path)
        with self._overflow.open("a") as out:
            out.writelines(json.dumps(asdict(p)) + "\n" for p in points)
        self._overflowed += len(points)

    def _write_spill(self, unsent: list[MetricPoint]) -> str | None:
        """The unsent points (overflow first, oldest first) as JSON lines at ``spill_uri``."""
        lines = self._overflow.read_text() if self._overflow else ""
        lines += "".join(json.dumps(asdict(p)) + "\n" for p in unsent)
        if self._overflow:
            self._overflow.unlink(missing_ok=True)
        if not self.spill_uri:
            return None
        try:
            fs, path = filesystem(self.spill_uri)
            previous = fs.cat_file(path).decode() if fs.exists(path) else ""
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            fs.pipe_file(path, (previous + lines).encode())
        except Exception as error:  # never fail the job over its metrics
            logger.warning(
                f"[tracking] WARNING: could not write unsent metrics to {redact_url(self.spill_uri)}: {error}"
            )
            return None
        return self.spill_uri


def replay_spilled(uri: str, run_id: str, spill_uri: str, timeout_s: float = FLUSH_TIMEOUT_S) -> int:
    """Send the points a worker could not send (see :meth:`MetricSender.close`); returns how many are
    still unsent. The file is removed once everything in it has reached MLflow."""
    fs, path = filesystem(spill_uri)
    if not fs.exists(path):
        return 0
    points = [MetricPoint(**json.loads(line)) for line in fs.cat_file(path).decode().splitlines() if line]
    fs.rm(path)
    sender = MetricSender(uri, run_id, spill_uri=spill_uri, flush_timeout_s=timeout_s)
    sender.add(points)
    unsent = sender.close()
    if not unsent:
        logger.info(f"[tracking] sent {len(points)} metric points a worker could not send during the run")
    return unsent


def _auth_header(username: str | None, password: str | None) -> dict[str, str]:
    username = username or os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = password or os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if username and password:
        token = base64.b64encode(f"{username}:{password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"}
    return {}


def _json_number(value: float) -> float | str:
    """Protobuf JSON spells non-finite doubles as strings."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


class SystemMetricsSampler:
    """Samples this machine's CPU, memory, disk, network (and GPU) usage into ``system/...`` metrics."""

    def __init__(self, sender: MetricSender, interval_s: float = SYSTEM_METRICS_INTERVAL_S):
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
        from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

        self.sender = sender
        self.interval_s = interval_s
        self.monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        try:
            from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

            self.monitors.append(GPUMonitor())
        except Exception:  # no pynvml, or no NVIDIA GPU
            pass
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlflow-system-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        step = 0
        while not self._stop.is_set():
            try:
                for monitor in self.monitors:
                    monitor.collect_metrics()
            except Exception:  # a sampling hiccup is not worth a job
                pass
            if self._stop.wait(self.interval_s):
                return
            now = int(time.time() * 1000)
            points = []
            for monitor in self.monitors:
                try:
                    points += [
                        MetricPoint(f"system/{key}", float(value), now, step)
                        for key, value in monitor.aggregate_metrics().items()
                    ]
                finally:
                    monitor.clear_metrics()
            self.sender.add(points)
            step += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
