"""The predgate command line on a finished bundle: stage subcommands and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cli.main import main
from models.bundle import load_bundle


def test_mutants_and_features_subcommands_redo_their_stage(
    tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
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


def test_serve_refuses_a_bad_bundle_before_binding(
    tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["schema_version"] = 42
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["serve", "--bundle", str(copy), "--port", "1"]) == 2
    assert "bad bundle" in capsys.readouterr().err


def test_mutants_confined_to_a_later_stage_share_the_prefix(tiny_bundle: Path, tmp_path: Path) -> None:
    import numpy as np
    import torch

    from models.data import load_splits
    from models.gate import load_extractor
    from models.lcr import predict_naive
    from models.prefix_ensemble import PrefixSharingEnsemble, convs_in

    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    assert main(["mutants", "--bundle", str(copy), "-n", "3", "--modules", "layer3", "--redo"]) == 0
    assert main(["features", "--bundle", str(copy)]) == 0
    bundle = load_bundle(copy)
    assert bundle.manifest["mutants"]["modules"] == ["layer3"]
    extractor = load_extractor(bundle)
    assert isinstance(extractor.ensemble, PrefixSharingEnsemble)
    allowed = {name for name, _ in convs_in(extractor.model, ["layer3"])}
    specs = extractor.ensemble.specs
    assert all(conv in allowed for spec in specs for conv, _ in spec.filters)
    x = bundle.normalisation.apply(load_splits(bundle)["val"].images[:16])
    naive = predict_naive(extractor.model, specs, x)
    assert torch.equal(extractor.ensemble.predict(x), naive)
    stored = bundle.read_arrays("features/val.npz")
    np.testing.assert_array_equal(stored["mutant_labels"][:, :16], naive.numpy())


def test_train_imports_another_bundles_weights(
    tiny_bundle: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    """Bring-your-own weights: the paper's fit-on-cnn-train setting reuses the held-out build's CNN."""
    source = load_bundle(tiny_bundle)
    out = tmp_path / "paper-setting"
    args = [
        "train",
        "--dataset",
        "fashion-mnist",
        "--data-root",
        str(tiny_data_dir),
        "--cnn-train",
        "500",
        "--fit",
        "250",
        "--val",
        "200",
        "--test",
        "200",
        "--fit-from-cnn-train",
        "--weights",
        str(tiny_bundle / "weights.safetensors"),
        "--out",
        str(out),
    ]
    assert main(args) == 0
    bundle = load_bundle(out)
    assert bundle.manifest["splits"]["fit_is_cnn_train"] is True
    assert bundle.manifest["training"]["imported_weights"] == "weights.safetensors"
    # Same seed, same cnn-train, same weights: the same accuracies as the source bundle.
    for split in ("cnn-train", "test"):
        assert (
            bundle.manifest["training"][f"{split}_accuracy"]
            == source.manifest["training"][f"{split}_accuracy"]
        )


def test_train_twice_with_one_seed_gives_one_cnn(tiny_data_dir: Path, tmp_path: Path) -> None:
    """Same seed, same data: the same weights, bit for bit (the initial weights are seeded too)."""
    digests = []
    for name in ("a", "b"):
        args = [
            "train",
            "--dataset",
            "fashion-mnist",
            "--data-root",
            str(tiny_data_dir),
            "--cnn-train",
            "200",
            "--fit",
            "50",
            "--val",
            "50",
            "--test",
            "50",
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / name),
        ]
        assert main(args) == 0
        digests.append(load_bundle(tmp_path / name).manifest["files"]["weights.safetensors"]["sha256"])
    assert digests[0] == digests[1]
