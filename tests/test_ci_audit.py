"""CI's audit summary (.ci/audit_summary.py): a fixable vulnerability fails, nothing is read as clean
unaudited."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "audit_summary.py"


def run(tmp_path: Path, dependencies: list[dict]) -> subprocess.CompletedProcess[str]:
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"dependencies": dependencies, "fixes": []}))
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(report)], capture_output=True, text=True, check=False
    )


def test_a_vulnerability_with_a_fixed_release_fails(tmp_path: Path) -> None:
    done = run(
        tmp_path,
        [
            {
                "name": "requests",
                "version": "2.25.1",
                "vulns": [{"id": "GHSA-x", "fix_versions": ["2.31.0"]}],
            },
            {"name": "numpy", "version": "2.0.0", "vulns": []},
        ],
    )
    assert done.returncode == 1
    assert "KNOWN VULNERABILITY WITH A FIX: requests 2.25.1: GHSA-x (fixed in: 2.31.0)" in done.stdout
    assert "2 audited, 0 could not be audited" in done.stdout


def test_one_without_a_fix_is_reported_and_passes(tmp_path: Path) -> None:
    done = run(tmp_path, [{"name": "pkg", "version": "1", "vulns": [{"id": "PYSEC-1", "fix_versions": []}]}])
    assert done.returncode == 0
    assert "without a fixed release: pkg 1: PYSEC-1 (fixed in: none)" in done.stdout


def test_nothing_audited_is_said_out_loud(tmp_path: Path) -> None:
    done = run(tmp_path, [{"name": "a", "skip_reason": "Dependency not found on PyPI"}])
    assert done.returncode == 0
    assert (
        "0 audited, 1 could not be audited" in done.stdout
        and "WARNING: no package could be audited" in done.stdout
    )
