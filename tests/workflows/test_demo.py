"""The embedded demo, small: installed from its wheel it runs from any directory; its summary, its MLflow
runs, and a rerun's reuse of the synthetic and prepared data.

The demo runs once from a wheel installed in a fresh virtualenv, started in a directory that is
neither the repository nor a git checkout: that catches lookups into the repository that only work
in a checkout (configs found next to the source tree, package data missing from the wheel, a git
commit read from the package's location). The virtualenv's dependencies come from this environment's
site-packages (a path in a ``.pth`` file, so nothing is downloaded or reinstalled and this
environment's editable llava-ray, itself a ``.pth``, is not seen). The reuse is then checked in this
process on the same work directory, with the steps a rerun takes before it trains.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from llava_ray.data.prepare import REPORT_FILE
from llava_ray.workflows.demo import stage_config, synthetic_data
from llava_ray.workflows.pipeline import prepare_job

pytestmark = pytest.mark.integration

SAMPLES = 16
OVERRIDES = ("train.max_steps=2", "train.global_batch_size=8", "train.micro_batch_size=4")
REPO = Path(__file__).resolve().parents[2]
BUILD_INPUTS = ("pyproject.toml", "README.md", "platform")  # what building the wheel reads


def run(command: list[str | Path], cwd: Path, timeout: int, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, (
        f"{command} exited {result.returncode}:\n{(result.stdout + result.stderr)[-6000:]}"
    )
    return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with llava-ray installed from a wheel built from a copy of the sources."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"  # a copy: building writes build/ and egg-info next to the sources
    source.mkdir()
    for name in BUILD_INPUTS:
        origin = REPO / name
        if origin.is_dir():
            shutil.copytree(origin, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(origin, source / name)
    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], root, timeout=120)
    python = venv / "bin" / "python"
    site_packages = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root, 60)
    (Path(site_packages.strip()) / "llava_ray_test_dependencies.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n"
    )
    # No build isolation: the build backend (setuptools) comes from this environment, not an index.
    run(
        [
            python,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--quiet",
            source,
        ],
        root,
        timeout=600,
    )
    return venv


@pytest.fixture(scope="module")
def installed_demo(installed: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The installed ``llava-ray demo`` run from a directory outside any checkout: (work dir, summary)."""
    cli = installed / "bin" / "llava-ray"
    root = tmp_path_factory.mktemp("demo")
    elsewhere = root / "elsewhere"  # neither the repository nor a git checkout
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "MLFLOW_"))}
    env.pop("PYTHONPATH", None)
    env.pop("LLAVA_RAY_GIT_COMMIT", None)
    workdir = root / "demo"
    run(
        [cli, "demo", "--workdir", workdir, "--samples", str(SAMPLES), *OVERRIDES],
        elsewhere,
        timeout=600,
        env=env,
    )
    return workdir, json.loads((workdir / "summary.json").read_text())


def test_installed_package_runs_the_demo_from_another_directory(installed, installed_demo, tmp_path):
    python, cli = installed / "bin" / "python", installed / "bin" / "llava-ray"
    located = run([python, "-c", "import llava_ray; print(llava_ray.__file__)"], tmp_path, 120)
    assert Path(located.strip()).is_relative_to(installed), f"llava_ray imported from {located}"
    assert "--samples" in run([cli, "demo", "--help"], tmp_path, 120)
    page = "import importlib.resources as r; print(r.files('llava_ray.serving').joinpath('static/chat.html').is_file())"
    assert run([python, "-c", page], tmp_path, 120).strip() == "True", "the chat page is in the wheel"
    # The shipped configs are package data: listed and copied from the wheel, outside any checkout.
    assert "tiny/pretrain" in run([cli, "configs", "list"], tmp_path, 120)
    run([cli, "configs", "copy", "tiny/pipeline", f"{tmp_path / 'mine'}/"], tmp_path, 120)
    assert (tmp_path / "mine" / "pipeline.yaml").is_file() and (tmp_path / "mine" / "pretrain.yaml").is_file()
    workdir, summary = installed_demo
    assert set(summary["stages"]) >= {
        "prepare-pretrain",
        "prepare-finetune",
        "pretrain",
        "finetune",
        "evaluate",
    }
    assert 0 <= summary["eval_accuracy"] <= 1
    assert (Path(summary["final_model"]) / "hf" / "config.json").exists()
    # The commit tag comes from the working directory's checkout: outside one there is none.
    parent = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").get_run(summary["parent_run_id"])
    assert "mlflow.source.git.commit" not in parent.data.tags


