"""Mutation operators, mutant specs, batched mutant evaluation and the acceptance rule.

References are independent of the code under test: operator effects are checked row by row
against the original weights, the batched ensemble against one deep copy per mutant loaded with
``load_state_dict``, LCR against a hand count, acceptance against accuracies recomputed naively.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from models.architectures import build_model
from models.errors import BundleError, ConfigError, PredgateError
from models.lcr import MutantEnsemble, label_change_rate, predict_model, predict_naive
from models.mutant_search import generate_mutants
from models.mutation import (
    OPERATORS,
    MutantSet,
    MutantSpec,
    MutationError,
    count_filters,
    mutant_tensors,
    mutant_weights_hash,
    plan_mutant,
)


def _randomise(model: nn.Module, in_channels: int, seed: int) -> nn.Module:
    """Non-trivial BN statistics and a balanced random head, so predictions vary across inputs.

    A fresh network maps all inputs to nearly the same pooled features; BN statistics taken from
    random images (then jittered) and a head centred on the mean feature spread the predictions.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, in_channels, 16, 16, generator=gen)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration pass
    model.train()
    with torch.no_grad():
        model(x)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_mean.add_(torch.randn(m.num_features, generator=gen) * 0.05)
                m.running_var.mul_(torch.rand(m.num_features, generator=gen) * 0.4 + 0.8)
        model.eval()
        head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        captured: list[torch.Tensor] = []
        handle = head.register_forward_hook(lambda _m, inp, _out: captured.append(inp[0]))
        model(x)
        handle.remove()
        mean, std = captured[0].mean(0), captured[0].std(0).clamp_min(1e-6)
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) / std)
        head.bias.copy_(-head.weight @ mean)
    return model


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return _randomise(build_model("resnet20", 10, 1), 1, seed=1)


@pytest.fixture(scope="module")
def biased() -> nn.Module:
    """Convs with biases, a depthwise and a grouped conv: the cases ResNet20 does not have."""
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=True),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=True),
        nn.ReLU(),
        nn.Conv2d(8, 12, 1, groups=4, bias=True),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
        nn.Linear(12, 5),
    )
    return _randomise(model, 3, seed=3)


