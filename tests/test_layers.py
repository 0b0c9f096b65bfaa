"""The layer rules that the import contract (pyproject's [tool.importlinter]) cannot see: what a
light layer pulls in from outside the package. Data workers and the conversation package must not
pay for torch (seconds of import per Ray worker process)."""

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize(
    "module",
    ["llava_ray.conversation.templates", "llava_ray.conversation.tokenizer", "llava_ray.data.prepare"],
)
def test_light_layers_do_not_import_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False", f"importing {module} imported torch"


def test_import_contract_holds():
    """`make lint` runs the same check; here it also guards `make test`."""
    repo = Path(__file__).resolve().parents[1]
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint_imports), "--no-cache"], capture_output=True, text=True, cwd=repo)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]
    assert "0 broken" in result.stdout
