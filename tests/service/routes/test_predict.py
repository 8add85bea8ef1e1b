"""POST /predict and /predict/batch: every input form, the response record, signal sets, auth.

Expected numbers come from Gate.run on the same normalised inputs."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from models.bundle import Bundle
from models.gate import Gate, GateOutput
from tests.service.conftest import png_bytes

TOL = 1e-5


def expected(gate: Gate, bundle: Bundle, images: np.ndarray, **kwargs: Any) -> GateOutput:
    return gate.run(bundle.normalisation.apply(images), **kwargs)


def b64(image: np.ndarray) -> str:
    return base64.b64encode(png_bytes(image)).decode()


def check_record(record: dict[str, Any], out: GateOutput, i: int, bundle: Bundle) -> None:
    assert record["label"] == int(out.prediction[i])
    assert record["class_name"] == bundle.class_names[record["label"]]
    np.testing.assert_allclose(record["probabilities"], out.probabilities[i], atol=TOL)
    assert record["unified_score"] == pytest.approx(float(out.unified_score[i]), abs=TOL)
    assert record["verdict"] == ("unknown" if out.reject[i] else "accept")
    assert record["signal_set"] == out.signal_set
    assert record["operating_point"] == {
        "name": out.operating_point.name,
        "threshold": out.operating_point.threshold,
    }
    assert record["bundle_id"] == bundle.manifest["bundle_id"]
    for field, values in (("conductance_score", out.cond_score), ("lcr", out.lcr)):
        if values is None:
            assert record[field] is None
        else:
            assert record[field] == pytest.approx(float(values[i]), abs=TOL)


def test_multipart_upload(client: TestClient, gate: Gate, bundle: Bundle, sample_images: np.ndarray) -> None:
    response = client.post("/predict", files={"file": ("x.png", png_bytes(sample_images[0]), "image/png")})
    assert response.status_code == 200, response.text
    record = response.json()
    out = expected(gate, bundle, sample_images[:1])
    check_record(record, out, 0, bundle)
    assert out.signal_set == gate.default_set and record["conductance"] is None
    top = record["top_k"]
    assert len(top) == 3 and [t["label"] for t in top] == list(np.argsort(-out.probabilities[0])[:3])
    assert top[0]["probability"] >= top[1]["probability"] >= top[2]["probability"]
    stages = set(record["timings_ms"])
    assert {"queue", "detectors", "total"} <= stages and stages - {"queue", "detectors", "total"} == set(
        out.seconds
    ) - {"detectors"}
    assert record["timings_ms"]["total"] >= record["timings_ms"]["queue"]


def test_base64_json_raw_body_and_tensor_agree(
    client: TestClient, gate: Gate, bundle: Bundle, sample_images: np.ndarray
) -> None:
    image = sample_images[1:2]
    out = expected(gate, bundle, image)
    by_json = client.post("/predict", json={"image": b64(image[0]), "top_k": 5}).json()
    by_raw = client.post(
        "/predict?top_k=5", content=png_bytes(image[0]), headers={"content-type": "image/png"}
    ).json()
    tensor = bundle.normalisation.apply(image)[0].tolist()
    by_tensor = client.post("/predict", json={"tensor": tensor, "top_k": 5}).json()
    for record in (by_json, by_raw, by_tensor):
        check_record(record, out, 0, bundle)
        assert len(record["top_k"]) == 5


def test_signal_set_override_and_full_evidence(
    client: TestClient, gate: Gate, bundle: Bundle, sample_images: np.ndarray
) -> None:
    image = sample_images[2:3]
    cheap = client.post(
        "/predict?signal_set=msp", files={"file": ("x.png", png_bytes(image[0]), "image/png")}
    ).json()
    out = expected(gate, bundle, image, signal_set="msp")
    check_record(cheap, out, 0, bundle)
    assert cheap["signal_set"] == "msp" and cheap["lcr"] is None and cheap["conductance_score"] is None
    assert "lcr" not in cheap["timings_ms"]

    full = client.post(
        "/predict", json={"image": b64(image[0]), "signal_set": "msp", "full_evidence": True}
    ).json()
    out_full = expected(gate, bundle, image, signal_set="msp", full_evidence=True)
    check_record(full, out_full, 0, bundle)
    assert (
        full["signal_set"] == "msp"
        and full["lcr"] is not None
        and full["unified_score"] == cheap["unified_score"]
    )
    assert out_full.conductance is not None
    np.testing.assert_allclose(full["conductance"], out_full.conductance[0], atol=TOL)

    vector = client.post(
        "/predict?return_conductance=true", files={"file": ("x.png", png_bytes(image[0]), "image/png")}
    ).json()
    assert vector["signal_set"] == gate.default_set
    np.testing.assert_allclose(vector["conductance"], out_full.conductance[0], atol=TOL)


def test_operating_point_override(
    client: TestClient, gate: Gate, bundle: Bundle, sample_images: np.ndarray
) -> None:
    chosen = gate.signal_set(None)
    for name, point in chosen.operating_points.items():
        record = client.post(
            "/predict", json={"image": b64(sample_images[3]), "operating_point": name}
        ).json()
        out = expected(gate, bundle, sample_images[3:4], operating_point=name)
        check_record(record, out, 0, bundle)
        assert record["operating_point"]["threshold"] == point.threshold


def test_batch_json_multipart_and_tensors_in_order(
    client: TestClient, gate: Gate, bundle: Bundle, sample_images: np.ndarray
) -> None:
    images = sample_images[:6]
    out = expected(gate, bundle, images)
    by_json = client.post("/predict/batch", json={"images": [b64(i) for i in images]})
    files = [("files", (f"{i}.png", png_bytes(image), "image/png")) for i, image in enumerate(images)]
    by_form = client.post("/predict/batch", files=files)
    tensors = bundle.normalisation.apply(images).tolist()
    by_tensor = client.post("/predict/batch", json={"tensors": tensors, "signal_set": "msp"})
    out_msp = expected(gate, bundle, images, signal_set="msp")
    for response, reference in ((by_json, out), (by_form, out), (by_tensor, out_msp)):
        assert response.status_code == 200, response.text
        records = response.json()
        assert len(records) == len(images)
        for i, record in enumerate(records):
            check_record(record, reference, i, bundle)


def test_server_signal_set_setting(
    app_client: Callable[..., TestClient], gate: Gate, bundle: Bundle, sample_images: np.ndarray
) -> None:
    with app_client(signal_set="msp", operating_point="correct-recall=0.98", warmup=False) as client:
        record = client.post("/predict", json={"image": b64(sample_images[4])}).json()
        out = expected(
            gate, bundle, sample_images[4:5], signal_set="msp", operating_point="correct-recall=0.98"
        )
        check_record(record, out, 0, bundle)
        assert record["signal_set"] == "msp" and record["lcr"] is None
        assert client.get("/v1/bundle").json()["serving"]["signal_set"] == "msp"
        # a request may still ask for another set
        other = client.post("/predict?signal_set=cond%2Blcr", json={"image": b64(sample_images[4])}).json()
        assert other["signal_set"] == "cond+lcr" and other["lcr"] is not None


@pytest.fixture(scope="module")
def secured(app_client: Callable[..., TestClient]) -> Iterator[TestClient]:
    with app_client(api_key="let-me-in", warmup=False) as client:
        yield client


def test_auth(secured: TestClient, sample_images: np.ndarray) -> None:
    body = {"image": b64(sample_images[0])}
    missing = secured.post("/predict", json=body)
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "unauthorized"
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = secured.post("/predict", json=body, headers={"Authorization": "Bearer let-me-out"})
    assert wrong.status_code == 401 and "invalid" in wrong.json()["error"]["message"]
    basic = secured.post(
        "/predict/batch", json={"images": [body["image"]]}, headers={"Authorization": "Basic eDp5"}
    )
    assert basic.status_code == 401
    right = secured.post("/predict", json=body, headers={"Authorization": "Bearer let-me-in"})
    assert right.status_code == 200
    batch = secured.post(
        "/predict/batch", json={"images": [body["image"]]}, headers={"Authorization": "Bearer let-me-in"}
    )
    assert batch.status_code == 200
    for path in ("/healthz", "/readyz", "/metrics"):  # probes and scrapes stay open
        assert secured.get(path).status_code == 200
    assert secured.get("/v1/bundle").status_code == 200


def test_openapi_documents_both_body_forms(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data", "image/png", "image/jpeg"} <= set(body)
    assert "image" in body["application/json"]["schema"]["properties"]
    assert (
        "files"
        in spec["paths"]["/predict/batch"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"][
            "properties"
        ]
    )
    assert "Prediction" in spec["components"]["schemas"]
    assert json.dumps(spec)  # serialisable
