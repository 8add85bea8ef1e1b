"""What the detector tests share: learnable synthetic data and one fitted detector of every kind.

Both :mod:`tests.models.test_detectors` (fitting and scoring) and
:mod:`tests.models.test_detector_state` (storing and rebuilding) run on the same cases.
"""

from __future__ import annotations

import numpy as np
import pytest

from models.detectors import ConductanceDetector, UnifiedClassifier


def make_data(n: int, n_features: int, seed: int, spread: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from a logistic model of the first features (about 20% positives); with
    ``spread`` the columns get very different scales so that standardisation matters."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, n_features))
    logit = 2.5 * x[:, 0] - 2.0 * x[:, 1] + 0.8 * x[:, 2] * x[:, 1 % n_features] - 2.0
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    return (x * np.logspace(-2, 2, n_features) if spread else x), y


DETECTORS = {
    "conductance": lambda: ConductanceDetector(max_epochs=15, patience=4, batch_size=256, seed=3),
    "unified-nn": lambda: UnifiedClassifier(kind="nn", max_epochs=40, seed=3),
    "unified-rf": lambda: UnifiedClassifier(kind="rf", n_estimators=30, seed=3),
    "unified-lda": lambda: UnifiedClassifier(kind="lda"),
    "unified-qda": lambda: UnifiedClassifier(kind="qda"),
}
N_FEATURES = {"conductance": 16}


@pytest.fixture(scope="module", params=sorted(DETECTORS))
def detector_case(request):
    """(name, make, data, one fitted detector): fitted once per detector for each test file."""
    name = request.param
    n_features = N_FEATURES.get(name, 4)
    x, y = make_data(1500, n_features, seed=0)
    x_val, y_val = make_data(500, n_features, seed=1)
    x_test, y_test = make_data(1000, n_features, seed=2)
    detector = DETECTORS[name]()
    returned = detector.fit(x, y, x_val, y_val)
    return {
        "name": name,
        "make": DETECTORS[name],
        "fit": (x, y, x_val, y_val),
        "test": (x_test, y_test),
        "detector": detector,
        "returned": returned,
    }
