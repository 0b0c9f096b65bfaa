"""llava-ray installed from its wheel (not editable) runs the demo from any directory.

Catches lookups into the repository that only work in a checkout: configs found next to the source
tree, package data missing from the wheel, a git commit read from the package's location. The
package goes into a fresh virtualenv whose dependencies come from this environment's site-packages
(a path in a ``.pth`` file, so nothing is downloaded or reinstalled and this environment's editable
llava-ray, itself a ``.pth``, is not seen).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.integration

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


def test_installed_package_runs_the_demo_from_another_directory(installed, tmp_path):
    python, cli = installed / "bin" / "python", installed / "bin" / "llava-ray"
    located = run([python, "-c", "import llava_ray; print(llava_ray.__file__)"], tmp_path, 120)
    assert Path(located.strip()).is_relative_to(installed), f"llava_ray imported from {located}"
    assert "--samples" in run([cli, "demo", "--help"], tmp_path, 120)

    elsewhere = tmp_path / "elsewhere"  # neither the repository nor a git checkout
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "MLFLOW_"))}
    env.pop("PYTHONPATH", None)
    env.pop("LLAVA_RAY_GIT_COMMIT", None)
    workdir = tmp_path / "demo"
    overrides = ["train.max_steps=2", "train.global_batch_size=8", "train.micro_batch_size=4"]
    run([cli, "demo", "--workdir", workdir, "--samples", "16", *overrides], elsewhere, timeout=600, env=env)

    summary = json.loads((workdir / "summary.json").read_text())
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
