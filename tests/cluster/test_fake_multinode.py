"""cluster/fake_multinode.py offline: the rehearsal cluster mirrors cluster/aws.yaml and Ray accepts it.

Nothing is started here; tests/cluster/test_autoscaling.py runs the rehearsal itself.

    python -m pytest tests/cluster/test_fake_multinode.py -q
"""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "cluster" / "fake_multinode.py"

_spec = importlib.util.spec_from_file_location("fake_multinode", SCRIPT)
fake_multinode = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake_multinode)


@pytest.fixture(scope="module")
def aws() -> dict[str, Any]:
    return yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())


@pytest.fixture(scope="module")
def fake() -> dict[str, Any]:
    return fake_multinode.fake_multinode_config("127.0.0.1:6390", idle_timeout_s=12)


def aws_workers(aws: dict[str, Any]) -> dict[str, Any]:
    return {name: t for name, t in aws["available_node_types"].items() if name != aws["head_node_type"]}


def test_worker_node_types_mirror_aws_yaml(aws: dict[str, Any], fake: dict[str, Any]) -> None:
    fake_types = fake["available_node_types"]
    assert set(fake_types) - {fake["head_node_type"]} == set(aws_workers(aws))
    for name, aws_type in aws_workers(aws).items():
        mirrored, aws_resources = fake_types[name], aws_type["resources"]
        # Nodes only on demand, as on AWS, and never more of a type than AWS allows.
        assert mirrored["min_workers"] == aws_type.get("min_workers", 0) == 0, name
        assert 1 <= mirrored["max_workers"] <= aws_type["max_workers"], name
        resources = mirrored["resources"]
        assert resources["CPU"] == fake_multinode.CPUS_PER_NODE, name
        # A GPU type keeps a GPU count (fake: no device behind it); a CPU type gets none.
        assert ("GPU" in resources) == (aws_resources.get("GPU", 0) > 0), name
        custom = {k: v for k, v in aws_resources.items() if k not in ("CPU", "GPU")}
        assert {k: v for k, v in resources.items() if k in custom} == custom, name
        assert set(resources) == {*custom, "CPU", "object_store_memory"} | (
            {"GPU"} if "GPU" in resources else set()
        )
    gpu_types = [n for n, t in fake_types.items() if t["resources"].get("GPU")]
    assert sorted(gpu_types) == ["gpu-a100-p4d", "gpu-h100-p5"]


def test_head_and_cluster_settings_mirror_aws_yaml(aws: dict[str, Any], fake: dict[str, Any]) -> None:
    # The fake provider tags its head with this type name, whatever aws.yaml calls its head.
    head = fake["available_node_types"][fake["head_node_type"]]
    assert fake["head_node_type"] == "ray.head.default"
    assert head["resources"] == aws["available_node_types"][aws["head_node_type"]]["resources"] == {"CPU": 0}
    assert head["max_workers"] == 0
    assert fake["upscaling_speed"] == aws["upscaling_speed"]
    assert fake["idle_timeout_minutes"] == pytest.approx(12 / 60)
    assert fake["idle_timeout_minutes"] < aws["idle_timeout_minutes"]
    workers = sum(
        t["max_workers"] for n, t in fake["available_node_types"].items() if n != "ray.head.default"
    )
    assert fake["max_workers"] == min(aws["max_workers"], workers)
    assert fake["provider"]["type"] == "fake_multinode"
    assert fake["provider"]["gcs_address"] == "127.0.0.1:6390"


def test_follows_a_changed_aws_yaml(aws: dict[str, Any]) -> None:
    """Derived, not copied: a new worker type in aws.yaml appears in the rehearsal as it is."""
    changed = copy.deepcopy(aws)
    changed["available_node_types"]["gpu-l4-g6"] = {
        "min_workers": 0,
        "max_workers": 1,
        "resources": {"CPU": 48, "GPU": 4, "accelerator_type:L4": 1},
        "node_config": {"InstanceType": "g6.12xlarge"},
    }
    fake = fake_multinode.fake_multinode_config("127.0.0.1:1", aws=changed)
    assert fake["available_node_types"]["gpu-l4-g6"]["resources"] == {
        "accelerator_type:L4": 1,
        "CPU": 1,
        "GPU": fake_multinode.GPUS_PER_GPU_NODE,
        "object_store_memory": fake_multinode.OBJECT_STORE_BYTES_PER_NODE,
    }
    assert fake["available_node_types"]["gpu-l4-g6"]["max_workers"] == 1


def test_ray_accepts_the_config(fake: dict[str, Any]) -> None:
    """The schema check the autoscaler runs on (re)loading its config (private API: Ray 2.60)."""
    from ray.autoscaler._private.util import validate_config

    assert ray.__version__.startswith("2.60"), ray.__version__
    validate_config(copy.deepcopy(fake))
    broken = copy.deepcopy(fake)
    broken["available_node_types"]["cpu-m6i-8xlarge"]["min_wokers"] = 0
    with pytest.raises(jsonschema.ValidationError, match="'min_wokers' was unexpected"):
        validate_config(broken)


def test_command_line_prints_the_config() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--gcs-port", "6390", "--idle-timeout-s", "12"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert yaml.safe_load(result.stdout) == fake_multinode.fake_multinode_config("127.0.0.1:6390", 12)
