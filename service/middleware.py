"""Two pure-ASGI middlewares: a request-body size cap and the per-route request counter.

Pure ASGI (not ``BaseHTTPMiddleware``) so that the body cap can stop reading a chunked upload as soon
as it passes the limit, before the app or the multipart parser sees any of it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics

_HAS_BODY = frozenset({"POST", "PUT", "PATCH"})


async def _send_error(send: Send, status: int, error_type: str, message: str) -> None:
    body = json.dumps({"error": {"type": error_type, "message": message}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """413 for bodies over ``max_bytes``: at once from ``Content-Length``, else while reading.

    A body without a (trustworthy) length is read here, chunk by chunk, up to ``max_bytes``; past it
    the request is answered 413 and the rest is never read. Under the limit the buffered body is
    replayed to the app unchanged, so memory stays bounded by ``max_bytes``.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: str) -> str:
        return f"request body is {size}, more than the limit of {self.max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _HAS_BODY:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _send_error(send, 400, "http_error", "invalid Content-Length header")
                return
            if declared > self.max_bytes:
                await _send_error(send, 413, "payload_too_large", self._too_large(f"{declared} bytes"))
                return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                await _send_error(send, 413, "payload_too_large", self._too_large(f"over {total} bytes"))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class RequestMetricsMiddleware:
    """Counts every HTTP request in ``predgate_requests_total`` by route template and status.

    The route label is the template of the route that handled the request (set by the router in
    ``scope["route"]``), or, for requests answered before routing (413 from the body cap), the path
    when it is one of ``known_paths``; anything else is ``unmatched``, so random paths cannot blow up
    the label set.
    """

    def __init__(self, app: ASGIApp, known_paths: Callable[[], Iterable[str]]) -> None:
        self.app = app
        self._known_paths = known_paths
        self._paths: frozenset[str] | None = None

    def _route(self, scope: Scope) -> str:
        route = scope.get("route")
        path = getattr(route, "path", None)
        if isinstance(path, str):
            return path
        if self._paths is None:
            self._paths = frozenset(self._known_paths())
        return scope["path"] if scope["path"] in self._paths else "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: dict[str, Any] = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            metrics.REQUESTS.labels(route=self._route(scope), status=str(status["code"])).inc()
