"""Bundle round trip and refusal of bundles that cannot be trusted (each names the file)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.architectures import build_model
from models.bundle import MANIFEST_NAME, WEIGHTS_NAME, Bundle, load_bundle
from models.errors import BundleError
from models.preprocess import Normalisation


def _make_bundle(path: Path) -> tuple[Bundle, torch.nn.Module]:
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 1).eval()
    bundle = Bundle.create(
        path,
        dataset={"name": "synthetic", "source": {"name": "synthetic"}},
        class_names=[f"c{i}" for i in range(10)],
        input_shape=(1, 28, 28),
        normalisation=Normalisation((0.5,), (0.25,)),
        architecture={"name": "resnet20", "num_classes": 10, "in_channels": 1},
    )
    bundle.save_model(model)
    bundle.write_arrays("features/val.npz", {"lcr": np.arange(5, dtype=np.float32)})
    bundle.write_json("mutants.json", {"specs": [1, 2, 3]})
    bundle.set("detectors", {"kind": "nn"})
    bundle.save()
    return bundle, model


def test_round_trip(tmp_path: Path) -> None:
    _, model = _make_bundle(tmp_path / "b")
    loaded = load_bundle(tmp_path / "b")
    assert loaded.manifest["detectors"] == {"kind": "nn"}
    assert loaded.class_names[3] == "c3"
    assert loaded.input_shape == (1, 28, 28)
    assert loaded.normalisation == Normalisation((0.5,), (0.25,))
    np.testing.assert_array_equal(loaded.read_arrays("features/val.npz")["lcr"], np.arange(5))
    assert loaded.read_json("mutants.json") == {"specs": [1, 2, 3]}
    reloaded = loaded.load_model()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))
    assert not reloaded.training


def test_tampered_file_is_refused_and_named(tmp_path: Path) -> None:
    _make_bundle(tmp_path / "b")
    target = tmp_path / "b" / "mutants.json"
    target.write_text(target.read_text().replace("3", "4"))
    with pytest.raises(BundleError, match="mutants.json"):
        load_bundle(tmp_path / "b")


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    _make_bundle(tmp_path / "b")
    target = tmp_path / "b" / WEIGHTS_NAME
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=WEIGHTS_NAME):
        load_bundle(tmp_path / "b")


def test_missing_file_is_refused_and_named(tmp_path: Path) -> None:
    _make_bundle(tmp_path / "b")
    (tmp_path / "b" / "features" / "val.npz").unlink()
    with pytest.raises(BundleError, match="features/val.npz"):
        load_bundle(tmp_path / "b")


def test_unknown_schema_is_refused(tmp_path: Path) -> None:
    _make_bundle(tmp_path / "b")
    path = tmp_path / "b" / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["schema_version"] = 99
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="schema_version 99"):
        load_bundle(tmp_path / "b")


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="manifest.json is missing"):
        load_bundle(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(tmp_path / "bad")


def test_missing_required_key(tmp_path: Path) -> None:
    _make_bundle(tmp_path / "b")
    path = tmp_path / "b" / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    del manifest["normalisation"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="normalisation"):
        load_bundle(tmp_path / "b")


def test_create_refuses_to_overwrite(tmp_path: Path) -> None:
    _make_bundle(tmp_path / "b")
    with pytest.raises(BundleError, match="already holds a bundle"):
        _make_bundle(tmp_path / "b")


def test_weights_of_another_architecture_refused(tmp_path: Path) -> None:
    bundle, _ = _make_bundle(tmp_path / "b")
    bundle.manifest["architecture"]["num_classes"] = 7
    with pytest.raises(BundleError, match="does not fit"):
        bundle.load_model()


def test_copy_gets_its_own_id_and_refuses_a_changed_source(tmp_path: Path) -> None:
    source, _ = _make_bundle(tmp_path / "src")
    copy = source.copy_to(tmp_path / "variant")
    assert copy.manifest["bundle_id"].startswith("variant-") and copy.manifest["bundle_id"] != source.manifest["bundle_id"]
    assert copy.manifest["derived_from"] == source.manifest["bundle_id"]
    reloaded = load_bundle(tmp_path / "variant")
    assert reloaded.manifest["files"] == source.manifest["files"]
    with pytest.raises(BundleError, match="already exists"):
        source.copy_to(tmp_path / "variant")
    name = "mutants.json"
    (tmp_path / "src" / name).write_text('{"specs": [9]}')
    with pytest.raises(BundleError, match=name):
        source.copy_to(tmp_path / "second")
    assert not (tmp_path / "second").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert json.loads((tmp_path / "variant" / "manifest.json").read_text())["derived_from"]
