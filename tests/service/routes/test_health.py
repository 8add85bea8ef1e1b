"""Liveness and readiness: 503 before the lifespan has loaded and warmed up, 200 after."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from service.main import create_app
from tests.service.conftest import make_settings


def test_readiness_before_and_after_load(tiny_bundle: Path) -> None:
    app = create_app(make_settings(tiny_bundle))
    state = app.state.predgate
    cold = TestClient(app)  # without "with": the lifespan has not run, nothing is loaded
    assert cold.get("/healthz").json() == {"status": "alive"}
    ready = cold.get("/readyz")
    assert ready.status_code == 503 and ready.json()["ready"] is False and state.loaded is None
    refused = cold.post("/predict", json={"tensor": [[[0.0] * 28] * 28]})
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "not_ready"
    assert refused.headers["retry-after"] == "5"
    with TestClient(app) as warm:
        body = warm.get("/readyz")
        assert body.status_code == 200
        assert body.json() == {
            "ready": True,
            "bundle_id": state.loaded.bundle.manifest["bundle_id"],
            "detail": "bundle loaded and warmed up",
        }
        assert warm.get("/healthz").status_code == 200
    assert state.ready is False  # the lifespan's shutdown cleared it
