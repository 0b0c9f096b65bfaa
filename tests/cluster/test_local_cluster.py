"""cluster/local.sh for real: a local Ray head with its job server, `ray job submit`, stop.

Starts one head on free ports with a temporary state directory, submits jobs to it the way
cluster/README.md submits to a real cluster, then stops it and checks that nothing is left
(the stop also runs at teardown, so a failing test leaves no head behind). 1.5-2.5 minutes on
2 cores: the head takes 5-45 s to answer, each job 10-45 s, depending on the machine's load.

    python -m pytest tests/cluster/test_local_cluster.py -q
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
LOCAL_SH = REPO / "cluster" / "local.sh"
# The virtualenv running these tests: its `ray` starts the head and its `python` runs the jobs.
VENV = Path(sys.prefix)
START_TIMEOUT_S = 150
JOB_TIMEOUT_S = 240
TRAIN_JOB_TIMEOUT_S = 900


@dataclass
class LocalHead:
    state_dir: Path
    gcs_port: int
    dashboard_port: int
    env: dict[str, str]  # PATH, LLAVA_RAY_VENV, RAY_ADDRESS, RAY_AUTH_MODE for subprocesses

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def pid(self) -> int:
        return int((self.state_dir / "ports.env").read_text().split("HEAD_PID=")[1].split()[0])


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["LLAVA_RAY_VENV"] = str(VENV)
    return env


def local_sh(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LOCAL_SH), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def stop(head: LocalHead) -> subprocess.CompletedProcess[str]:
    return local_sh("stop", "--dir", str(head.state_dir), "--timeout", "60", env=head.env, timeout=120)


def auth_headers(env: dict[str, str]) -> dict[str, str]:
    """The bearer token `ray job submit` would send (Ray 2.60 token authentication)."""
    if env.get("RAY_AUTH_MODE") != "token":
        return {}
    token = subprocess.run(
        ["ray", "get-auth-token"], env=env, capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()
    return {"Authorization": f"Bearer {token}"}


def session_members(session_id: int) -> list[int]:
    """Pids (not zombies) whose session is `session_id`: the head leads its own session."""
    members = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        state, session = fields[0], int(fields[3])
        if session == session_id and state != "Z":
            members.append(int(stat_file.parent.name))
    return members


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def submit(head: LocalHead, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["ray", "job", "submit", "--address", head.address, *args],
        cwd=cwd,
        env=head.env,
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, f"job failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHead]:
    state_dir = tmp_path_factory.mktemp("local-head")
    gcs_port, dashboard_port = free_ports(2)
    head = LocalHead(state_dir, gcs_port, dashboard_port, base_env())
    try:
        started = local_sh(
            "start",
            "--port",
            str(gcs_port),
            "--dashboard-port",
            str(dashboard_port),
            "--num-cpus",
            "2",
            "--object-store-memory",
            str(256 * 1024 * 1024),
            "--dir",
            str(state_dir),
            "--timeout",
            str(START_TIMEOUT_S - 30),
            env=head.env,
            timeout=START_TIMEOUT_S,
        )
        assert started.returncode == 0, f"local.sh start failed:\n{started.stderr}"
        # The one stdout line: "RAY_ADDRESS=http://127.0.0.1:D RAY_AUTH_MODE=token".
        exported = dict(item.split("=", 1) for item in started.stdout.split())
        assert exported["RAY_ADDRESS"] == head.address, started.stdout
        head.env.update(exported)
        yield head
    finally:
        stop(head)  # a no-op when the last test already stopped it


def test_status_reports_the_running_head(head: LocalHead) -> None:
    status = local_sh("status", "--dir", str(head.state_dir), env=head.env, timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"RAY_ADDRESS={head.address}" in status.stdout


def test_api_version_answers(head: LocalHead) -> None:
    request = urllib.request.Request(f"{head.address}/api/version", headers=auth_headers(head.env))
    with urllib.request.urlopen(request, timeout=10) as response:
        version = json.load(response)
    assert version["ray_version"] == ray.__version__
    if head.env.get("RAY_AUTH_MODE") == "token":
        # The job server is not open to anyone who can reach the port.
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{head.address}/api/version", timeout=10)
        assert refused.value.code == 401


def test_job_submit_runs_a_script_and_prints_its_output(head: LocalHead, tmp_path: Path) -> None:
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "script.py").write_text(
        textwrap.dedent(
            """
            import sys

            import ray

            ray.init()


            @ray.remote
            def square(x):
                return x * x


            print("tiny-job python:", sys.executable)
            print("tiny-job squares:", ray.get([square.remote(i) for i in range(4)]))
            """
        )
    )
    result = submit(head, "--working-dir", str(job_dir), "--", "python", "script.py", cwd=tmp_path)
    assert "tiny-job squares: [0, 1, 4, 9]" in result.stdout
    # Jobs run the python of the virtualenv that started the head.
    assert f"tiny-job python: {VENV / 'bin' / 'python'}" in result.stdout
    assert "succeeded" in result.stdout + result.stderr


def test_runtime_env_yaml_ships_the_submitted_package(head: LocalHead, tmp_path: Path) -> None:
    """cluster/runtime_env.yaml as README submits it: the uploaded copy of llava_ray is imported.

    Its `pip` list is left out here: building a virtualenv needs the network. Everything else
    (working_dir, excludes, env_vars with PYTHONPATH=platform) is the shipped file.
    """
    runtime_env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    runtime_env.pop("pip")
    env_file = tmp_path / "runtime_env.yaml"
    env_file.write_text(yaml.safe_dump(runtime_env))
    probe = textwrap.dedent(
        """
        import json, os
        import ray
        import llava_ray

        ray.init()

        @ray.remote
        def where():
            import llava_ray
            return os.getcwd(), llava_ray.__file__

        cwd, remote_file = ray.get(where.remote())
        print("probe:", json.dumps({
            "driver_cwd": os.getcwd(), "driver_file": llava_ray.__file__,
            "worker_cwd": cwd, "worker_file": remote_file,
            "has_jobs": os.path.isdir("jobs"), "has_venv": os.path.isdir(".venv"),
            "mlflow_uri": os.environ.get("MLFLOW_TRACKING_URI"),
        }))
        """
    )
    result = submit(
        head,
        "--working-dir",
        ".",
        "--runtime-env",
        str(env_file),
        "--",
        "python",
        "-c",
        probe,
        cwd=REPO,
    )
    line = next(line for line in result.stdout.splitlines() if line.startswith("probe: "))
    seen = json.loads(line.removeprefix("probe: "))
    for side in ("driver", "worker"):
        cwd = seen[f"{side}_cwd"]
        assert cwd != str(REPO), f"{side} runs in the repository, not in the uploaded working_dir"
        assert seen[f"{side}_file"] == os.path.join(cwd, "platform", "llava_ray", "__init__.py"), seen
    assert seen["has_jobs"] and not seen["has_venv"], seen
    assert seen["mlflow_uri"] == runtime_env["env_vars"]["MLFLOW_TRACKING_URI"]


def submit_job(head: LocalHead, script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``ray job submit --working-dir <repo> -- python jobs/<script> ...``; returns without asserting."""
    return subprocess.run(
        [
            "ray",
            "job",
            "submit",
            "--address",
            head.address,
            "--working-dir",
            str(REPO),
            "--",
            "python",
            f"jobs/{script}",
            *args,
        ],
        cwd=REPO,
        env=head.env,
        capture_output=True,
        text=True,
        timeout=TRAIN_JOB_TIMEOUT_S,
        check=False,
    )


