"""The ONNX Runtime backend gives torch's numbers: logits, mutant labels, and a whole gate's verdicts.

References are independent of the backend: the torch model itself, :func:`models.lcr.predict_naive`
(one ``load_state_dict`` copy per mutant) and the torch :class:`MutantEnsemble`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models import onnx_backend
from models.architectures import ResNet20
from models.bundle import load_bundle
from models.errors import ConfigError
from models.gate import load_extractor, load_gate
from models.lcr import MutantEnsemble, predict_model, predict_naive
from models.mutation import plan_mutant
from models.onnx_backend import (
    OnnxForward,
    OnnxMutantEnsemble,
    providers_for,
    stack_mutants,
)
from models.prefix_ensemble import PrefixSharingEnsemble, plan_mutant_in

needs_onnx = pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None, reason="torch.onnx.export needs the 'onnx' package"
)
SHAPE = (3, 12, 12)
TOL = 1e-4


@pytest.fixture(scope="module")
def model() -> nn.Module:
    """A tiny ResNet20 whose predictions vary between images and flip under mutation.

    Non-trivial BatchNorm statistics (identity BN would hide layout mistakes), and a head centred
    and scaled on the features of random images: a randomly initialised head predicts one class
    for every input, and no mutant would change a label.
    """
    torch.manual_seed(0)
    net = ResNet20(num_classes=10, in_channels=3)
    generator = torch.Generator().manual_seed(1)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(c, generator=generator))
            module.weight.data.copy_(0.5 + torch.rand(c, generator=generator))
            module.bias.data.copy_(0.1 * torch.randn(c, generator=generator))
    net.eval()
    features: list[torch.Tensor] = []
    handle = net.flatten.register_forward_hook(lambda m, i, o: features.append(o))
    with torch.no_grad():
        net(torch.randn((64, *SHAPE), generator=torch.Generator().manual_seed(3)))
        handle.remove()
        weight = torch.randn(10, 64, generator=generator) / features[0].std(0).clamp_min(1e-3)
        net.fc.weight.copy_(weight)
        net.fc.bias.copy_(-(features[0].mean(0) @ weight.T))
    return net


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn((7, *SHAPE), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def specs(model: nn.Module) -> list:
    """Two mutants of each operator over the whole model, at a rate that changes labels."""
    ops = ["NAI", "GF", "WS", "NS"] * 2
    return [plan_mutant(model, op, 0.02, seed) for seed, op in enumerate(ops)]


@pytest.fixture(scope="module")
def late_specs(model: nn.Module) -> list:
    ops = ["NAI", "GF", "WS", "NS", "NAI"]
    return [plan_mutant_in(model, op, 0.02, 10 + seed, ["layer3"]) for seed, op in enumerate(ops)]


def _changes_labels(labels: torch.Tensor, model: nn.Module, x: torch.Tensor) -> bool:
    return bool((labels != predict_model(model, x).view(1, -1)).any())


# ------------------------------------------------------------------------- without onnx export
def test_stacked_module_equals_naive_in_torch(model: nn.Module, images: torch.Tensor, specs: list) -> None:
    """The fx construction alone (grouped convs over stacked weights), before any export."""
    naive = predict_naive(model, specs, images)
    assert _changes_labels(naive, model, images)  # else the comparison below could not fail
    with torch.no_grad():
        stacked = stack_mutants(model, specs, SHAPE)(images)
    assert stacked.dtype == torch.long and torch.equal(stacked, naive)


def test_confined_mutants_share_the_prefix(model: nn.Module, images: torch.Tensor, late_specs: list) -> None:
    module = stack_mutants(model, late_specs, SHAPE)
    repeats = [n for n in module.graph.nodes if n.op == "call_function" and "repeat" in n.target.__name__]
    assert repeats and all(n.args[0].op != "placeholder" for n in repeats)  # not the images themselves
    stem = [n for n in module.graph.nodes if n.op == "call_module" and n.target == "conv1"]
    assert stem and stem[0].args[0].op == "placeholder"  # the stem runs once, on N rows
    with torch.no_grad():
        assert torch.equal(module(images), predict_naive(model, late_specs, images))


def test_unknown_backend_and_device_are_refused(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    with pytest.raises(ConfigError, match=r"unknown backend 'tensorflow'.*\['torch', 'onnx'\]"):
        load_gate(bundle, "cpu", backend="tensorflow")
    with pytest.raises(ConfigError, match="unknown backend"):
        load_extractor(bundle, "cpu", backend="")
    with pytest.raises(ConfigError, match="unknown ONNX Runtime device"):
        providers_for("tpu")
    cuda = providers_for("cuda")
    assert cuda[-1] == "CPUExecutionProvider"
    import onnxruntime as ort

    assert (cuda[0] == "CUDAExecutionProvider") == ("CUDAExecutionProvider" in ort.get_available_providers())


def test_missing_onnx_package_is_a_config_error(model: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes "import onnx" raise ImportError
    with pytest.raises(ConfigError, match="needs the 'onnx' package"):
        onnx_backend.export_forward(model, SHAPE)


# ------------------------------------------------------------------------- ONNX Runtime
@needs_onnx
def test_forward_matches_torch_at_any_batch(model: nn.Module, images: torch.Tensor) -> None:
    runner = OnnxForward(model, "layer3", threads=1, input_shape=SHAPE)
    seen: list[torch.Tensor] = []
    handle = model.layer3.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            expected = model(images)
    finally:
        handle.remove()
    for n in (1, 2, 7):  # exported at batch 2: the batch axis must be dynamic
        logits, activation = runner.run(images[:n])
        assert logits.shape == (n, 10) and activation is not None
        torch.testing.assert_close(logits, expected[:n], atol=TOL, rtol=0)
        torch.testing.assert_close(activation, seen[0][:n], atol=TOL, rtol=0)
    plain = OnnxForward(model, threads=1)(images[:3])  # no layer: logits only, exported on first use
    torch.testing.assert_close(plain, expected[:3], atol=TOL, rtol=0)


@needs_onnx
@pytest.mark.parametrize("chunk_size", [3, 8])  # 3 does not divide the 8 mutants
def test_mutant_labels_match_torch(
    model: nn.Module, images: torch.Tensor, specs: list, chunk_size: int
) -> None:
    ensemble = OnnxMutantEnsemble(model, specs, chunk_size=chunk_size, threads=1)
    labels = ensemble.predict(images)
    assert labels.shape == (len(specs), len(images)) and labels.dtype == torch.long
    naive = predict_naive(model, specs, images)
    assert torch.equal(labels, naive)
    assert torch.equal(labels, MutantEnsemble(model, specs, chunk_size=chunk_size).predict(images))
    assert torch.equal(ensemble.predict(images[2:3]), naive[:, 2:3])  # batch of one, same graphs
    assert ensemble.predict(images[:0]).shape == (len(specs), 0)


@needs_onnx
def test_confined_mutant_labels_match_torch(model: nn.Module, images: torch.Tensor, late_specs: list) -> None:
    ensemble = OnnxMutantEnsemble(model, late_specs, chunk_size=2, threads=1, input_shape=SHAPE)
    labels = ensemble.predict(images)
    naive = predict_naive(model, late_specs, images)
    assert _changes_labels(naive, model, images)
    assert torch.equal(labels, naive)
    assert torch.equal(labels, PrefixSharingEnsemble(model, late_specs, "layer3").predict(images))


@needs_onnx
def test_gate_on_onnx_matches_torch(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    torch_gate = load_gate(bundle, "cpu")
    onnx_gate = load_gate(bundle, "cpu", backend="onnx", threads=1)
    assert isinstance(onnx_gate.extractor.ensemble, OnnxMutantEnsemble)
    raw = np.random.default_rng(0).integers(0, 256, size=(12, *bundle.input_shape[1:], bundle.input_shape[0]))
    x = bundle.normalisation.apply(raw.astype(np.uint8))
    for signal_set in torch_gate.signal_sets:
        ref = torch_gate.run(x, signal_set=signal_set, full_evidence=True)
        out = onnx_gate.run(x, signal_set=signal_set, full_evidence=True)
        np.testing.assert_array_equal(out.prediction, ref.prediction)
        np.testing.assert_allclose(out.logits, ref.logits, atol=TOL, rtol=0)
        np.testing.assert_allclose(out.conductance, ref.conductance, atol=TOL, rtol=0)
        np.testing.assert_array_equal(out.lcr, ref.lcr)
        np.testing.assert_allclose(out.unified_score, ref.unified_score, atol=TOL, rtol=1e-4)
        clear = np.abs(ref.unified_score - ref.operating_point.threshold) > 1e-4  # no near-ties
        np.testing.assert_array_equal(out.reject[clear], ref.reject[clear])
    # the plain forward (no conductance asked for) also comes from ORT; the model stays torch's
    assert isinstance(onnx_gate.extractor.forward, OnnxForward)
    assert onnx_gate.extractor.model is not onnx_gate.extractor.forward
    plain = onnx_gate.extractor(x, conductance=False, lcr=False)
    reference = torch_gate.extractor(x, conductance=False, lcr=False).logits
    torch.testing.assert_close(plain.logits, reference, atol=TOL, rtol=0)