def _images(n: int, channels: int = 1, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _mutated_copy(model: nn.Module, spec: MutantSpec) -> nn.Module:
    mutant = copy.deepcopy(model)
    state = mutant.state_dict()
    state.update(mutant_tensors(model, spec))
    mutant.load_state_dict(state)
    return mutant


def _changed_rows(model: nn.Module, spec: MutantSpec) -> dict[str, set[int]]:
    """Per parameter, which output-channel rows differ between the mutant and the original."""
    mutant = dict(_mutated_copy(model, spec).state_dict())
    changed = {}
    for name, orig in model.state_dict().items():
        new = mutant[name]
        assert new.shape == orig.shape and new.dtype == orig.dtype
        if orig.ndim == 0:
            assert torch.equal(new, orig), name
            continue
        rows = {i for i in range(len(orig)) if not torch.equal(new[i], orig[i])}
        if rows:
            changed[name] = rows
    return changed


def _expected_rows(spec: MutantSpec, with_bias: bool) -> dict[str, set[int]]:
    expected: dict[str, set[int]] = {}
    for name, c in spec.filters:
        expected.setdefault(f"{name}.weight", set()).add(c)
        if with_bias:
            expected.setdefault(f"{name}.bias", set()).add(c)
    return expected


@pytest.mark.parametrize("operator", sorted(OPERATORS))
@pytest.mark.parametrize("which", ["resnet", "biased"])
def test_operator_changes_exactly_the_chosen_filters(operator, which, request):
    model = request.getfixturevalue(which)
    spec = plan_mutant(model, operator, 0.05, seed=4)
    # GF and WS leave biases alone; NAI negates them and NS swaps them with the weights.
    with_bias = which == "biased" and operator in ("NAI", "NS")
    assert _changed_rows(model, spec) == _expected_rows(spec, with_bias)


@pytest.mark.parametrize("which", ["resnet", "biased"])
def test_nai_negates_weights_and_bias(which, request):
    model = request.getfixturevalue(which)
    spec = plan_mutant(model, "NAI", 0.1, seed=5)
    new = mutant_tensors(model, spec)
    params = dict(model.named_parameters())
    for name, c in spec.filters:
        assert torch.equal(new[f"{name}.weight"][c], -params[f"{name}.weight"][c])
        if f"{name}.bias" in params:
            assert torch.equal(new[f"{name}.bias"][c], -params[f"{name}.bias"][c])


def test_gf_draws_from_the_layer_statistics(resnet):
    spec = plan_mutant(resnet, "GF", 0.2, seed=6)
    new = mutant_tensors(resnet, spec)
    params = dict(resnet.named_parameters())
    z = []
    for name, c in spec.filters:
        orig = params[f"{name}.weight"]
        row = new[f"{name}.weight"][c]
        assert row.shape == orig[c].shape
        assert not torch.equal(row, orig[c])
        z.append(((row - orig.mean()) / orig.std()).reshape(-1))
    z = torch.cat(z)
    assert z.numel() > 5000
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05


def test_ws_permutes_inside_each_filter(resnet):
    spec = plan_mutant(resnet, "WS", 0.05, seed=7)
    new = mutant_tensors(resnet, spec)
    params = dict(resnet.named_parameters())
    moved = 0
    for name, c in spec.filters:
        orig, row = params[f"{name}.weight"][c], new[f"{name}.weight"][c]
        assert torch.equal(row.reshape(-1).sort().values, orig.reshape(-1).sort().values)
        moved += not torch.equal(row, orig)
    assert moved == len(spec.filters)


def test_ns_swaps_pairs_within_a_layer(biased):
    spec = plan_mutant(biased, "NS", 0.2, seed=8)
    new = mutant_tensors(biased, spec)
    params = dict(biased.named_parameters())
    assert len(spec.filters) % 2 == 0
    for (name_a, a), (name_b, b) in zip(spec.filters[::2], spec.filters[1::2], strict=True):
        assert name_a == name_b and a != b
        for attr in ("weight", "bias"):
            key = f"{name_a}.{attr}"
            assert torch.equal(new[key][a], params[key][b])
            assert torch.equal(new[key][b], params[key][a])


@pytest.mark.parametrize("rate", [1e-6, 0.001, 0.005, 0.03])
def test_filter_count_follows_rate(resnet, rate):
    total = count_filters(resnet)
    assert total == 16 + 6 * 16 + 7 * 32 + 7 * 64  # stem, 18 block convs, 2 shortcut convs
    n = max(1, round(rate * total))
    for operator in ("NAI", "GF", "WS"):
        spec = plan_mutant(resnet, operator, rate, seed=0)
        assert spec.n_filters == n
        assert len(set(spec.filters)) == n
    assert plan_mutant(resnet, "NS", rate, seed=0).n_filters == n + n % 2


def test_same_seed_same_mutant_different_seed_different(resnet):
    for operator in sorted(OPERATORS):
        a = plan_mutant(resnet, operator, 0.01, seed=11)
        b = plan_mutant(resnet, operator, 0.01, seed=11)
        c = plan_mutant(resnet, operator, 0.01, seed=12)
        assert a == b and a.filters != c.filters
        assert mutant_weights_hash(resnet, a) == mutant_weights_hash(resnet, b)
        assert mutant_weights_hash(resnet, a) != mutant_weights_hash(resnet, c)


def test_gf_values_depend_on_seed_not_only_on_filters(resnet):
    a = plan_mutant(resnet, "GF", 0.01, seed=1)
    same_filters_other_seed = MutantSpec("GF", a.rate, 2, a.filters)
    assert mutant_weights_hash(resnet, a) != mutant_weights_hash(resnet, same_filters_other_seed)


def test_spec_round_trip_regenerates_the_same_weights(resnet):
    for operator in sorted(OPERATORS):
        spec = plan_mutant(resnet, operator, 0.02, seed=3)
        recorded = mutant_weights_hash(resnet, spec)
        loaded = MutantSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
        assert loaded == spec
        # Regenerate on a fresh model holding the same weights, as a bundle reload would.
        fresh = build_model("resnet20", 10, 1).eval()
        fresh.load_state_dict(resnet.state_dict())
        assert mutant_weights_hash(fresh, loaded) == recorded


def test_hash_detects_changed_original_weights(resnet):
    spec = plan_mutant(resnet, "NAI", 0.01, seed=3)
    other = copy.deepcopy(resnet)
    name, c = spec.filters[0]
    with torch.no_grad():
        other.get_submodule(name).weight[c].mul_(1.001)
    assert mutant_weights_hash(other, spec) != mutant_weights_hash(resnet, spec)


def test_bad_specs_are_rejected(resnet):
    with pytest.raises(ConfigError, match=r"valid: \['GF', 'NAI', 'NS', 'WS'\]"):
        plan_mutant(resnet, "XYZ", 0.01, 0)
    with pytest.raises(ConfigError):
        MutantSpec("NAI", 0.0, 0, (("conv1", 0),))
    with pytest.raises(BundleError):
        MutantSpec.from_dict({"operator": "NAI", "rate": 0.1})
    with pytest.raises(BundleError, match="does not have"):
        mutant_tensors(resnet, MutantSpec("NAI", 0.1, 0, (("conv1", 16),)))
    with pytest.raises(BundleError, match="does not have"):
        mutant_tensors(resnet, MutantSpec("NAI", 0.1, 0, (("fc", 0),)))


def _mixed_specs(model: nn.Module, rate: float, n: int) -> list[MutantSpec]:
    operators = sorted(OPERATORS)
    return [plan_mutant(model, operators[i % 4], rate, seed=100 + i) for i in range(n)]


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("which,channels", [("resnet", 1), ("biased", 3)])
def test_ensemble_equals_naive(which, channels, batch, request):
    model = request.getfixturevalue(which)
    specs = _mixed_specs(model, 0.05, 7)
    x = _images(batch, channels, seed=batch)
    naive = predict_naive(model, specs, x)
    assert naive.shape == (7, batch)
    ensemble = MutantEnsemble(model, specs, chunk_size=3)  # 3 does not divide 7
    for strategy in ("vmap", "loop", "auto"):
        assert torch.equal(ensemble.predict(x, strategy=strategy), naive), strategy
    assert ensemble.predict(x[:0]).shape == (7, 0)
    # The ensemble left both the caller's model and its own copy as they were.
    assert torch.equal(ensemble.predict(x, strategy="loop"), naive)
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), ensemble.model.state_dict().values())
    )


