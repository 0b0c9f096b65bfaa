"""Offline checks of the cluster definitions under cluster/: nothing is launched.

cluster/aws.yaml goes through the Ray cluster launcher's own defaults and schema (the same
`prepare_config` + `validate_config` that `ray up` runs first). The KubeRay manifests go through
KubeRay's own CRD schemas as the API server applies them (`kubectl apply --validate=strict`:
unknown fields are errors), from tests/assets/kuberay/ (see its README for the source tag); the
RayService's serveConfigV2 goes through Ray Serve's schema and its args through llava-ray's
`ServeConfig`. The manifests, the Dockerfiles and the runtime environment are also checked for
the structure and the versions that a real cluster would otherwise reject only after nodes are up,
and for what a real GPU fleet needs: token authentication on every node, the CPU image on nodes
without a GPU, EFA on the multi-node GPU types, GPU models the autoscaler can scale up for (with
Ray's own autoscaler code), RayJob deadlines, autoscaler v2.

    python -m pytest tests/cluster/test_cluster_definitions.py -q
"""

from __future__ import annotations

import copy
import functools
import gzip
import importlib
import itertools
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.runtime_env import RuntimeEnv

from llava_ray.config.serve import ServeConfig, serve_problems

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
KUBERAY_CRDS = REPO / "tests" / "assets" / "kuberay"
# GPU nodes run Ray's GPU image, the head and CPU nodes its CPU image: the same Ray and Python,
# without the GBs of CUDA libraries a node without a GPU never uses.
GPU_IMAGE = f"rayproject/ray:{ray.__version__}-py311-gpu"
CPU_IMAGE = f"rayproject/ray:{ray.__version__}-py311-cpu"
# Per GPU instance type: the GPU model Ray detects on it (ray.util.accelerators) and its EFA
# interfaces (one per network card: p4d.24xlarge 4, p5.48xlarge 32).
GPU_INSTANCE_TYPES = {"p4d.24xlarge", "p5.48xlarge"}
GPU_MODEL = {"p4d.24xlarge": "A100", "p5.48xlarge": "H100"}
EFA_INTERFACES = {"p4d.24xlarge": 4, "p5.48xlarge": 32}

# Ray Serve 2.60's own modules use pydantic's deprecated Field(**extra) when first imported.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:Using extra keyword arguments on `Field`:DeprecationWarning:ray\.serve"
)


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
    return load_yaml(KUBERAY / "raycluster.yaml")


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    return load_yaml(KUBERAY / "rayjob.yaml")


@pytest.fixture(scope="module")
def rayservice() -> dict[str, Any]:
    return load_yaml(KUBERAY / "rayservice.yaml")


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


# --- cluster/aws.yaml: closed by default, images per node kind, EFA ---------------------------


def launcher_container(config: dict[str, Any], node_type: str) -> tuple[str, list[str]]:
    """The image and `docker run` options Ray 2.60's launcher gives a node of `node_type`.

    As Ray does it: the node type's `docker` section updates the global one
    (StandardAutoscaler._get_node_specific_docker_config), then a head takes `head_image` and
    `head_run_options`, a worker `worker_image` and `worker_run_options`, both falling back to
    `image` and sharing `run_options` (DockerCommandRunner.run_init).
    """
    docker = {**config["docker"], **config["available_node_types"][node_type].get("docker", {})}
    role = "head" if node_type == config["head_node_type"] else "worker"
    return docker.get(f"{role}_image", docker["image"]), [
        *docker.get("run_options", []),
        *docker.get(f"{role}_run_options", []),
    ]


def docker_env(run_options: list[str]) -> dict[str, str]:
    """The environment variables `docker run` options set (`--env K=V`, `-e K=V`, `--env=K=V`)."""
    words = " ".join(run_options).replace("--env=", "--env ").split()
    pairs = [value for flag, value in itertools.pairwise(words) if flag in ("--env", "-e")]
    return dict(pair.split("=", 1) for pair in pairs)


def _gpu_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    types = config["available_node_types"]
    return {n: t for n, t in types.items() if t["node_config"]["InstanceType"] in GPU_INSTANCE_TYPES}


def check_aws_token_auth(config: dict[str, Any]) -> None:
    """Every node's container runs in token mode and has the token at the default path."""
    for name in config["available_node_types"]:
        env = docker_env(launcher_container(config, name)[1])
        assert env.get("RAY_AUTH_MODE") == "token", (
            f"{name}: RAY_AUTH_MODE={env.get('RAY_AUTH_MODE')!r} in its container: set `--env "
            "RAY_AUTH_MODE=token` in docker.run_options so every node (and client on it) uses the token"
        )
    # file_mounts' targets are in the container user's home: Ray's default token file there.
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token", (
        f"file_mounts: {config['file_mounts']}: copy your ~/.ray/auth_token to every node's ~/.ray/auth_token"
    )
    for command in [*config["head_start_ray_commands"], *config["worker_start_ray_commands"]]:
        assert "RAY_AUTH_MODE=disabled" not in command, command


def check_aws_images(config: dict[str, Any]) -> None:
    """GPU types run the GPU image, the head and CPU types the CPU image."""
    gpu_types = _gpu_types(config)
    for name in config["available_node_types"]:
        image, _ = launcher_container(config, name)
        expected = GPU_IMAGE if name in gpu_types else CPU_IMAGE
        assert image == expected, f"{name}: runs {image}, expected {expected}"


def check_aws_efa(config: dict[str, Any]) -> None:
    """Each GPU type has all its EFA interfaces, in a cluster placement group, visible in its container."""
    from ray.autoscaler._private.aws.config import _configure_subnets_and_groups_from_network_interfaces

    shared_groups = {
        tuple(t["node_config"]["SecurityGroupIds"])
        for name, t in config["available_node_types"].items()
        if name not in _gpu_types(config)
    }
    assert len(shared_groups) == 1, f"one security group for every node: {shared_groups}"
    for name, node_type in _gpu_types(config).items():
        node_config = node_type["node_config"]
        interfaces = node_config.get("NetworkInterfaces", [])
        expected = EFA_INTERFACES[node_config["InstanceType"]]
        efa = [i for i in interfaces if i.get("InterfaceType") in ("efa", "efa-only")]
        assert len(efa) == len(interfaces) == expected, (
            f"{name}: {len(efa)} EFA interfaces of {len(interfaces)}; {node_config['InstanceType']} has {expected}"
        )
        assert sorted(i["NetworkCardIndex"] for i in efa) == list(range(expected)), (
            f"{name}: one per network card"
        )
        (primary,) = [i for i in efa if i["DeviceIndex"] == 0]
        assert (primary["NetworkCardIndex"], primary["InterfaceType"]) == (0, "efa"), f"{name}: {primary}"
        # Ray's own bootstrap step for NetworkInterfaces (it refuses a missing subnet or group).
        bootstrapped = _configure_subnets_and_groups_from_network_interfaces(node_config)
        assert len(set(bootstrapped["SubnetIds"])) == 1, f"{name}: EFA needs one subnet"
        assert {tuple(sorted(set(bootstrapped["SecurityGroupIds"])))} == shared_groups, (
            f"{name}: its interfaces must be in the cluster's security group, or nodes cannot talk"
        )
        assert node_config.get("Placement", {}).get("GroupName"), f"{name}: a cluster placement group"
        _, options = launcher_container(config, name)
        assert "--device=/dev/infiniband" in options, f"{name}: the container must see the EFA devices"
        assert "--ulimit memlock=-1:-1" in options, f"{name}: libfabric pins NCCL's buffers"
        assert docker_env(options).get("FI_PROVIDER") == "efa", name
    for name in config["available_node_types"]:
        if name not in _gpu_types(config):
            assert "--device=/dev/infiniband" not in launcher_container(config, name)[1], name


