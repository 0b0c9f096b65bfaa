"""Multi-node scenarios on one machine: each runs in its own ``ray.cluster_utils.Cluster``.

A ``Cluster`` starts a head and worker nodes here, each its own raylet and object store (1 CPU,
256 MB each); custom resources decide where training workers go, and ``remove_node`` takes a
whole node away (its raylet, object store and every worker process on it) as a lost machine
would. Each scenario runs in a process of its own (this script), so the cluster never meets the
session-wide Ray instance of the pytest process that launches it; ``tests/cluster/test_multinode.py``
runs the scenarios and asserts on the one JSON line each prints last::

    python tests/cluster/multinode_scenarios.py training WORKDIR
    python tests/cluster/multinode_scenarios.py prepare-node-loss WORKDIR

``training``, on one cluster (one start of it and of this process, not two): first placement,
stage 1 with both Ray Train workers on one node (the baseline) and the same job with one worker
on each of two nodes; then node loss, the node of one training worker removed after the step-2
checkpoint, a replacement node joining and the run resuming from the latest checkpoint.
``prepare-node-loss``: a node running a prepare actor is removed mid-run and a node c joins;
the shards and report are read back.

Where things ran comes from the GCS actor table (``Cluster.global_state``; a restarted actor
shows its latest node), how far training got from the steps rank 0 logged to MLflow (a private
store under WORKDIR), and where prepare batches ran from a line each batch appends under
WORKDIR/progress (:class:`ObservedPrepareWorker`, defined here, not in the package).

The script writes only under WORKDIR and a private Ray temp folder, and stops exactly the
cluster it started (``Cluster.shutdown``), whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Before Ray, torch or transformers load: workers inherit this environment through the raylets.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import mlflow
import pyarrow.parquet as pq
import ray
from ray.cluster_utils import Cluster

from llava_ray.config import load_config
from llava_ray.config.schema import LlavaRayConfig
from llava_ray.data import prepare
from llava_ray.data.synthetic import generate
from llava_ray.training.driver import run_train

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "jobs" / "configs" / "tiny"
NODE_CPUS = 1
OBJECT_STORE_BYTES = 256 * 2**20
# As tests/training/test_train_ray.py: 40 synthetic samples, 6 steps of 8, a checkpoint every 2 steps.
TRAIN_SAMPLES = 40
TRAIN_OVERRIDES = [
    "train.global_batch_size=8",
    "train.micro_batch_size=4",
    "checkpoint.every_n_steps=2",
    "train.warmup_ratio=0",
    "train.max_steps=6",
]
# Enough records that each of the three prepare actors handles several batches (32 samples each).
PREPARE_SAMPLES = 2400
NODE_LOSS_AFTER_STEP = 2
WAIT_TIMEOUT_S = 300
RESULT_PREFIX = "RESULT "


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def node_ports() -> dict[str, int]:
    """Every port a node would otherwise take at a fixed default (8265, 52365, ...), picked free."""
    return {
        "dashboard_port": free_port(),
        "dashboard_agent_listen_port": free_port(),
        "metrics_export_port": free_port(),
        "runtime_env_agent_port": free_port(),
    }


class LocalCluster:
    """A head and named worker nodes; nodes are added and removed by name."""

    def __init__(self) -> None:
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": NODE_CPUS,
                "object_store_memory": OBJECT_STORE_BYTES,
                "include_dashboard": False,
                **node_ports(),
            },
        )
        self.nodes: dict[str, Any] = {}
        self.names = {self.cluster.head_node.node_id: "head"}

    def add(self, name: str, resources: dict[str, float] | None = None) -> None:
        node = self.cluster.add_node(
            num_cpus=NODE_CPUS,
            object_store_memory=OBJECT_STORE_BYTES,
            resources=resources or {},
            **node_ports(),
        )
        self.nodes[name] = node
        self.names[node.node_id] = name

    def remove(self, name: str) -> None:
        """The whole node at once, without a graceful drain: a machine that is gone."""
        self.cluster.remove_node(self.nodes.pop(name), allow_graceful=False)

    def actors(self, class_name: str) -> list[dict[str, Any]]:
        """Every actor of that class so far, alive or dead, with the name of its node."""
        table = self.cluster.global_state.actor_table(None)
        return [
            {
                "id": actor["ActorID"],
                "node": self.names.get(actor["Address"]["NodeID"], "?"),
                "state": actor["State"],
                "restarts": actor["NumRestarts"],
            }
            for actor in table.values()
            if class_name in actor["ActorClassName"]
        ]


@contextlib.contextmanager
def local_cluster(nodes: dict[str, dict[str, float]]) -> Iterator[LocalCluster]:
    """A cluster of a head and ``nodes`` (name: custom resources), connected; shut down on exit.

    Ray's temp folder is a private one: ``Cluster`` records its address there for ``ray.init()``
    to find, and removes the record at shutdown; in the shared /tmp/ray it could hide or remove
    someone else's. (A short path: Ray's socket paths live in it.)
    """
    temp = tempfile.mkdtemp(prefix="mn", dir="/tmp")
    os.environ["RAY_TMPDIR"] = temp
    cluster = None
    try:
        cluster = LocalCluster()
        for name, resources in nodes.items():
            cluster.add(name, resources)
        ray.init(address=cluster.cluster.address, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield cluster
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def wait_for(condition: Callable[[], Any], what: str, timeout_s: float = WAIT_TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.1)
    raise TimeoutError(f"gave up waiting for {what} after {timeout_s} s")


def train_data(workdir: Path) -> Path:
    """Synthetic stage-1 data prepared once per WORKDIR (the first training scenario does it)."""
    prepared = workdir / "prepared" / "pretrain"
    if not (prepared / prepare.REPORT_FILE).exists():
        generate(workdir / "data", samples=TRAIN_SAMPLES, seed=0)
        prepare.run_prepare(
            load_config(
                TINY / "pretrain.yaml",
                [f"data.sources.0.path={workdir / 'data' / 'stage1.json'}", f"data.prepared_path={prepared}"],
            )
        )
    return prepared


def train_config(workdir: Path, name: str, resources: dict[str, float], *overrides: str) -> LlavaRayConfig:
    """Tiny stage 1 on the prepared data, its workers placed by ``resources`` (one unit each)."""
    return load_config(
        TINY / "pretrain.yaml",
        [
            f"data.prepared_path={train_data(workdir)}",
            f"run.storage_path={workdir / 'runs'}",
            f"run.name={name}",
            f"scaling.resources_per_worker={json.dumps(resources)}",
            *TRAIN_OVERRIDES,
            *overrides,
        ],
    )


def train_on(cluster: LocalCluster, config: LlavaRayConfig) -> dict[str, Any]:
    """Run the job; return its result and the nodes its Ray Train workers ran on."""
    before = {actor["id"] for actor in cluster.actors("RayTrainWorker")}
    started = time.perf_counter()
    result = run_train(config)
    workers = [actor for actor in cluster.actors("RayTrainWorker") if actor["id"] not in before]
    return {
        "final_model": result.final_model,
        "metrics": {key: value for key, value in result.metrics.items() if isinstance(value, int | float)},
        "worker_nodes": sorted(actor["node"] for actor in workers),
        "elapsed_s": round(time.perf_counter() - started, 1),
    }


def training(workdir: Path) -> dict[str, Any]:
    """:func:`placement`, then :func:`node_loss`, on one cluster."""
    with local_cluster({"a": {"train_slot": 1}, "b": {"train_slot": 1}, "pair": {"pair_slot": 2}}) as cluster:
        return {"placement": placement(cluster, workdir), **node_loss(cluster, workdir)}


def placement(cluster: LocalCluster, workdir: Path) -> dict[str, Any]:
    """Both workers on one node, then one worker on each of two nodes.

    A worker asks for one ``train_slot``; nodes a and b have one each, so the two workers of a
    job cannot share a node (Ray Train's default PACK placement still spills a bundle that does
    not fit). Node ``pair`` has two ``pair_slot`` units, so both workers of the baseline land there.
    """
    train_data(workdir)
    one_node = train_on(cluster, train_config(workdir, "one-node", {"pair_slot": 1}))
    two_nodes = train_on(cluster, train_config(workdir, "two-nodes", {"train_slot": 1}))
    return {"one_node": one_node, "two_nodes": two_nodes}


def latest_checkpoint_step(run_dir: Path) -> int:
    """The step of the latest checkpoint Ray Train has registered (0 before the first)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or being rewritten
        return 0
    latest = snapshot.get("latest_checkpoint_result") or {}
    return int(latest.get("metrics", {}).get("step", 0))