def test_submitted_tiny_pretrain_job_trains_checkpoints_and_tracks(head: LocalHead, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from llava_ray.data.synthetic import generate

    generate(tmp_path / "data", samples=24, seed=0)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [
        f"data.sources.0.path={tmp_path / 'data' / 'stage1.json'}",
        f"data.prepared_path={tmp_path / 'prepared'}",
        f"run.storage_path={tmp_path / 'runs'}",
        "run.name=submitted",
        f"tracking.uri={tracking}",
        "train.global_batch_size=8",
        "train.micro_batch_size=4",
        "train.max_steps=4",
        "checkpoint.every_n_steps=2",
    ]
    config = ["--config", "jobs/configs/tiny/pretrain.yaml", *overrides]
    for script in ("prepare.py", "train.py"):
        result = submit_job(head, script, *config)
        assert result.returncode == 0, f"{script} failed:\n{result.stdout[-4000:]}\n{result.stderr[-2000:]}"
        assert "succeeded" in (result.stdout + result.stderr).lower()
    assert "step 4/4" in result.stdout
    run_dir = tmp_path / "runs" / "submitted"
    assert any(run_dir.glob("checkpoint_*/train_state.json")), list(run_dir.iterdir())
    assert (run_dir / "final" / "model.safetensors").exists()
    runs = MlflowClient(tracking).search_runs(
        [e.experiment_id for e in MlflowClient(tracking).search_experiments()],
        "attributes.run_name = 'pretrain submitted'",
    )
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags.get("ray.job_submission_id", "").startswith("raysubmit_")
    assert len(MlflowClient(tracking).get_metric_history(runs[0].info.run_id, "train/loss")) == 4


def test_submitted_job_with_a_bad_config_fails_with_the_validation_message(head: LocalHead) -> None:
    result = submit_job(
        head, "train.py", "--config", "jobs/configs/tiny/pretrain.yaml", "train.lerning_rate=1"
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "failed" in output.lower()
    assert "train.lerning_rate: unknown key. Did you mean 'learning_rate'?" in output


def http_json(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, {}


def test_submitted_serve_job_answers_until_it_is_stopped(head: LocalHead, trained_model_dir: Path) -> None:
    """jobs/serve.py as a Ray job: the app answers the OpenAI API while the job runs, and goes with it."""
    port = free_ports(1)[0]
    submitted = subprocess.run(
        ["ray", "job", "submit", "--no-wait", "--address", head.address, "--working-dir", str(REPO), "--",
         "python", "jobs/serve.py", "--model", str(trained_model_dir), "--port", str(port),
         "serve.model_name=tiny-llava", "serve.max_tokens=8"],
        cwd=REPO, env=head.env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job_id = re.search(r"raysubmit_\w+", submitted.stdout + submitted.stderr).group(0)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        try:
            status, models = http_json(f"{base}/v1/models")
            if status == 200:
                break
        except OSError:
            pass
        logs = subprocess.run(
            ["ray", "job", "logs", "--address", head.address, job_id],
            env=head.env,
            capture_output=True,
            text=True,
        )
        assert time.monotonic() < deadline, f"the serve job did not answer:\n{logs.stdout[-3000:]}"
        time.sleep(2)
    assert [m["id"] for m in models["data"]] == ["tiny-llava"]
    status, reply = http_json(
        f"{base}/v1/chat/completions",
        {"model": "tiny-llava", "messages": [{"role": "user", "content": "What shape?"}], "temperature": 0},
    )
    assert status == 200 and reply["choices"][0]["finish_reason"] in ("stop", "length")
    stopped = subprocess.run(
        ["ray", "job", "stop", "--address", head.address, job_id],
        env=head.env,
        capture_output=True,
        text=True,
    )
    assert stopped.returncode == 0, stopped.stderr
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if http_json(f"{base}/v1/models")[0] == 404:  # Serve's proxy stays; the app is gone
                break
        except OSError:
            break
        time.sleep(1)
    else:
        pytest.fail("the app still answers after `ray job stop`")


def test_stop_leaves_nothing_running(head: LocalHead) -> None:
    pid = head.pid
    assert pid in session_members(pid), "the head should be running before stop"
    stopped = stop(head)
    assert stopped.returncode == 0, stopped.stderr
    # The head leads its own session: an empty session means the head and all it started are gone.
    assert session_members(pid) == [], f"the head's processes survived: {session_members(pid)}"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", head.dashboard_port), timeout=5).close()
    assert port_is_free(head.dashboard_port) and port_is_free(head.gcs_port)
    # A plain ray.init() follows /tmp/ray/ray_current_cluster: it must not name the stopped head.
    record = Path(head.env.get("RAY_TMPDIR", "/tmp/ray")) / "ray_current_cluster"
    assert not (record.exists() and record.read_text().strip().endswith(f":{head.gcs_port}"))
    status = local_sh("status", "--dir", str(head.state_dir), env=head.env, timeout=60)
    assert status.returncode == 1 and "not running" in status.stdout
