"""predgate_in_flight_requests (the autoscaling signal) counts predict requests from arrival to answer,
whatever the outcome, and nothing else; through the real app it is back to its value after each request."""

from __future__ import annotations

import asyncio

from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from starlette.types import Receive, Scope, Send

from service.inflight import InFlightMiddleware


def in_flight() -> float:
    return REGISTRY.get_sample_value("predgate_in_flight_requests") or 0.0


def test_counts_predict_requests_while_they_run() -> None:
    seen: dict[str, float] = {}

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen[scope["path"]] = in_flight()
        if scope["path"] == "/predict/fail":
            raise RuntimeError("boom")

    app = InFlightMiddleware(inner)
    base = in_flight()

    async def call(path: str) -> None:
        await app({"type": "http", "path": path}, None, None)  # type: ignore[arg-type]

    asyncio.run(call("/predict"))
    asyncio.run(call("/readyz"))
    try:
        asyncio.run(call("/predict/fail"))
    except RuntimeError:
        pass
    assert seen == {"/predict": base + 1, "/readyz": base, "/predict/fail": base + 1}
    assert in_flight() == base


def test_two_concurrent_requests_count_two() -> None:
    release = asyncio.Event()
    peak: list[float] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        peak.append(in_flight())
        await release.wait()

    app = InFlightMiddleware(inner)

    async def main() -> None:
        base = in_flight()
        tasks = [
            asyncio.create_task(app({"type": "http", "path": "/predict/batch"}, None, None)) for _ in range(2)
        ]  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        assert in_flight() == base + 2
        release.set()
        await asyncio.gather(*tasks)
        assert in_flight() == base

    asyncio.run(main())
    assert len(peak) == 2


def test_real_app_returns_to_zero(client: TestClient) -> None:
    before = in_flight()
    response = client.post("/predict", json={"tensor": "not a tensor"})
    assert 400 <= response.status_code < 500
    assert in_flight() == before
    assert "predgate_in_flight_requests" in client.get("/metrics").text
