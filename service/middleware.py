"""Pure-ASGI middlewares: request id and deadline, unknown query parameters, the request-body size
and time caps, and the per-route request counter.

Pure ASGI (not ``BaseHTTPMiddleware``) so that the body cap can stop reading a chunked upload as soon
as it passes the limit (or its deadline), before the app or the multipart parser sees any of it.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics

_HAS_BODY = frozenset({"POST", "PUT", "PATCH"})


REQUEST_ID_HEADER = "x-request-id"
TIMEOUT_HEADER = "x-request-timeout"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


async def _send_error(
    send: Send, status: int, error_type: str, message: str, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps({"error": {"type": error_type, "message": message}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": body})


def request_context(scope: Scope) -> dict[str, Any]:
    """``scope["state"]`` (``request.state`` in a route): ``request_id`` and ``deadline`` live there."""
    return scope.setdefault("state", {})  # type: ignore[no-any-return]


class RequestContextMiddleware:
    """Gives every HTTP request an id and a deadline, and caps its headers, before anything else reads it.

    - ``X-Request-ID``: the client's value when it is a plain token (``[A-Za-z0-9._:-]``, at most 128),
      else a fresh UUID; echoed on every response, errors included, and in each prediction body, so a
      client can match each answer to its request.
    - ``X-Request-Timeout``: seconds this request may take (``default_timeout_s`` without it, capped at
      ``max_timeout_s``); stored as an absolute ``time.monotonic()`` deadline in
      ``request.state.deadline`` for the request path to honour. A value that is not a positive
      number gets 400 ``invalid_header``.
    - Header count/size and URL length are capped (431 / 414, JSON), since uvicorn's parser does not
      bound them when they arrive in one read.
    """

    def __init__(
        self,
        app: ASGIApp,
        default_timeout_s: float,
        max_timeout_s: float = 3600.0,
        max_header_bytes: int = 16 * 1024,
        max_headers: int = 100,
        max_target_bytes: int = 8 * 1024,
    ) -> None:
        self.app = app
        self.default_timeout_s = default_timeout_s
        self.max_timeout_s = max_timeout_s
        self.max_header_bytes, self.max_headers, self.max_target_bytes = (
            max_header_bytes,
            max_headers,
            max_target_bytes,
        )

    def _oversized(self, scope: Scope) -> tuple[int, str] | None:
        """uvicorn's h11 parser bounds neither header size nor count when they arrive in one read."""
        raw = scope["headers"]
        size = sum(len(k) + len(v) + 4 for k, v in raw)
        if len(raw) > self.max_headers or size > self.max_header_bytes:
            return 431, (
                f"request headers too large: {len(raw)} headers, {size} bytes "
                f"(limits {self.max_headers} headers, {self.max_header_bytes} bytes)"
            )
        target = len(scope.get("raw_path") or scope["path"].encode()) + len(scope.get("query_string", b""))
        if target > self.max_target_bytes:
            return 414, f"request URL is {target} bytes, more than the limit of {self.max_target_bytes}"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        oversized = self._oversized(scope)
        headers = (
            {}
            if oversized
            else {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        )
        given = headers.get(REQUEST_ID_HEADER, "")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        id_header = (REQUEST_ID_HEADER.encode(), request_id.encode())
        context = request_context(scope)
        context["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), id_header]}
            await send(message)

        if oversized is not None:
            await _send_error(
                send_with_id, oversized[0], "request_too_large", oversized[1], [(b"connection", b"close")]
            )
            return

        timeout = self.default_timeout_s
        if TIMEOUT_HEADER in headers:
            try:
                timeout = float(headers[TIMEOUT_HEADER])
                if not 0 < timeout < float("inf"):
                    raise ValueError
            except ValueError:
                await _send_error(
                    send_with_id,
                    400,
                    "invalid_header",
                    "X-Request-Timeout must be a positive number of seconds, "
                    f"got {headers[TIMEOUT_HEADER][:40]!r}",
                )
                return
        context["deadline"] = time.monotonic() + min(timeout, self.max_timeout_s)
        await self.app(scope, receive, send_with_id)


def declared_query_params(app: FastAPI) -> dict[str, set[str]]:
    """Each documented path and the query parameter names its operations declare (from the OpenAPI
    document, the public description of the routes)."""
    out: dict[str, set[str]] = {}
    for path, operations in app.openapi().get("paths", {}).items():
        names = out.setdefault(path, set())
        for operation in operations.values():
            names.update(p["name"] for p in operation.get("parameters", []) if p.get("in") == "query")
    return out


class StrictQueryMiddleware:
    """422 for query parameters a route does not declare (a typo such as ``?signal-set=`` would
    otherwise be ignored without a word). ``allowed`` maps a path to its parameter names; paths it
    does not name are left alone. Computed on first use, when every route is registered."""

    def __init__(self, app: ASGIApp, allowed: Callable[[], Mapping[str, Iterable[str]]]) -> None:
        self.app = app
        self._allowed = allowed
        self._map: dict[str, frozenset[str]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("query_string"):
            if self._map is None:
                self._map = {path: frozenset(names) for path, names in self._allowed().items()}
            names = self._map.get(scope["path"])
            if names is not None:
                given = {
                    k for k, _ in parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
                }
                unknown = sorted(given - names)
                if unknown:
                    shown = [name[:40] for name in unknown[:5]]
                    await _send_error(
                        send,
                        422,
                        "validation_error",
                        f"unknown query parameter(s) {shown}; this route takes {sorted(names)}",
                    )
                    return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for bodies over ``max_bytes``: at once from ``Content-Length``, else while reading; 408 for
    a body not received within ``timeout_s``.

    The body is read here, chunk by chunk, up to ``max_bytes``; past it the request is answered 413
    and the rest is never read. A client that trickles its body (slowloris on the body) is cut when the
    whole body has not arrived within ``timeout_s``. Under both limits the buffered body is replayed to
    the app unchanged, so memory stays bounded by ``max_bytes``.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

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
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
            except TimeoutError:
                await _send_error(
                    send,
                    408,
                    "body_timeout",
                    f"request body not received within {self.timeout_s:g} s ({total} bytes arrived)",
                    [(b"connection", b"close")],
                )
                return
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
