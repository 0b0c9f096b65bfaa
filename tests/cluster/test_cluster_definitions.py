"""Offline checks of the cluster definitions under cluster/: nothing is launched.

cluster/aws.yaml goes through the Ray cluster launcher's own defaults and schema (the same
`prepare_config` + `validate_config` that `ray up` runs first); the KubeRay manifests, the
Dockerfile and the runtime environment are checked for the structure and the versions that
a real cluster would otherwise reject only after nodes are up.

    python -m pytest tests/cluster/test_cluster_definitions.py -q
"""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.runtime_env import RuntimeEnv

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
# Every node (head, CPU, GPU) runs this one image so Python, Ray and torch agree everywhere.
EXPECTED_IMAGE = f"rayproject/ray:{ray.__version__}-py311-gpu"
GPU_INSTANCE_TYPES = {"p4d.24xlarge", "p5.48xlarge"}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def validated_launcher_config(config: dict[str, Any]) -> dict[str, Any]:
    """Fill Ray's AWS defaults into `config` and validate it as `ray up` does."""
    # Private API: its behaviour is checked for this Ray release only.
    from ray.autoscaler._private.util import prepare_config, validate_config

    assert ray.__version__.startswith("2.60"), (
        f"these checks use Ray's private launcher API as of 2.60; installed Ray is {ray.__version__}: "
        "re-check prepare_config/validate_config and update this test"
    )
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def aws() -> dict[str, Any]:
    return load_yaml(CLUSTER / "aws.yaml")


@pytest.fixture(scope="module")
def aws_prepared(aws: dict[str, Any]) -> dict[str, Any]:
    return validated_launcher_config(aws)


@pytest.fixture(scope="module")
def raycluster() -> dict[str, Any]:
    return load_yaml(CLUSTER / "kuberay" / "raycluster.yaml")


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    return load_yaml(CLUSTER / "kuberay" / "rayjob.yaml")


@pytest.fixture(scope="module")
def runtime_env() -> dict[str, Any]:
    return load_yaml(CLUSTER / "runtime_env.yaml")


# --- cluster/aws.yaml -----------------------------------------------------------------------


def test_ray_version_is_the_one_these_checks_were_written_for() -> None:
    assert ray.__version__.startswith("2.60"), ray.__version__


def test_aws_yaml_passes_ray_launcher_validation(aws_prepared: dict[str, Any]) -> None:
    assert aws_prepared["provider"]["type"] == "aws"
    assert aws_prepared["head_node_type"] in aws_prepared["available_node_types"]


def _unknown_top_level_key(c: dict[str, Any]) -> None:
    c["idle_timeout_minute"] = 5  # typo of idle_timeout_minutes


def _unknown_node_type_key(c: dict[str, Any]) -> None:
    c["available_node_types"]["gpu-h100-p5"]["min_worker"] = 0  # typo of min_workers


def _unknown_docker_key(c: dict[str, Any]) -> None:
    c["docker"]["imagee"] = c["docker"]["image"]


def _fractional_gpu_resource(c: dict[str, Any]) -> None:
    c["available_node_types"]["gpu-a100-p4d"]["resources"]["GPU"] = 7.5


def _missing_node_config(c: dict[str, Any]) -> None:
    del c["available_node_types"]["cpu-m6i-8xlarge"]["node_config"]


def _head_type_not_defined(c: dict[str, Any]) -> None:
    c["head_node_type"] = "ray.head.default"
    del c["available_node_types"]["head"]


def _min_workers_above_global_max(c: dict[str, Any]) -> None:
    c["available_node_types"]["gpu-a100-p4d"]["min_workers"] = c["max_workers"] + 1


@pytest.mark.parametrize(
    ("break_config", "message"),
    [
        pytest.param(
            _unknown_top_level_key, r"'idle_timeout_minute' was unexpected", id="unknown_top_level_key"
        ),
        pytest.param(_unknown_node_type_key, r"'min_worker' was unexpected", id="unknown_node_type_key"),
        pytest.param(_unknown_docker_key, r"'imagee' was unexpected", id="unknown_docker_key"),
        pytest.param(_fractional_gpu_resource, r"7.5 is not of type 'integer'", id="fractional_gpu_resource"),
        pytest.param(_missing_node_config, r"'node_config' is a required property", id="missing_node_config"),
        pytest.param(
            _head_type_not_defined,
            r"`head_node_type` must be one of `available_node_types`",
            id="head_type_not_defined",
        ),
        pytest.param(
            _min_workers_above_global_max,
            r"global `max_workers` is smaller than the sum of `min_workers`",
            id="min_workers_above_global_max",
        ),
    ],
)
def test_ray_launcher_validation_rejects_a_broken_copy(aws: dict[str, Any], break_config, message) -> None:
    """The validation above can fail: each deliberately broken copy is refused, for its reason."""
    broken = copy.deepcopy(aws)
    break_config(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=message):
        validated_launcher_config(broken)


