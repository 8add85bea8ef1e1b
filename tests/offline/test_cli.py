"""The predgate command line on a finished bundle: stage subcommands and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from models.bundle import load_bundle
from offline.cli import main


def test_mutants_and_features_subcommands_redo_their_stage(tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    assert main(["mutants", "--bundle", str(copy), "-n", "3", "--operator", "GF", "--redo"]) == 0
    assert "3 GF mutants" in capsys.readouterr().out
    bundle = load_bundle(copy)
    assert bundle.manifest["mutants"]["count"] == 3
    assert "features:val" not in bundle.manifest["stages"]  # later stages were cleared
    assert main(["features", "--bundle", str(copy)]) == 0
    bundle = load_bundle(copy)
    assert bundle.read_arrays("features/val.npz")["mutant_labels"].shape[0] == 3


def test_errors_are_reported_not_raised(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--bundle", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_serve_refuses_a_bad_bundle_before_binding(tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["schema_version"] = 42
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["serve", "--bundle", str(copy), "--port", "1"]) == 2
    assert "bad bundle" in capsys.readouterr().err
