"""cluster/aws.yaml shrunk onto one machine: a cluster config for Ray's fake multi-node autoscaler.

Ray 2.60's ``fake_multinode`` provider "launches" a node by starting one more raylet (with its
own object store and workers) on this machine, so the real autoscaler can be watched adding nodes
for pending work and removing idle ones without any cloud. The node types are derived from
``aws.yaml`` here, never written twice: the same worker type names, ``min_workers`` (0: nodes only
on demand), ``upscaling_speed`` and custom resources (``accelerator_type:A100`` / ``:H100``), with
each node scaled down to fit a laptop (1 CPU; a GPU type gets a fake ``GPU`` count and no device)
and a short idle timeout. The head keeps ``aws.yaml``'s ``CPU: 0``: no work lands on it. With no
device behind the fake GPUs, a job reaches a GPU type through its ``accelerator_type:*`` resource
and trains on CPU (``scaling.use_gpu=false``); on AWS ``scaling.use_gpu=true`` asks for the
``GPU`` resource those types carry.

Write the config and start a rehearsal head from the repository root (never `ray stop` to end it:
that stops every Ray on the machine; terminate the ``ray start --block`` process instead):

    python cluster/fake_multinode.py --gcs-port 6390 > /tmp/fake.yaml
    RAY_FAKE_CLUSTER=1 AUTOSCALER_UPDATE_INTERVAL_S=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \\
        ray start --head --block --port 6390 --num-cpus 0 --include-dashboard false \\
        --autoscaling-config /tmp/fake.yaml

``RAY_FAKE_CLUSTER=1`` enables the provider; ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps every
fake node on 127.0.0.1. Then ``ray.init(address="127.0.0.1:6390")`` and run jobs. The rehearsal
and its measured timings: tests/cluster/test_autoscaling.py.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

AWS_YAML = Path(__file__).resolve().with_name("aws.yaml")
# The fake provider tags its head with this type name (ray.autoscaler._private.fake_multi_node).
FAKE_HEAD_TYPE = "ray.head.default"
CPUS_PER_NODE = 1
# Fake GPUs per GPU node: the GPU types stay GPU types for the autoscaler, which weighs a node
# type's GPUs when it picks one for work that needs none. Nothing can use them (no device), and the
# tiny configs' 2 Ray Train workers (0.5 CPU each) fit one node's CPU.
GPUS_PER_GPU_NODE = 2
MAX_NODES_PER_TYPE = 2  # each fake node is real processes on this machine
OBJECT_STORE_BYTES_PER_NODE = 128 * 2**20
IDLE_TIMEOUT_S = 10.0

# What Ray's fake_multinode example config sets besides node types (the provider reads the file
# as is: Ray 2.60's wheel ships no defaults file for this provider to fill in from).
_FAKE_PROVIDER = {
    "type": "fake_multinode",
    "use_node_id_as_ip": True,
    "disable_node_updaters": True,
    "disable_launch_config_check": True,
}
_EMPTY_SECTIONS: dict[str, Any] = {
    "auth": {},
    "docker": {},
    "file_mounts": {},
    "cluster_synced_files": [],
    "file_mounts_sync_continuously": False,
    "rsync_exclude": [],
    "rsync_filter": [],
    "initialization_commands": [],
    "setup_commands": [],
    "head_setup_commands": [],
    "worker_setup_commands": [],
    "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
}


def load_aws_config(path: Path = AWS_YAML) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def fake_node_resources(aws_resources: dict[str, float]) -> dict[str, float]:
    """One AWS node type's resources at rehearsal size: 1 CPU, fake GPUs, custom resources kept."""
    resources = {key: value for key, value in aws_resources.items() if key not in ("CPU", "GPU")}
    resources["CPU"] = CPUS_PER_NODE
    if aws_resources.get("GPU", 0) > 0:
        resources["GPU"] = GPUS_PER_GPU_NODE
    resources["object_store_memory"] = OBJECT_STORE_BYTES_PER_NODE
    return resources


def fake_multinode_config(
    gcs_address: str,
    idle_timeout_s: float = IDLE_TIMEOUT_S,
    aws: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The autoscaling config for a fake cluster whose head's GCS is at ``gcs_address`` (host:port)."""
    aws = copy.deepcopy(aws if aws is not None else load_aws_config())
    aws_head = aws["available_node_types"][aws["head_node_type"]]
    node_types: dict[str, Any] = {
        FAKE_HEAD_TYPE: {
            "resources": {key: value for key, value in aws_head.get("resources", {}).items()},
            "node_config": {},
            "max_workers": 0,
        }
    }
    for name, node_type in aws["available_node_types"].items():
        if name == aws["head_node_type"]:
            continue
        node_types[name] = {
            "resources": fake_node_resources(node_type["resources"]),
            "node_config": {},
            "min_workers": node_type.get("min_workers", 0),
            "max_workers": min(node_type["max_workers"], MAX_NODES_PER_TYPE),
        }
    workers = sum(t.get("max_workers", 0) for n, t in node_types.items() if n != FAKE_HEAD_TYPE)
    return {
        "cluster_name": f"{aws['cluster_name']}-fake",
        "max_workers": min(aws["max_workers"], workers),
        "upscaling_speed": aws.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": idle_timeout_s / 60,
        "provider": {**_FAKE_PROVIDER, "gcs_address": gcs_address},
        "available_node_types": node_types,
        "head_node_type": FAKE_HEAD_TYPE,
        **copy.deepcopy(_EMPTY_SECTIONS),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gcs-port", type=int, required=True, help="the head's --port")
    parser.add_argument("--host", default="127.0.0.1", help="the head's address (default 127.0.0.1)")
    parser.add_argument(
        "--idle-timeout-s", type=float, default=IDLE_TIMEOUT_S, help=f"default {IDLE_TIMEOUT_S:g}"
    )
    args = parser.parse_args(argv)
    config = fake_multinode_config(f"{args.host}:{args.gcs_port}", args.idle_timeout_s)
    yaml.safe_dump(config, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
