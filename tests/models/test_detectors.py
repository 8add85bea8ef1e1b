"""One conformance suite for every detector, plus the pieces behind them (forest arrays, LDA/QDA
state, early stopping) and the softmax baseline scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save
from scipy.special import softmax
from sklearn.base import clone
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis, QuadraticDiscriminantAnalysis
from sklearn.ensemble import RandomForestClassifier
from sklearn.exceptions import NotFittedError as SklearnNotFittedError
from sklearn.metrics import roc_auc_score

from models.detectors import (
    ConductanceDetector,
    ForestArrays,
    UnifiedClassifier,
    discriminant_from_state,
    discriminant_to_state,
    load_state,
    mlp_logits,
    save_state,
)
from models.errors import BundleError, ConfigError, NotFittedError
from models.scores import BASELINE_SCORES, doctor, entropy, margin, msp_score

torch.set_num_threads(1)


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
def case(request):
    """(name, make, data, one fitted detector): fitted once per detector for the whole file."""
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


def test_fit_returns_self(case):
    assert case["returned"] is case["detector"]


def test_not_fitted_before_fit(case):
    x_test, _ = case["test"]
    fresh = case["make"]()
    for method in (fresh.predict_proba, fresh.decision_function, fresh.predict):
        with pytest.raises(NotFittedError) as info:
            method(x_test)
        assert isinstance(info.value, SklearnNotFittedError)
    with pytest.raises(NotFittedError):
        fresh.to_state()


def test_init_only_stores_params(case):
    fresh = case["make"]()
    assert not [k for k in vars(fresh) if k.endswith("_")]
    assert clone(fresh).get_params() == fresh.get_params()


def test_probabilities(case):
    x_test, _ = case["test"]
    proba = case["detector"].predict_proba(x_test)
    assert proba.shape == (len(x_test), 2)
    assert np.all((proba >= 0) & (proba <= 1))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(case["detector"].decision_function(x_test), proba[:, 1])
    np.testing.assert_array_equal(case["detector"].predict(x_test), (proba[:, 1] >= 0.5).astype(int))
    np.testing.assert_array_equal(case["detector"].classes_, [0, 1])


def test_learns_held_out(case):
    x_test, y_test = case["test"]
    assert roc_auc_score(y_test, case["detector"].decision_function(x_test)) > 0.8


def test_deterministic_with_seed(case):
    x, y, x_val, y_val = case["fit"]
    x_test, _ = case["test"]
    again = case["make"]().fit(x, y, x_val, y_val)
    np.testing.assert_array_equal(again.decision_function(x_test), case["detector"].decision_function(x_test))


def test_state_round_trip(case):
    """Through JSON and a safetensors file, as a bundle would store it: identical scores."""
    x_test, _ = case["test"]
    config, arrays = save_state(case["detector"])
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    config = json.loads(json.dumps(config, allow_nan=False))
    arrays = st_load(st_save({k: np.ascontiguousarray(v) for k, v in arrays.items()}))
    loaded = load_state(config, arrays)
    assert type(loaded) is type(case["detector"])
    assert loaded.get_params() == case["detector"].get_params()
    np.testing.assert_array_equal(loaded.predict_proba(x_test), case["detector"].predict_proba(x_test))


def test_rejects_bad_inputs(case):
    x, y, _, _ = case["fit"]
    x_test, _ = case["test"]
    with pytest.raises(ValueError, match="both"):
        case["make"]().fit(x, np.zeros_like(y))
    with pytest.raises(ValueError, match="0 .*1"):
        case["make"]().fit(x, y * 2)
    with pytest.raises(ValueError):
        case["detector"].predict_proba(x_test[:, :-1])
    with pytest.raises(ValueError):
        case["detector"].predict_proba(np.full_like(x_test, np.nan))


def test_sklearn_estimator_checks(case):
    """The cheap parts of sklearn's own conformance suite that a binary-only detector can pass."""
    from sklearn.utils import estimator_checks as checks

    fresh = case["make"]()
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


def test_unknown_kind_and_type():
    x, y = make_data(200, 3, seed=0)
    with pytest.raises(ConfigError, match="kind"):
        UnifiedClassifier(kind="svm").fit(x, y)
    with pytest.raises(BundleError, match="unknown detector type"):
        load_state({"type": "Pickle"}, {})
    config, arrays = UnifiedClassifier(kind="lda").fit(x, y).to_state()
    with pytest.raises(BundleError):
        ConductanceDetector.from_state(config, arrays)
    del arrays["estimator.coef_"]
    with pytest.raises(BundleError, match="coef_"):
        load_state(config, arrays)


# ---------------------------------------------------------------------------------------------
# random forest arrays and LDA/QDA state against sklearn itself
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


# ---------------------------------------------------------------------------------------------
# softmax baseline scores
# ---------------------------------------------------------------------------------------------


def test_baseline_scores_match_naive_softmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(200, 10))
    p = softmax(logits, axis=1)
    top2 = np.sort(logits, axis=1)[:, -2:]
    expected = {
        "msp": 1.0 - p.max(axis=1),
        "entropy": -(p * np.log(p)).sum(axis=1),
        "margin": top2[:, 0] - top2[:, 1],
        "doctor": 1.0 - (p**2).sum(axis=1),
    }
    assert set(BASELINE_SCORES) == set(expected)
    for name, fn in BASELINE_SCORES.items():
        np.testing.assert_allclose(fn(logits), expected[name], rtol=1e-10, atol=1e-12, err_msg=name)
        as_torch = fn(torch.from_numpy(logits).float())
        assert isinstance(as_torch, torch.Tensor) and as_torch.dtype == torch.float32
        np.testing.assert_allclose(as_torch.numpy(), expected[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_baseline_scores_stable_for_confident_and_huge_logits():
    # two classes, gap 40: 1 - p_max = sigmoid(-40), far below float64 epsilon
    logits = np.array([[0.0, -40.0], [1e4, -1e4], [-1e4, 1e4 - 1.0]])
    tail = 1.0 / (1.0 + np.exp(40.0))
    np.testing.assert_allclose(msp_score(logits)[0], tail, rtol=1e-12)
    # 1 - (p1^2 + p2^2) = 2 p1 p2 for two classes
    np.testing.assert_allclose(doctor(logits)[0], 2 * tail * (1 - tail), rtol=1e-12)
    log_tail = -40.0 - np.log1p(np.exp(-40.0))
    np.testing.assert_allclose(
        entropy(logits)[0], -tail * log_tail - (1 - tail) * np.log1p(-tail), rtol=1e-12
    )
    for fn in (msp_score, entropy, margin, doctor):
        assert np.all(np.isfinite(fn(logits)))
    assert entropy(logits)[1] == 0.0
    np.testing.assert_array_equal(margin(logits), [-40.0, -2e4, -(2e4 - 1.0)])
    with pytest.raises(ValueError):
        msp_score(np.zeros((3, 1)))
