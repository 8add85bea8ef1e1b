"""The import contracts of pyproject.toml (``lint-imports``) hold on this tree, and they can fail: a copy
of the tree with one forbidden import added is refused, naming the import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("models", "offline", "service", "bench", "cli")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(
    not LINT_IMPORTS.exists(), reason="import-linter (dev extra) is not installed"
)


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH first: the packages of `root` shadow the installed (editable) ones of this checkout.
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        check=False,
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _copy_tree(target: Path) -> Path:
    for part in PARTS:
        shutil.copytree(ROOT / part, target / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", target / "pyproject.toml")
    return target


def test_contracts_hold_on_this_tree() -> None:
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("added", "broken"),
    [
        ({"models/_forbidden.py": "import service.settings\n"}, "models._forbidden -> service.settings"),
        (
            {"offline/_forbidden.py": "from bench.common import finish\n"},
            "offline._forbidden -> bench.common",
        ),
        ({"service/_forbidden.py": "import offline.report\n"}, "service._forbidden -> offline.report"),
        ({"bench/_forbidden.py": "import cli.main\n"}, "bench._forbidden -> cli.main"),
        # captum only through models.explanations, which keeps its hooks off the gate's model
        ({"service/_forbidden.py": "import captum.attr\n"}, "service._forbidden -> captum"),
        # a cycle inside a part: models.errors -> models._forbidden -> models.errors
        (
            {
                "models/_forbidden.py": "import models.errors\n",
                "models/errors.py": "import models._forbidden\n",
            },
            ".errors -> ._forbidden",
        ),
    ],
    ids=[
        "models->service",
        "offline->bench",
        "service->offline",
        "bench->cli",
        "service->captum",
        "cycle-in-models",
    ],
)
def test_a_forbidden_import_breaks_a_contract(tmp_path: Path, added: dict[str, str], broken: str) -> None:
    root = _copy_tree(tmp_path)
    for module, line in added.items():
        path = root / module
        path.write_text((path.read_text() if path.exists() else "") + line)
    result = _lint_imports(root)
    assert result.returncode != 0, result.stdout
    assert "BROKEN" in result.stdout
    assert broken in result.stdout, result.stdout
