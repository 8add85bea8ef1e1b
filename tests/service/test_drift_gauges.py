"""Drift gauges: after enough answered images, /metrics carries the KS statistic and p-value of the
window against the bundle's val scores and the window's unknown share, equal to scipy's KS test and
to the gate's own verdicts on the same images."""

from __future__ import annotations

import base64
from collections.abc import Callable

import numpy as np
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from scipy.stats import ks_2samp

from models.bundle import Bundle
from models.drift import reference_scores
from models.gate import Gate
from tests.service.conftest import png_bytes


def gauge(name: str, signal_set: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"signal_set": signal_set})


def test_gauges_follow_the_answered_images(
    app_client: Callable[..., TestClient], gate: Gate, bundle: Bundle, sample_images: np.ndarray
) -> None:
    images = sample_images[:30]
    out = gate.run(bundle.normalisation.apply(images), signal_set="softmax")
    reference = reference_scores(bundle, ["softmax"])["softmax"]
    expected = ks_2samp(out.unified_score, reference, method="asymp")
    body = {"images": [base64.b64encode(png_bytes(i)).decode() for i in images]}
    with app_client(drift_window=30, drift_min_window=20) as client:
        first = client.post("/predict/batch?signal_set=softmax", json={"images": body["images"][:10]})
        assert first.status_code == 200
        state = client.app.state.predgate.loaded.drift
        state.refresh("softmax")
        # 10 images < min_window: no statistic yet (a KS test of a handful of scores says nothing);
        # no other test fills a drift window to its minimum, so the gauge has never been set
        assert gauge("predgate_drift_ks_statistic", "softmax") is None
        assert len(state.monitor("softmax")._scores) == 10
        rest = client.post("/predict/batch?signal_set=softmax", json={"images": body["images"][10:]})
        assert rest.status_code == 200
        state.refresh("softmax")  # the gauges refresh at most once a second; force it for the test
    assert gauge("predgate_drift_window_images", "softmax") == 30
    assert abs(gauge("predgate_drift_ks_statistic", "softmax") - expected.statistic) < 1e-6
    assert abs(gauge("predgate_drift_ks_pvalue", "softmax") - expected.pvalue) < 1e-6
    assert gauge("predgate_window_unknown_share", "softmax") == float(np.mean(out.reject))


def test_reference_is_the_stored_val_scores(bundle: Bundle) -> None:
    stored = bundle.read_arrays("detectors/scores.npz")
    references = reference_scores(bundle, ["msp", "cond+lcr", "no-such-set"])
    assert set(references) == {"msp", "cond+lcr"}
    assert np.array_equal(references["msp"], stored["0/msp/val"])