def check_aws_gpu_models(config: dict[str, Any]) -> None:
    """Each GPU type advertises the GPU model Ray will detect on its instance type."""
    for name, node_type in _gpu_types(config).items():
        advertised = {r for r in node_type["resources"] if r.startswith("accelerator_type:")}
        assert advertised == {f"accelerator_type:{GPU_MODEL[node_type['node_config']['InstanceType']]}"}, name


def test_aws_cluster_is_closed_by_default(aws_prepared: dict[str, Any]) -> None:
    check_aws_token_auth(aws_prepared)


def test_aws_cpu_nodes_do_not_pull_the_gpu_image(aws_prepared: dict[str, Any]) -> None:
    check_aws_images(aws_prepared)


def test_aws_gpu_types_have_their_efa_interfaces(aws_prepared: dict[str, Any]) -> None:
    check_aws_efa(aws_prepared)


def test_aws_gpu_types_advertise_their_gpu_model(aws_prepared: dict[str, Any]) -> None:
    check_aws_gpu_models(aws_prepared)


def test_aws_top_comment_gives_the_token_steps() -> None:
    header = (CLUSTER / "aws.yaml").read_text().split("\ncluster_name:")[0]
    assert "ray get-auth-token --generate" in header
    assert "RAY_AUTH_MODE=token" in header


@pytest.mark.parametrize(
    ("check", "break_config", "message"),
    [
        pytest.param(
            check_aws_token_auth,
            lambda c: c["docker"]["run_options"].remove("--env RAY_AUTH_MODE=token"),
            r"head: RAY_AUTH_MODE=None in its container",
            id="auth_mode_not_set",
        ),
        pytest.param(
            check_aws_token_auth,
            lambda c: c["available_node_types"]["gpu-h100-p5"]["docker"]["worker_run_options"].append(
                "-e RAY_AUTH_MODE=disabled"
            ),
            r"gpu-a100-p4d: RAY_AUTH_MODE='disabled'",  # the two GPU types share their docker section
            id="auth_disabled_on_a_type",
        ),
        pytest.param(
            check_aws_token_auth,
            lambda c: c["file_mounts"].pop("~/.ray/auth_token"),
            r"copy your ~/\.ray/auth_token",
            id="token_not_copied",
        ),
        pytest.param(
            check_aws_images,
            lambda c: c["available_node_types"]["cpu-m6i-8xlarge"].pop("docker"),
            r"cpu-m6i-8xlarge: runs rayproject/ray:\S+-gpu",
            id="cpu_type_on_the_gpu_image",
        ),
        pytest.param(
            check_aws_efa,
            lambda c: c["available_node_types"]["gpu-h100-p5"]["node_config"]["NetworkInterfaces"].pop(),
            r"gpu-h100-p5: 31 EFA interfaces of 31; p5\.48xlarge has 32",
            id="efa_interface_missing",
        ),
        pytest.param(
            check_aws_efa,
            lambda c: c["available_node_types"]["gpu-a100-p4d"]["node_config"]["NetworkInterfaces"][1].pop(
                "SubnetId"
            ),
            r"at least one is missing a subnet",
            id="efa_interface_without_subnet",
        ),
        pytest.param(
            check_aws_efa,
            lambda c: c["available_node_types"]["gpu-a100-p4d"]["node_config"].pop("Placement"),
            r"gpu-a100-p4d: a cluster placement group",
            id="no_placement_group",
        ),
        pytest.param(
            check_aws_gpu_models,
            lambda c: c["available_node_types"]["gpu-h100-p5"]["resources"].update(
                {"accelerator_type:H100": 0, "accelerator_type:A100": 1}
            ),
            r"gpu-h100-p5",
            id="wrong_gpu_model",
        ),
    ],
)
def test_aws_fleet_checks_reject_a_broken_copy(aws: dict[str, Any], check, break_config, message) -> None:
    """The checks above can fail: each deliberately broken copy is refused, for its reason."""
    broken = copy.deepcopy(aws)
    break_config(broken)
    with pytest.raises((AssertionError, ValueError), match=message):
        check(validated_launcher_config(broken))


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
    aws: dict[str, Any], raycluster: dict[str, Any], rayjob: dict[str, Any], rayservice: dict[str, Any]
) -> None:
    assert aws["docker"]["image"] == GPU_IMAGE
    assert _dockerfile_from("Dockerfile") == [GPU_IMAGE]
    assert _dockerfile_from("Dockerfile.cpu") == [CPU_IMAGE]
    for name, manifest in (
        ("raycluster.yaml", raycluster),
        ("rayjob.yaml", rayjob),
        ("rayservice.yaml", rayservice),
    ):
        images = _images(manifest)
        assert images, f"{name}: no container images found"
        assert set(images) <= {GPU_IMAGE, CPU_IMAGE}, f"{name}: {sorted(set(images))}"
    assert raycluster["spec"]["rayVersion"] == ray.__version__
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
    assert rayservice["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__


def _dockerfile_from(name: str) -> list[str]:
    return re.findall(r"^FROM\s+(\S+)", (CLUSTER / name).read_text(), re.MULTILINE)


def _dockerfile_runs(name: str) -> str:
    text = (CLUSTER / name).read_text()
    return " ".join(re.findall(r"^RUN\s+(.*?)(?<!\\)$", text, re.MULTILINE | re.DOTALL))


def test_dockerfile_installs_cuda_torch_deepspeed_and_the_project() -> None:
    runs = _dockerfile_runs("Dockerfile")
    assert re.search(r"pip install .*torch==", runs)
    assert "whl/cpu" not in runs, "the training image needs the CUDA build of torch"
    assert "deepspeed" in runs
    assert re.search(r"pip install [^\n]*\s\.(\s|$)", runs), "the project itself: pip install ."


def test_dockerfile_installs_efa_userspace_for_nccl() -> None:
    """libfabric and aws-ofi-nccl in the GPU image (user space only), where NCCL finds the plugin."""
    text = (CLUSTER / "Dockerfile").read_text()
    runs = _dockerfile_runs("Dockerfile")
    assert "efa_installer.sh" in runs and "--skip-kmod" in runs, "EFA user space, the host has the driver"
    (library_path,) = re.findall(r"^ENV\s+LD_LIBRARY_PATH=(\S+)", text, re.MULTILINE)
    assert "/opt/amazon/ofi-nccl/lib" in library_path.split(":"), "NCCL loads aws-ofi-nccl from here"
    assert re.search(r"^USER ray$", text.split("efa_installer.sh")[1], re.MULTILINE), "back to the ray user"


def test_dockerfile_cpu_installs_cpu_torch_deepspeed_and_the_project() -> None:
    """The CPU image: Ray's CPU base, the CPU torch build first (nothing pulls CUDA's), the project."""
    text = (CLUSTER / "Dockerfile.cpu").read_text()
    runs = _dockerfile_runs("Dockerfile.cpu")
    assert re.search(r"pip install .*torch==\S+.* --index-url https://download\.pytorch\.org/whl/cpu", runs)
    assert runs.index("whl/cpu") < runs.index("deepspeed") < runs.index(" . "), "CPU torch before all else"
    assert re.search(r"pip install [^\n]*\s\.(\s|$)", runs), "the project itself: pip install ."
    assert (
        "COPY --chown=ray:users platform ./platform" in text and "COPY --chown=ray:users jobs ./jobs" in text
    )


# --- KubeRay: KubeRay's own CRD schemas -----------------------------------------------------

KUBERAY_MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
# The CRDs of KubeRay v1.7.0 (tests/assets/kuberay/README.md), by the kind each defines.
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml.gz",
    "RayJob": "ray.io_rayjobs.yaml.gz",
    "RayService": "ray.io_rayservices.yaml.gz",
}
# The operator refuses longer names: a RayJob's or RayService's cluster name adds a suffix
# (KubeRay v1.7.0 ray-operator/controllers/ray/utils/constant.go and validation.go).
MAX_NAME_LENGTH = {"RayCluster": 53, "RayJob": 47, "RayService": 47}
DNS_1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
PRESERVE_UNKNOWN_FIELDS = "x-kubernetes-preserve-unknown-fields"
# metav1.ObjectMeta's fields: the API server validates `metadata` itself (the CRD says `type: object`).
OBJECT_META_FIELDS = (
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
)