class Background:
    """``function()`` in a thread, its result or error kept.

    The job runs in the thread and the main thread adds and removes nodes: a Ray node sets a
    SIGTERM handler when it starts, which Python allows only in the main thread.
    """

    def __init__(self, function: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: str | None = None
        self.finished_at: float | None = None

        def run() -> None:
            try:
                self.result = function()
            except BaseException as error:  # reported in the JSON, where the test shows it
                self.error = f"{type(error).__name__}: {error}"[:4000]
            self.finished_at = time.monotonic()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def done(self) -> bool:
        return not self.thread.is_alive()


def node_loss(cluster: LocalCluster, workdir: Path) -> dict[str, Any]:
    """Node b (one training worker) is removed once the step-2 checkpoint is registered.

    Nodes a and b hold the only two ``train_slot`` units, so the restarted worker group needs
    the replacement node c, which joins right after b is gone (as an autoscaler would add one).
    """
    observed: dict[str, Any] = {}
    config = train_config(workdir, "node-loss", {"train_slot": 1}, "scaling.max_failures=2")
    run_dir = workdir / "runs" / "node-loss"
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.monotonic()
    job = Background(lambda: train_on(cluster, config))
    wait_for(
        lambda: job.done() or latest_checkpoint_step(run_dir) >= NODE_LOSS_AFTER_STEP,
        "the step-2 checkpoint",
    )
    if not job.done():
        observed["checkpoint_step_at_removal"] = latest_checkpoint_step(run_dir)
        observed["workers_before"] = cluster.actors("RayTrainWorker")
        removed_at, removed_wall = time.monotonic(), time.time()
        cluster.remove("b")
        observed["removed_after_s"] = round(removed_at - started, 1)
        cluster.add("c", {"train_slot": 1})
        observed["replacement_joined_s"] = round(time.monotonic() - removed_at, 1)

        def restarted() -> bool:
            alive = [a for a in cluster.actors("RayTrainWorker") if a["state"] == "ALIVE"]
            return job.done() or (len(alive) == 2 and any(a["node"] == "c" for a in alive))

        wait_for(restarted, "the restarted worker group")
        observed["workers_restarted_s"] = round(time.monotonic() - removed_at, 1)
    wait_for(job.done, "the job", timeout_s=2 * WAIT_TIMEOUT_S)
    observed["workers_after"] = cluster.actors("RayTrainWorker")
    if "removed_after_s" in observed:
        observed["removal_to_end_s"] = round(job.finished_at - removed_at, 1)
        observed |= lost_work(loss_log(config), removed_wall)
    return {"node_loss": job.result or {"error": job.error}, **observed}


def loss_log(config: LlavaRayConfig) -> list[tuple[float, int]]:
    """(wall-clock time, step) of every step rank 0 logged to MLflow for this run, in time order."""
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    runs = client.search_runs(
        [experiment.experiment_id], f"attributes.run_name = '{config.train.stage} {config.run.name}'"
    )
    return sorted(
        (metric.timestamp / 1000, metric.step)
        for metric in client.get_metric_history(runs[0].info.run_id, "train/loss")
    )


def lost_work(log: list[tuple[float, int]], removed_wall: float) -> dict[str, Any]:
    """What the node loss cost, from the steps' log: the last step done before it, the steps
    trained twice (done before the loss, redone after the resume), and when the resumed run
    finished its first step (the first step logged that is not past every step before it)."""
    steps = [step for _, step in log]
    resumed_at = next(
        (at for index, (at, step) in enumerate(log) if index and step <= max(steps[:index])), None
    )
    return {
        "step_at_removal": max((step for at, step in log if at <= removed_wall), default=0),
        "steps_trained_twice": sorted({step for step in steps if steps.count(step) > 1}),
        "removal_to_resumed_step_s": None if resumed_at is None else round(resumed_at - removed_wall, 1),
    }


class ObservedPrepareWorker(prepare.PrepareWorker):
    """The production worker, plus a line per batch (node, rows) in WORKDIR/progress: the test's eyes.

    Defined here (pickled by value, so the actors run it too) and put in place of
    ``prepare.PrepareWorker`` for this process only; it changes no result and no timing.
    """

    progress_dir: str = ""

    def __call__(self, batch):
        table = super().__call__(batch)
        line = json.dumps({"node": ray.get_runtime_context().get_node_id(), "rows": table.num_rows})
        with open(Path(self.progress_dir) / f"{os.getpid()}.jsonl", "a") as out:
            out.write(line + "\n")
        return table


def progress_by_node(progress: Path, names: dict[str, str]) -> dict[str, int]:
    rows: dict[str, int] = {}
    for path in progress.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            if line.endswith("}"):  # a line being written is skipped until it is complete
                entry = json.loads(line)
                name = names.get(entry["node"], "?")
                rows[name] = rows.get(name, 0) + entry["rows"]
    return rows


def prepare_node_loss(workdir: Path) -> dict[str, Any]:
    """Node b is removed once its prepare actor has handed over some rows, and a node c joins.

    The prepared shards and the report are then checked by reading them back.
    """
    data, output, progress = workdir / "prepare-data", workdir / "prepare-out", workdir / "progress"
    generate(data, samples=PREPARE_SAMPLES, eval_samples=1, seed=1)
    shutil.rmtree(progress, ignore_errors=True)
    progress.mkdir(parents=True)
    ObservedPrepareWorker.progress_dir = str(progress)
    prepare.PrepareWorker = ObservedPrepareWorker
    config = load_config(
        TINY / "pretrain.yaml",
        [f"data.sources.0.path={data / 'stage1.json'}", f"data.prepared_path={output}"],
    )
    observed: dict[str, Any] = {}
    with local_cluster({"a": {}, "b": {}}) as cluster:
        started = time.monotonic()
        job = Background(lambda: prepare.run_prepare(config))
        wait_for(
            lambda: job.done() or progress_by_node(progress, cluster.names).get("b", 0) > 0,
            "rows from node b",
        )
        if not job.done():
            observed["rows_by_node_at_removal"] = progress_by_node(progress, cluster.names)
            observed["actors_before"] = cluster.actors("PrepareWorker")
            observed["report_actor_node"] = [a["node"] for a in cluster.actors("ReportBuilder")]
            removed_at = time.monotonic()
            cluster.remove("b")
            observed["removed_after_s"] = round(removed_at - started, 1)
            cluster.add("c")
        wait_for(job.done, "the prepare job", timeout_s=2 * WAIT_TIMEOUT_S)
        observed["elapsed_s"] = round(job.finished_at - started, 1)
        observed["actors_after"] = cluster.actors("PrepareWorker")
        observed["rows_by_node"] = progress_by_node(progress, cluster.names)
    report = job.result or {"error": job.error}
    shards = sorted(output.glob("*.parquet"))
    rows = [
        row for shard in shards for row in pq.read_table(shard, columns=["row"]).column("row").to_pylist()
    ]
    return {
        "report": {key: report.get(key) for key in ("input", "written", "skipped", "error", "workers")},
        "shard_rows": len(rows),
        "distinct_row_keys": len(set(rows)),
        # Rows whose batch was prepared twice: done on node b, lost with it, done again elsewhere.
        "rows_prepared_twice": sum(observed["rows_by_node"].values()) - (report.get("written") or 0),
        **observed,
    }


SCENARIOS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "training": training,
    "prepare-node-loss": prepare_node_loss,
}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in SCENARIOS:
        print(f"usage: multinode_scenarios.py {{{','.join(SCENARIOS)}}} WORKDIR", file=sys.stderr)
        return 2
    workdir = Path(argv[1]).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = (
        f"sqlite:///{workdir / 'mlflow.db'}"  # private, never the caller's store
    )
    started = time.perf_counter()
    result = SCENARIOS[argv[0]](workdir)
    result["scenario_s"] = round(time.perf_counter() - started, 1)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
