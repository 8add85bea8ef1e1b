"""Fixtures of the service tests: apps over the real tiny bundle, sample images, the gate itself.

Every expected number comes from :class:`models.gate.Gate` run on the same inputs, never from the
service under test.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from models.bundle import Bundle, load_bundle
from models.data import read_idx
from models.gate import Gate, load_gate
from service.main import create_app
from service.settings import Settings
from tests.service.redis_server import RedisServer


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: starts real servers (uvicorn, prometheus) on loopback")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session (skips where it is not installed); tests keep apart by
    key prefix (:func:`redis_prefix`)."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_prefix() -> str:
    return f"test:{uuid.uuid4().hex[:8]}:"


def png_bytes(image: np.ndarray, mode: str | None = None) -> bytes:
    """PNG of an ``H x W`` or ``H x W x C`` uint8 array (lossless, so decoding gives the same pixels)."""
    array = image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def make_settings(bundle: Path, **overrides: Any) -> Settings:
    """Settings that ignore the environment's PREDGATE_* (tests must not depend on the shell)."""
    values: dict[str, Any] = {"bundle": bundle, "device": "cpu", "max_queue_delay_ms": 5.0}
    values.update(overrides)
    return Settings(_env_prefix="PREDGATE_TEST_UNUSED_", **values)  # type: ignore[call-arg]


@pytest.fixture(scope="session")
def bundle(tiny_bundle: Path) -> Bundle:
    return load_bundle(tiny_bundle)


@pytest.fixture(scope="session")
def gate(bundle: Bundle) -> Gate:
    return load_gate(bundle, "cpu")


@pytest.fixture(scope="session")
def sample_images(tiny_data_dir: Path) -> np.ndarray:
    """40 test-split images of the tiny data (``40 x 28 x 28 x 1`` uint8): the CNN gets some wrong."""
    images = read_idx(tiny_data_dir / "t10k-images-idx3-ubyte.gz")[:40]
    return np.ascontiguousarray(images[..., None])


@pytest.fixture(scope="session")
def app_client(tiny_bundle: Path) -> Callable[..., Any]:
    """``with app_client(**settings) as client:`` a TestClient whose lifespan has run."""

    def make(**overrides: Any) -> TestClient:
        return TestClient(create_app(make_settings(tiny_bundle, **overrides)))

    return make


@pytest.fixture(scope="module")
def client(app_client: Callable[..., TestClient]) -> Iterator[TestClient]:
    """The default app (bundle defaults, no API key), started once per module."""
    with app_client() as test_client:
        yield test_client