def test_ensemble_sees_label_changes(resnet):
    """The equality test above is only meaningful if mutants do change labels."""
    specs = _mixed_specs(resnet, 0.05, 8)
    x = _images(32, seed=9)
    original = predict_model(resnet, x)
    assert len(original.unique()) >= 3
    labels = MutantEnsemble(resnet, specs, chunk_size=5).predict(x)
    assert torch.equal(labels, predict_naive(resnet, specs, x))
    lcr = label_change_rate(labels, original)
    assert 0 < lcr.mean().item() < 1


def test_label_change_rate_hand_count():
    labels = torch.tensor([[0, 1, 2, 3], [0, 2, 2, 0], [1, 1, 2, 0]])
    original = torch.tensor([0, 1, 2, 3])
    # column 0: 1 of 3 differs; column 1: 1 of 3; column 2: none; column 3: 2 of 3.
    assert torch.allclose(label_change_rate(labels, original), torch.tensor([1 / 3, 1 / 3, 0.0, 2 / 3]))
    with pytest.raises(PredgateError):
        label_change_rate(labels, original[:3])


def test_train_mode_is_refused(resnet):
    model = copy.deepcopy(resnet).train()
    spec = plan_mutant(model, "NAI", 0.01, 0)
    with pytest.raises(ConfigError, match="eval mode"):
        MutantEnsemble(model, [spec])
    with pytest.raises(ConfigError, match="eval mode"):
        predict_naive(model, [spec], _images(2))
    with pytest.raises(ConfigError, match="eval mode"):
        generate_mutants(model, "NAI", 0.01, 2, _images(4), torch.zeros(4), progress=False)
    # A single submodule left in train mode is enough to make BN use batch statistics.
    partly = copy.deepcopy(resnet)
    partly.layer2[0].bn1.train()
    with pytest.raises(ConfigError, match="layer2.0.bn1"):
        MutantEnsemble(partly, [spec])
    with pytest.raises(ConfigError, match="valid"):
        MutantEnsemble(resnet, [spec], strategy="fast")


@pytest.fixture(scope="module")
def val_set(resnet) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels = the original model's own predictions, so its accuracy is 1.0 by construction."""
    x = _images(48, seed=21)
    return x, predict_model(resnet, x)


def test_generation_keeps_n_mutants_that_meet_the_threshold(resnet, val_set):
    x, y = val_set
    result = generate_mutants(
        resnet, "NAI", 0.001, 4, x, y, min_relative_accuracy=0.8, seed=50, progress=False
    )
    assert result.original_accuracy == 1.0
    assert len(result.specs) == 4 and result.attempts >= 4
    assert result.candidate_seeds == tuple(range(50, 50 + result.attempts))
    # Recompute every candidate's accuracy with the naive reference.
    candidates = [plan_mutant(resnet, "NAI", 0.001, s) for s in result.candidate_seeds]
    accs = (predict_naive(resnet, candidates, x) == y).double().mean(1).tolist()
    assert result.candidate_accuracies == pytest.approx(accs, abs=1e-12)
    assert result.candidate_kept == tuple(a >= 0.8 for a in accs)
    assert list(result.specs) == [c for c, k in zip(candidates, result.candidate_kept, strict=True) if k]
    assert all(a >= 0.8 for a in result.accuracies)
    assert result.filters_per_mutant == (1,) * 4
    assert result.attempts > 4  # this random model is fragile: some single-filter mutants fail
    assert result.acceptance_rate == 4 / result.attempts
    assert MutantSet.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_generation_rejects_and_reports_when_threshold_is_strict(resnet, val_set):
    """Rejections happen and the kept ones still meet the stricter threshold."""
    x, y = val_set
    result = generate_mutants(
        resnet, "GF", 0.001, 3, x, y, min_relative_accuracy=0.9, max_attempts=40, seed=0, progress=False
    )
    assert len(result.specs) == 3
    assert not all(result.candidate_kept)
    assert all(a >= 0.9 for a in result.accuracies)


def test_generation_raises_after_the_attempt_cap(resnet, val_set):
    x, y = val_set
    with pytest.raises(
        MutationError, match=r"kept 0 of 5 candidate NAI mutants \(needed 3\).*lower rate"
    ) as info:
        generate_mutants(
            resnet, "NAI", 0.01, 3, x, y, min_relative_accuracy=1.01, max_attempts=5, progress=False
        )
    assert isinstance(info.value, PredgateError)
    assert info.value.partial.attempts == 5 and not any(info.value.partial.candidate_kept)
