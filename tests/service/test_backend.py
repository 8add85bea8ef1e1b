"""``PREDGATE_BACKEND=onnx`` serves the same answers as the torch backend."""

from __future__ import annotations

import base64
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.main import create_app
from service.settings import Settings
from tests.service.conftest import png_bytes

TOL = 1e-4


def _answers(client: TestClient, images: np.ndarray) -> list[dict[str, Any]]:
    records = []
    for image in images:
        response = client.post(
            "/predict?full_evidence=true", json={"image": base64.b64encode(png_bytes(image)).decode()}
        )
        assert response.status_code == 200, response.text
        records.append(response.json())
    return records


def test_backend_setting_is_validated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREDGATE_BUNDLE", str(tmp_path))
    assert Settings().backend == "torch"  # type: ignore[call-arg]
    monkeypatch.setenv("PREDGATE_BACKEND", "onnx")
    assert Settings().backend == "onnx"  # type: ignore[call-arg]
    monkeypatch.setenv("PREDGATE_BACKEND", "tensorrt")
    with pytest.raises(ValidationError, match="backend"):
        Settings()  # type: ignore[call-arg]


@pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None, reason="torch.onnx.export needs the 'onnx' package"
)
def test_onnx_backend_answers_like_torch(
    tiny_bundle: Path,
    app_client: Callable[..., TestClient],
    sample_images: np.ndarray,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    images = sample_images[:6]
    with app_client() as torch_client:
        expected = _answers(torch_client, images)
    monkeypatch.setenv("PREDGATE_BUNDLE", str(tiny_bundle))
    monkeypatch.setenv("PREDGATE_BACKEND", "onnx")
    monkeypatch.setenv("PREDGATE_DEVICE", "cpu")
    with TestClient(create_app(Settings())) as onnx_client:  # type: ignore[call-arg]
        assert onnx_client.get("/readyz").status_code == 200
        got = _answers(onnx_client, images)
        metrics = onnx_client.get("/metrics").text
    assert 'backend="onnx"' in metrics
    for ours, ref in zip(got, expected, strict=True):
        for key in ("label", "signal_set", "bundle_id", "lcr"):
            assert ours[key] == ref[key], key
        # ORT rounds differently (~1e-6): a verdict may differ only for a score at the threshold
        if abs(ref["unified_score"] - ref["operating_point"]["threshold"]) > TOL:
            assert ours["verdict"] == ref["verdict"]
        for key in ("unified_score", "conductance_score"):
            assert ours[key] == pytest.approx(ref[key], abs=TOL)
        np.testing.assert_allclose(ours["probabilities"], ref["probabilities"], atol=TOL, rtol=0)
        np.testing.assert_allclose(ours["conductance"], ref["conductance"], atol=TOL, rtol=0)
