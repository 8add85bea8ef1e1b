"""Metrics against sklearn and against slow, literal implementations of their definitions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from models.metrics import (
    _weighted_auroc,
    accept_lowest,
    accuracy_with_fallback,
    aupr_error,
    aurc,
    auroc,
    bootstrap_indices,
    fpr_at_wrong_recall,
    paired_bootstrap_auroc,
    paired_selective_accuracy,
    recalls_at_threshold,
    risk_coverage_curve,
    summarise,
)
from models.operating_points import choose_threshold


def make_scores(n: int = 400, seed: int = 0, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    wrong = rng.random(n) < 0.2
    scores = rng.normal(size=n) + 1.2 * wrong
    return (np.round(scores, 1) if ties else scores), wrong


def naive_auroc(scores: np.ndarray, wrong: np.ndarray) -> float:
    """Mann-Whitney: share of (wrong, correct) pairs ranked right, ties one half."""
    pos, neg = scores[wrong], scores[~wrong]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def naive_average_precision(scores: np.ndarray, wrong: np.ndarray) -> float:
    """sum over distinct thresholds (high to low) of (recall step) x precision, rejecting s >= t."""
    total, prev_recall = 0.0, 0.0
    for t in np.unique(scores)[::-1]:
        rejected = scores >= t
        recall = (rejected & wrong).sum() / wrong.sum()
        precision = (rejected & wrong).sum() / rejected.sum()
        total += (recall - prev_recall) * precision
        prev_recall = recall
    return total


def naive_risks(scores_in_order: np.ndarray, wrong_in_order: np.ndarray) -> np.ndarray:
    """The literal loop: accept the first k, count their errors."""
    return np.array([wrong_in_order[:k].sum() / k for k in range(1, len(wrong_in_order) + 1)])


@pytest.mark.parametrize("ties", [False, True])
def test_auroc_and_aupr(ties):
    scores, wrong = make_scores(ties=ties)
    assert auroc(scores, wrong) == pytest.approx(roc_auc_score(wrong, scores), abs=1e-15)
    assert auroc(scores, wrong) == pytest.approx(naive_auroc(scores, wrong), abs=1e-12)
    assert aupr_error(scores, wrong) == pytest.approx(naive_average_precision(scores, wrong), abs=1e-12)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("recall", [0.95, 0.5, 1.0])
def test_fpr_at_wrong_recall_brute_force(ties, recall):
    scores, wrong = make_scores(ties=ties)
    best = 1.0
    for t in np.unique(scores):  # reject s >= t, i.e. every achievable verdict but "accept all"
        rejected = scores >= t
        if (rejected & wrong).sum() / wrong.sum() >= recall:
            best = min(best, (rejected & ~wrong).sum() / (~wrong).sum())
    assert fpr_at_wrong_recall(scores, wrong, recall) == pytest.approx(best, abs=1e-15)


def test_risk_coverage_matches_naive_loop_without_ties():
    scores, wrong = make_scores()
    coverage, risk = risk_coverage_curve(scores, wrong)
    order = np.argsort(scores)
    expected = naive_risks(scores[order], wrong[order])
    np.testing.assert_allclose(risk, expected, rtol=0, atol=1e-15)
    np.testing.assert_allclose(coverage, np.arange(1, len(scores) + 1) / len(scores))
    assert aurc(scores, wrong) == pytest.approx(expected.mean(), abs=1e-15)


def test_risk_coverage_with_ties_is_mean_over_tie_orders():
    """Tied inputs have no order; the curve is the average of the naive loop over all orders."""
    scores = np.array([0.9, 0.1, 0.5, 0.1, 0.5, 0.1, 0.3, 0.5])
    wrong = np.array([1, 0, 1, 1, 0, 0, 0, 1], dtype=bool)
    by_score = np.argsort(scores, kind="stable")
    groups = [list(by_score[scores[by_score] == v]) for v in np.unique(scores)]
    curves = [
        naive_risks(scores[list(itertools.chain(*order))], wrong[list(itertools.chain(*order))])
        for order in itertools.product(*(itertools.permutations(g) for g in groups))
    ]
    _, risk = risk_coverage_curve(scores, wrong)
    np.testing.assert_allclose(risk, np.mean(curves, axis=0), atol=1e-15)
    # and the input order does not matter
    perm = np.random.default_rng(0).permutation(len(scores))
    np.testing.assert_allclose(risk_coverage_curve(scores[perm], wrong[perm])[1], risk, atol=1e-15)


def test_recalls_follow_the_verdict_rule():
    scores, wrong = make_scores(ties=True)
    op = choose_threshold(scores, wrong, "correct-recall=0.9")
    figures = recalls_at_threshold(scores, wrong, op.threshold)
    assert figures["correct_recall"] == op.correct_recall
    assert figures["wrong_recall"] == op.wrong_recall
    assert figures["coverage"] == op.coverage
    assert figures["risk"] == pytest.approx(op.risk, abs=1e-15)
    # a score equal to the threshold is accepted
    assert recalls_at_threshold(np.array([0.5, 0.5]), np.array([0, 1]), 0.5)["coverage"] == 1.0


def test_accuracy_with_fallback():
    wrong = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1], dtype=bool)
    rejected = np.array([1, 0, 0, 0, 0, 0, 0, 0, 1, 0], dtype=bool)
    out = accuracy_with_fallback(wrong, rejected)
    assert out == {
        "accuracy": 0.8,
        "accuracy_with_fallback": 0.9,
        "coverage": 0.8,
        "accepted_accuracy": 7 / 8,
    }
    scores, wrong = make_scores()
    rejected = scores > 0.5
    out = accuracy_with_fallback(wrong, rejected)
    assert out["accuracy_with_fallback"] == pytest.approx(1 - (wrong & ~rejected).sum() / len(wrong))
    assert out["accuracy_with_fallback"] >= out["accuracy"]


def test_weighted_auroc_equals_sklearn_on_materialised_resamples():
    scores, wrong = make_scores(ties=True)
    idx = next(bootstrap_indices(len(scores), 5, seed=3))
    counts = np.stack([np.bincount(row, minlength=len(scores)) for row in idx]).astype(float)
    expected = [roc_auc_score(wrong[row], scores[row]) for row in idx]
    np.testing.assert_allclose(_weighted_auroc(scores, wrong, counts), expected, atol=1e-12)


def test_paired_bootstrap():
    scores_a, wrong = make_scores(n=2000, seed=1)
    rng = np.random.default_rng(5)
    scores_b = scores_a + rng.normal(scale=0.8, size=len(scores_a))
    out = paired_bootstrap_auroc(scores_a, scores_b, wrong, n_boot=300, seed=11)
    assert out["auroc_a"] == pytest.approx(roc_auc_score(wrong, scores_a), abs=1e-15)
    assert out["auroc_b"] == pytest.approx(roc_auc_score(wrong, scores_b), abs=1e-15)
    assert out["diff"] == out["auroc_a"] - out["auroc_b"]
    for key, point in (("ci_a", "auroc_a"), ("ci_b", "auroc_b"), ("ci_diff", "diff")):
        low, high = out[key]
        assert low < out[point] < high
    assert out["ci_diff"][0] > 0  # noise only hurts: b is a blurred a
    assert out["n_valid"] == 300
    assert paired_bootstrap_auroc(scores_a, scores_b, wrong, n_boot=300, seed=11) == out
    assert paired_bootstrap_auroc(scores_a, scores_b, wrong, n_boot=300, seed=12)["ci_a"] != out["ci_a"]
    same = paired_bootstrap_auroc(scores_a, scores_a, wrong, n_boot=300, seed=11)
    assert same["diff"] == 0.0 and same["ci_diff"] == (0.0, 0.0)


def test_paired_bootstrap_ci_width_is_honest():
    """Over independent val sets, the 90% CI of one fixed score covers the true AUROC about 90% of the
    time."""
    rng = np.random.default_rng(0)
    # binormal model: AUROC = Phi(d / sqrt(2))
    from scipy.stats import norm

    true_auc = norm.cdf(1.0 / np.sqrt(2))
    hits = 0
    for trial in range(40):
        wrong = rng.random(500) < 0.3
        scores = rng.normal(size=500) + wrong
        low, high = paired_bootstrap_auroc(scores, scores, wrong, n_boot=200, seed=trial, confidence=0.9)[
            "ci_a"
        ]
        hits += low <= true_auc <= high
    assert 28 <= hits <= 40


def test_summarise_and_input_checks():
    scores, wrong = make_scores()
    out = summarise(scores, wrong, threshold=0.0)
    assert out["auroc"] == auroc(scores, wrong) and out["aurc"] == aurc(scores, wrong)
    assert out["coverage"] == (scores <= 0.0).mean()
    with pytest.raises(ValueError):
        auroc(scores[:-1], wrong)
    with pytest.raises(ValueError):
        aurc(np.array([0.1, np.nan]), np.array([0, 1]))
    with pytest.raises(ValueError):
        aurc(np.array([0.1, 0.2]), np.array([0, 2]))


def test_accept_lowest_takes_the_n_most_confident_with_stable_ties():
    scores = np.array([0.3, 0.1, 0.3, 0.2, 0.3])
    assert accept_lowest(scores, 3).tolist() == [True, True, False, True, False]
    assert accept_lowest(scores, 0).sum() == 0 and accept_lowest(scores, 5).all()
    with pytest.raises(ValueError):
        accept_lowest(scores, 6)


def test_paired_selective_accuracy_equals_materialised_resamples():
    """Each replicate's difference equals the one computed on the resampled arrays themselves."""
    scores_a, wrong = make_scores(300, seed=4)
    scores_b = scores_a + np.random.default_rng(5).normal(scale=1.5, size=scores_a.size)
    acc_a, acc_b = accept_lowest(scores_a, 200), accept_lowest(scores_b, 200)
    out = paired_selective_accuracy(acc_a, acc_b, wrong, n_boot=200, seed=9)
    assert out["accuracy_a"] == pytest.approx(1 - wrong[acc_a].mean())
    assert out["accuracy_b"] == pytest.approx(1 - wrong[acc_b].mean())
    naive = []
    for idx in bootstrap_indices(wrong.size, 200, 9):
        for row in idx:
            w, a, b = wrong[row], acc_a[row], acc_b[row]
            naive.append((1 - w[a].mean()) - (1 - w[b].mean()))
    assert out["ci_diff"] == pytest.approx(list(np.percentile(naive, [2.5, 97.5])))
    # a score that ranks errors better accepts fewer of them at equal coverage: its CI lies above 0
    assert out["diff"] > 0 and out["ci_diff"][0] > 0