def strict_structural_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A CRD's structural schema as JSON Schema that refuses what `kubectl apply --validate=strict` refuses.

    The API server drops every field its schema does not declare, and strict validation makes each
    one an error: an object schema takes no undeclared field unless it has `additionalProperties`
    (a map) or `x-kubernetes-preserve-unknown-fields: true`. `x-kubernetes-int-or-string` takes an
    integer or a string, `nullable` adds null. CEL rules (`x-kubernetes-validations`) and `format`
    are not checked.
    """
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {
            name: strict_structural_schema(sub) for name, sub in schema["properties"].items()
        }
    for key in ("additionalProperties", "items", "not"):
        if isinstance(schema.get(key), dict):
            schema[key] = strict_structural_schema(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            schema[key] = [strict_structural_schema(sub) for sub in schema[key]]
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in schema:
        schema["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    is_object = schema.get("type") == "object" or "properties" in schema
    if is_object and "additionalProperties" not in schema and not schema.get(PRESERVE_UNKNOWN_FIELDS):
        schema["additionalProperties"] = False
    if schema.get("nullable"):
        schema = {"anyOf": [{"type": "null"}, schema]}
    return schema


def object_meta_schema(kind: str) -> dict[str, Any]:
    """`metadata` as the API server and KubeRay check it: a name, known fields, string labels and annotations."""
    string_map = {"type": "object", "additionalProperties": {"type": "string"}}
    fields: dict[str, Any] = {field: {} for field in OBJECT_META_FIELDS}
    fields.update(
        name={"type": "string", "pattern": DNS_1035_LABEL, "maxLength": MAX_NAME_LENGTH[kind]},
        namespace={"type": "string"},
        labels=string_map,
        annotations=string_map,
    )
    return {"type": "object", "required": ["name"], "properties": fields, "additionalProperties": False}


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft4Validator:
    """The validator of `kind`'s ray.io/v1 objects, from KubeRay's CRD."""
    text = gzip.decompress((KUBERAY_CRDS / CRD_FILES[kind]).read_bytes())
    crd = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind, CRD_FILES[kind]
    (v1,) = [version for version in crd["spec"]["versions"] if version["name"] == "v1"]
    schema = strict_structural_schema(v1["schema"]["openAPIV3Schema"])
    schema["properties"].update(
        apiVersion={"enum": [f"{crd['spec']['group']}/v1"]},
        kind={"enum": [kind]},
        metadata=object_meta_schema(kind),
    )
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    # OpenAPI v3.0 schemas are JSON Schema draft 4 plus the x-kubernetes-* keys handled above.
    return jsonschema.Draft4Validator(schema)


def check_kuberay_schema(manifest: dict[str, Any]) -> None:
    """Raise one ValueError listing every field KubeRay 1.7's CRD (or ObjectMeta) refuses, by its path."""
    kind = manifest.get("kind")
    if kind not in CRD_FILES:
        raise ValueError(f"kind {kind!r} is none of KubeRay's {sorted(CRD_FILES)}")
    errors = sorted(
        crd_validator(kind).iter_errors(manifest), key=lambda e: [str(p) for p in e.absolute_path]
    )
    if errors:
        name = manifest.get("metadata", {}).get("name")
        raise ValueError(
            f"{kind} {name!r} does not match KubeRay 1.7's CRD schema:\n"
            + "\n".join(f"  {error.json_path}: {error.message}" for error in errors)
        )


def test_strict_structural_schema_follows_kubernetes_rules() -> None:
    """Each rule on a small schema: undeclared fields refused unless kept or a map; int-or-string; nullable."""
    schema = strict_structural_schema(
        {
            "type": "object",
            "properties": {
                "port": {"x-kubernetes-int-or-string": True},
                "kept": {
                    "type": "object",
                    "properties": {"a": {"type": "string"}},
                    PRESERVE_UNKNOWN_FIELDS: True,
                },
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "when": {"type": "string", "nullable": True},
                "bare": {"type": "object"},
            },
        }
    )
    validator = jsonschema.Draft4Validator(schema)
    accepted = {
        "port": "http",
        "kept": {"a": "x", "extra": 1},
        "labels": {"any": "x"},
        "when": None,
        "bare": {},
    }
    assert list(validator.iter_errors(accepted)) == []
    assert validator.is_valid({"port": 8000})
    refused = [
        {"port": 1.5},
        {"kept": {"a": 1}},
        {"labels": {"any": 1}},
        {"bare": {"field": 1}},
        {"unknown": 1},
    ]
    for instance in refused:
        assert not validator.is_valid(instance), instance


def _manifest_id(path: Path) -> str:
    return path.name


def test_every_kuberay_manifest_is_checked() -> None:
    assert [p.name for p in KUBERAY_MANIFESTS] == ["raycluster.yaml", "rayjob.yaml", "rayservice.yaml"]


@pytest.mark.parametrize("path", KUBERAY_MANIFESTS, ids=_manifest_id)
def test_kuberay_manifest_passes_kuberays_crd_schema(path: Path) -> None:
    check_kuberay_schema(load_yaml(path))


