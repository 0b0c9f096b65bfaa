"""An autoscaling rehearsal on one machine: the tiny prepare and stage jobs on a fake AWS-shaped cluster.

Starts a Ray head with Ray's fake multi-node autoscaler and cluster/aws.yaml's node types at
rehearsal size (cluster/fake_multinode.py: a head with no CPUs, 1-CPU worker nodes, GPU nodes with
2 fake GPUs, min_workers 0), runs the tiny pretrain config's prepare job and then its stage job
pinned to H100 nodes, waits until the autoscaler has removed every idle worker node, stops exactly
the head it started (never `ray stop`), and prints one line ``AUTOSCALING_OBSERVATIONS {json}`` on
stdout: for each node its type (from the autoscaler's own report), when it joined, when it was
busy, the most of each resource in use on it, and when it left; the autoscaler's launch and removal
messages; the node (and its type) each Ray Train worker ran on, from the GCS actor table.

tests/cluster/test_autoscaling.py runs it in a process of its own (the pytest process keeps its own
Ray). By hand, about 1.5-3.5 minutes on 2 cores:

    .venv/bin/python tests/cluster/autoscaling_scenario.py --workdir /tmp/autoscaling

The jobs run unchanged, as the product runs on CPU. The fake GPU nodes have a ``GPU`` resource but
no device, and the CPU build of torch has neither CUDA nor NCCL, so the stage job trains on CPU
(``scaling.use_gpu=false``: Ray Train's gloo backend) and reaches the H100 node type through the
resource only that type carries, ``scaling.resources_per_worker={"accelerator_type:H100": 0.001}``.
The autoscaler still has to launch a ``gpu-h100-p5`` node for it. On a real cluster the stage job
also sets ``scaling.use_gpu=true``, which asks for the ``GPU`` resource those node types carry.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "cluster"))

import fake_multinode  # noqa: E402  (cluster/ holds scripts, not a package)

# Shared by the head's processes, its fake nodes (started by its autoscaler) and this driver: the
# fake provider, a 1 s autoscaler loop, every node on 127.0.0.1, token authentication
# (~/.ray/auth_token, created if missing, as cluster/local.sh does), no drain wait at shutdown.
RAY_ENV = {
    "RAY_FAKE_CLUSTER": "1",
    "AUTOSCALER_UPDATE_INTERVAL_S": "1",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "token",
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}
HEAD_START_TIMEOUT_S = 150
SCALE_DOWN_SLACK_S = 60  # past the idle timeout, to see the last idle node go
SAMPLE_EVERY_S = 0.5
PINNED_ACCELERATOR = "H100"  # the stage job asks for H100 nodes, as cluster/README.md shows
TRAIN_WORKER_CLASS = "RayTrainWorker"  # Ray Train's worker actor (v1 and v2)
MARKER = "AUTOSCALING_OBSERVATIONS "


def log(message: str) -> None:
    print(f"[autoscaling {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


# --- the head ---------------------------------------------------------------------------------


class FakeHead:
    """``ray start --head --block`` with the fake autoscaler, as the leader of a session of its own:
    its GCS, raylet and autoscaler, the raylets of the fake nodes the autoscaler starts, and every
    worker stay in that session, so :meth:`stop` finds exactly this head's processes."""

    def __init__(self, ray_tmpdir: Path, idle_timeout_s: float) -> None:
        self.ray_tmpdir = ray_tmpdir
        self.gcs_port, client_port, agent_port = free_ports(3)
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.config = fake_multinode.fake_multinode_config(self.address, idle_timeout_s)
        config_file = ray_tmpdir / "fake_multinode.yaml"
        config_file.write_text(yaml.safe_dump(self.config, sort_keys=False))
        head = self.config["available_node_types"][self.config["head_node_type"]]["resources"]
        ray_bin = str(Path(sys.executable).with_name("ray"))
        env = {**os.environ, **RAY_ENV, "RAY_TMPDIR": str(ray_tmpdir)}
        # The venv first on PATH: the autoscaler's fake nodes and every worker run its python.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        # `ray start` only reads the token; this creates it when missing.
        subprocess.run([ray_bin, "get-auth-token", "--generate"], env=env, capture_output=True, check=True)
        command = [
            ray_bin, "start", "--head", "--block",
            "--port", str(self.gcs_port),
            "--node-ip-address", "127.0.0.1",
            "--ray-client-server-port", str(client_port),
            "--dashboard-agent-listen-port", str(agent_port),
            "--include-dashboard", "false",
            "--num-cpus", str(int(head.get("CPU", 0))),
            "--object-store-memory", str(fake_multinode.OBJECT_STORE_BYTES_PER_NODE),
            "--autoscaling-config", str(config_file),
            "--disable-usage-stats",
        ]  # fmt: skip
        self.log_file = ray_tmpdir / "ray-start.log"
        with self.log_file.open("w") as output:
            self.process = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def connect(self, timeout_s: float) -> None:
        import ray

        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the Ray head exited with {self.process.returncode}:\n{self.log_file.read_text()}"
                )
            try:
                ray.init(address=self.address, log_to_driver=False)
                return
            except (ConnectionError, RuntimeError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def session_members(self) -> list[int]:
        """Live pids of the head's session (its session id is its pid)."""
        members = []
        for stat_file in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat_file.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[3]) == self.process.pid and fields[0] != "Z":
                members.append(int(stat_file.parent.name))
        return members

    def stop(self, timeout_s: float = 30) -> list[int]:
        """Terminate the head (it shuts down what it started), then kill what is left of its
        session. Returns the pids still running 10 s after the head ended (then signalled)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # Fake nodes still up (a run cut short) are raylets the head's autoscaler started: they
        # outlive it until they miss the GCS. Terminate them, then kill what still stays.
        leftovers = self._wait_for_session_end(10)
        for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            for pid in self.session_members():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            if not self._wait_for_session_end(wait_s):
                break
        return leftovers

    def _wait_for_session_end(self, timeout_s: float) -> list[int]:
        deadline = time.monotonic() + timeout_s
        while (left := self.session_members()) and time.monotonic() < deadline:
            time.sleep(0.5)
        return left

    def logs_dir(self) -> Path | None:
        sessions = sorted(self.ray_tmpdir.glob("ray/session_2*/logs"))
        return sessions[-1] if sessions else None


# --- what the autoscaler does, sampled --------------------------------------------------------


class ClusterSampler(threading.Thread):
    """Every SAMPLE_EVERY_S: the alive nodes (``ray.nodes()``), which are busy (some of their CPU
    or GPU in use), the most of each resource in use on each, and the autoscaler's own report (the
    source of ``ray status``: the node type of each node, pending launches). Kept as per-node
    records and change events."""

    def __init__(self, t0: float) -> None:
        super().__init__(daemon=True)
        self.t0 = t0
        self.stopped = threading.Event()
        self.nodes: dict[str, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._pending: dict[str, int] = {}

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.sample()
            except Exception as error:  # keep sampling through a transient GCS hiccup
                self.errors.append(repr(error))
            self.stopped.wait(SAMPLE_EVERY_S)

    def sample(self) -> None:
        import ray
        from ray._private import state
        from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
        from ray.experimental.internal_kv import _internal_kv_get

        t = round(time.monotonic() - self.t0, 2)
        raw = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
        report = (json.loads(raw).get("autoscaler_report") or {}) if raw else {}
        types = report.get("node_type_mapping") or {}  # node id -> type (use_node_id_as_ip)
        pending = report.get("pending_launches") or {}
        for node_type in sorted(set(pending) | set(self._pending)):
            if pending.get(node_type, 0) != self._pending.get(node_type, 0):
                count = pending.get(node_type, 0)
                self.events.append({"t": t, "event": "pending_launches", "type": node_type, "count": count})
        self._pending = dict(pending)
        alive = {node["NodeID"]: node for node in ray.nodes() if node["Alive"]}
        available = state.available_resources_per_node()
        for node_id, node in alive.items():
            record = self.nodes.get(node_id)
            if record is None:
                resources = {k: v for k, v in node["Resources"].items() if not k.startswith("node:")}
                record = {
                    "type": None,
                    "resources": resources,
                    "up": t,
                    "down": None,
                    "busy": [],
                    "peak_in_use": {},
                }
                self.nodes[node_id] = record
                self.events.append({"t": t, "event": "node_up", "node": node_id})
            if record["type"] is None and node_id in types:
                record["type"] = types[node_id]
            total, free = node["Resources"], available.get(node_id, {})
            for key in record["resources"].keys() - {"memory", "object_store_memory"}:
                in_use = round(total.get(key, 0) - free.get(key, 0), 4)  # Ray counts resources in 1e-4 units
                if in_use > record["peak_in_use"].get(key, 0):
                    record["peak_in_use"][key] = in_use
            busy = any(free.get(key, 0) < total.get(key, 0) - 1e-6 for key in ("CPU", "GPU"))
            intervals = record["busy"]
            if busy and (not intervals or intervals[-1][1] is not None):
                intervals.append([t, None])
            elif not busy and intervals and intervals[-1][1] is None:
                intervals[-1][1] = t
        for node_id, record in self.nodes.items():
            if record["down"] is None and node_id not in alive:
                record["down"] = t
                if record["busy"] and record["busy"][-1][1] is None:
                    record["busy"][-1][1] = t
                self.events.append({"t": t, "event": "node_down", "node": node_id, "type": record["type"]})

    def worker_nodes_alive(self, head_id: str) -> list[str]:
        return [n for n, r in self.nodes.items() if n != head_id and r["down"] is None]


# The autoscaler's own words in monitor.log: its event summaries ("Adding 1 node(s) of type X.",
# "Removing 1 nodes of type X (idle).") and each termination, with the node's id and the reason.
AUTOSCALER_MESSAGE = re.compile(
    r"^(?P<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}).*? -- (:event_summary:)?(?P<message>"
    r"(Adding|Removing) \d+ node(s|\(s\))? of type .*|StandardAutoscaler: Terminating the node with id .*)$"
)
TERMINATION = re.compile(r"Terminating the node with id (?P<node>\w+) .*\((?P<reason>[^)]*)\)\.?\s*$")


def autoscaler_messages(monitor_log: str, t0_wall: float) -> list[dict[str, Any]]:
    """The autoscaler's launch and removal messages, timed from the scenario's start."""
    messages = []
    for line in monitor_log.splitlines():
        match = AUTOSCALER_MESSAGE.match(line)
        if not match:
            continue
        wall = datetime.strptime(match["time"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        message: dict[str, Any] = {"t": round(wall - t0_wall, 2), "message": match["message"].strip()}
        if terminated := TERMINATION.search(message["message"]):
            message |= {"terminated": terminated["node"], "reason": terminated["reason"]}
        messages.append(message)
    return messages


# --- the jobs -------------------------------------------------------------------------------


def training_workers(t0_wall: float, nodes: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Where each Ray Train worker ran, from the GCS actor table (dead actors stay listed): its node,
    that node's type, and when it started and ended. Ray's public state API
    (``ray.util.state.list_actors``) is served by the dashboard, which this head runs without."""
    from ray._private.state import actors

    def since_start(epoch_ms: int) -> float | None:
        return round(epoch_ms / 1000 - t0_wall, 2) if epoch_ms else None

    workers = []
    for actor in actors().values():
        if actor["ActorClassName"] != TRAIN_WORKER_CLASS:
            continue
        node = actor["Address"]["NodeID"]
        workers.append(
            {
                "actor": actor["ActorID"],
                "node": node,
                "type": nodes.get(node, {}).get("type"),
                "state": actor["State"],
                "start": since_start(actor["StartTime"]),
                "end": since_start(actor["EndTime"]),
            }
        )
    return sorted(workers, key=lambda worker: worker["start"] or 0)


