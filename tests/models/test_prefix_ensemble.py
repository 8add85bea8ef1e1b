"""Mutants restricted to later modules, and the ensemble that shares their unmutated prefix.

References: :func:`models.lcr.predict_naive` (one model copy per mutant, independent of the graph
split) for labels, forward hooks for how often each part runs, and a multiply-accumulate count
taken with hooks on the plain model for the FLOP share.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import nn

from models.architectures import ResNet20
from models.errors import ConfigError
from models.lcr import predict_naive
from models.mutant_search import generate_mutants_in
from models.mutation import MutantSpec, MutationError, filters_for_rate, mutant_weights_hash
from models.prefix_ensemble import PrefixSharingEnsemble, convs_in, plan_mutant_in
from models.sequential_lcr import SPRT, SequentialLCR, simulate_sequential


class SkipNet(nn.Module):
    """Two prefix values cross into the suffix: ``h2`` feeds ``body`` and ``h1`` is added after it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 1))
        self.head = nn.Linear(6 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1 = self.stem(x)
        h2 = self.mid(h1)
        return self.head((self.body(h2) + h1).flatten(1))


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    model = ResNet20(num_classes=10, in_channels=1)
    with torch.no_grad():  # varied BN statistics, so that mutants change some predictions
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_plan_mutant_in_restricts_and_is_reproducible() -> None:
    model = _resnet()
    allowed = {name for name, _ in convs_in(model, ["layer3"])}
    assert allowed and all(name.startswith("layer3.") for name in allowed)
    for seed in range(20):
        spec = plan_mutant_in(model, "NAI", 0.01, seed, ["layer3"])
        assert {name for name, _ in spec.filters} <= allowed
        assert spec.n_filters == filters_for_rate(model, 0.01)
        assert spec == plan_mutant_in(model, "NAI", 0.01, seed, ["layer3"])
        assert MutantSpec.from_dict(spec.to_dict()) == spec
    ns = plan_mutant_in(model, "NS", 0.01, 3, ["layer2.1", "layer3.2"])
    pairs = list(zip(ns.filters[::2], ns.filters[1::2], strict=True))
    assert all(a[0] == b[0] and a[0].startswith(("layer2.1.", "layer3.2.")) for a, b in pairs)
    assert len({plan_mutant_in(model, "NAI", 0.01, s, ["layer3"]).filters for s in range(10)}) == 10
    with pytest.raises(ConfigError):
        plan_mutant_in(model, "NAI", 0.01, 0, ["layer9"])
    with pytest.raises(ConfigError):
        plan_mutant_in(model, "NAI", 0.5, 0, ["layer3.2.conv2"])  # 392 filters asked, 64 there


@pytest.mark.parametrize("operator", ["NAI", "GF", "NS"])
@pytest.mark.parametrize("split", ["layer3", "layer2.2", None])
def test_labels_equal_naive_on_resnet20(operator: str, split: str | None) -> None:
    model = _resnet()
    modules = [split or "layer3.1"]
    specs = [plan_mutant_in(model, operator, 0.02, seed, modules) for seed in range(6)]
    x = torch.randn(12, 1, 8, 8)
    ensemble = PrefixSharingEnsemble(model, specs, split)
    labels = ensemble.predict(x)
    expected = predict_naive(model, specs, x)
    assert torch.equal(labels, expected)
    assert (expected != model(x).argmax(1)).any(), "mutants should change some labels"
    assert torch.equal(ensemble.predict(x), expected)  # rows restored after a call
    assert all(mutant_weights_hash(model, s) == mutant_weights_hash(ensemble.model, s) for s in specs)


def test_skip_connections_cross_the_split() -> None:
    torch.manual_seed(1)
    model = SkipNet().eval()
    specs = [plan_mutant_in(model, "NAI", 0.2, seed, ["body"]) for seed in range(8)]
    x = torch.randn(10, 1, 6, 6)
    ensemble = PrefixSharingEnsemble(model, specs, "body")
    assert len(ensemble.prefix(x)) == 2  # h2 for body, h1 for the addition
    assert torch.equal(ensemble.predict(x), predict_naive(model, specs, x))


def test_prefix_runs_once_suffix_per_mutant() -> None:
    model = _resnet()
    specs = [plan_mutant_in(model, "NAI", 0.01, seed, ["layer3"]) for seed in range(5)]
    ensemble = PrefixSharingEnsemble(model, specs, "layer3")
    calls = {"conv1": 0, "layer2.2.conv2": 0, "layer3.0.conv1": 0, "fc": 0}
    for name in list(calls):
        ensemble.model.get_submodule(name).register_forward_hook(
            lambda *_a, name=name: calls.__setitem__(name, calls[name] + 1)
        )
    ensemble.predict(torch.randn(3, 1, 8, 8))
    assert calls == {"conv1": 1, "layer2.2.conv2": 1, "layer3.0.conv1": 5, "fc": 5}


def test_suffix_flop_share_matches_hook_count() -> None:
    model = _resnet()
    x = torch.randn(2, 1, 28, 28)
    macs: dict[str, int] = {}

    def hook(module: nn.Module, _inp: tuple, out: torch.Tensor, name: str) -> None:
        if isinstance(module, nn.Conv2d):
            per_out = module.in_channels // module.groups * math.prod(module.kernel_size)
        else:
            per_out = module.in_features
        macs[name] = out[0].numel() * per_out

    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(lambda mod, i, o, name=name: hook(mod, i, o, name))
    with torch.no_grad():
        model(x)
    for split in ("layer3", "layer2"):
        specs = [plan_mutant_in(model, "NAI", 0.01, 0, [split])]
        share = PrefixSharingEnsemble(model, specs, split).suffix_flop_share(x)
        suffix = sum(v for k, v in macs.items() if k.startswith(("layer3", split)) or k == "fc")
        assert share == pytest.approx(suffix / sum(macs.values()))
    assert 0.25 < PrefixSharingEnsemble(model, specs[:1], "layer2").suffix_flop_share(x) < 0.75


def test_rejects_mutants_outside_the_split_and_train_mode() -> None:
    model = _resnet()
    spec = plan_mutant_in(model, "NAI", 0.01, 0, ["layer2"])
    with pytest.raises(ConfigError):
        PrefixSharingEnsemble(model, [spec], "layer3")
    with pytest.raises(ConfigError):
        PrefixSharingEnsemble(model.train(), [spec], "layer2")
    with pytest.raises(ConfigError):
        PrefixSharingEnsemble(model.eval(), [], "layer2")


def test_generate_mutants_in_applies_the_acceptance_rule() -> None:
    model = _resnet()
    x = torch.randn(30, 1, 8, 8)
    y = model(x).argmax(1)
    y[::3] = (y[::3] + 1) % 10  # original accuracy 2/3, so that the rule has something to reject
    result = generate_mutants_in(
        model, "NAI", 0.01, 4, ["layer3"], x, y, min_relative_accuracy=0.82, max_attempts=40, progress=False
    )
    specs = [plan_mutant_in(model, "NAI", 0.01, s, ["layer3"]) for s in result.candidate_seeds]
    accs = (predict_naive(model, specs, x) == y.view(1, -1)).double().mean(1)
    original = (model(x).argmax(1) == y).double().mean().item()
    assert result.original_accuracy == pytest.approx(original)
    assert list(result.candidate_accuracies) == pytest.approx(accs.tolist())
    assert list(result.candidate_kept) == (accs >= 0.82 * original).tolist()
    assert result.specs == tuple(s for s, k in zip(specs, result.candidate_kept, strict=True) if k)
    assert len(result.specs) == 4 and not all(result.candidate_kept)
    with pytest.raises(MutationError):
        generate_mutants_in(
            model, "NAI", 0.01, 4, ["layer3"], x, y, min_relative_accuracy=2.0, max_attempts=5, progress=False
        )


def test_sequential_lcr_over_prefix_sharing_chunks() -> None:
    model = _resnet()
    specs = [plan_mutant_in(model, "NAI", 0.02, seed, ["layer3"]) for seed in range(9)]
    x = torch.randn(16, 1, 8, 8)
    pred = model(x).argmax(1)
    rule = SPRT(0.1, 0.5, 0.2, 0.2)
    live = SequentialLCR(
        model, specs, rule, chunk_size=2, factory=partial(PrefixSharingEnsemble, split_module="layer3")
    )
    lcr, used = live(x, pred)
    expected_lcr, expected_used = simulate_sequential(
        predict_naive(model, specs, x), pred, rule, chunk_size=2
    )
    assert torch.equal(used, torch.from_numpy(expected_used))
    assert torch.allclose(lcr.double(), torch.from_numpy(expected_lcr), atol=1e-6)


def test_sequential_lcr_runs_the_prefix_once() -> None:
    model = _resnet()
    specs = [plan_mutant_in(model, "NAI", 0.02, seed, ["layer3"]) for seed in range(9)]
    x = torch.randn(16, 1, 8, 8)
    pred = model(x).argmax(1)
    rule = SPRT(0.1, 0.5, 0.2, 0.2)
    ensemble = PrefixSharingEnsemble(model, specs, "layer3")
    calls = {"conv1": 0, "fc": 0}
    for name in list(calls):
        ensemble.model.get_submodule(name).register_forward_hook(
            lambda *_a, name=name: calls.__setitem__(name, calls[name] + 1)
        )
    lcr, used = ensemble.sequential_lcr(x, pred, rule, chunk_size=2)
    expected_lcr, expected_used = simulate_sequential(
        predict_naive(model, specs, x), pred, rule, chunk_size=2
    )
    assert torch.equal(used, torch.from_numpy(expected_used))
    assert torch.allclose(lcr.double(), torch.from_numpy(expected_lcr), atol=1e-6)
    assert len(set(expected_used.tolist())) > 1  # images stopped at different points
    assert calls == {"conv1": 1, "fc": int(used.max())}  # one suffix call per mutant evaluated
