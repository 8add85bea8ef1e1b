"""Drift of the gate's evidence in production: is the live score distribution still the one the
thresholds were chosen on?

A threshold chosen on clean val data keeps its meaning only while live inputs resemble val inputs;
under shift the rejection rate can stay flat while the accepted inputs turn wrong (the open-world
report shows where). :class:`DriftMonitor` keeps the last ``window`` unified scores of a signal set
and compares them with the bundle's val scores by a two-sample Kolmogorov-Smirnov test, and tracks
the share of ``unknown`` verdicts in the same window. The service exports both as Prometheus gauges
and alerts on them (deploy/prometheus/rules.yml).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np
from scipy.stats import ks_2samp

from models.bundle import SCORES_FILE, Bundle, scores_key
from models.errors import BundleError, ConfigError


@dataclass(frozen=True)
class DriftState:
    """The window's statistics: ``ks_statistic`` (sup distance of the two empirical CDFs),
    ``ks_pvalue`` (asymptotic two-sided), ``unknown_share`` and how many scores the window holds."""

    ks_statistic: float
    ks_pvalue: float
    unknown_share: float
    window_size: int


class DriftMonitor:
    """Sliding window of live scores against a fixed reference sample (thread-safe).

    Parameters
    ----------
    reference : the val scores of the signal set (what its thresholds were chosen on).
    window : how many of the latest live scores the test compares; the statistics are only
        reported once ``min_window`` scores have arrived (a KS test of a handful of scores says nothing).
    """

    def __init__(self, reference: np.ndarray, window: int = 1000, min_window: int = 100) -> None:
        reference = np.asarray(reference, dtype=np.float64).reshape(-1)
        if reference.size < 2 or not np.all(np.isfinite(reference)):
            raise ConfigError("the drift reference needs at least two finite scores")
        if not 1 <= min_window <= window:
            raise ConfigError(f"need 1 <= min_window <= window, got {min_window}, {window}")
        self.reference = np.sort(reference)
        self.window = window
        self.min_window = min_window
        self._scores: deque[float] = deque(maxlen=window)
        self._rejected: deque[bool] = deque(maxlen=window)
        self._lock = threading.Lock()

    def update(self, scores: np.ndarray, rejected: np.ndarray) -> None:
        """Add one batch's unified scores and verdicts (True = unknown)."""
        with self._lock:
            self._scores.extend(np.asarray(scores, dtype=np.float64).reshape(-1).tolist())
            self._rejected.extend(np.asarray(rejected, dtype=bool).reshape(-1).tolist())

    def state(self) -> DriftState | None:
        """The window's statistics, or None while it holds fewer than ``min_window`` scores."""
        with self._lock:
            live = np.fromiter(self._scores, dtype=np.float64, count=len(self._scores))
            rejected = np.fromiter(self._rejected, dtype=bool, count=len(self._rejected))
        if live.size < self.min_window:
            return None
        result = ks_2samp(live, self.reference, alternative="two-sided", method="asymp")
        return DriftState(
            float(result.statistic), float(result.pvalue), float(rejected.mean()), int(live.size)
        )


def reference_scores(bundle: Bundle, signal_sets: list[str]) -> dict[str, np.ndarray]:
    """The val scores of each set's served (seed-0) detector, read in one pass: the sample its
    thresholds were chosen on, so the sample live scores are compared with. A set the bundle
    stores no val scores for (a bundle made before they were stored) is left out.

    Raises
    ------
    BundleError
        The bundle has no scores file at all (build its detectors stage).
    """
    if not bundle.has_file(SCORES_FILE):
        raise BundleError(f"the bundle has no {SCORES_FILE}: build its detectors stage")
    scores = bundle.read_arrays(SCORES_FILE)
    keys = {name: scores_key(0, name, "val") for name in signal_sets}
    return {name: scores[key] for name, key in keys.items() if key in scores}
