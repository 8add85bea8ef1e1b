"""The request guards that sit between the body cap and the request counter, added in one place.

From the outside in (the last added runs first): request id, deadline header and header/URL size caps
(:class:`~service.middleware.RequestContextMiddleware`, so every answer, a refusal included, carries
its ``X-Request-ID``), CORS only when origins are configured (off by default: a browser page on
another origin gets no CORS headers), and unknown query parameters refused
(:class:`~service.middleware.StrictQueryMiddleware`).
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from service.middleware import RequestContextMiddleware, StrictQueryMiddleware, declared_query_params
from service.settings import Settings


def cors_origins(settings: Settings) -> list[str]:
    return [origin.strip() for origin in settings.cors_origins.split(",") if origin.strip()]


def install_guards(app: FastAPI, settings: Settings) -> None:
    """Add the guards to ``app`` (call after the body cap, before the request counter)."""
    app.add_middleware(StrictQueryMiddleware, allowed=lambda: declared_query_params(app))
    origins = cors_origins(settings)
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID", "X-Request-Timeout"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    app.add_middleware(RequestContextMiddleware, default_timeout_s=settings.request_timeout_s)
