"""Every Prometheus metric of the service, as module-level constants (default registry).

The service runs one uvicorn worker (the batcher must see every request), so the default registry
is complete; multiprocess mode is not needed.

Stage latencies: ``queue`` and ``total`` are observed once per image (each request's own wait and
its whole time in the service); the gate's stages (the keys of ``GateOutput.seconds``: ``forward`` or
``forward+conductance``, ``lcr``, ``detectors``) once per gate batch, as the batch's wall time.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info, make_asgi_app

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_UNIT_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))

REQUESTS = Counter(
    "predgate_requests_total",
    "HTTP requests by route template and status code.",
    ["route", "status"],
)
PREDICTIONS = Counter(
    "predgate_predictions_total",
    "Images answered, by verdict (accept | unknown), predicted class name and the signal set that decided.",
    ["verdict", "class_name", "signal_set"],
)
STAGE_SECONDS = Histogram(
    "predgate_stage_seconds",
    "Latency per stage: queue and total per image; forward(+conductance), lcr, detectors per gate batch.",
    ["stage"],
    buckets=_LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "predgate_batch_size",
    "Images per gate run (one run per group of equal signal set, operating point and evidence flag).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
QUEUE_DEPTH = Gauge("predgate_queue_depth", "Images waiting in the batching queue.")
LCR = Histogram(
    "predgate_lcr_ratio",
    "Label change rate of answered images (only where it was computed).",
    ["signal_set"],
    buckets=_UNIT_BUCKETS,
)
UNIFIED_SCORE = Histogram(
    "predgate_unified_score",
    "Unified detector score (probability the prediction is wrong) per signal set.",
    ["signal_set"],
    buckets=_UNIT_BUCKETS,
)
READY = Gauge("predgate_ready", "1 when the bundle is loaded and warmed up, else 0.")
BUNDLE = Info(
    "predgate_bundle", "The bundle being served and the signal set and operating point it uses by default."
)

STAGES = ("queue", "forward", "forward+conductance", "lcr", "detectors", "total")
"""Label values of ``predgate_stage_seconds``."""


def metrics_app():  # type: ignore[no-untyped-def]
    """The ``/metrics`` ASGI app over the default registry."""
    return make_asgi_app()
