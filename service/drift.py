"""Drift gauges of the live service: one :class:`models.drift.DriftMonitor` per signal set in use.

Each answered image adds its unified score and verdict to its signal set's window; the gauges
(``predgate_drift_ks_statistic``, ``predgate_drift_ks_pvalue``, ``predgate_window_unknown_share``,
``predgate_drift_window_images``) are refreshed at most once per ``refresh_s`` so that the KS test
(a sort of window + reference) costs nothing per request. A signal set whose val scores the bundle
does not store gets no monitor (logged at start-up), never an error on the request path.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from models.bundle import Bundle
from models.drift import DriftMonitor, reference_scores
from models.errors import BundleError
from service import metrics

log = logging.getLogger("predgate.service")


class DriftGauges:
    """Per-signal-set drift monitors feeding the Prometheus gauges, made once at start-up (the val
    scores are read from the bundle here, never on the request path)."""

    def __init__(
        self, bundle: Bundle, signal_sets: list[str], window: int, min_window: int, refresh_s: float = 1.0
    ) -> None:
        self.refresh_s = refresh_s
        self._monitors: dict[str, DriftMonitor] = {}
        self._refreshed: dict[str, float] = {}
        try:
            references = reference_scores(bundle, signal_sets)
        except BundleError as exc:
            log.warning("no drift monitors: %s", exc)
            references = {}
        for name in signal_sets:
            if name in references:
                self._monitors[name] = DriftMonitor(references[name], window, min_window)
            else:
                log.warning("no drift monitor for signal set %s: the bundle stores no val scores of it", name)

    def monitor(self, signal_set: str) -> DriftMonitor | None:
        """The set's monitor (None when the bundle stores no val scores for it)."""
        return self._monitors.get(signal_set)

    def observe(self, signal_set: str, scores: np.ndarray, rejected: np.ndarray) -> None:
        """Add answered images to the window and refresh the gauges when they are due."""
        monitor = self.monitor(signal_set)
        if monitor is None:
            return
        monitor.update(scores, rejected)
        now = time.monotonic()
        if now - self._refreshed.get(signal_set, -np.inf) < self.refresh_s:
            return
        self._refreshed[signal_set] = now
        self.refresh(signal_set)

    def refresh(self, signal_set: str) -> None:
        """Compute the window's statistics now and set the gauges (nothing while the window is short)."""
        monitor = self.monitor(signal_set)
        state = monitor.state() if monitor is not None else None
        if state is None:
            return
        metrics.DRIFT_KS.labels(signal_set=signal_set).set(state.ks_statistic)
        metrics.DRIFT_PVALUE.labels(signal_set=signal_set).set(state.ks_pvalue)
        metrics.WINDOW_UNKNOWN_SHARE.labels(signal_set=signal_set).set(state.unknown_share)
        metrics.DRIFT_WINDOW.labels(signal_set=signal_set).set(state.window_size)
