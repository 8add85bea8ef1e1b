"""The app's lifecycle: loading through the lifespan, refusing a bad bundle, and shutdown ordering
(readiness goes first, then every queued image is still answered)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from models.bundle import MANIFEST_NAME, Bundle
from models.errors import BundleError, ConfigError
from models.gate import Gate
from service.errors import ShuttingDown
from service.main import app_from_env, create_app
from service.settings import get_settings
from service.state import ServiceState, load_service
from tests.service.conftest import make_settings


def test_shutdown_clears_readiness_then_drains(
    tiny_bundle: Path, gate: Gate, bundle: Bundle, sample_images: np.ndarray
) -> None:
    settings = make_settings(tiny_bundle, max_batch_size=4, max_queue_delay_ms=100, warmup=False)
    x = bundle.normalisation.apply(sample_images[:10])
    expected = gate.run(x)
    key = gate.plan()

    async def main() -> None:
        state = ServiceState(settings, load_service(settings))
        await state.start()
        assert state.ready
        futures = state.batcher.submit(x, key)  # type: ignore[union-attr]
        stopping = asyncio.create_task(state.stop())
        await asyncio.sleep(0)
        assert state.ready is False  # no longer ready while the queue drains
        with pytest.raises(ShuttingDown):
            state.batcher.submit(x[:1], key)  # type: ignore[union-attr]
        await stopping
        rows = [f.result() for f in futures]  # every queued image was answered
        np.testing.assert_allclose(
            [r.output.unified_score[r.index] for r in rows], expected.unified_score, atol=1e-5
        )
        assert [bool(r.output.reject[r.index]) for r in rows] == list(expected.reject)

    asyncio.run(main())


def test_bad_bundle_fails_startup(tiny_bundle: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle, broken)
    weights = broken / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"tampered")
    app = create_app(make_settings(broken))
    with (
        pytest.raises(BundleError, match="weights.safetensors does not match its manifest hash"),
        TestClient(app),
    ):
        pass
    assert app.state.predgate.ready is False


def test_unknown_settings_fail_at_load(tiny_bundle: Path) -> None:
    with pytest.raises(ConfigError, match="signal_set 'nope' is not in the bundle"):
        load_service(make_settings(tiny_bundle, signal_set="nope"))
    with pytest.raises(ConfigError, match="unknown operating point 'nope'"):
        load_service(make_settings(tiny_bundle, operating_point="nope"))


def test_app_from_env(monkeypatch: pytest.MonkeyPatch, tiny_bundle: Path, tmp_path: Path) -> None:
    manifest = json.loads((tiny_bundle / MANIFEST_NAME).read_text())
    monkeypatch.setenv("PREDGATE_BUNDLE", str(tiny_bundle))
    monkeypatch.setenv("PREDGATE_SIGNAL_SET", "msp")
    monkeypatch.setenv("PREDGATE_WARMUP", "0")
    get_settings.cache_clear()
    try:
        with TestClient(app_from_env()) as client:
            ready = client.get("/readyz").json()
            assert ready["bundle_id"] == manifest["bundle_id"]
            assert client.get("/v1/bundle").json()["serving"]["signal_set"] == "msp"
    finally:
        get_settings.cache_clear()
