"""Storing and rebuilding every detector (:mod:`models.detector_state`): through JSON and a
safetensors file, as a bundle does, the rebuilt detector scores exactly as the original; LDA/QDA
attributes and forest arrays survive the trip; broken or foreign state is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis, QuadraticDiscriminantAnalysis
from sklearn.ensemble import RandomForestClassifier

from models.detector_state import (
    STATE_FORMAT,
    discriminant_from_state,
    discriminant_to_state,
    forest_from_arrays,
    forest_to_arrays,
    load_state,
    save_state,
)
from models.detectors import ConductanceDetector, ForestArrays, UnifiedClassifier
from models.errors import BundleError, NotFittedError
from tests.models.conftest import make_data


def test_state_round_trip(detector_case):
    """Through JSON and a safetensors file, as a bundle would store it: identical scores."""
    x_test, _ = detector_case["test"]
    config, arrays = save_state(detector_case["detector"])
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    config = json.loads(json.dumps(config, allow_nan=False))
    arrays = st_load(st_save({k: np.ascontiguousarray(v) for k, v in arrays.items()}))
    loaded = load_state(config, arrays)
    assert type(loaded) is type(detector_case["detector"])
    assert loaded.get_params() == detector_case["detector"].get_params()
    np.testing.assert_array_equal(
        loaded.predict_proba(x_test), detector_case["detector"].predict_proba(x_test)
    )


def test_unfitted_detector_has_no_state(detector_case):
    with pytest.raises(NotFittedError):
        save_state(detector_case["make"]())


def test_unknown_type_format_or_missing_array_is_refused():
    x, y = make_data(200, 3, seed=0)
    with pytest.raises(BundleError, match="unknown detector type"):
        load_state({"type": "Pickle"}, {})
    config, arrays = save_state(UnifiedClassifier(kind="lda").fit(x, y))
    with pytest.raises(BundleError, match="format"):
        load_state({**config, "format": STATE_FORMAT + 1}, arrays)
    del arrays["estimator.coef_"]
    with pytest.raises(BundleError, match="coef_"):
        load_state(config, arrays)


@pytest.mark.parametrize(
    ("make", "array"),
    [
        (lambda: ConductanceDetector(hidden=(8,), max_epochs=2), "net.0.weight"),
        (lambda: UnifiedClassifier(kind="rf", n_estimators=3), "forest.threshold"),
    ],
    ids=["mlp", "forest"],
)
def test_missing_model_array_is_named(make, array):
    x, y = make_data(300, 3, seed=0)
    config, arrays = save_state(make().fit(x, y))
    del arrays[array]
    with pytest.raises(BundleError, match=array):
        load_state(config, arrays)


def test_forest_arrays_round_trip():
    x, y = make_data(500, 3, seed=0)
    forest = ForestArrays.from_sklearn(RandomForestClassifier(n_estimators=5, random_state=0).fit(x, y))
    rebuilt = forest_from_arrays(forest_to_arrays(forest, "f"), "f")
    for name, value in vars(forest).items():
        np.testing.assert_array_equal(getattr(rebuilt, name), value)


@pytest.mark.parametrize("cls", [LinearDiscriminantAnalysis, QuadraticDiscriminantAnalysis])
def test_discriminant_state_rebuilds_estimator(cls):
    x, y = make_data(800, 3, seed=0, spread=False)
    x_test, _ = make_data(300, 3, seed=2, spread=False)
    est = cls().fit(x, y)
    config, arrays = discriminant_to_state(est, "e")
    rebuilt = discriminant_from_state(json.loads(json.dumps(config)), arrays, "e")
    for key, value in vars(est).items():
        other = getattr(rebuilt, key)
        if isinstance(value, list):
            assert all(np.array_equal(a, b) for a, b in zip(value, other, strict=True))
        else:
            np.testing.assert_array_equal(other, value)
    np.testing.assert_array_equal(rebuilt.predict_proba(x_test), est.predict_proba(x_test))
