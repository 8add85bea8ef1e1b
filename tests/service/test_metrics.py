"""Prometheus metrics: exposition at /metrics, labels (signal set, class, verdict, stage), counts equal
to what Gate.run says about the same inputs, and batching seen through the batch-size histogram."""

from __future__ import annotations

import base64
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from models.bundle import Bundle
from models.gate import Gate
from tests.service.conftest import png_bytes


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def predictions(verdict: str, signal_set: str) -> float:
    """Sum of predgate_predictions_total over classes for one verdict and signal set."""
    total = 0.0
    for metric in REGISTRY.collect():
        if metric.name != "predgate_predictions":
            continue
        for s in metric.samples:
            if (
                s.name.endswith("_total")
                and s.labels["verdict"] == verdict
                and s.labels["signal_set"] == signal_set
            ):
                total += s.value
    return total


def test_prediction_counts_match_the_gate(
    client: TestClient, gate: Gate, bundle: Bundle, sample_images: np.ndarray
) -> None:
    images = sample_images[:12]
    out = gate.run(bundle.normalisation.apply(images), signal_set="msp")
    expected_unknown = int(out.reject.sum())
    before = {v: predictions(v, "msp") for v in ("accept", "unknown")}
    requests_before = sample("predgate_requests_total", route="/predict/batch", status="200")
    response = client.post(
        "/predict/batch?signal_set=msp",
        json={"images": [base64.b64encode(png_bytes(i)).decode() for i in images]},
    )
    assert response.status_code == 200
    assert predictions("unknown", "msp") - before["unknown"] == expected_unknown
    assert predictions("accept", "msp") - before["accept"] == len(images) - expected_unknown
    assert sample("predgate_requests_total", route="/predict/batch", status="200") - requests_before == 1
    first_class = bundle.class_names[int(out.prediction[0])]
    verdict = "unknown" if out.reject[0] else "accept"
    assert (
        sample("predgate_predictions_total", verdict=verdict, class_name=first_class, signal_set="msp") >= 1
    )


def test_exposition_names_and_labels(client: TestClient, gate: Gate, sample_images: np.ndarray) -> None:
    client.post(
        "/predict?full_evidence=true", files={"file": ("x.png", png_bytes(sample_images[0]), "image/png")}
    )
    client.post("/predict", json={"image": "%%%"})  # a 422, counted by route and status
    text = client.get("/metrics").text
    chosen = gate.default_set
    for needle in (
        'predgate_requests_total{route="/predict",status="200"}',
        'predgate_requests_total{route="/predict",status="422"}',
        f'signal_set="{chosen}"',
        'predgate_stage_seconds_bucket{le="0.001",stage="queue"}',
        'stage="total"',
        'stage="detectors"',
        'stage="lcr"',
        "predgate_batch_size_bucket",
        "predgate_queue_depth",
        f'predgate_lcr_ratio_count{{signal_set="{chosen}"}}',
        f'predgate_unified_score_count{{signal_set="{chosen}"}}',
        "predgate_ready 1.0",
        f'predgate_bundle_info{{backend="torch",bundle_id="{client.get("/readyz").json()["bundle_id"]}"',
    ):
        assert needle in text, needle


def test_concurrent_requests_are_batched_and_answered_correctly(
    app_client: Callable[..., TestClient], gate: Gate, bundle: Bundle, sample_images: np.ndarray
) -> None:
    """Many simultaneous single-image requests: some share a gate run (batch > 1, seen both in the
    response and in the batch-size histogram), and each answer equals Gate.run on that image alone."""
    images = sample_images[:24]
    count_before = sample("predgate_batch_size_count")
    singles_before = sample("predgate_batch_size_bucket", le="1.0")
    with app_client(max_batch_size=16, max_queue_delay_ms=200, warmup=False) as client:

        def ask(i: int) -> dict:
            response = client.post(
                "/predict", files={"file": (f"{i}.png", png_bytes(images[i]), "image/png")}
            )
            assert response.status_code == 200, response.text
            return response.json()

        with ThreadPoolExecutor(max_workers=12) as pool:
            records = list(pool.map(ask, range(len(images))))
    batches = sample("predgate_batch_size_count") - count_before
    multi = batches - (sample("predgate_batch_size_bucket", le="1.0") - singles_before)
    assert multi >= 1 and batches < len(images)
    assert max(r["batch_size"] for r in records) > 1
    for i, record in enumerate(records):
        out = gate.run(bundle.normalisation.apply(images[i : i + 1]))
        assert record["label"] == int(out.prediction[0])
        assert record["unified_score"] == pytest.approx(float(out.unified_score[0]), abs=1e-5)
        assert record["lcr"] == pytest.approx(float(out.lcr[0]), abs=1e-5)
        assert record["conductance_score"] == pytest.approx(float(out.cond_score[0]), abs=1e-5)
        assert record["verdict"] == ("unknown" if out.reject[0] else "accept")
