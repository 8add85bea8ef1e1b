"""The open-world evidence checked against pytorch-ood, sklearn and naive implementations."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

from models.architectures import ResNet20
from models.errors import ConfigError, NotFittedError
from models.feature_scores import ClassMahalanobis, DeepKNN, PenultimateProbe
from models.fitted_scores import PNormSoftmax, RelativeUncertainty, pnorm_softmax_score
from models.input_perturbation import PerturbedDoctor, choose_perturbation
from models.scores import doctor, energy, max_logit, msp_score

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import pytorch_ood.detector as ood


def _features(n: int = 400, d: int = 8, k: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    centres = rng.normal(0, 3, (k, d))
    a = rng.normal(0, 1, (d, d))
    return centres[y] + rng.normal(0, 1, (n, d)) @ a, y


def test_maxlogit_and_energy_match_pytorch_ood() -> None:
    logits = torch.randn(50, 10) * 4
    assert torch.allclose(max_logit(logits), ood.MaxLogit.score(logits))
    assert torch.allclose(energy(logits), ood.EnergyBased.score(logits, t=1.0))
    assert torch.allclose(energy(logits, 2.0), ood.EnergyBased.score(logits, t=2.0))
    assert np.allclose(max_logit(logits.numpy()), -logits.numpy().max(1))
    with pytest.raises(ValueError):
        energy(logits, 0.0)


def test_mahalanobis_matches_pytorch_ood_up_to_its_unnormalised_covariance() -> None:
    x, y = _features()
    ours = ClassMahalanobis(ridge=0.0).fit(x, y)
    theirs = ood.Mahalanobis(None).fit_features(torch.from_numpy(x).float(), torch.from_numpy(y))
    q, _ = _features(60, seed=1)
    expected = theirs.predict_features(torch.from_numpy(q).float()).double().numpy()
    # pytorch-ood's covariance is the sum of outer products (N times ours) and its score half the
    # squared distance: 1 / (2N) of ours
    assert np.allclose(ours.decision_function(q) / (2 * len(x)), expected, rtol=2e-3)


def test_mahalanobis_naive_loop_and_state_round_trip() -> None:
    x, y = _features()
    det = ClassMahalanobis().fit(x, y)
    q, _ = _features(5, seed=2)
    cov = sum(
        np.outer(r - x[y == c].mean(0), r - x[y == c].mean(0)) for r, c in zip(x, y, strict=True)
    ) / len(x)
    cov += np.eye(len(cov)) * det.ridge * np.trace(cov) / len(cov)
    inv = np.linalg.inv(cov)
    naive = [min((r - x[y == c].mean(0)) @ inv @ (r - x[y == c].mean(0)) for c in range(4)) for r in q]
    assert np.allclose(det.decision_function(q), naive, rtol=1e-8)
    again = ClassMahalanobis.from_state(*det.to_state())
    assert np.array_equal(again.decision_function(q), det.decision_function(q))
    with pytest.raises(NotFittedError):
        ClassMahalanobis().decision_function(q)
    with pytest.raises(ConfigError):
        det.decision_function(q[:, :3])


def test_knn_matches_sklearn_and_pytorch_ood() -> None:
    x, y = _features(300)
    q, _ = _features(40, seed=3)
    det = DeepKNN(k=5).fit(x)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    nn_ = NearestNeighbors(n_neighbors=5).fit(unit)
    expected = nn_.kneighbors(q / np.linalg.norm(q, axis=1, keepdims=True))[0][:, -1]
    assert np.allclose(det.decision_function(q), expected, atol=1e-5)
    theirs = ood.KNN(None, k=5).fit_features(torch.from_numpy(x).float(), torch.from_numpy(y))
    assert np.allclose(
        det.decision_function(q), theirs.predict_features(torch.from_numpy(q).float()), atol=1e-5
    )
    again = DeepKNN.from_state(*det.to_state())
    assert np.array_equal(again.decision_function(q), det.decision_function(q))
    small = DeepKNN(k=2, bank_size=50).fit(x)
    assert small.bank_.shape == (50, x.shape[1])
    with pytest.raises(ConfigError):
        DeepKNN(k=400).fit(x)


def test_knn_and_mahalanobis_rank_far_inputs_above_near_ones() -> None:
    # classes as tight clusters (as a trained CNN's features are); unknown inputs point elsewhere
    rng = np.random.default_rng(4)
    centres = rng.normal(0, 5, (4, 8))
    y = rng.integers(0, 4, 600)
    x = centres[y] + rng.normal(0, 0.5, (600, 8))
    near, far = x[500:], rng.normal(0, 5, (100, 8))
    x, y = x[:500], y[:500]
    label = np.r_[np.zeros(100), np.ones(100)]
    for det in (ClassMahalanobis().fit(x, y), DeepKNN(k=5).fit(x)):
        assert roc_auc_score(label, det.decision_function(np.vstack([near, far]))) > 0.95


def test_penultimate_probe_gives_the_head_input() -> None:
    torch.manual_seed(0)
    model = ResNet20(num_classes=10, in_channels=1).eval()
    probe = PenultimateProbe(model)
    x = torch.randn(3, 1, 28, 28)
    logits, feats = probe(x)
    with torch.no_grad():
        assert torch.allclose(logits, model(x))
        assert torch.allclose(model.fc(feats), logits, atol=1e-6)
    assert feats.shape == (3, 64)
    probe.close()
    assert not model.fc._forward_hooks


def test_pnorm_softmax_none_is_msp_and_fit_never_worse_than_msp() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (500, 10))
    assert np.allclose(pnorm_softmax_score(logits, None, 1.0), msp_score(logits))
    wrong = (rng.random(500) < 1 / (1 + np.exp(logits.max(1) - 5))).astype(int)
    det = PNormSoftmax().fit(logits, wrong)
    assert det.fit_auroc_ >= roc_auc_score(wrong, msp_score(logits)) - 1e-12
    centred = logits - logits.mean(1, keepdims=True)
    p, tau = 2.0, 0.5
    scaled = centred / (tau * np.linalg.norm(centred, ord=p, axis=1, keepdims=True))
    soft = np.exp(scaled) / np.exp(scaled).sum(1, keepdims=True)
    assert np.allclose(pnorm_softmax_score(logits, p, tau), 1 - soft.max(1))
    again = PNormSoftmax.from_state(*det.to_state())
    assert np.array_equal(again.decision_function(logits), det.decision_function(logits))


def test_relative_uncertainty_matches_the_reference_closed_form() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (600, 5))
    wrong = (rng.random(600) < 0.3).astype(int)
    det = RelativeUncertainty().fit(logits, wrong)
    t, lam = det.temperature_, det.lambda_
    p = torch.softmax(torch.from_numpy(logits) / t, 1)
    y = torch.from_numpy(wrong)
    ref = -(1 - lam) * torch.einsum("ij,ik->ijk", p[y == 0], p[y == 0]).mean(0) + lam * torch.einsum(
        "ij,ik->ijk", p[y == 1], p[y == 1]
    ).mean(0)
    ref = torch.tril(ref, diagonal=-1)
    ref = torch.relu(ref + ref.T)
    ref = ref / ref.norm()
    assert np.allclose(det.matrix_, ref.numpy())
    assert np.allclose(det.decision_function(logits), torch.diag(p @ ref @ p.T).numpy())
    again = RelativeUncertainty.from_state(*det.to_state())
    assert np.array_equal(again.decision_function(logits), det.decision_function(logits))


def test_relative_uncertainty_falls_back_to_gini() -> None:
    logits = np.random.default_rng(2).normal(0, 1, (100, 4))
    wrong = np.r_[np.ones(2), np.zeros(98)].astype(int)
    det = RelativeUncertainty(lambdas=(0.0,), temperatures=(1.0,)).fit(logits, wrong)
    gini = (1 - np.eye(4)) / np.linalg.norm(1 - np.eye(4))
    assert np.allclose(det.matrix_, gini)
    # with D = 1 - I, p^T D p = 1 - sum p^2: DOCTOR up to the norm
    assert np.allclose(det.decision_function(logits) * np.linalg.norm(1 - np.eye(4)), doctor(logits))


def test_perturbed_doctor_zero_step_is_doctor_and_step_follows_the_gradient() -> None:
    torch.manual_seed(0)
    model = ResNet20(num_classes=10, in_channels=1).eval()
    x = torch.randn(6, 1, 28, 28)
    with torch.no_grad():
        logits = model(x).double().numpy()
    d = doctor(logits)
    assert np.allclose(PerturbedDoctor(model, (0.5,), 0.0, 1.0)(x), d / (1 - d), rtol=1e-4)
    eps = 0.01
    ours = PerturbedDoctor(model, (0.5,), eps, 2.0)(x)
    assert all(p.grad is None for p in model.parameters())  # only the input got a gradient
    moved = x.clone().requires_grad_(True)
    log_p = torch.log_softmax(model(moved) / 2.0, 1)
    g = (log_p.exp() ** 2).sum(1)
    torch.log((1 - g) / g).sum().backward()
    x2 = x - eps / 0.5 * moved.grad.sign()
    with torch.no_grad():
        p2 = torch.softmax(model(x2) / 2.0, 1)
    g2 = (p2**2).sum(1)
    expected = ((1 - g2) / g2).double().numpy()
    assert np.allclose(ours, expected, rtol=1e-4)


def test_choose_perturbation_returns_the_best_grid_point() -> None:
    torch.manual_seed(0)
    model = ResNet20(num_classes=10, in_channels=1).eval()
    x = torch.randn(40, 1, 28, 28)
    wrong = np.r_[np.zeros(20), np.ones(20)].astype(int)
    best, table = choose_perturbation(model, (1.0,), x, wrong, eps_grid=(0.0, 0.01), temperature_grid=(1.0,))
    assert set(table) == {"0.0@1.0", "0.01@1.0"}
    assert table[f"{best.eps}@{best.temperature}"] == max(table.values())
    with pytest.raises(ConfigError):
        PerturbedDoctor(model.train(), (1.0,), 0.0, 1.0)
