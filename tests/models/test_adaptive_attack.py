"""The differentiable gate equals the real one; the adaptive PGD keeps its budget and hides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.adaptive_attack import (
    DIFFERENTIABLE_SIGNALS,
    AdaptiveSpec,
    DifferentiableGate,
    adaptive_pgd,
    redraw_mutants,
)
from models.attacks import to_pixels
from models.bundle import load_bundle
from models.data import load_splits
from models.errors import ConfigError
from models.gate import load_gate, load_mutants


@pytest.fixture(scope="module")
def loaded(tiny_bundle: Path):  # type: ignore[no-untyped-def]
    bundle = load_bundle(tiny_bundle)
    gate = load_gate(bundle)
    specs = load_mutants(bundle, gate.extractor.model).specs
    test = load_splits(bundle)["test"]
    return bundle, gate, specs, to_pixels(test.images[:48]), torch.as_tensor(test.labels[:48])


def _normalised(bundle, pixels: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    norm = bundle.normalisation
    mean = torch.tensor(norm.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(norm.std, dtype=torch.float32).view(1, -1, 1, 1)
    return (pixels - mean) / std


def test_differentiable_gate_scores_as_the_real_gate(loaded) -> None:  # type: ignore[no-untyped-def]
    bundle, gate, specs, pixels, _ = loaded
    checked, kinds = 0, set()
    for name, chosen in gate.signal_sets.items():
        if any(s not in DIFFERENTIABLE_SIGNALS for s in chosen.signals) or chosen.classifier.kind == "rf":
            continue
        kinds.add(chosen.classifier.kind)
        dgate = DifferentiableGate(gate, bundle.normalisation, name, specs)
        terms = dgate(pixels, hard_lcr=True)
        out = gate.run(_normalised(bundle, pixels), signal_set=name)
        np.testing.assert_allclose(terms.unified.detach().numpy(), out.unified_score, atol=1e-5, err_msg=name)
        np.testing.assert_array_equal(terms.logits.argmax(1).numpy(), out.prediction)
        if "lcr" in chosen.signals:
            np.testing.assert_allclose(terms.columns["lcr"].numpy(), out.lcr, atol=1e-6)
        checked += 1
    assert checked >= 5  # msp, cond, lcr, cond+lcr, all, ... of the tiny bundle
    assert len(kinds) >= 2, kinds  # more than one kind of unified classifier was checked


def test_the_surrogate_lcr_has_a_gradient_and_tracks_the_true_rate(loaded) -> None:  # type: ignore[no-untyped-def]
    bundle, gate, specs, pixels, _ = loaded
    dgate = DifferentiableGate(gate, bundle.normalisation, "cond+lcr", specs)
    x = pixels.clone().requires_grad_(True)
    terms = dgate(x)
    (grad,) = torch.autograd.grad(terms.unified.sum(), x)
    assert float(grad.abs().sum()) > 0
    hard = dgate(pixels, hard_lcr=True).columns["lcr"].numpy()
    soft = terms.columns["lcr"].detach().numpy()
    assert np.all((soft >= 0) & (soft <= 1))
    assert np.corrcoef(hard, soft)[0, 1] > 0.5


def test_adaptive_pgd_keeps_the_budget_and_hides_from_the_gate(loaded) -> None:  # type: ignore[no-untyped-def]
    bundle, gate, specs, pixels, labels = loaded
    pixels, labels = pixels[:32], labels[:32]
    dgate = DifferentiableGate(gate, bundle.normalisation, "cond+lcr", specs[:2])
    plain = adaptive_pgd(dgate, pixels, labels, AdaptiveSpec(eps=0.15, steps=6, lam=0.0), seed=1)
    hiding = adaptive_pgd(dgate, pixels, labels, AdaptiveSpec(eps=0.15, steps=6, lam=5.0), seed=1)
    for adv in (plain, hiding):
        assert float((adv - pixels).abs().max()) <= 0.15 + 1e-6
        assert float(adv.min()) >= 0 and float(adv.max()) <= 1
    threshold = dgate.set.point(None).threshold

    def accepted_wrong(adv: torch.Tensor) -> int:
        with torch.no_grad():
            terms = dgate(adv)
        return int(((terms.logits.argmax(1) != labels) & (terms.unified <= threshold)).sum())

    assert accepted_wrong(hiding) > accepted_wrong(plain)


def test_unsupported_sets_and_missing_mutants_are_refused(loaded) -> None:  # type: ignore[no-untyped-def]
    bundle, gate, specs, _, _ = loaded
    with pytest.raises(ConfigError, match="give the attacker mutants"):
        DifferentiableGate(gate, bundle.normalisation, "cond+lcr", ())
    with pytest.raises(ConfigError, match="unknown signal set"):
        DifferentiableGate(gate, bundle.normalisation, "nope", specs)


def test_redrawn_mutants_are_new_and_of_the_bundles_kind(loaded) -> None:  # type: ignore[no-untyped-def]
    _, gate, specs, _, _ = loaded
    drawn = redraw_mutants(gate.extractor.model, specs, 5, seed=100)
    assert len(drawn) == 5
    assert not {d.seed for d in drawn} & {s.seed for s in specs}
    assert {(d.operator, d.rate) for d in drawn} == {(specs[0].operator, specs[0].rate)}
