"""Every error the service answers, mapped to one HTTP status and one JSON shape, in one place.

Body of every error response: ``{"error": {"type": ..., "message": ...}}``.

Each error, as cause -> status: ``type``:

- unreadable input (:class:`models.errors.InputError`): not an image, truncated, bad base64, wrong tensor
  shape, NaN/inf, empty body -> 422: ``invalid_input``
- unknown signal set or operating point, or an option the gate cannot honour
  (:class:`models.errors.ConfigError`) -> 422: ``invalid_option``
- malformed fields or query parameters (FastAPI's ``RequestValidationError``) -> 422: ``validation_error``
- ``X-Request-Timeout`` not a positive number -> 400: ``invalid_header``
- body not received within ``body_timeout_s`` (a trickling client) -> 408: ``body_timeout``
- more than 100 headers or 16 KiB of them / URL over 8 KiB -> 431 / 414: ``request_too_large``
- query parameter the route does not declare -> 422: ``validation_error``
- body over ``max_payload_bytes`` -> 413: ``payload_too_large``
- more images than ``max_images_per_request`` -> 413: ``too_many_images``
- content type other than JSON or multipart, or JSON in a charset other than UTF-8 -> 415:
  ``unsupported_media_type``
- missing or wrong bearer token (the review page: or HTTP Basic password) -> 401: ``unauthorized``
- review page off (``review``), or no such outbox item -> 404: ``not_found``
- more requests than ``rate_limit_per_s`` (+ ``rate_limit_burst``) for one key -> 429 + ``Retry-After``:
  ``rate_limited``
- batching queue full / not ready yet / shutting down -> 503 + ``Retry-After``: ``queue_full`` / ``not_ready``
  / ``shutting_down``
- a gate batch stuck past the watchdog limit / out of memory on a single image -> 503 + ``Retry-After``:
  ``batch_stuck`` / ``out_of_memory``
- a fallback is configured and an ``unknown`` image's item could not be stored in the outbox -> 503 +
  ``Retry-After``: ``fallback_unavailable``
- the request's deadline (``X-Request-Timeout``) passed while queued or computing -> 504:
  ``deadline_exceeded``
- other HTTP errors (404, 405, ...) -> as raised: ``http_error``
- anything unexpected (a bug) -> 500: ``internal_error``

Unknown signal sets and operating points are 422 rather than 400: the request is well formed, one of
its values names nothing the bundle holds, like any other invalid field value.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.errors import ConfigError, InputError

log = logging.getLogger("predgate.service")


class ServiceError(Exception):
    """An error the service raises on purpose, carrying its HTTP status and error type."""

    status_code = 500
    error_type = "internal_error"
    retry_after: int | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


class TooManyImages(ServiceError):
    status_code, error_type = 413, "too_many_images"


class UnsupportedMediaType(ServiceError):
    status_code, error_type = 415, "unsupported_media_type"


class Unauthorized(ServiceError):
    status_code, error_type = 401, "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class ReviewUnauthorized(Unauthorized):
    """The review page without credentials: a browser cannot send a bearer token on a plain page load,
    so the page also accepts HTTP Basic (password: an API key) and asks for it."""

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Basic realm="predgate review", charset="UTF-8"'}


class NotFound(ServiceError):
    status_code, error_type = 404, "not_found"


class RateLimited(ServiceError):
    """The key's token bucket is empty; ``Retry-After`` is the whole seconds until a token is back."""

    status_code, error_type = 429, "rate_limited"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QueueFull(ServiceError):
    status_code, error_type, retry_after = 503, "queue_full", 1


class NotReady(ServiceError):
    status_code, error_type, retry_after = 503, "not_ready", 5


class ShuttingDown(ServiceError):
    status_code, error_type, retry_after = 503, "shutting_down", 5


class BatchStuck(ServiceError):
    """A gate batch has run past the watchdog limit: readiness is off and new work is refused."""

    status_code, error_type, retry_after = 503, "batch_stuck", 5


class OutOfMemory(ServiceError):
    """The gate ran out of memory on a single image (a larger batch is split and retried first)."""

    status_code, error_type, retry_after = 503, "out_of_memory", 5


class FallbackUnavailable(ServiceError):
    """An ``unknown`` answer's fallback item could not be written to the outbox: the answer is withheld,
    because the promise is that every ``unknown`` reaches the fallback; the client retries."""

    status_code, error_type, retry_after = 503, "fallback_unavailable", 5


class DeadlineExceeded(ServiceError):
    """The request's deadline (``X-Request-Timeout``) passed before its answer was ready; images
    still queued are dropped, never computed. No Retry-After: the client's own budget is spent."""

    status_code, error_type = 504, "deadline_exceeded"


def error_response(
    status: int, error_type: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"type": error_type, "message": message}}, status_code=status, headers=headers
    )


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request"


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return error_response(exc.status_code, exc.error_type, exc.message, exc.headers())


async def _input_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(422, "invalid_input", str(exc))


async def _config_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(422, "invalid_option", str(exc))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(422, "validation_error", _validation_message(exc))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(exc.status_code, "http_error", str(exc.detail), dict(exc.headers or {}))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", f"internal error ({type(exc).__name__}); see the server log")


def install_handlers(app: FastAPI) -> None:
    """Register the mapping above on ``app``."""
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(InputError, _input_error)
    app.add_exception_handler(ConfigError, _config_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
