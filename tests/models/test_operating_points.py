"""Each spec meets its own definition on val, checked by brute force over every threshold."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import binom

from models.errors import ConfigError
from models.operating_points import (
    OperatingPoint,
    Spec,
    choose_threshold,
    clopper_pearson_upper,
    parse_spec,
)


def make_val(kind: str, n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Continuous scores, or LCR-like scores k/20 with many ties."""
    rng = np.random.default_rng(seed)
    wrong = rng.random(n) < 0.15
    scores = rng.normal(size=n) + 1.5 * wrong
    if kind == "ties":
        scores = np.round(np.clip((scores + 2) / 5, 0, 1) * 20) / 20
    return scores, wrong


def brute_force(scores: np.ndarray, wrong: np.ndarray) -> dict[str, np.ndarray]:
    """Figures at every threshold that can matter: each distinct score and one below them all."""
    thresholds = np.concatenate([[scores.min() - 1.0], np.unique(scores)])
    rows = []
    for t in thresholds:
        accept = scores <= t
        rows.append(
            (
                (accept & ~wrong).sum() / (~wrong).sum(),
                (~accept & wrong).sum() / wrong.sum(),
                accept.mean(),
                accept.sum(),
                (accept & wrong).sum(),
            )
        )
    cr, wr, cov, n_acc, n_err = map(np.array, zip(*rows, strict=True))
    return {"t": thresholds, "cr": cr, "wr": wr, "cov": cov, "n_acc": n_acc, "n_err": n_err}


def assert_figures_hold(op: OperatingPoint, scores: np.ndarray, wrong: np.ndarray) -> None:
    """The recorded val figures are what op.reject does on val."""
    rejected = op.reject(scores)
    accepted = ~rejected
    assert op.correct_recall == pytest.approx((accepted & ~wrong).sum() / (~wrong).sum(), abs=1e-15)
    assert op.wrong_recall == pytest.approx((rejected & wrong).sum() / wrong.sum(), abs=1e-15)
    assert op.coverage == pytest.approx(accepted.mean(), abs=1e-15)
    if accepted.any():
        assert op.risk == pytest.approx((accepted & wrong).sum() / accepted.sum(), abs=1e-15)
    assert op.n_val == len(scores) and op.n_wrong_val == wrong.sum()


KINDS = ["continuous", "ties"]


@pytest.mark.parametrize("kind", KINDS)
def test_equal_recall_minimises_gap(kind):
    scores, wrong = make_val(kind)
    op = choose_threshold(scores, wrong, "equal-recall")
    assert_figures_hold(op, scores, wrong)
    bf = brute_force(scores, wrong)
    gaps = np.abs(bf["cr"] - bf["wr"])
    assert abs(op.correct_recall - op.wrong_recall) == pytest.approx(gaps.min(), abs=1e-15)
    # ties go to the highest threshold (most coverage)
    best = bf["t"][gaps <= gaps.min() + 1e-12]
    assert (scores <= op.threshold).sum() == (scores <= best.max()).sum()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target", [0.5, 0.9, 0.98, 1.0])
def test_correct_recall_is_strictest_meeting_target(kind, target):
    scores, wrong = make_val(kind)
    op = choose_threshold(scores, wrong, f"correct-recall={target}")
    assert_figures_hold(op, scores, wrong)
    assert op.correct_recall >= target
    bf = brute_force(scores, wrong)
    stricter = bf["t"] < op.threshold
    assert np.all(bf["cr"][stricter] < target)
    # so it rejects the most wrong predictions among thresholds meeting the target
    assert op.wrong_recall == bf["wr"][bf["cr"] >= target].max()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target", [0.5, 0.9, 0.995, 1.0])
def test_wrong_recall_is_most_permissive_meeting_target(kind, target):
    scores, wrong = make_val(kind)
    op = choose_threshold(scores, wrong, f"wrong-recall={target}")
    assert_figures_hold(op, scores, wrong)
    assert op.wrong_recall >= target
    bf = brute_force(scores, wrong)
    looser = bf["t"] > op.threshold
    assert np.all(bf["wr"][looser] < target)
    assert op.coverage == bf["cov"][bf["wr"] >= target].max()


