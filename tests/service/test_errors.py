"""Every kind of bad request gets a JSON 4xx naming the problem, never a 500, and the server keeps
serving: after each one, a good request succeeds."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.middleware import BodyLimitMiddleware
from tests.service.conftest import png_bytes

LIMIT = 64 * 1024
MAX_IMAGES = 4


@pytest.fixture(scope="module")
def strict(app_client: Callable[..., TestClient]) -> Iterator[TestClient]:
    with app_client(max_payload_bytes=LIMIT, max_images_per_request=MAX_IMAGES, warmup=False) as client:
        yield client


def _raw_json(text: str) -> dict[str, Any]:
    return {"content": text.encode(), "headers": {"content-type": "application/json"}}


def _cases(image: np.ndarray) -> list[tuple[str, str, str, dict[str, Any], int, str, str]]:
    """(id, method, path, request kwargs, status, error type, message fragment)."""
    png = png_bytes(image)
    good = base64.b64encode(png).decode()
    zeros = [[[0.0] * 28] * 28]
    return [
        (
            "not-an-image",
            "post",
            "/predict",
            {"files": {"file": ("x.png", b"GIF? no, text", "image/png")}},
            422,
            "invalid_input",
            "not a PNG or JPEG",
        ),
        (
            "truncated-png",
            "post",
            "/predict",
            {"files": {"file": ("x.png", png[: len(png) // 2], "image/png")}},
            422,
            "invalid_input",
            "truncated",
        ),
        (
            "truncated-base64-png",
            "post",
            "/predict",
            {"json": {"image": base64.b64encode(png[:60]).decode()}},
            422,
            "invalid_input",
            "truncated",
        ),
        (
            "wrong-shape",
            "post",
            "/predict",
            {"json": {"tensor": [[[0.0] * 28] * 27]}},
            422,
            "invalid_input",
            "shape [1, 27, 28]",
        ),
        (
            "nan",
            "post",
            "/predict",
            _raw_json(
                '{"tensor": [[[NaN'
                + ", 0.0" * 27
                + "]"
                + (", [" + ", ".join(["0.0"] * 28) + "]") * 27
                + "]]}"
            ),
            422,
            "invalid_input",
            "NaN",
        ),
        (
            "inf",
            "post",
            "/predict",
            _raw_json(json.dumps({"tensor": zeros}).replace("0.0", "1e400", 1)),
            422,
            "invalid_input",
            "infinite",
        ),
        (
            "bad-base64",
            "post",
            "/predict",
            {"json": {"image": "not*base64!"}},
            422,
            "invalid_input",
            "not valid base64",
        ),
        ("empty-body", "post", "/predict", {}, 422, "invalid_input", "empty body"),
        ("empty-json-body", "post", "/predict", _raw_json(""), 422, "invalid_input", "empty body"),
        ("invalid-json", "post", "/predict", _raw_json('{"image": '), 422, "invalid_input", "not valid JSON"),
        (
            "image-and-tensor",
            "post",
            "/predict",
            {"json": {"image": good, "tensor": zeros}},
            422,
            "validation_error",
            "exactly one",
        ),
        (
            "unknown-field",
            "post",
            "/predict",
            {"json": {"image": good, "colour": "red"}},
            422,
            "validation_error",
            "colour",
        ),
        (
            "bad-top-k",
            "post",
            "/predict?top_k=0",
            {"json": {"image": good}},
            422,
            "validation_error",
            "top_k",
        ),
        (
            "no-file-field",
            "post",
            "/predict",
            {"files": {"upload": ("x.png", png, "image/png")}},
            422,
            "invalid_input",
            "'file'",
        ),
        (
            "text-content-type",
            "post",
            "/predict",
            {"content": b"hello", "headers": {"content-type": "text/plain"}},
            415,
            "unsupported_media_type",
            "text/plain",
        ),
        (
            "too-large",
            "post",
            "/predict",
            {"json": {"image": "A" * (LIMIT + 10)}},
            413,
            "payload_too_large",
            f"limit of {LIMIT} bytes",
        ),
        (
            "too-large-chunked",
            "post",
            "/predict",
            {
                "content": iter([b'{"image": "', b"A" * LIMIT, b'"}']),
                "headers": {"content-type": "application/json"},
            },
            413,
            "payload_too_large",
            "more than the limit",
        ),
        (
            "too-many-images",
            "post",
            "/predict/batch",
            {"json": {"images": [good] * (MAX_IMAGES + 1)}},
            413,
            "too_many_images",
            f"limit of {MAX_IMAGES}",
        ),
        (
            "too-many-files",
            "post",
            "/predict/batch",
            {"files": [("files", ("x.png", png, "image/png"))] * (MAX_IMAGES + 3)},
            413,
            "too_many_images",
            "limit",
        ),
        ("empty-batch", "post", "/predict/batch", {"json": {"images": []}}, 422, "invalid_input", "empty"),
        (
            "bad-image-in-batch",
            "post",
            "/predict/batch",
            {"json": {"images": [good, "%%%"]}},
            422,
            "invalid_input",
            "images[1]",
        ),
        (
            "unknown-operating-point",
            "post",
            "/predict?operating_point=risk%3D0.5%4099",
            {"json": {"image": good}},
            422,
            "invalid_option",
            "unknown operating point 'risk=0.5@99'",
        ),
        (
            "unknown-signal-set",
            "post",
            "/predict",
            {"json": {"image": good, "signal_set": "vibes"}},
            422,
            "invalid_option",
            "unknown signal set 'vibes'",
        ),
        ("unknown-path", "get", "/nothing-here", {}, 404, "http_error", "Not Found"),
        ("wrong-method", "get", "/predict", {}, 405, "http_error", "Method Not Allowed"),
    ]


CASE_IDS = [c[0] for c in _cases(np.zeros((28, 28, 1), np.uint8))]


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_bad_request_gets_json_4xx_and_server_keeps_serving(
    strict: TestClient, sample_images: np.ndarray, case_id: str
) -> None:
    case = next(c for c in _cases(sample_images[0]) if c[0] == case_id)
    _, method, path, kwargs, status, error_type, fragment = case
    response = getattr(strict, method)(path, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["type"] == error_type
    assert fragment in error["message"]
    after = strict.post("/predict", files={"file": ("ok.png", png_bytes(sample_images[0]), "image/png")})
    assert after.status_code == 200 and after.json()["verdict"] in ("accept", "unknown")


def test_queue_full_is_503_with_retry_after(
    app_client: Callable[..., TestClient], sample_images: np.ndarray
) -> None:
    """A batch larger than the whole queue can never fit: refused at once, nothing is queued."""
    with app_client(queue_limit=2, warmup=False) as client:
        images = [base64.b64encode(png_bytes(i)).decode() for i in sample_images[:3]]
        response = client.post("/predict/batch", json={"images": images})
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "queue_full" and response.headers["retry-after"] == "1"
        assert client.post("/predict/batch", json={"images": images[:2]}).status_code == 200


def test_body_limit_stops_reading_past_the_limit() -> None:
    """Without Content-Length the cap reads chunk by chunk and stops at the first chunk past it."""
    received: list[int] = []
    sent: list[dict[str, Any]] = []
    chunks = [b"x" * 400] * 10

    async def receive() -> dict[str, Any]:
        received.append(1)
        return {
            "type": "http.request",
            "body": chunks[len(received) - 1],
            "more_body": len(received) < len(chunks),
        }

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the app must not be called")

    scope = {"type": "http", "method": "POST", "headers": [(b"content-type", b"application/json")]}
    asyncio.run(BodyLimitMiddleware(app, max_bytes=1000)(scope, receive, send))
    assert len(received) == 3  # 1200 bytes > 1000: the remaining 7 chunks were never read
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["error"]["type"] == "payload_too_large"


def test_body_under_the_limit_reaches_the_app_unchanged() -> None:
    parts = [b"ab", b"cd", b"ef"]
    seen: list[bytes] = []

    async def receive() -> dict[str, Any]:
        body = parts.pop(0)
        return {"type": "http.request", "body": body, "more_body": bool(parts)}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        seen.append(message["body"])
        assert message["more_body"] is False

    async def send(message: dict[str, Any]) -> None:
        raise AssertionError("the middleware must not answer")

    scope = {"type": "http", "method": "POST", "headers": []}
    asyncio.run(BodyLimitMiddleware(app, max_bytes=1000)(scope, receive, send))
    assert seen == [b"abcdef"]