def test_aws_node_types(aws_prepared: dict[str, Any]) -> None:
    types = aws_prepared["available_node_types"]
    head = types[aws_prepared["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head must not take tasks (resources: {CPU: 0})"

    gpu_types = {
        name: t for name, t in types.items() if t["node_config"]["InstanceType"] in GPU_INSTANCE_TYPES
    }
    assert {t["node_config"]["InstanceType"] for t in gpu_types.values()} == GPU_INSTANCE_TYPES
    for name, t in gpu_types.items():
        assert t["min_workers"] == 0, f"{name}: GPU nodes must scale from 0"
        assert t["max_workers"] >= 1, name
        assert t["resources"]["GPU"] == 8, f"{name}: 8 GPUs per node"

    cpu_types = [t for t in types.values() if t["node_config"]["InstanceType"] == "m6i.8xlarge"]
    assert len(cpu_types) == 1
    assert (cpu_types[0]["min_workers"], cpu_types[0]["max_workers"]) == (0, 8)
    assert "GPU" not in cpu_types[0]["resources"]

    for name, t in types.items():
        profile = t["node_config"].get("IamInstanceProfile", {})
        assert profile.get("Arn") or profile.get("Name"), f"{name}: S3 access needs an IamInstanceProfile"
    assert aws_prepared["idle_timeout_minutes"] > 0


def test_aws_start_commands_use_the_cluster_ports(aws_prepared: dict[str, Any]) -> None:
    head = " ".join(aws_prepared["head_start_ray_commands"])
    worker = " ".join(aws_prepared["worker_start_ray_commands"])
    for flag in (
        "--head",
        "--port=6379",
        "--object-manager-port=8076",
        "--dashboard-host=0.0.0.0",
        "--dashboard-port=8265",
        "--autoscaling-config=~/ray_bootstrap_config.yaml",
    ):
        assert flag in head, flag
    assert "--address=$RAY_HEAD_IP:6379" in worker
    assert "--object-manager-port=8076" in worker


def test_aws_setup_installs_torch_builds_per_node_kind(aws_prepared: dict[str, Any]) -> None:
    """CPU nodes get the CPU torch build, GPU nodes PyPI's CUDA build; all get llava-ray."""
    types = aws_prepared["available_node_types"]
    cpu_index = "download.pytorch.org/whl/cpu"
    assert cpu_index in " ".join(aws_prepared["head_setup_commands"])
    for t in types.values():
        if t["node_config"]["InstanceType"] == "m6i.8xlarge":
            assert cpu_index in " ".join(t["worker_setup_commands"])
        if t["node_config"]["InstanceType"] in GPU_INSTANCE_TYPES:
            commands = " ".join(t["worker_setup_commands"])
            assert "torch" in commands and cpu_index not in commands
    for commands in [aws_prepared["head_setup_commands"]] + [
        t["worker_setup_commands"] for name, t in types.items() if name != aws_prepared["head_node_type"]
    ]:
        assert any("pip install" in c and "llava-ray" in c for c in commands), commands


def test_aws_top_comment_gives_the_commands() -> None:
    text = (CLUSTER / "aws.yaml").read_text()
    assert text.startswith("#")
    for command in ("ray up", "ray job submit", "ray down"):
        assert command in text, command


# --- images and versions --------------------------------------------------------------------


def _images(node: Any) -> list[str]:
    """Every `image:` value anywhere in a manifest."""
    if isinstance(node, dict):
        found = [v for k, v in node.items() if k == "image" and isinstance(v, str)]
        return found + [i for v in node.values() for i in _images(v)]
    if isinstance(node, list):
        return [i for v in node for i in _images(v)]
    return []


def test_images_match_the_installed_ray(
    aws: dict[str, Any], raycluster: dict[str, Any], rayjob: dict[str, Any]
) -> None:
    assert aws["docker"]["image"] == EXPECTED_IMAGE
    dockerfile_from = re.findall(r"^FROM\s+(\S+)", (CLUSTER / "Dockerfile").read_text(), re.MULTILINE)
    assert dockerfile_from == [EXPECTED_IMAGE]
    for name, manifest in (("raycluster.yaml", raycluster), ("rayjob.yaml", rayjob)):
        images = _images(manifest)
        assert images, f"{name}: no container images found"
        assert set(images) == {EXPECTED_IMAGE}, f"{name}: {sorted(set(images))}"
    assert raycluster["spec"]["rayVersion"] == ray.__version__
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__


def test_dockerfile_installs_cuda_torch_deepspeed_and_the_project() -> None:
    text = (CLUSTER / "Dockerfile").read_text()
    runs = " ".join(re.findall(r"^RUN\s+(.*?)(?<!\\)$", text, re.MULTILINE | re.DOTALL))
    assert re.search(r"pip install .*torch==", runs)
    assert "whl/cpu" not in runs, "the training image needs the CUDA build of torch"
    assert "deepspeed" in runs
    assert re.search(r"pip install [^\n]*\s\.(\s|$)", runs), "the project itself: pip install ."


# --- KubeRay --------------------------------------------------------------------------------


def _containers(group: dict[str, Any]) -> list[dict[str, Any]]:
    return group["template"]["spec"]["containers"]


def _gpu_limit(group: dict[str, Any]) -> int:
    return sum(
        int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in _containers(group)
    )


def check_raycluster_spec(spec: dict[str, Any]) -> None:
    assert spec["enableInTreeAutoscaling"] is True
    assert isinstance(spec["autoscalerOptions"], dict) and spec["autoscalerOptions"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert _containers(head) and all(c.get("image") and c.get("name") for c in _containers(head))
    groups = spec["workerGroupSpecs"]
    for group in [head, *groups]:
        # KubeRay's rayStartParams is map[string]string: a bare 0 or true is rejected.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), group["rayStartParams"]
    for group in groups:
        assert group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        assert _containers(group)
    gpu_groups = [g for g in groups if _gpu_limit(g)]
    cpu_groups = [g for g in groups if not _gpu_limit(g)]
    assert gpu_groups and cpu_groups, "one CPU and one GPU worker group"
    for group in gpu_groups:
        assert group["minReplicas"] == 0, f"{group['groupName']}: GPU pods must scale from 0"
        assert _gpu_limit(group) == 8, group["groupName"]


def test_raycluster_structure(raycluster: dict[str, Any]) -> None:
    assert raycluster["apiVersion"] == "ray.io/v1"
    assert raycluster["kind"] == "RayCluster"
    assert raycluster["metadata"]["name"]
    check_raycluster_spec(raycluster["spec"])


def test_rayjob_structure(rayjob: dict[str, Any], raycluster: dict[str, Any]) -> None:
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    assert rayjob["metadata"]["name"]
    spec = rayjob["spec"]
    assert spec["entrypoint"] == "python jobs/pipeline.py --config jobs/configs/llava-1.5-7b/pipeline.yaml"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    check_raycluster_spec(spec["rayClusterSpec"])
    assert spec["rayClusterSpec"] == raycluster["spec"], (
        "keep rayjob.yaml's rayClusterSpec = raycluster.yaml's spec"
    )


def test_rayjob_runtime_env_is_runtime_env_yaml_with_a_remote_working_dir(
    rayjob: dict[str, Any], runtime_env: dict[str, Any]
) -> None:
    job_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**job_env)  # Ray's own field validation
    assert re.match(r"^(https|s3)://.+\.zip$", job_env["working_dir"]), job_env["working_dir"]
    local_only = {"working_dir", "excludes"}  # excludes apply to local uploads only
    assert {k: v for k, v in job_env.items() if k not in local_only} == {
        k: v for k, v in runtime_env.items() if k not in local_only
    }


# --- runtime environment --------------------------------------------------------------------


def test_runtime_env_yaml(runtime_env: dict[str, Any]) -> None:
    RuntimeEnv(**runtime_env)  # Ray's own validation of the known fields
    assert set(runtime_env) <= {"working_dir", "excludes", "pip", "env_vars"}, "unknown runtime_env field"
    assert runtime_env["working_dir"] == "."
    excludes = runtime_env["excludes"]
    for pattern in (".venv", "/data/", "/runs/"):
        assert pattern in excludes, pattern
    # Unanchored, these would also drop the package's own data/ subpackage from the upload.
    assert "data" not in excludes and "data/" not in excludes
    env_vars = runtime_env["env_vars"]
    assert env_vars["PYTHONPATH"] == "platform" and (REPO / "platform" / "llava_ray").is_dir()
    assert {"HF_HOME", "MLFLOW_TRACKING_URI"} <= set(env_vars)


def test_runtime_env_pip_is_pyproject_dependencies_minus_ray(runtime_env: dict[str, Any]) -> None:
    tomllib = pytest.importorskip("tomllib")
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    expected = [d for d in dependencies if not re.match(r"^ray\b", d)]
    assert runtime_env["pip"] == expected, (
        "cluster/runtime_env.yaml `pip` (and rayjob.yaml's runtimeEnvYAML) must list pyproject.toml's "
        f"dependencies except ray, in order: {expected}"
    )


# --- cluster/local.sh -----------------------------------------------------------------------


def test_local_sh_is_valid_bash_and_executable() -> None:
    script = CLUSTER / "local.sh"
    assert script.stat().st_mode & 0o111, "cluster/local.sh must be executable"
    subprocess.run(["bash", "-n", str(script)], check=True)
    usage = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert usage.returncode == 2 and "local.sh start" in usage.stderr
    unknown = subprocess.run([str(script), "start", "--bogus", "1"], capture_output=True, text=True)
    assert unknown.returncode == 1 and "unknown option '--bogus'" in unknown.stderr