def cp_upper_by_root(errors: int, n: int, confidence: float) -> float:
    """Clopper-Pearson upper bound from its definition: the rate u with P(Bin(n, u) <= errors) = 1 - c."""
    if errors >= n:
        return 1.0
    return brentq(lambda u: binom.cdf(errors, n, u) - (1.0 - confidence), 1e-15, 1 - 1e-15, xtol=1e-14)


def test_clopper_pearson_matches_definition():
    for errors, n in [(0, 1), (0, 50), (3, 50), (40, 400), (7, 7)]:
        bound = float(clopper_pearson_upper(errors, n, 0.95))
        assert bound == pytest.approx(cp_upper_by_root(errors, n, 0.95), abs=1e-9)
    # with no errors the one-sided bound is 1 - (1 - c)^(1/n)
    assert float(clopper_pearson_upper(0, 50, 0.9)) == pytest.approx(1 - 0.1 ** (1 / 50), abs=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spec", ["risk=0.05@0.95", "risk=0.1@0.9", "risk=0.02@0.8"])
def test_risk_maximises_coverage_under_bound(kind, spec):
    scores, wrong = make_val(kind, n=2000)
    target, confidence = (float(v) for v in spec.split("=")[1].split("@"))
    op = choose_threshold(scores, wrong, spec)
    assert_figures_hold(op, scores, wrong)
    bf = brute_force(scores, wrong)
    n_acc = int((scores <= op.threshold).sum())
    n_err = int(((scores <= op.threshold) & wrong).sum())
    assert op.risk_upper == pytest.approx(cp_upper_by_root(n_err, n_acc, confidence), abs=1e-9)
    assert op.risk_upper <= target
    feasible = [
        cov
        for cov, a, e in zip(bf["cov"], bf["n_acc"], bf["n_err"], strict=True)
        if a > 0 and cp_upper_by_root(int(e), int(a), confidence) <= target + 1e-9
    ]
    assert op.coverage == max(feasible)


def test_infeasible_risk_raises():
    scores, wrong = make_val("continuous", n=100)
    with pytest.raises(ConfigError, match="infeasible") as info:
        choose_threshold(scores, wrong, "risk=0.001@0.99")
    assert "upper bound" in str(info.value)


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "equal",
        "correct-recall",
        "correct-recall=",
        "correct-recall=1.5",
        "correct-recall=0",
        "wrong-recall=abc",
        "risk=0.02",
        "risk=0.02@1",
        "risk=1@0.9",
        "risk=0@0.9",
        "accuracy=0.9",
        "equal-recall=0.5",
    ],
)
def test_invalid_specs_raise_config_error(spec):
    with pytest.raises(ConfigError) as info:
        parse_spec(spec)
    assert "equal-recall" in str(info.value) and "risk=r@c" in str(info.value)
    scores, wrong = make_val("continuous", n=50)
    with pytest.raises(ConfigError):
        choose_threshold(scores, wrong, spec)


def test_parse_valid_specs():
    assert parse_spec("equal-recall") == Spec("equal-recall")
    assert parse_spec("correct-recall=0.98") == Spec("correct-recall", 0.98)
    assert parse_spec(" wrong-recall=1 ") == Spec("wrong-recall", 1.0)
    assert parse_spec("risk=2e-2@0.95") == Spec("risk", 0.02, 0.95)


def test_threshold_itself_is_accepted():
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    wrong = np.array([0, 0, 0, 1, 0, 1], dtype=bool)
    op = choose_threshold(scores, wrong, "equal-recall")
    assert not op.reject(np.array([op.threshold]))[0]
    assert op.reject(np.array([np.nextafter(op.threshold, np.inf)]))[0]


def test_needs_both_classes_and_finite_scores():
    with pytest.raises(ValueError, match="both"):
        choose_threshold(np.arange(5.0), np.zeros(5), "equal-recall")
    with pytest.raises(ValueError, match="finite"):
        choose_threshold(np.array([0.0, np.nan]), np.array([0, 1]), "equal-recall")


def test_dict_round_trip_through_json():
    scores, wrong = make_val("ties")
    for spec in ("equal-recall", "risk=0.1@0.9"):
        op = choose_threshold(scores, wrong, spec)
        again = OperatingPoint.from_dict(json.loads(json.dumps(op.to_dict(), allow_nan=False)))
        assert again == op
    with pytest.raises(ConfigError):
        OperatingPoint.from_dict({"name": "x"})
