"""Early-stopping LCR: the offline replay equals the live run, the rules stop where hand-computed.

References: :func:`models.lcr.predict_naive` labels (one model copy per mutant) and
:func:`models.lcr.label_change_rate` for the full LCR; SPRT stopping points worked out by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from models.errors import ConfigError
from models.lcr import MutantEnsemble, label_change_rate, predict_naive
from models.mutation import plan_mutant
from models.sequential_lcr import (
    SPRT,
    Curtailed,
    SequentialLCR,
    chunk_ensembles,
    rule_from_dict,
    rule_to_dict,
    sequential_lcr,
    simulate_sequential,
)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 12, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(12 * 6 * 6, 4)  # no pooling: a random net then still varies its predictions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Module, list, torch.Tensor]:
    torch.manual_seed(0)
    model = TinyNet().eval()
    # A high rate (2 of 20 filters) so that LCR spreads over [0, 1] across images.
    specs = [plan_mutant(model, "NAI", 0.1, seed) for seed in range(23)]
    x = torch.randn(40, 1, 6, 6)
    return model, specs, x


RULES = [SPRT(0.1, 0.4, 0.1, 0.1), SPRT(0.05, 0.3, 0.01, 0.2), Curtailed(0.3)]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("chunk_size,min_mutants", [(5, 0), (4, 9), (1, 0)])
def test_simulate_equals_live(setup, rule, chunk_size: int, min_mutants: int) -> None:
    model, specs, x = setup
    pred = model(x).argmax(1)
    labels = predict_naive(model, specs, x)
    lcr_sim, used_sim = simulate_sequential(labels.numpy(), pred.numpy(), rule, chunk_size, min_mutants)
    chunks = chunk_ensembles(model, specs, chunk_size, factory=MutantEnsemble)
    lcr_live, used_live = sequential_lcr(chunks, x, pred, rule, min_mutants)
    np.testing.assert_array_equal(used_live.numpy(), used_sim)
    np.testing.assert_allclose(lcr_live.numpy(), lcr_sim, rtol=1e-6)
    # The live LCR is the changed share among each image's own first mutants_used mutants.
    changed = (labels != pred.view(1, -1)).numpy()
    expected = [changed[:u, i].mean() for i, u in enumerate(used_sim)]
    np.testing.assert_allclose(lcr_sim, expected)
    assert len(set(used_sim.tolist())) > 1, "the test should make images stop at different points"


def test_never_stopping_equals_full_lcr(setup) -> None:
    model, specs, x = setup
    pred = model(x).argmax(1)
    labels = predict_naive(model, specs, x)
    full = label_change_rate(labels, pred).numpy()
    never = SPRT(0.1, 0.4, alpha=0.0, beta=0.0)
    lcr, used = simulate_sequential(labels.numpy(), pred.numpy(), never, chunk_size=5)
    np.testing.assert_allclose(lcr, full, rtol=1e-6)
    assert (used == len(specs)).all()
    live, live_used = SequentialLCR(model, specs, never, chunk_size=7, factory=MutantEnsemble)(x, pred)
    np.testing.assert_allclose(live.numpy(), full, rtol=1e-6)
    assert (live_used.numpy() == len(specs)).all()
    # Curtailed at 0 is settled at once (every LCR >= 0): one chunk each.
    _, used0 = simulate_sequential(labels.numpy(), pred.numpy(), Curtailed(0.0), chunk_size=5)
    assert (used0 == 5).all()


@pytest.mark.parametrize("rule", RULES)
def test_mutants_used_bounds(rule) -> None:
    rng = np.random.default_rng(1)
    total, n, chunk = 37, 300, 6
    pred = rng.integers(0, 3, n)
    labels = np.where(rng.random((total, n)) < rng.random(n), rng.integers(0, 3, (total, n)), pred)
    for min_mutants in (0, 13):
        _, used = simulate_sequential(labels, pred, rule, chunk, min_mutants)
        assert used.min() >= max(chunk, min_mutants) and used.max() <= total
        assert np.isin(used, [*range(chunk, total, chunk), total]).all()  # only at chunk boundaries


def test_sprt_stops_where_hand_computed() -> None:
    rule = SPRT(0.05, 0.3, 0.05, 0.05)
    lower, upper = rule.bounds
    assert lower == pytest.approx(math.log(0.05 / 0.95)) and upper == pytest.approx(math.log(0.95 / 0.05))
    # No change: LLR = n log(0.7/0.95) <= log(1/19) first at n = 10 (9.64 rounded up).
    # All changed: LLR = n log(6) >= log(19) first at n = 2.
    pred = np.zeros(3, dtype=np.int64)
    labels = np.zeros((40, 3), dtype=np.int64)
    labels[:, 1] = 1
    labels[:, 2] = np.tile([1, 0, 0, 0, 0, 0, 0, 0], 5)  # one in 8: the LLR drifts, never settles
    lcr, used = simulate_sequential(labels, pred, rule, chunk_size=1)
    assert used[0] == 10 and lcr[0] == 0.0
    assert used[1] == 2 and lcr[1] == 1.0
    assert used[2] > 10
    _, used5 = simulate_sequential(labels, pred, rule, chunk_size=5)
    assert used5[0] == 10 and used5[1] == 5


def test_curtailed_keeps_the_thresholded_decision() -> None:
    rng = np.random.default_rng(2)
    total, n = 50, 500
    pred = np.zeros(n, dtype=np.int64)
    labels = (rng.random((total, n)) < rng.random(n)).astype(np.int64)
    full = labels.mean(0)
    for threshold in (0.1, 0.35, 0.8):
        lcr, used = simulate_sequential(labels, pred, Curtailed(threshold), chunk_size=5)
        # A stopped image is "high" iff its changes so far already reach the full-ensemble count.
        changed = np.rint(lcr * used)
        np.testing.assert_array_equal(changed >= threshold * total, full >= threshold)
        assert used.mean() < total


def test_live_evaluates_only_undecided_images(setup) -> None:
    model, specs, x = setup
    pred = model(x).argmax(1)
    seen: list[int] = []

    class Counting:
        def __init__(self, inner) -> None:
            self.inner = inner

        def __len__(self) -> int:
            return len(self.inner)

        def predict(self, images: torch.Tensor) -> torch.Tensor:
            seen.append(len(images))
            return self.inner.predict(images)

    chunks = [Counting(c) for c in chunk_ensembles(model, specs, 5, factory=MutantEnsemble)]
    _, used = sequential_lcr(chunks, x, pred, RULES[0])
    expected = [int((used.numpy() > k).sum()) for k in range(0, len(specs), 5)]
    assert seen == [e for e in expected if e > 0]
    assert seen[0] == len(x) and seen[-1] < len(x)


def test_rule_round_trip_and_validation() -> None:
    for rule in RULES:
        assert rule_from_dict(rule_to_dict(rule)) == rule
    with pytest.raises(ConfigError):
        SPRT(0.3, 0.1)
    with pytest.raises(ConfigError):
        SPRT(0.1, 0.3, alpha=0.6, beta=0.6)
    with pytest.raises(ConfigError):
        Curtailed(1.5)
    with pytest.raises(ConfigError):
        rule_from_dict({"rule": "bayes"})
    with pytest.raises(ConfigError):
        simulate_sequential(np.zeros((3, 2)), np.zeros(2), RULES[0], chunk_size=0)
