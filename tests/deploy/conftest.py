"""The service test fixtures (apps over the tiny bundle, sample images), shared with the deployment tests."""

import pytest

from tests.service.conftest import app_client, client, sample_images  # noqa: F401


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: starts real servers (uvicorn, haproxy) on loopback")
