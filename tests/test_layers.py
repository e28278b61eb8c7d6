"""The layer contracts of pyproject.toml (import-linter): they hold on this tree, and a wrong import breaks them.

belladonna -> flows -> tasks -> infra -> poison_core; poison_core never imports prefect / ray /
mlflow / boto3 / s3fs; inside poison_core the members (attacks, defenses: independent of each other)
sit above the shared machinery, data and models, and configs and registries. The negative cases copy
the five packages to a temporary folder, add one upward import and expect `lint-imports` to fail
naming it: a contract that cannot fail checks nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("belladonna", "flows", "tasks", "infra", "poison_core")
LINT_IMPORTS = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([LINT_IMPORTS, "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def _copy_tree(dst: Path) -> None:
    for name in PACKAGES:
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")


@pytest.fixture(scope="module")
def lint_imports() -> str:
    if not Path(LINT_IMPORTS).exists():
        pytest.fail("lint-imports is not installed: install the test extra (pip install -e '.[test]')")
    return LINT_IMPORTS


def test_the_layer_contracts_hold(lint_imports, tmp_path):
    _copy_tree(tmp_path)
    done = _lint(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(("module", "line", "named"), [
    ("poison_core/io.py", "import tasks.keys\n", "poison_core is not allowed to import tasks"),
    ("infra/storage.py", "import flows.benchmark\n", "infra is not allowed to import flows"),
    ("poison_core/metrics.py", "import mlflow\n", "poison_core.metrics -> mlflow"),
    ("poison_core/perturbation.py", "import poison_core.attacks.base\n",
     "poison_core.perturbation -> poison_core.attacks.base"),
    ("poison_core/attacks/badnets.py", "import poison_core.defenses.base\n",
     "poison_core.attacks is not allowed to import poison_core.defenses"),
])
def test_a_wrong_import_breaks_a_contract(lint_imports, tmp_path, module, line, named):
    _copy_tree(tmp_path)
    target = tmp_path / module
    target.write_text(target.read_text() + "\n" + line)
    done = _lint(tmp_path)
    assert done.returncode != 0, done.stdout
    assert named in done.stdout, done.stdout
