"""The softmax baseline scores of :mod:`models.scores` against naive softmax, and their numerical
stability for confident and huge logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import softmax

from models.scores import BASELINE_SCORES, doctor, entropy, margin, msp_score


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
