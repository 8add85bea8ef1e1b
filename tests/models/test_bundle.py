"""Bundle round trip and refusal of bundles that cannot be trusted (each names the file)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from models.architectures import build_model
from models.bundle import (
    FEATURE_SPLITS,
    MANIFEST_NAME,
    WEIGHTS_NAME,
    Bundle,
    DetectorsSection,
    features_file,
    load_bundle,
    load_features,
    signal_set_stem,
)
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
    assert (
        copy.manifest["bundle_id"].startswith("variant-")
        and copy.manifest["bundle_id"] != source.manifest["bundle_id"]
    )
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


def test_detectors_section_reads_with_its_defaults_and_writes_back_what_it_read_with_them() -> None:
    raw = {
        "conductance": {"stem": "detectors/conductance", "best_val_auroc": 0.9, "trained_on": "fit"},
        "signal_sets": {
            "cond+lcr": {
                "signals": ["cond", "lcr"],
                "stem": "detectors/set-cond+lcr",
                "kind": "nn",
                "val_auroc": 0.93,
                "operating_points": {"equal-recall": {"threshold": 0.5}},
                "default_point": "equal-recall",
                "val_auroc_by_kind": {"nn": 0.93},
                "skipped_points": {},
            },
            "msp": {"signals": ["msp"], "stem": "detectors/set-msp", "operating_points": {}},
        },
        "default_set": "cond+lcr",
        "seeds": [0, 1],
        "seconds": 3.5,
    }
    section = DetectorsSection.from_dict(raw)
    assert section.conductance.inputs == "conductance"  # bundles made before the option: the paper's
    assert section.signal_sets["cond+lcr"].signals == ("cond", "lcr")
    assert section.signal_sets["cond+lcr"].details == {
        "val_auroc_by_kind": {"nn": 0.93},
        "skipped_points": {},
    }
    assert (
        section.signal_sets["msp"].default_point == "equal-recall" and section.signal_sets["msp"].kind is None
    )
    assert section.signal_set(None).name == "cond+lcr" and section.seeds == (0, 1)
    # written back as read, with the defaults spelt out
    assert section.to_dict() == {
        **raw,
        "conductance": {**raw["conductance"], "inputs": "conductance"},
        "signal_sets": {
            **raw["signal_sets"],
            "msp": {**raw["signal_sets"]["msp"], "default_point": "equal-recall"},
        },
    }
    with pytest.raises(BundleError, match="detectors section"):
        DetectorsSection.from_dict({"signal_sets": {}})
    with pytest.raises(BundleError, match="no signal set 'nope'"):
        section.signal_set("nope")


def test_bundle_file_names_and_stored_tables(tmp_path: Path) -> None:
    bundle = Bundle.create(
        tmp_path / "b",
        dataset={"name": "x"},
        class_names=["a", "b"],
        input_shape=(1, 4, 4),
        normalisation=Normalisation((0.5,), (0.25,)),
        architecture={"name": "resnet20", "num_classes": 2, "in_channels": 1},
    )
    assert bundle.detectors is None
    columns = {"label": np.array([0, 1]), "prediction": np.array([0, 0])}
    for split in FEATURE_SPLITS:
        bundle.write_features(split, columns)
    assert features_file("val") in bundle.manifest["files"]
    loaded = load_features(bundle)
    assert list(loaded) == list(FEATURE_SPLITS)
    np.testing.assert_array_equal(loaded["test"]["prediction"], columns["prediction"])
    bundle.write_detector_state(signal_set_stem("msp"), {"kind": "x"}, {"w": np.ones(2)})
    config, arrays = bundle.read_detector_state(signal_set_stem("msp"))
    assert config == {"kind": "x"} and arrays["w"].tolist() == [1.0, 1.0]


def test_bundle_files_are_readable_by_other_users_under_a_usual_umask(tmp_path: Path) -> None:
    """A container's service user reads a mounted bundle: its files must not keep mkstemp's 0600."""
    old = os.umask(0o022)
    try:
        _make_bundle(tmp_path / "b")
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "b").rglob("*") if p.is_file()]
    assert files and {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}
