"""Bearer keys with rotation (several accepted at once) and the per-key rate limit (429 + Retry-After)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.auth import KeyRing, RateLimiter, configured_keys, retry_after_s
from service.settings import Settings
from tests.service.conftest import make_settings, png_bytes


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Content-Type": "image/png"}


def test_every_configured_key_counts_and_blanks_do_not(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PREDGATE_BUNDLE", str(tmp_path))
    monkeypatch.setenv("PREDGATE_API_KEY", "first")
    monkeypatch.setenv("PREDGATE_API_KEYS", " second, ,third,first ")
    settings = Settings()  # type: ignore[call-arg]
    assert configured_keys(settings) == ["first", "second", "third"]
    assert "second" not in repr(settings)  # secrets never show in logs
    ring = KeyRing(configured_keys(settings))
    assert ring.enabled and len(ring) == 3
    assert ring.match("second") is not None and ring.match("second") == ring.match("second")
    assert ring.match("first") != ring.match("third")
    assert ring.match("secon") is None and ring.match("second ") is None and ring.match("") is None
    assert not KeyRing(configured_keys(make_settings(tmp_path, api_keys=" , "))).enabled


def test_token_bucket_sheds_beyond_the_burst_and_refills_at_the_rate() -> None:
    now = [100.0]
    limiter = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(0.5)  # empty: one token back in 1 / rate
    assert limiter.take("b") == 0.0  # buckets are per identity
    now[0] += 0.5
    assert limiter.take("a") == 0.0 and limiter.take("a") == pytest.approx(0.5)
    now[0] += 60  # refills to the burst, never beyond
    assert [limiter.take("a") for _ in range(4)][-1] > 0
    assert retry_after_s(0.01) == 1 and retry_after_s(1.2) == 2


def test_rotation_an_old_key_is_refused_and_both_keys_of_the_overlap_work(
    app_client: Callable[..., TestClient], sample_images: np.ndarray
) -> None:
    body = png_bytes(sample_images[0])
    # overlap: the old key in api_key, the new one in api_keys; both accepted
    with app_client(api_key="old-key", api_keys="new-key", warmup=False) as client:
        for key in ("old-key", "new-key"):
            answer = client.post("/predict", content=body, headers=bearer(key))
            assert answer.status_code == 200, answer.text
        refused = client.post("/predict", content=body, headers=bearer("other"))
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "unauthorized"
    # rotated: only the new key (and a third one) left; the old one is refused like any other
    with app_client(api_keys="new-key,third-key", warmup=False) as client:
        old = client.post("/predict", content=body, headers=bearer("old-key"))
        assert old.status_code == 401 and old.json()["error"]["message"] == "invalid bearer token"
        assert old.headers["www-authenticate"] == "Bearer"
        for key in ("new-key", "third-key"):
            assert client.post("/predict", content=body, headers=bearer(key)).status_code == 200
        assert client.post("/predict", content=body, headers={"Content-Type": "image/png"}).status_code == 401


def test_the_rate_limit_sheds_with_429_and_retry_after_per_key_and_recovers(
    app_client: Callable[..., TestClient], sample_images: np.ndarray
) -> None:
    body = png_bytes(sample_images[1])
    with app_client(api_keys="key-a,key-b", rate_limit_per_s=4.0, rate_limit_burst=2, warmup=False) as client:
        statuses = [
            client.post("/predict", content=body, headers=bearer("key-a")).status_code for _ in range(2)
        ]
        assert statuses == [200, 200]
        shed = client.post("/predict", content=body, headers=bearer("key-a"))
        assert shed.status_code == 429 and shed.headers["retry-after"] == "1"
        error = shed.json()["error"]
        assert error["type"] == "rate_limited" and "4 requests/s" in error["message"]
        assert shed.headers["x-request-id"]
        # another key has its own bucket
        assert client.post("/predict", content=body, headers=bearer("key-b")).status_code == 200
        # a wrong key is refused before it touches any bucket
        assert client.post("/predict", content=body, headers=bearer("nope")).status_code == 401
        time.sleep(0.3)  # a token is back after 1 / 4 s
        assert client.post("/predict", content=body, headers=bearer("key-a")).status_code == 200
        assert client.get("/healthz").status_code == 200  # probes are never limited
        documented = client.get("/openapi.json").json()["paths"]["/predict"]["post"]["responses"]["429"]
        assert "Retry-After" in documented["headers"]


def test_without_keys_the_limit_is_per_client_address(
    app_client: Callable[..., TestClient], sample_images: np.ndarray
) -> None:
    body = png_bytes(sample_images[2])
    with app_client(rate_limit_per_s=0.5, rate_limit_burst=1, warmup=False) as client:
        headers = {"Content-Type": "image/png"}
        assert client.post("/predict", content=body, headers=headers).status_code == 200
        shed = client.post("/predict/batch", files=[("files", ("a.png", body, "image/png"))])
        assert shed.status_code == 429 and shed.headers["retry-after"] == "2"
        assert "per client address" in shed.json()["error"]["message"]