def _typo_in_start_params(m: dict[str, Any]) -> None:
    head = m["spec"]["headGroupSpec"]
    head["rayStartParam"] = head.pop("rayStartParams")


def _integer_start_param(m: dict[str, Any]) -> None:
    m["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # map[string]string: must be "0"


def _typo_in_metadata(m: dict[str, Any]) -> None:
    m["metadata"]["lables"] = m["metadata"].pop("labels")


def _worker_group_without_name(m: dict[str, Any]) -> None:
    del m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]


def _gpu_count_not_a_quantity(m: dict[str, Any]) -> None:
    gpu_group = m["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]
    _containers(gpu_group)[0]["resources"]["limits"]["nvidia.com/gpu"] = "eight"


def _typo_in_container(m: dict[str, Any]) -> None:
    gpu_group = m["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]
    container = _containers(gpu_group)[0]
    container["volumeMount"] = container.pop("volumeMounts")


def _rayjob_field_name_in_a_rayservice(m: dict[str, Any]) -> None:
    m["spec"]["rayClusterSpec"] = m["spec"].pop("rayClusterConfig")


def _serve_config_as_a_mapping(m: dict[str, Any]) -> None:
    m["spec"]["serveConfigV2"] = yaml.safe_load(m["spec"]["serveConfigV2"])


def _name_with_dots(m: dict[str, Any]) -> None:
    m["metadata"]["name"] = "llava-1.5-7b"


def _no_name(m: dict[str, Any]) -> None:
    del m["metadata"]["name"]


def _alpha_api_version(m: dict[str, Any]) -> None:
    m["apiVersion"] = "ray.io/v1alpha1"


@pytest.mark.parametrize(
    ("file", "break_manifest", "message"),
    [
        pytest.param(
            "raycluster.yaml",
            _typo_in_start_params,
            r"\$\.spec\.headGroupSpec: Additional properties are not allowed \('rayStartParam' was unexpected\)",
            id="typo_in_start_params",
        ),
        pytest.param(
            "raycluster.yaml",
            _integer_start_param,
            r"\$\.spec\.headGroupSpec\.rayStartParams\['num-cpus'\]: 0 is not of type 'string'",
            id="integer_start_param",
        ),
        pytest.param("raycluster.yaml", _typo_in_metadata, r"'lables' was unexpected", id="typo_in_metadata"),
        pytest.param(
            "rayjob.yaml",
            _worker_group_without_name,
            r"\$\.spec\.rayClusterSpec\.workerGroupSpecs\[0\]: 'groupName' is a required property",
            id="worker_group_without_name",
        ),
        pytest.param(
            "rayjob.yaml", _gpu_count_not_a_quantity, r"'eight' does not match", id="not_a_quantity"
        ),
        pytest.param(
            "rayjob.yaml", _typo_in_container, r"'volumeMount' was unexpected", id="typo_in_container"
        ),
        pytest.param(
            "rayservice.yaml",
            _rayjob_field_name_in_a_rayservice,
            r"(?s)\$\.spec: 'rayClusterConfig' is a required property.*'rayClusterSpec' was unexpected",
            id="rayjob_field_name_in_a_rayservice",
        ),
        pytest.param(
            "rayservice.yaml",
            _serve_config_as_a_mapping,
            r"\$\.spec\.serveConfigV2: .* is not of type 'string'",
            id="serve_config_as_a_mapping",
        ),
        pytest.param(
            "rayservice.yaml", _name_with_dots, r"'llava-1\.5-7b' does not match", id="name_with_dots"
        ),
        pytest.param(
            "rayservice.yaml", _no_name, r"\$\.metadata: 'name' is a required property", id="no_name"
        ),
        pytest.param(
            "raycluster.yaml",
            lambda m: m["spec"]["authOptions"].update(mode="tokens"),
            r"\$\.spec\.authOptions\.mode: 'tokens' is not one of \['disabled', 'token'\]",
            id="auth_mode_typo",
        ),
        pytest.param(
            "raycluster.yaml",
            lambda m: m["spec"]["autoscalerOptions"].update(version="2"),
            r"\$\.spec\.autoscalerOptions\.version: '2' is not one of \['v1', 'v2'\]",
            id="autoscaler_version_typo",
        ),
        pytest.param(
            "raycluster.yaml",
            lambda m: m["spec"]["workerGroupSpecs"][1].update(resources={"accelerator_type:A100": 1}),
            r"\$\.spec\.workerGroupSpecs\[1\]\.resources\['accelerator_type:A100'\]: 1 is not of type 'string'",
            id="group_resource_not_a_string",
        ),
        pytest.param(
            "rayjob.yaml",
            lambda m: m["spec"].update(preRunningDeadlineSecond=m["spec"].pop("preRunningDeadlineSeconds")),
            r"'preRunningDeadlineSecond' was unexpected",
            id="deadline_typo",
        ),
        pytest.param(
            "rayjob.yaml",
            lambda m: m["spec"].update(activeDeadlineSeconds="48h"),
            r"\$\.spec\.activeDeadlineSeconds: '48h' is not of type 'integer'",
            id="deadline_not_seconds",
        ),
        pytest.param(
            "rayservice.yaml",
            _alpha_api_version,
            r"'ray\.io/v1alpha1' is not one of \['ray\.io/v1'\]",
            id="alpha_api_version",
        ),
    ],
)
def test_kuberay_crd_schema_rejects_a_broken_copy(file: str, break_manifest, message: str) -> None:
    """The CRD check can fail: each deliberately broken copy is refused, at the broken field."""
    broken = load_yaml(KUBERAY / file)
    break_manifest(broken)
    with pytest.raises(ValueError, match=message):
        check_kuberay_schema(broken)


@pytest.mark.parametrize("path", KUBERAY_MANIFESTS, ids=_manifest_id)
def test_kuberay_top_comment_gives_the_commands(path: Path) -> None:
    text = path.read_text()
    manifest = yaml.safe_load(text)
    header = text[: text.index("\napiVersion:")]
    assert header.startswith("#") and all(line.startswith("#") for line in header.splitlines())
    for command in (
        f"kubectl apply -f cluster/kuberay/{path.name}",
        f"kubectl get {manifest['kind'].lower()} {manifest['metadata']['name']}",
        f"kubectl delete -f cluster/kuberay/{path.name}",
    ):
        assert command in header, command


# --- KubeRay: cluster structure -------------------------------------------------------------


def _containers(group: dict[str, Any]) -> list[dict[str, Any]]:
    return group["template"]["spec"]["containers"]


def _gpu_limit(group: dict[str, Any]) -> int:
    return sum(
        int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in _containers(group)
    )


def _cpu_limit(group: dict[str, Any]) -> float:
    """The CPUs Ray advertises on a pod of `group`: its containers' cpu limits (a quantity: "6", "500m")."""
    quantities = [str(c["resources"]["limits"]["cpu"]) for c in _containers(group)]
    return sum(float(q[:-1]) / 1000 if q.endswith("m") else float(q) for q in quantities)


def _serve_ports(group: dict[str, Any]) -> list[int]:
    return [
        p["containerPort"] for c in _containers(group) for p in c.get("ports", []) if p.get("name") == "serve"
    ]


def _pod_templates(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [group["template"] for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]]


def check_cluster_spec(spec: dict[str, Any]) -> None:
    """What every llava-ray cluster shares: Ray's autoscaler, a head that takes no work, sane group sizes."""
    assert spec["enableInTreeAutoscaling"] is True
    assert isinstance(spec["autoscalerOptions"], dict) and spec["autoscalerOptions"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert head["rayStartParams"]["num-cpus"] == "0", "the head takes no tasks, actors or replicas"
    assert _containers(head) and all(c.get("image") and c.get("name") for c in _containers(head))
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        assert _containers(group)
    check_kuberay_token_auth(spec)
    check_kuberay_autoscaler_v2(spec)
    check_kuberay_images(spec)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def check_kuberay_token_auth(spec: dict[str, Any]) -> None:
    """Token authentication as KubeRay 1.7 turns it on: authOptions.mode token, Ray 2.52 or later.

    KubeRay then sets RAY_AUTH_MODE and the token on every Ray container, but never over a
    container's own RAY_AUTH_MODE (common/pod.go SetContainerTokenAuthEnvVars), so none may set one.
    """
    mode = spec.get("authOptions", {}).get("mode")
    assert mode == "token", (
        f"authOptions.mode is {mode!r}: set `authOptions: {{mode: token}}` (closed by default)"
    )
    assert _version(spec["rayVersion"]) >= (2, 52), (
        f"token auth needs Ray 2.52 or later, not {spec['rayVersion']}"
    )
    for template in _pod_templates(spec):
        for container in template["spec"]["containers"]:
            names = {e["name"] for e in container.get("env", [])}
            assert not names & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, (
                f"{container['name']}: sets {sorted(names & {'RAY_AUTH_MODE', 'RAY_AUTH_TOKEN'})}, which "
                "would override KubeRay's token authentication"
            )


def check_kuberay_autoscaler_v2(spec: dict[str, Any]) -> None:
    """Autoscaler v2 as KubeRay 1.7 spells it, and what its validation refuses alongside it (utils/validation.go)."""
    version = spec["autoscalerOptions"].get("version")
    assert version == "v2", f"autoscalerOptions.version is {version!r}: set `version: v2`"
    head_env = {e["name"] for c in _containers(spec["headGroupSpec"]) for e in c.get("env", [])}
    assert "RAY_enable_autoscaler_v2" not in head_env, (
        "KubeRay refuses both autoscalerOptions.version and the env"
    )
    for template in _pod_templates(spec):
        assert template["spec"].get("restartPolicy", "Never") == "Never", (
            "autoscaler v2: restartPolicy Never or unset"
        )


def check_kuberay_images(spec: dict[str, Any]) -> None:
    """Pods with GPUs run the GPU image; the head and every pod without a GPU, the CPU image."""
    for name, group in [("head", spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in spec["workerGroupSpecs"]
    ]:
        expected = GPU_IMAGE if _gpu_limit(group) else CPU_IMAGE
        images = [c["image"] for c in _containers(group)]
        assert images == [expected] * len(images), f"{name}: runs {images}, expected {expected}"


def kuberay_autoscaler_node_types(spec: dict[str, Any]) -> dict[str, Any]:
    """The node types Ray's autoscaler (v1 and v2 alike) derives from a RayCluster spec on KubeRay."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    ray_cr = {"metadata": {"name": "llava-ray", "namespace": "default"}, "spec": copy.deepcopy(spec)}
    return _derive_autoscaling_config_from_ray_cr(ray_cr)["available_node_types"]


def nodes_launched_for(node_types: dict[str, Any], head_type: str, bundles: list[dict[str, float]]):
    """What Ray's autoscaler adds for `bundles` on an empty cluster: (node counts by type, unmet bundles)."""
    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for

    scorer = functools.partial(
        _default_utilization_scorer, node_availability_summary=NodeAvailabilitySummary(node_availabilities={})
    )
    to_add, unmet = get_nodes_for(node_types, {head_type: 1}, head_type, 100, bundles, scorer)
    return dict(to_add), unmet


def _instance_type(group: dict[str, Any]) -> str | None:
    return group["template"]["spec"].get("nodeSelector", {}).get("node.kubernetes.io/instance-type")


def check_kuberay_gpu_models(spec: dict[str, Any]) -> None:
    """Each GPU group is one GPU model, and Ray's autoscaler scales it up from 0 for a job that pins it.

    Ray detects a pod's GPU model (`accelerator_type:H100`) only once the pod runs; at 0 pods the
    autoscaler knows what the group spec declares. 8 Train workers pinned to a model must start
    exactly one pod of that model's group.
    """
    node_types = kuberay_autoscaler_node_types(spec)
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    for model in sorted(set(GPU_MODEL.values())):
        bundles = [{"CPU": 1, "GPU": 1, f"accelerator_type:{model}": 0.001}] * 8
        launched, unmet = nodes_launched_for(node_types, "headgroup", bundles)
        assert len(launched) == 1 and sum(launched.values()) == 1 and not unmet, (
            f"8 workers pinned to accelerator_type:{model} start {launched}, leave {len(unmet)} pending: "
            f'declare `resources: {{"accelerator_type:{model}": "1"}}` on the {model} group'
        )
        (name,) = launched
        instance_type = _instance_type(groups[name])
        assert GPU_MODEL.get(instance_type) == model, (
            f"{name} advertises accelerator_type:{model} but its nodeSelector asks for {instance_type}: "
            "pin the instance type whose GPU Ray will detect"
        )


def check_kuberay_efa(spec: dict[str, Any]) -> None:
    """Each 8-GPU group asks for all its instance type's EFA devices and points libfabric at them."""
    for group in [g for g in spec["workerGroupSpecs"] if _gpu_limit(g)]:
        instance_type = _instance_type(group)
        (container,) = _containers(group)
        for kind in ("limits", "requests"):
            efa = container["resources"][kind].get("vpc.amazonaws.com/efa")
            assert efa == EFA_INTERFACES[instance_type], (
                f"{group['groupName']}: {kind} vpc.amazonaws.com/efa is {efa}, {instance_type} has "
                f"{EFA_INTERFACES[instance_type]}"
            )
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env.get("FI_PROVIDER") == "efa", f"{group['groupName']}: FI_PROVIDER=efa for libfabric"


def check_training_cluster_spec(spec: dict[str, Any]) -> None:
    """A training cluster: a CPU group for Ray Data, 8-GPU pods for Ray Train, both from 0."""
    check_cluster_spec(spec)
    groups = spec["workerGroupSpecs"]
    gpu_groups = [g for g in groups if _gpu_limit(g)]
    cpu_groups = [g for g in groups if not _gpu_limit(g)]
    assert gpu_groups and cpu_groups, "one CPU and one GPU worker group"
    for group in gpu_groups:
        assert group["minReplicas"] == 0, f"{group['groupName']}: GPU pods must scale from 0"
        assert _gpu_limit(group) == 8, group["groupName"]
    check_kuberay_gpu_models(spec)
    assert {_instance_type(g) for g in gpu_groups} == GPU_INSTANCE_TYPES, "a GPU group per aws.yaml GPU type"
    check_kuberay_efa(spec)


def check_serving_cluster_spec(spec: dict[str, Any], serve: ServeConfig, http_port: int) -> None:
    """A serving cluster: GPU groups sized by the app's replica autoscaling, Serve's port on every pod."""
    check_cluster_spec(spec)
    groups = spec["workerGroupSpecs"]
    assert groups and all(_gpu_limit(g) for g in groups), "serving: GPU worker groups only (the replicas)"
    scaling = serve.autoscaling
    assert scaling is not None, "serve.autoscaling: replicas (and so GPU pods) follow the load"
    assert serve.num_gpus_per_replica == 1, (
        f"one GPU per replica (7B in bf16 fits one), not {serve.num_gpus_per_replica!r}"
    )
    # So a pod holds as many replicas as it has GPUs, and the groups as many as their GPUs.
    for group in groups:
        assert _cpu_limit(group) >= _gpu_limit(group) * serve.num_cpus_per_replica, (
            f"{group['groupName']}: {_cpu_limit(group)} CPUs cannot hold {_gpu_limit(group)} replicas of "
            f"num_cpus_per_replica={serve.num_cpus_per_replica}"
        )
    fewest = sum(g["minReplicas"] * _gpu_limit(g) for g in groups)
    most = sum(g["maxReplicas"] * _gpu_limit(g) for g in groups)
    assert fewest == scaling.min_replicas, (
        f"the GPU groups keep {fewest} replicas' GPUs up, serve.autoscaling.min_replicas is "
        f"{scaling.min_replicas}: more holds idle GPUs; set minReplicas to match"
    )
    assert most >= scaling.max_replicas, (
        f"the GPU groups hold at most {most} replicas, serve.autoscaling.max_replicas is "
        f"{scaling.max_replicas}: the rest would stay pending; raise maxReplicas"
    )
    # KubeRay's serve service targets the pods' `serve` port; Serve's proxies listen on http_options.port.
    assert _serve_ports(spec["headGroupSpec"]) == [http_port]
    for group in groups:
        assert _serve_ports(group) == [http_port], group["groupName"]


def test_raycluster_structure(raycluster: dict[str, Any]) -> None:
    assert raycluster["apiVersion"] == "ray.io/v1"
    assert raycluster["kind"] == "RayCluster"
    assert raycluster["metadata"]["name"]
    check_training_cluster_spec(raycluster["spec"])


def check_rayjob_deadlines(spec: dict[str, Any]) -> None:
    """A RayJob that cannot start, or whose work stays PENDING, fails instead of waiting forever."""
    pre_running = spec.get("preRunningDeadlineSeconds")
    active = spec.get("activeDeadlineSeconds")
    assert isinstance(pre_running, int) and pre_running > 0, (
        f"preRunningDeadlineSeconds={pre_running!r}: bound the wait for the cluster and the submission"
    )
    assert isinstance(active, int) and active > 0, (
        f"activeDeadlineSeconds={active!r}: bound the whole run (a request no group satisfies stays PENDING)"
    )
    assert pre_running < active, "the start's deadline lies within the run's"
    # The 7B pipeline takes about 14 h on one 8-A100 node; do not stop a healthy run, nor wait a week.
    assert 24 * 3600 <= active <= 7 * 24 * 3600, active


def test_rayjob_structure(rayjob: dict[str, Any], raycluster: dict[str, Any]) -> None:
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    assert rayjob["metadata"]["name"]
    spec = rayjob["spec"]
    assert spec["entrypoint"] == "python jobs/pipeline.py --config jobs/configs/llava-1.5-7b/pipeline.yaml"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    check_rayjob_deadlines(spec)
    check_training_cluster_spec(spec["rayClusterSpec"])
    assert spec["rayClusterSpec"] == raycluster["spec"], (
        "keep rayjob.yaml's rayClusterSpec = raycluster.yaml's spec"
    )


def test_rayservice_structure(rayservice: dict[str, Any], raycluster: dict[str, Any]) -> None:
    assert rayservice["apiVersion"] == "ray.io/v1"
    assert rayservice["kind"] == "RayService"
    assert rayservice["metadata"]["name"]
    spec = rayservice["spec"]
    deploy_config = serve_deploy_config(rayservice)
    _, serve = validated_serve_app(deploy_config)
    check_serving_cluster_spec(spec["rayClusterConfig"], serve, deploy_config["http_options"]["port"])
    # Same autoscaler settings and S3 identity as the training cluster.
    cluster = spec["rayClusterConfig"]
    assert cluster["autoscalerOptions"] == raycluster["spec"]["autoscalerOptions"]
    accounts = {t["spec"].get("serviceAccountName") for t in _pod_templates(cluster)}
    assert accounts == {raycluster["spec"]["headGroupSpec"]["template"]["spec"]["serviceAccountName"]}


# One test per fleet item, per manifest (the structure tests above check them all together).
CLUSTER_SPECS = {
    "raycluster.yaml": lambda m: m["spec"],
    "rayjob.yaml": lambda m: m["spec"]["rayClusterSpec"],
    "rayservice.yaml": lambda m: m["spec"]["rayClusterConfig"],
}
TRAINING_MANIFESTS = ("raycluster.yaml", "rayjob.yaml")


def cluster_spec(file: str) -> dict[str, Any]:
    return CLUSTER_SPECS[file](load_yaml(KUBERAY / file))


@pytest.mark.parametrize("file", sorted(CLUSTER_SPECS))
def test_kuberay_cluster_is_closed_by_default(file: str) -> None:
    check_kuberay_token_auth(cluster_spec(file))


@pytest.mark.parametrize("file", sorted(CLUSTER_SPECS))
def test_kuberay_cluster_runs_autoscaler_v2(file: str) -> None:
    check_kuberay_autoscaler_v2(cluster_spec(file))


@pytest.mark.parametrize("file", sorted(CLUSTER_SPECS))
def test_kuberay_cpu_pods_do_not_pull_the_gpu_image(file: str) -> None:
    check_kuberay_images(cluster_spec(file))


@pytest.mark.parametrize("file", TRAINING_MANIFESTS)
def test_kuberay_gpu_groups_scale_up_for_a_pinned_gpu_model(file: str) -> None:
    check_kuberay_gpu_models(cluster_spec(file))


@pytest.mark.parametrize("file", TRAINING_MANIFESTS)
def test_kuberay_gpu_groups_get_their_efa_devices(file: str) -> None:
    check_kuberay_efa(cluster_spec(file))


def test_rayjob_fails_instead_of_waiting_forever(rayjob: dict[str, Any]) -> None:
    check_rayjob_deadlines(rayjob["spec"])


@pytest.mark.parametrize(
    ("break_spec", "message"),
    [
        pytest.param(lambda s: s.pop("authOptions"), r"authOptions\.mode is None", id="auth_off"),
        pytest.param(
            lambda s: s["authOptions"].update(mode="disabled"),
            r"authOptions\.mode is 'disabled'",
            id="auth_disabled",
        ),
        pytest.param(
            lambda s: (
                _containers(s["workerGroupSpecs"][0])[0]
                .setdefault("env", [])
                .append({"name": "RAY_AUTH_MODE", "value": "disabled"})
            ),
            r"ray-worker: sets \['RAY_AUTH_MODE'\], which would override",
            id="auth_env_override",
        ),
        pytest.param(
            lambda s: s.update(rayVersion="2.51.0"),
            r"token auth needs Ray 2\.52 or later",
            id="ray_too_old_for_auth",
        ),
        pytest.param(
            lambda s: s["autoscalerOptions"].pop("version"),
            r"autoscalerOptions\.version is None",
            id="autoscaler_v1",
        ),
        pytest.param(
            lambda s: s["headGroupSpec"]["template"]["spec"].update(restartPolicy="Always"),
            r"restartPolicy Never or unset",
            id="v2_with_restart_policy",
        ),
        pytest.param(
            lambda s: _containers(s["workerGroupSpecs"][0])[0].update(image=GPU_IMAGE),
            r"cpu: runs \['rayproject/ray:\S+-gpu'\], expected rayproject/ray:\S+-cpu",
            id="cpu_group_on_the_gpu_image",
        ),
        pytest.param(
            lambda s: _containers(s["headGroupSpec"])[0].update(image=GPU_IMAGE),
            r"head: runs \['rayproject/ray:\S+-gpu'\]",
            id="head_on_the_gpu_image",
        ),
    ],
)
def test_cluster_spec_checks_reject_a_broken_copy(
    raycluster: dict[str, Any], break_spec, message: str
) -> None:
    """The checks every cluster spec goes through can fail: each broken copy is refused, for its reason."""
    broken = copy.deepcopy(raycluster)
    break_spec(broken["spec"])
    with pytest.raises(AssertionError, match=message):
        check_cluster_spec(broken["spec"])


@pytest.mark.parametrize(
    ("break_spec", "message"),
    [
        pytest.param(
            lambda s: s["workerGroupSpecs"][2].pop("resources"),
            r"8 workers pinned to accelerator_type:H100 start \{\}, leave 8 pending",
            id="gpu_model_not_advertised",
        ),
        pytest.param(
            lambda s: s["workerGroupSpecs"][1].update(resources={"accelerator_type:H100": "1"}),
            r"accelerator_type:A100 start \{\}",
            id="gpu_model_of_the_other_group",
        ),
        pytest.param(
            lambda s: s["workerGroupSpecs"][2]["template"]["spec"].update(
                nodeSelector={"node.kubernetes.io/instance-type": "p4d.24xlarge"}
            ),
            r"gpu-h100 advertises accelerator_type:H100 but its nodeSelector asks for p4d\.24xlarge",
            id="gpu_model_on_the_wrong_instance_type",
        ),
        pytest.param(
            lambda s: s["workerGroupSpecs"][1]["template"]["spec"].pop("nodeSelector"),
            r"gpu-a100 advertises accelerator_type:A100 but its nodeSelector asks for None",
            id="gpu_model_not_pinned",
        ),
        pytest.param(
            lambda s: _containers(s["workerGroupSpecs"][2])[0]["resources"]["limits"].pop(
                "vpc.amazonaws.com/efa"
            ),
            r"gpu-h100: limits vpc\.amazonaws\.com/efa is None, p5\.48xlarge has 32",
            id="no_efa",
        ),
        pytest.param(
            lambda s: _containers(s["workerGroupSpecs"][1])[0].pop("env"),
            r"gpu-a100: FI_PROVIDER=efa",
            id="no_efa_provider",
        ),
    ],
)
def test_training_cluster_checks_reject_a_broken_copy(
    raycluster: dict[str, Any], break_spec, message: str
) -> None:
    broken = copy.deepcopy(raycluster)
    break_spec(broken["spec"])
    with pytest.raises(AssertionError, match=message):
        check_training_cluster_spec(broken["spec"])


def test_gpu_groups_scale_up_for_an_unpinned_job(raycluster: dict[str, Any]) -> None:
    """Unpinned, 8 GPU workers start one 8-GPU pod of either model, and preparation's CPUs no GPU pod."""
    node_types = kuberay_autoscaler_node_types(raycluster["spec"])
    launched, unmet = nodes_launched_for(node_types, "headgroup", [{"CPU": 1, "GPU": 1}] * 8)
    assert unmet == [] and sum(launched.values()) == 1 and set(launched) <= {"gpu-a100", "gpu-h100"}, launched
    launched, unmet = nodes_launched_for(node_types, "headgroup", [{"CPU": 1}] * 60)
    assert (launched, unmet) == ({"cpu": 2}, []), launched


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        pytest.param(
            "preRunningDeadlineSeconds", None, r"preRunningDeadlineSeconds=None", id="no_pre_running_deadline"
        ),
        pytest.param("activeDeadlineSeconds", None, r"activeDeadlineSeconds=None", id="no_active_deadline"),
        pytest.param(
            "activeDeadlineSeconds", 1200, r"the start's deadline lies within", id="active_before_start"
        ),
    ],
)
def test_rayjob_deadline_check_rejects_a_broken_copy(
    rayjob: dict[str, Any], field: str, value, message: str
) -> None:
    spec = copy.deepcopy(rayjob["spec"])
    spec.pop(field)
    if value is not None:
        spec[field] = value
    with pytest.raises(AssertionError, match=message):
        check_rayjob_deadlines(spec)


# --- KubeRay: the RayService's Serve config -------------------------------------------------

# ServeConfig fields a RayService takes from elsewhere: the HTTP address from serveConfigV2's
# http_options, the app's name and route from its application entry.
CLI_ONLY_SERVE_FIELDS = ("host", "port", "app_name", "route_prefix")


def serve_deploy_config(rayservice: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def _unknown_keys(where: str, given: dict[str, Any], schema: Any) -> list[str]:
    unknown = sorted(set(given) - set(schema.model_fields))
    return [f"{where}: unknown keys {unknown}, which Ray Serve ignores"] if unknown else []


def validated_serve_app(deploy_config: dict[str, Any]) -> tuple[dict[str, Any], ServeConfig]:
    """Check serveConfigV2 as Ray Serve and llava-ray read it; return its one application and its args.

    Ray's schemas ignore unknown keys (for forward compatibility), so they are looked for here: a
    typo would otherwise deploy with the default. Replicas, GPUs and batching have one home, the
    args (llava-ray's ServeConfig), never serveConfigV2's `deployments` overrides.
    """
    from ray.serve.schema import HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    problems = _unknown_keys("serveConfigV2", deploy_config, ServeDeploySchema)
    problems += _unknown_keys("http_options", deploy_config.get("http_options", {}), HTTPOptionsSchema)
    for i, app in enumerate(deploy_config.get("applications", [])):
        problems += _unknown_keys(f"applications[{i}]", app, ServeApplicationSchema)
        if app.get("deployments"):
            problems.append(
                f"applications[{i}].deployments overrides {[d.get('name') for d in app['deployments']]}: "
                "set replicas, GPUs and batching in args (the serve config) only"
            )
        cli_only = [key for key in CLI_ONLY_SERVE_FIELDS if key in app.get("args", {})]
        if cli_only:
            problems.append(
                f"applications[{i}].args {cli_only}: unused in a RayService; set http_options' host/port "
                "and the application's name/route_prefix instead"
            )
    if problems:
        raise ValueError("; ".join(problems))
    ServeDeploySchema.model_validate(deploy_config)  # pydantic's ValidationError is a ValueError
    (app,) = deploy_config["applications"]
    serve = ServeConfig.model_validate(app.get("args", {}))
    if serve_problems(serve):
        raise ValueError("; ".join(serve_problems(serve)))
    return app, serve


def test_rayservice_serve_config_passes_ray_serve_and_llava_ray_validation(
    rayservice: dict[str, Any],
) -> None:
    deploy_config = serve_deploy_config(rayservice)
    app, serve = validated_serve_app(deploy_config)
    assert deploy_config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    assert (app["name"], app["route_prefix"]) == ("llava-ray", "/")
    assert app["import_path"] == "llava_ray.serving.app:build_app"
    assert serve.backend == "llava-ray"


def test_rayservice_serves_the_stage_2_model(rayservice: dict[str, Any]) -> None:
    from llava_ray.config.loader import load_config
    from llava_ray.training.final_model import final_model_uri

    _, serve = validated_serve_app(serve_deploy_config(rayservice))
    finetune = load_config(REPO / "jobs" / "configs" / "llava-1.5-7b" / "finetune.yaml")
    assert serve.model == final_model_uri(finetune), "serve finetune.yaml's final model"


def test_rayservice_app_builds_from_its_args(rayservice: dict[str, Any]) -> None:
    """import_path names llava-ray's builder, and Ray Serve takes the deployment it builds from the args."""
    from ray import serve

    (app,) = serve_deploy_config(rayservice)["applications"]
    module, function = app["import_path"].split(":")
    build = getattr(importlib.import_module(module), function)
    assert isinstance(build(app["args"]), serve.Application)  # nothing starts: the model is not loaded


def test_rayservice_top_comment_reaches_the_serve_service(rayservice: dict[str, Any]) -> None:
    text = (KUBERAY / "rayservice.yaml").read_text()
    port = serve_deploy_config(rayservice)["http_options"]["port"]
    name = rayservice["metadata"]["name"]
    assert f"kubectl port-forward service/{name}-serve-svc {port}:{port}" in text
    assert f"curl http://127.0.0.1:{port}/v1/models" in text


def _set_serve_config(m: dict[str, Any], change) -> None:
    config = yaml.safe_load(m["spec"]["serveConfigV2"])
    change(config)
    m["spec"]["serveConfigV2"] = yaml.safe_dump(config, sort_keys=False)


def _app(config: dict[str, Any]) -> dict[str, Any]:
    return config["applications"][0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param(
            lambda c: c.update(http_option=c.pop("http_options")),
            r"serveConfigV2: unknown keys \['http_option'\]",
            id="typo_in_serve_config",
        ),
        pytest.param(
            lambda c: _app(c).update(route="/"),
            r"applications\[0\]: unknown keys \['route'\]",
            id="typo_in_application",
        ),
        pytest.param(
            lambda c: _app(c).update(deployments=[{"name": "LlavaServer", "num_replicas": 2}]),
            r"applications\[0\]\.deployments overrides \['LlavaServer'\]: set replicas",
            id="deployment_override",
        ),
        pytest.param(
            lambda c: _app(c)["args"].update(port=9000),
            r"applications\[0\]\.args \['port'\]: unused in a RayService",
            id="cli_only_arg",
        ),
        pytest.param(
            lambda c: _app(c).update(import_path="llava_ray.serving.app:build_app:app"),
            r'Got invalid import path "llava_ray\.serving\.app:build_app:app"',
            id="bad_import_path",
        ),
        pytest.param(
            lambda c: _app(c)["runtime_env"].update(working_dir="."),
            r"runtime_envs in the Serve config support only remote URIs in working_dir",
            id="local_working_dir",
        ),
        pytest.param(
            lambda c: _app(c)["args"].update(num_gpu_per_replica=1),
            r"num_gpu_per_replica\n  Extra inputs are not permitted",
            id="typo_in_args",
        ),
        pytest.param(
            lambda c: _app(c)["args"]["autoscaling"].update(min_replicas=5),
            r"min_replicas=5 > max_replicas=4",
            id="autoscaling_min_above_max",
        ),
        pytest.param(
            lambda c: _app(c)["args"].update(remote_image_hosts=["images.example.com"]),
            r"serve\.remote_image_hosts is set but serve\.allow_remote_images is false",
            id="serve_problem",
        ),
    ],
)
def test_serve_config_validation_rejects_a_broken_copy(
    rayservice: dict[str, Any], change, message: str
) -> None:
    """The Serve checks can fail: each deliberately broken serveConfigV2 is refused, for its reason."""
    broken = copy.deepcopy(rayservice)
    _set_serve_config(broken, change)
    with pytest.raises(ValueError, match=message):
        validated_serve_app(serve_deploy_config(broken))


def test_serving_cluster_check_rejects_a_broken_copy(rayservice: dict[str, Any]) -> None:
    """The serving structure check can fail: a GPU group too small for max_replicas is refused."""
    broken = copy.deepcopy(rayservice)
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = 2
    deploy_config = serve_deploy_config(broken)
    _, serve = validated_serve_app(deploy_config)
    with pytest.raises(AssertionError, match=r"at most 2 replicas, serve\.autoscaling\.max_replicas is 4"):
        check_serving_cluster_spec(
            broken["spec"]["rayClusterConfig"], serve, deploy_config["http_options"]["port"]
        )


# --- KubeRay: runtime environments ----------------------------------------------------------

# Where each KubeRay manifest that runs llava-ray code keeps its runtime_env.
KUBERAY_RUNTIME_ENVS = {
    "rayjob.yaml": lambda m: yaml.safe_load(m["spec"]["runtimeEnvYAML"]),
    "rayservice.yaml": lambda m: serve_deploy_config(m)["applications"][0]["runtime_env"],
}


@pytest.mark.parametrize("file", sorted(KUBERAY_RUNTIME_ENVS))
def test_kuberay_runtime_env_is_runtime_env_yaml_with_a_remote_working_dir(
    file: str, runtime_env: dict[str, Any]
) -> None:
    env = KUBERAY_RUNTIME_ENVS[file](load_yaml(KUBERAY / file))
    RuntimeEnv(**env)  # Ray's own field validation
    assert re.match(r"^(https|s3)://.+\.zip$", env["working_dir"]), env["working_dir"]
    local_only = {"working_dir", "excludes"}  # excludes apply to local uploads only
    assert {k: v for k, v in env.items() if k not in local_only} == {
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
