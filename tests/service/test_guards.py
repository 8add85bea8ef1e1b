"""The request guards: request ids on every answer, the deadline header, a trickling body cut with 408,
CORS off unless origins are configured, unknown query parameters refused."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient

from service.middleware import BodyLimitMiddleware, RequestContextMiddleware


def test_request_id_is_echoed_or_made_and_hostile_ids_replaced(app_client: Callable[..., TestClient]) -> None:
    with app_client(warmup=False) as client:
        given = client.get("/healthz", headers={"x-request-id": "abc-123.x:y"})
        assert given.headers["x-request-id"] == "abc-123.x:y"
        made = client.get("/healthz").headers["x-request-id"]
        hostile = client.get("/healthz", headers={"x-request-id": "a b\tc<script>"}).headers["x-request-id"]
        assert len(made) == len(hostile) == 32 and made != hostile and "<" not in hostile
        refused = client.post("/predict?nope=1", json={})
        assert refused.status_code == 422 and refused.headers["x-request-id"]
        assert "unknown query parameter(s) ['nope']" in refused.json()["error"]["message"]


def test_cors_is_off_by_default_and_on_for_named_origins(app_client: Callable[..., TestClient]) -> None:
    preflight = {"origin": "https://evil.example", "access-control-request-method": "POST"}
    with app_client(warmup=False) as client:
        answer = client.options("/predict", headers=preflight)
        assert "access-control-allow-origin" not in answer.headers
        assert "access-control-allow-origin" not in client.get("/healthz", headers=preflight).headers
    with app_client(warmup=False, cors_origins="https://app.example") as client:
        ok = client.options("/predict", headers={**preflight, "origin": "https://app.example"})
        assert ok.headers["access-control-allow-origin"] == "https://app.example"
        assert "access-control-allow-origin" not in client.options("/predict", headers=preflight).headers


async def _call(
    app: Any, receive: Callable[[], Any], headers: list[tuple[bytes, bytes]]
) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": headers, "query_string": b""}
    await app(scope, receive, send)
    return sent


def test_a_trickling_body_is_cut_after_the_deadline() -> None:
    reached: list[bool] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        reached.append(True)

    async def trickle() -> dict[str, Any]:
        await asyncio.sleep(0.1)  # one byte every 100 ms, forever
        return {"type": "http.request", "body": b"x", "more_body": True}

    app = BodyLimitMiddleware(inner, max_bytes=1 << 20, timeout_s=0.5)
    started = time.monotonic()
    sent = asyncio.run(_call(app, trickle, [(b"content-type", b"application/json")]))
    assert 0.5 <= time.monotonic() - started < 2.0 and not reached
    assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"]
    error = json.loads(sent[1]["body"])["error"]
    assert error["type"] == "body_timeout" and "within 0.5 s" in error["message"]


def test_deadline_header_is_stored_or_refused() -> None:
    seen: dict[str, Any] = {}

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        seen.update(scope["state"])

    async def nothing() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    app = RequestContextMiddleware(inner, default_timeout_s=60.0)
    before = time.monotonic()
    asyncio.run(_call(app, nothing, [(b"x-request-timeout", b"2.5")]))
    assert before + 2.5 <= seen["deadline"] <= time.monotonic() + 2.5
    asyncio.run(_call(app, nothing, []))
    assert seen["deadline"] >= before + 60.0
    for bad in (b"soon", b"0", b"-3", b"inf", b"nan"):
        sent = asyncio.run(_call(app, nothing, [(b"x-request-timeout", bad)]))
        assert sent[0]["status"] == 400, bad
