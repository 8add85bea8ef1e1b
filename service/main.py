"""The FastAPI application: ``create_app(settings)`` builds it; the lifespan loads, warms up, serves, drains.

Run it with ``predgate serve`` (:func:`service.server.serve`, which validates the bundle before binding
the port) or ``uvicorn service.main:app_from_env --factory`` (settings from ``PREDGATE_*``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from models import __version__
from service import metrics
from service.docs_assets import install_docs
from service.errors import install_handlers
from service.guards import install_guards
from service.inflight import InFlightMiddleware
from service.middleware import BodyLimitMiddleware, RequestMetricsMiddleware
from service.openapi import install_openapi
from service.review import routes as review
from service.routes import bundle, explain, health, predict
from service.settings import Settings, get_settings
from service.state import LoadedService, ServiceState

DESCRIPTION = """An error-detection gate in front of an image CNN: each prediction comes with a verdict,
`accept` or `unknown` (send it to the fallback), from conductance, label change rate and softmax signals.
Errors are JSON `{"error": {"type", "message"}}`."""


class _MetricsEndpoint:
    """``/metrics`` as a plain route (a ``Mount`` would redirect ``/metrics`` to ``/metrics/``)."""

    def __init__(self) -> None:
        self.app = metrics.metrics_app()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def create_app(settings: Settings, *, loaded: LoadedService | None = None) -> FastAPI:
    """The app for ``settings``; ``loaded`` skips loading (``predgate serve`` loads before binding)."""
    state = ServiceState(settings, loaded)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.start()
        try:
            yield
        finally:
            await state.stop()  # uvicorn has already finished in-flight requests; drain what is queued

    app = FastAPI(
        title="predgate",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,  # served by install_docs from local assets, not a CDN
    )
    app.state.predgate = state
    install_openapi(app, state)  # the document states the bundle's names and tensor shape once loaded
    install_handlers(app)
    app.include_router(health.router)
    app.include_router(bundle.router)
    app.include_router(predict.router)
    app.include_router(review.router)
    app.include_router(explain.router)
    app.add_route("/metrics", _MetricsEndpoint(), methods=["GET"], include_in_schema=False)
    install_docs(app)
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.max_payload_bytes, timeout_s=settings.body_timeout_s
    )
    app.add_middleware(InFlightMiddleware)  # predgate_in_flight_requests, the autoscaling signal
    install_guards(app, settings)  # request id + deadline header, header/URL caps, CORS, unknown query params
    # outermost, so it counts the body cap's 413s too
    app.add_middleware(RequestMetricsMiddleware, known_paths=lambda: [*app.openapi()["paths"], "/metrics"])
    return app


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn service.main:app_from_env --factory``: settings from the environment."""
    return create_app(get_settings())