def tiny_config(workdir: Path, max_steps: int):
    from llava_ray.config import load_config

    return load_config(
        REPO / "jobs" / "configs" / "tiny" / "pretrain.yaml",
        [
            f"data.sources.0.path={workdir / 'data' / 'stage1.json'}",
            f"data.prepared_path={workdir / 'prepared'}",
            f"run.storage_path={workdir / 'runs'}",
            "run.name=autoscaling",
            f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
            "train.global_batch_size=8",
            "train.micro_batch_size=4",
            f"train.max_steps={max_steps}",
            f"checkpoint.every_n_steps={max_steps}",
            # Pinned to H100 nodes as on the AWS cluster, training on CPU (no device behind the
            # fake GPUs): only gpu-h100-p5 has this resource, so the autoscaler must launch it.
            "scaling.use_gpu=false",
            f'scaling.resources_per_worker={{"accelerator_type:{PINNED_ACCELERATOR}": 0.001}}',
        ],
    )


def run(workdir: Path, idle_timeout_s: float, max_steps: int, samples: int) -> dict[str, Any]:
    t0, t0_wall = time.monotonic(), time.time()

    def now() -> float:
        return round(time.monotonic() - t0, 2)

    workdir.mkdir(parents=True, exist_ok=True)
    # Short: Ray's socket paths below it must fit the 107-byte limit. RAY_TMPDIR also keeps this
    # head out of /tmp/ray/ray_current_cluster, where a plain ray.init() elsewhere would find it.
    ray_tmpdir = Path(tempfile.mkdtemp(prefix="llr-fake-", dir="/tmp"))
    os.environ.update(RAY_ENV)
    os.environ["RAY_TMPDIR"] = str(ray_tmpdir)
    phases: dict[str, list[float | None]] = {"head_start": [now(), None]}
    observations: dict[str, Any] = {"idle_timeout_s": idle_timeout_s, "phases": phases}
    head = FakeHead(ray_tmpdir, idle_timeout_s)
    observations["node_types"] = {
        name: {k: v for k, v in node_type.items() if k != "node_config"}
        for name, node_type in head.config["available_node_types"].items()
    }
    sampler = ClusterSampler(t0)
    import ray

    try:
        # While the head starts (20-40 s on a busy 2-core machine): data, config, MLflow store, imports.
        import mlflow
        import ray.data

        from llava_ray.data.synthetic import generate
        from llava_ray.training.driver import run_train
        from llava_ray.workflows.pipeline import prepare_job

        generate(workdir / "data", samples=samples, seed=0)
        config = tiny_config(workdir, max_steps)
        mlflow.MlflowClient(config.tracking.uri).search_experiments()  # creates the store's tables

        head.connect(HEAD_START_TIMEOUT_S)
        ray.data.DataContext.get_current().enable_progress_bars = False
        head_id = ray.get_runtime_context().get_node_id()
        phases["head_start"][1] = now()
        observations["head"] = head_id
        log(f"connected to the head at {head.address}, {now():.1f} s")
        sampler.start()

        phases["prepare"] = [now(), None]
        report = prepare_job(config)
        phases["prepare"][1] = now()
        observations["prepared"] = {"input": report["input"], "written": report["written"]}
        log(f"prepare done, {now():.1f} s")

        phases["train"] = [now(), None]
        result = run_train(config)
        phases["train"][1] = now()
        observations["train"] = {"steps": result.steps, "final_model": result.final_model}
        log(f"stage job done, {now():.1f} s")

        phases["scale_down"] = [now(), None]
        deadline = time.monotonic() + idle_timeout_s + SCALE_DOWN_SLACK_S
        while sampler.worker_nodes_alive(head_id) and time.monotonic() < deadline:
            time.sleep(0.5)
        phases["scale_down"][1] = now()
        log(f"scale-down waited for, {now():.1f} s; worker nodes left: {sampler.worker_nodes_alive(head_id)}")
    finally:
        signal.alarm(0)  # the clean-up below is not cut short by the deadline
        sampler.stopped.set()
        if sampler.is_alive():
            sampler.join(timeout=10)
        observations |= {
            "nodes": sampler.nodes,
            "events": sampler.events,
            "sampler_errors": sampler.errors[:5],
        }
        if ray.is_initialized():  # after the sampler: it has named the type of every node by now
            try:
                observations["train_workers"] = training_workers(t0_wall, sampler.nodes)
            except Exception as error:  # the clean-up below still runs
                observations["train_workers_error"] = repr(error)
        ray.shutdown()
        logs = head.logs_dir()
        monitor_log = logs / "monitor.log" if logs else None
        observations["autoscaler_messages"] = (
            autoscaler_messages(monitor_log.read_text(errors="replace"), t0_wall)
            if monitor_log and monitor_log.exists()
            else []
        )
        observations["signalled_leftovers"] = head.stop()
        observations["left_running"] = head.session_members()
        if logs:  # kept for a look after a failure; the sockets and the rest go
            shutil.copytree(logs, workdir / "ray-logs", symlinks=True, dirs_exist_ok=True)
        shutil.copy(head.log_file, workdir / "ray-start.log")
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
        observations["wall_s"] = now()
        print(MARKER + json.dumps(observations), flush=True)
    return observations


def _raise_timeout(signum: int, frame: Any) -> None:
    raise TimeoutError("the autoscaling scenario ran past its --deadline-s")


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one does not cut the clean-up short
    raise SystemExit(f"terminated by signal {signum}")  # so that `finally` stops the head


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, required=True, help="data, runs, Ray logs go here")
    parser.add_argument(
        "--idle-timeout-s",
        type=float,
        default=fake_multinode.IDLE_TIMEOUT_S,
        help=f"the autoscaler's idle timeout (default {fake_multinode.IDLE_TIMEOUT_S:g})",
    )
    parser.add_argument("--max-steps", type=int, default=2, help="stage job optimizer steps (default 2)")
    parser.add_argument("--samples", type=int, default=24, help="synthetic training images (default 24)")
    parser.add_argument(
        "--deadline-s", type=int, default=480, help="give up (and stop the head) after this (default 480)"
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGALRM, _raise_timeout)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    signal.alarm(args.deadline_s)
    run(args.workdir, args.idle_timeout_s, args.max_steps, args.samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
