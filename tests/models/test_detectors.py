"""One conformance suite for every detector of :mod:`models.detectors`, plus the pieces behind them
(early stopping, the internal holdout, the forest arrays against sklearn). Storing and rebuilding them
is tested in ``test_detector_state.py``, on the same cases (``tests/models/conftest.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.ensemble import RandomForestClassifier
from sklearn.exceptions import NotFittedError as SklearnNotFittedError
from sklearn.metrics import roc_auc_score

from models.detectors import ConductanceDetector, ForestArrays, UnifiedClassifier, mlp_logits
from models.errors import ConfigError, NotFittedError
from tests.models.conftest import make_data

torch.set_num_threads(1)


def test_fit_returns_self(detector_case):
    assert detector_case["returned"] is detector_case["detector"]


def test_not_fitted_before_fit(detector_case):
    x_test, _ = detector_case["test"]
    fresh = detector_case["make"]()
    for method in (fresh.predict_proba, fresh.decision_function, fresh.predict):
        with pytest.raises(NotFittedError) as info:
            method(x_test)
        assert isinstance(info.value, SklearnNotFittedError)


def test_init_only_stores_params(detector_case):
    fresh = detector_case["make"]()
    assert not [k for k in vars(fresh) if k.endswith("_")]
    assert clone(fresh).get_params() == fresh.get_params()


def test_probabilities(detector_case):
    x_test, _ = detector_case["test"]
    proba = detector_case["detector"].predict_proba(x_test)
    assert proba.shape == (len(x_test), 2)
    assert np.all((proba >= 0) & (proba <= 1))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(detector_case["detector"].decision_function(x_test), proba[:, 1])
    np.testing.assert_array_equal(detector_case["detector"].predict(x_test), (proba[:, 1] >= 0.5).astype(int))
    np.testing.assert_array_equal(detector_case["detector"].classes_, [0, 1])


def test_learns_held_out(detector_case):
    x_test, y_test = detector_case["test"]
    assert roc_auc_score(y_test, detector_case["detector"].decision_function(x_test)) > 0.8


def test_deterministic_with_seed(detector_case):
    x, y, x_val, y_val = detector_case["fit"]
    x_test, _ = detector_case["test"]
    again = detector_case["make"]().fit(x, y, x_val, y_val)
    np.testing.assert_array_equal(
        again.decision_function(x_test), detector_case["detector"].decision_function(x_test)
    )


def test_rejects_bad_inputs(detector_case):
    x, y, _, _ = detector_case["fit"]
    x_test, _ = detector_case["test"]
    with pytest.raises(ValueError, match="both"):
        detector_case["make"]().fit(x, np.zeros_like(y))
    with pytest.raises(ValueError, match="0 .*1"):
        detector_case["make"]().fit(x, y * 2)
    with pytest.raises(ValueError):
        detector_case["detector"].predict_proba(x_test[:, :-1])
    with pytest.raises(ValueError):
        detector_case["detector"].predict_proba(np.full_like(x_test, np.nan))


def test_sklearn_estimator_checks(detector_case):
    """The cheap parts of sklearn's own conformance suite that a binary-only detector can pass."""
    from sklearn.utils import estimator_checks as checks

    fresh = detector_case["make"]()
    name = type(fresh).__name__
    checks.check_no_attributes_set_in_init(name, fresh)
    checks.check_parameters_default_constructible(name, fresh)
    checks.check_get_params_invariance(name, fresh)
    checks.check_set_params(name, fresh)


# ---------------------------------------------------------------------------------------------
# MLP: early stopping and the internal holdout
# ---------------------------------------------------------------------------------------------


def test_early_stopping_keeps_best_epoch():
    x, y = make_data(1500, 8, seed=0)
    x_val, y_val = make_data(500, 8, seed=1)
    det = ConductanceDetector(hidden=(32, 32), max_epochs=12, patience=3, batch_size=128).fit(
        x, y, x_val, y_val
    )
    assert det.best_val_auroc_ == max(det.val_auroc_history_)
    assert det.val_auroc_history_[det.best_epoch_] == det.best_val_auroc_
    assert len(det.val_auroc_history_) == 12 or len(det.val_auroc_history_) == det.best_epoch_ + 1 + 3
    # the kept network is the best epoch's: its val AUROC, recomputed from scratch, is the best one
    logits = mlp_logits(det.network_, (x_val - det.mean_) / det.scale_, torch.device("cpu"))
    assert roc_auc_score(y_val, logits) == pytest.approx(det.best_val_auroc_, abs=1e-12)
    # standardisation uses the fit data's statistics, not the val data's
    np.testing.assert_allclose(det.mean_, x.mean(axis=0))
    np.testing.assert_allclose(det.scale_, x.std(axis=0))


def test_internal_holdout_without_val():
    x, y = make_data(1500, 4, seed=0)
    x_test, y_test = make_data(1000, 4, seed=2)
    det = UnifiedClassifier(kind="nn", max_epochs=30, val_fraction=0.2, seed=1).fit(x, y)
    # statistics come from the 80% that trained, so they differ from the full fit data's
    assert not np.allclose(det.mean_, x.mean(axis=0))
    assert roc_auc_score(y_test, det.decision_function(x_test)) > 0.8
    with pytest.raises(ValueError, match="both X_val and y_val"):
        UnifiedClassifier(kind="nn").fit(x, y, x[:10])


def test_unknown_kind():
    x, y = make_data(200, 3, seed=0)
    with pytest.raises(ConfigError, match="kind"):
        UnifiedClassifier(kind="svm").fit(x, y)


# ---------------------------------------------------------------------------------------------
# random forest arrays against sklearn itself
# ---------------------------------------------------------------------------------------------


def test_forest_arrays_match_sklearn():
    x, y = make_data(2000, 5, seed=4)
    x_test, _ = make_data(3000, 5, seed=5)
    forest = RandomForestClassifier(n_estimators=25, max_depth=8, class_weight="balanced", random_state=0)
    forest.fit(x, y)
    arrays = ForestArrays.from_sklearn(forest)
    # also probe the split points themselves, where `<=` against a float32 input decides the branch
    probes = np.repeat(x_test[:50], 5, axis=0)
    internal = arrays.children_left >= 0
    feats, thr = arrays.feature[internal][:250], arrays.threshold[internal][:250]
    probes[np.arange(len(feats)), feats] = thr
    for data in (x_test, probes):
        np.testing.assert_allclose(arrays.predict_proba(data), forest.predict_proba(data), rtol=0, atol=1e-12)
    leaves = arrays.leaves(x_test) - arrays.node_offsets[:-1, None]
    np.testing.assert_array_equal(leaves, forest.apply(x_test).T)


def test_unified_rf_matches_sklearn_forest():
    x, y = make_data(1000, 3, seed=0)
    x_test, _ = make_data(500, 3, seed=2)
    det = UnifiedClassifier(kind="rf", n_estimators=20, max_depth=6, seed=7).fit(x, y)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    ref = RandomForestClassifier(n_estimators=20, max_depth=6, class_weight="balanced", random_state=7)
    ref.fit((x - mean) / scale, y)
    np.testing.assert_allclose(
        det.predict_proba(x_test), ref.predict_proba((x_test - mean) / scale), atol=1e-12
    )
