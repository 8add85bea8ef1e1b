"""Counts predict requests in flight in ``predgate_in_flight_requests``: the autoscaling signal.

Queue depth alone misses the images the gate is running right now and the requests still being
parsed; in-flight requests (received, not yet answered) is what Little's law ties to throughput and
latency (in flight = rate x latency), so it is what the Kubernetes autoscaler targets per pod
(``deploy/k8s``). Pure ASGI, so it sees a request from its first byte to its last response byte.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from service import metrics

PREDICT_PREFIX = "/predict"


class InFlightMiddleware:
    """Adds 1 to the gauge while a ``/predict*`` request is being handled (any outcome)."""

    def __init__(self, app: ASGIApp, prefix: str = PREDICT_PREFIX) -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        metrics.IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            metrics.IN_FLIGHT.dec()
