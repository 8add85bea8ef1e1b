"""Offline/online parity: images sent to POST /predict give the conductance, LCR and scores that the
offline feature code (offline.features.extract_features: EvidenceExtractor on
bundle.normalisation.apply(images)) computes."""

from __future__ import annotations

import base64

import numpy as np
from fastapi.testclient import TestClient

from models.bundle import Bundle
from models.data import ImageArrays
from models.gate import Gate, load_extractor
from models.signals import signal_matrix
from offline.features import extract_features
from tests.service.conftest import png_bytes

TOL = 1e-5


def test_online_equals_offline(
    client: TestClient, bundle: Bundle, gate: Gate, sample_images: np.ndarray
) -> None:
    images = sample_images[:16]
    extractor = load_extractor(bundle, "cpu")  # a fresh one, as the offline stages build it
    arrays = ImageArrays(images, np.zeros(len(images), dtype=np.int64), bundle.class_names)
    features = extract_features(extractor, bundle.normalisation, arrays, batch_size=5, progress=False)
    cond = features["conductance"].astype(np.float64)
    cond_score = gate.cond_score(cond, features["prediction"])
    lcr = features["lcr"]
    logits = features["logits"]

    response = client.post(
        "/predict/batch?full_evidence=true",
        json={"images": [base64.b64encode(png_bytes(image)).decode() for image in images]},
    )
    assert response.status_code == 200
    records = response.json()
    np.testing.assert_allclose([r["conductance"] for r in records], cond, atol=TOL, rtol=0)
    np.testing.assert_allclose([r["lcr"] for r in records], lcr, atol=TOL, rtol=0)
    np.testing.assert_allclose([r["conductance_score"] for r in records], cond_score, atol=TOL, rtol=0)
    assert [r["label"] for r in records] == features["prediction"].tolist()
    for name, chosen in gate.signal_sets.items():  # every set's unified score, from the same features
        offline = chosen.classifier.decision_function(signal_matrix(chosen.signals, logits, cond_score, lcr))
        online = client.post(
            f"/predict/batch?signal_set={name.replace('+', '%2B')}",
            json={"images": [base64.b64encode(png_bytes(image)).decode() for image in images]},
        ).json()
        np.testing.assert_allclose([r["unified_score"] for r in online], offline, atol=TOL, rtol=0)
        point = chosen.point(None)
        assert [r["verdict"] == "unknown" for r in online] == list(point.reject(offline))