def test_the_demo_summary_and_its_mlflow_runs(installed_demo):
    workdir, summary = installed_demo
    written = json.loads((workdir / "summary.json").read_text())
    assert written == summary
    for key in (
        "eval_accuracy",
        "eval_chance",
        "eval_accuracy_before_stage2",
        "eval_accuracy_first_turn",
        "eval_accuracy_follow_up",
        "elapsed_s",
    ):
        assert isinstance(summary[key], float), key
    assert summary["eval_chance"] <= 0.25 and set(summary["eval_by_type"]) >= {
        "color",
        "shape",
        "count",
        "first_turn",
        "follow_up",
        "overall",
    }
    # First turns and follow-ups are scored apart: each is its own group of the held-out items.
    by_type = summary["eval_by_type"]
    assert summary["eval_accuracy_follow_up"] == by_type["follow_up"]["accuracy"]
    assert summary["eval_accuracy_first_turn"] == by_type["first_turn"]["accuracy"]
    assert isinstance(by_type["follow_up"]["before_stage2"], float)
    for stage in ("pretrain", "finetune"):
        assert {"loss_first", "loss_last", "seconds"} <= set(summary["stages"][stage])
    assert (workdir / "runs").exists() and any((workdir / "runs").glob("*/final/hf/config.json"))

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    parent = client.get_run(summary["parent_run_id"])
    assert parent.data.tags["llava_ray.job"] == "pipeline" and parent.info.status == "FINISHED"
    children = client.search_runs(experiments, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    jobs = sorted(child.data.tags["llava_ray.job"] for child in children)
    assert jobs == ["evaluate", "evaluate", "prepare", "prepare", "train", "train"], jobs
    assert all(child.info.status == "FINISHED" for child in children)


def test_a_rerun_reuses_the_synthetic_and_prepared_data(installed_demo, monkeypatch):
    """What a rerun does before it trains, on the demo's own work dir: the synthetic data and each
    stage's prepared data are taken as they are (a whole rerun retrains both stages: 100 s more)."""
    workdir, _ = installed_demo
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the demo's own store in its work dir
    manifest = (workdir / "data" / "manifest.json").read_bytes()
    assert synthetic_data(workdir, samples=SAMPLES, seed=0) == json.loads(manifest)
    assert (workdir / "data" / "manifest.json").read_bytes() == manifest  # not written again
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    for stage in ("pretrain", "finetune"):
        config = stage_config(stage, workdir, OVERRIDES)
        report_file = Path(config.data.prepared_path) / REPORT_FILE
        written = report_file.read_bytes()
        assert prepare_job(config, reuse=True) == json.loads(written)
        assert report_file.read_bytes() == written
        (prepare_run,) = client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            f"tags.llava_ray.reused_prepared_data = 'True' and attributes.run_name = 'prepare {stage} {config.run.name}'",
        )
        assert prepare_run.info.status == "FINISHED"


def test_synthetic_data_is_reused_only_for_the_same_size_and_seed(tmp_path):
    first = synthetic_data(tmp_path, samples=6, seed=0)
    stage1 = tmp_path / "data" / "stage1.json"
    assert len(json.loads(stage1.read_text())) == 6
    written = stage1.stat().st_mtime_ns
    assert synthetic_data(tmp_path, samples=6, seed=0) == first
    assert stage1.stat().st_mtime_ns == written  # reused, not written again
    (tmp_path / "prepared" / "pretrain").mkdir(parents=True)  # prepared from the old data
    resized = synthetic_data(tmp_path, samples=8, seed=0)
    assert resized["samples"] == 8 and len(json.loads(stage1.read_text())) == 8  # one caption per image
    assert not (tmp_path / "prepared").exists()
    assert synthetic_data(tmp_path, samples=8, seed=1)["seed"] == 1
