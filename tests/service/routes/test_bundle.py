"""GET /v1/bundle: manifest summary, every signal set with its operating points, evidence table."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from fastapi.testclient import TestClient

from models.bundle import MANIFEST_NAME, Bundle
from models.gate import Gate
from service.main import create_app
from tests.service.conftest import make_settings


def test_bundle_summary(client: TestClient, bundle: Bundle, gate: Gate) -> None:
    response = client.get("/v1/bundle")
    assert response.status_code == 200
    body = response.json()
    manifest = bundle.manifest
    assert body["bundle_id"] == manifest["bundle_id"]
    assert body["class_names"] == bundle.class_names and body["input_shape"] == list(bundle.input_shape)
    assert body["default_set"] == manifest["detectors"]["default_set"]
    assert body["serving"]["signal_set"] == gate.default_set
    assert body["serving"]["operating_point"] == gate.signal_set(None).default_point
    assert body["mutants"]["count"] == manifest["mutants"]["count"] and "weight_hashes" not in body["mutants"]
    assert body["conductance"]["layer"] == manifest["conductance"]["layer"]
    assert body["conductance"]["detector_inputs"] == "conductance"
    sets = {s["name"]: s for s in body["signal_sets"]}
    assert set(sets) == set(gate.signal_sets)
    for name, summary in sets.items():
        stored = gate.signal_sets[name]
        assert summary["signals"] == list(stored.signals)
        assert summary["default_point"] == stored.default_point
        assert summary["is_default"] == (name == manifest["detectors"]["default_set"])
        assert set(summary["operating_points"]) == set(stored.operating_points)
        for point_name, point in stored.operating_points.items():
            figures = summary["operating_points"][point_name]
            assert figures["threshold"] == point.threshold
            if math.isnan(point.risk):
                assert figures["risk"] is None  # JSON has no NaN
            else:
                assert figures["risk"] == point.risk
        recorded = manifest["detectors"]["signal_sets"][name].get("val_auroc")
        assert summary["details"].get("val_auroc") == recorded
    evidence = manifest["detectors"].get("evidence_value")
    assert body["evidence_value"] == (evidence if isinstance(evidence, list) else None)


def test_evidence_value_table_is_shown(tiny_bundle: Path, tmp_path: Path) -> None:
    """A copy of the bundle whose manifest carries an evidence table (the report stage writes one)."""
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    rows = [
        {
            "signal_set": "msp",
            "val_auroc": 0.9,
            "test_auroc": 0.89,
            "diff_to_msp": 0.0,
            "cost_forward_equiv": 1.0,
        },
        {
            "signal_set": "cond+lcr",
            "val_auroc": 0.91,
            "test_auroc": float("nan"),
            "diff_to_msp": 0.01,
            "diff_ci": [-0.01, 0.03],
            "cost_forward_equiv": 101.0,
        },
    ]
    manifest["detectors"]["evidence_value"] = rows
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    with TestClient(create_app(make_settings(copy, warmup=False))) as client:
        shown = client.get("/v1/bundle").json()["evidence_value"]
    assert shown[0] == rows[0]
    assert shown[1]["test_auroc"] is None and shown[1]["diff_ci"] == [-0.01, 0.03]
