"""Every Prometheus metric of the service, as module-level constants (default registry).

One uvicorn worker (the default) exposes the default registry. With several workers per container
(``PREDGATE_WORKERS``, each with its own batcher and gate) a scrape reaches one worker at random, so
the metrics go through prometheus-client's multiprocess mode: ``service.server`` points
``PROMETHEUS_MULTIPROC_DIR`` at an emptied directory before any worker imports this module, every
worker writes its values there, and ``/metrics`` sums the files through a ``MultiProcessCollector``
on a fresh registry. Gauges say how they combine across workers (``multiprocess_mode``: queue depth
and in-flight requests add up; ready is the best worker's), and a worker that exits drops its live
gauges (:func:`_forget_this_process`).

Stage latencies: ``queue`` and ``total`` are observed once per image (each request's own wait and
its whole time in the service); the gate's stages (the keys of ``GateOutput.seconds``: ``forward`` or
``forward+conductance``, ``lcr``, ``detectors``) once per gate batch, as the batch's wall time.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, make_asgi_app, multiprocess

if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # the value files open as the metrics below are made
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)

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
QUEUE_DEPTH = Gauge(
    "predgate_queue_depth",
    "Images waiting in the batching queue (summed over workers).",
    multiprocess_mode="livesum",
)
DECISIONS = Counter(
    "predgate_decisions_total",
    "Answers by who decided: primary (its gate accepted), cascade (the primary rejected, the cascade bundle "
    "accepted), none (unknown after every gate; these go to the fallback).",
    ["decided_by"],
)
CASCADE_QUEUE_DEPTH = Gauge(
    "predgate_cascade_queue_depth",
    "Primary rejects waiting in the cascade gate's batching queue "
    "(summed over workers; 0 without a cascade).",
    multiprocess_mode="livesum",
)
CASCADE_BATCH_SIZE = Histogram(
    "predgate_cascade_batch_size",
    "Images per cascade gate run (the primary's rejects, batched across requests).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
IN_FLIGHT = Gauge(
    "predgate_in_flight_requests",
    "Predict requests received and not yet answered (summed over workers): the autoscaling signal.",
    multiprocess_mode="livesum",
)
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
DRIFT_KS = Gauge(
    "predgate_drift_ks_statistic",
    "Two-sample KS statistic of the last window of unified scores against the bundle's val scores "
    "(max over workers).",
    ["signal_set"],
    multiprocess_mode="livemax",
)
DRIFT_PVALUE = Gauge(
    "predgate_drift_ks_pvalue",
    "Asymptotic p-value of that KS test (min over workers): small = live scores no longer look like val.",
    ["signal_set"],
    multiprocess_mode="livemin",
)
WINDOW_UNKNOWN_SHARE = Gauge(
    "predgate_window_unknown_share",
    "Share of 'unknown' verdicts among the last window of answered images (max over workers).",
    ["signal_set"],
    multiprocess_mode="livemax",
)
DRIFT_WINDOW = Gauge(
    "predgate_drift_window_images",
    "Images in the drift window (summed over workers); the drift gauges appear once it holds min_window.",
    ["signal_set"],
    multiprocess_mode="livesum",
)
READY = Gauge(
    "predgate_ready",
    "1 when the bundle is loaded and warmed up (in any worker), else 0.",
    multiprocess_mode="livemax",
)
DEADLINE_EXPIRED = Counter(
    "predgate_deadline_expired_total",
    "Images whose request deadline passed: 'queued' ones were dropped unseen by the gate, 'running' ones "
    "were in a gate run whose result came too late.",
    ["where"],
)
GATE_FAILURES = Counter(
    "predgate_gate_failures_total",
    "Gate runs that raised, by kind (out_of_memory | error); a failed batch of several images is split and "
    "retried, so one bad image fails alone.",
    ["kind"],
)
BATCH_STUCK = Gauge(
    "predgate_batch_stuck",
    "1 while a gate batch has run longer than the watchdog limit (readiness is off meanwhile), else 0.",
    multiprocess_mode="livemax",
)
FALLBACK_ENQUEUED = Counter(
    "predgate_fallback_enqueued_total", "Fallback items written to the outbox (one per `unknown` image)."
)
FALLBACK_DELIVERED = Counter(
    "predgate_fallback_delivered_total", "Fallback items the fallback URL acknowledged (2xx)."
)
FALLBACK_RETRIED = Counter(
    "predgate_fallback_retried_total",
    "Failed delivery attempts that will be retried (connection error, timeout, 408, 425, 429, 5xx).",
)
FALLBACK_DEAD = Counter(
    "predgate_fallback_dead_lettered_total",
    "Fallback items given up on: max attempts reached, or refused for good by the receiver (other 4xx).",
)
FALLBACK_ENQUEUE_FAILURES = Counter(
    "predgate_fallback_enqueue_failures_total",
    "Requests answered 503 because their `unknown` items could not be written to the outbox.",
)
EXPLANATION_FAILURES = Counter(
    "predgate_explanation_failures_total",
    "Batches of explanations that could not be computed (their answers and fallback items went without).",
)
FALLBACK_PENDING = Gauge(
    "predgate_fallback_outbox_pending",
    "Fallback items waiting for delivery (the outbox is shared, so workers report the same value).",
    multiprocess_mode="livemax",
)
FALLBACK_OLDEST_AGE = Gauge(
    "predgate_fallback_oldest_pending_age_seconds",
    "Age of the oldest undelivered fallback item (0 when none is pending).",
    multiprocess_mode="livemax",
)
BUNDLE = Info(
    "predgate_bundle", "The bundle being served and the signal set and operating point it uses by default."
)

STAGES = ("queue", "forward", "forward+conductance", "lcr", "detectors", "total")
"""Label values of ``predgate_stage_seconds``; the cascade gate's stages are these with a ``cascade_``
prefix (``cascade_forward``, ...)."""


def multiprocess_dir() -> str | None:
    """The multiprocess directory when this process writes its metrics there, else None."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def multiprocess_registry() -> CollectorRegistry:
    """A fresh registry that reads every worker's files, plus this worker's bundle info.

    ``Info`` has no multiprocess form; every worker of a container serves the same bundle, so this
    worker's own ``predgate_bundle_info`` stands for all of them.
    """
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(BUNDLE)
    return registry


def metrics_app():  # type: ignore[no-untyped-def]
    """The ``/metrics`` ASGI app: the default registry, or every worker's files in multiprocess mode."""
    if multiprocess_dir() is not None:
        return make_asgi_app(multiprocess_registry())
    return make_asgi_app()


def forget_this_process() -> None:
    """Drop this worker's live gauges (queue depth, in flight, ready) from the shared directory.

    Called when the worker's app has shut down (``service.server``), not at exit: uvicorn ends a
    worker by re-raising SIGTERM, which skips ``atexit``."""
    directory = multiprocess_dir()
    if directory is not None and os.path.isdir(directory):
        multiprocess.mark_process_dead(os.getpid(), directory)
