"""The drift monitor's KS statistic against a naive computation, and its window."""

from __future__ import annotations

import numpy as np
import pytest

from models.drift import DriftMonitor
from models.errors import ConfigError


def _naive_ks(a: np.ndarray, b: np.ndarray) -> float:
    grid = np.concatenate([a, b])
    fa = (a[None, :] <= grid[:, None]).mean(1)
    fb = (b[None, :] <= grid[:, None]).mean(1)
    return float(np.abs(fa - fb).max())


def test_ks_statistic_matches_the_naive_sup_distance() -> None:
    rng = np.random.default_rng(0)
    ref, live = rng.normal(0, 1, 500), rng.normal(0.3, 1.2, 200)
    monitor = DriftMonitor(ref, window=300, min_window=50)
    monitor.update(live, live > 1.0)
    state = monitor.state()
    assert state is not None
    assert state.ks_statistic == pytest.approx(_naive_ks(live, ref))
    assert state.unknown_share == pytest.approx((live > 1.0).mean())
    assert state.window_size == 200 and state.ks_pvalue < 0.01


def test_window_slides_and_same_distribution_is_not_flagged() -> None:
    rng = np.random.default_rng(1)
    ref = rng.normal(0, 1, 2000)
    monitor = DriftMonitor(ref, window=400, min_window=100)
    monitor.update(rng.normal(0, 1, 50), np.zeros(50, bool))
    assert monitor.state() is None  # too few scores to say anything
    monitor.update(rng.normal(3, 1, 400), np.ones(400, bool))  # a shifted batch fills the window
    monitor.update(rng.normal(0, 1, 400), np.zeros(400, bool))  # and is pushed out again
    state = monitor.state()
    assert state is not None and state.window_size == 400
    assert state.unknown_share == 0.0 and state.ks_pvalue > 0.001


def test_bad_reference_is_refused() -> None:
    with pytest.raises(ConfigError):
        DriftMonitor(np.array([1.0]))
    with pytest.raises(ConfigError):
        DriftMonitor(np.array([1.0, np.nan]))
    with pytest.raises(ConfigError):
        DriftMonitor(np.arange(10.0), window=10, min_window=20)
