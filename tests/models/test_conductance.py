"""Conductance against independent references: captum, the completeness axiom, per-image runs.

Models are randomly initialised but made "trained-ish" (random BatchNorm statistics and affine
parameters, non-zero head bias) so that logits vary between images and classes and no check is
satisfied trivially by near-constant outputs.
"""

from __future__ import annotations

import pytest
import torch
from captum.attr import LayerConductance as CaptumLayerConductance
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from models.architectures import build_model
from models.conductance import (
    LayerConductance,
    ShortcutConductance,
    step_gradients,
    verify_shortcut,
)
from models.errors import BundleError, ConfigError, InputError


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref|: the figure of merit used throughout."""
    return float((a - ref).abs().max() / ref.abs().max())


def _trainedish(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(0.5 + torch.rand(c, generator=gen))
                module.bias.copy_(0.2 * torch.randn(c, generator=gen))
                module.running_mean.copy_(0.2 * torch.randn(c, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(c, generator=gen))
            elif isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=gen))
    return model.eval()


_MODELS: dict[tuple[str, int, int], nn.Module] = {}


def _model(arch: str, in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    key = (arch, in_channels, num_classes)
    if key not in _MODELS:
        torch.manual_seed(0)
        _MODELS[key] = _trainedish(build_model(arch, num_classes, in_channels), seed=1)
    return _MODELS[key]


def _images(n: int, shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def _logit_gap(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """F_p(x) - F_p(0) from two plain forward passes."""
    with torch.no_grad():
        fx = model(x).gather(1, target.view(-1, 1))
        f0 = model(torch.zeros_like(x)).gather(1, target.view(-1, 1))
    return (fx - f0).view(-1)


# ---------------------------------------------------------------------------------------------
# captum reference (left rule == riemann_trapezoid)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "shape", "layer"),
    [
        ("resnet20", (3, 32, 32), "layer3"),
        ("resnet20", (3, 32, 32), "layer3.1"),
        ("resnet20", (1, 28, 28), "layer3"),
        ("resnet20", (1, 28, 28), "layer2"),
        ("resnet18", (3, 48, 48), "layer4"),
        ("resnet18", (3, 48, 48), "layer3.1"),
    ],
)
def test_left_rule_matches_captum_riemann_trapezoid(
    arch: str, shape: tuple[int, int, int], layer: str
) -> None:
    model = _model(arch, in_channels=shape[0])
    x = _images(2, shape)
    ours = LayerConductance(model, layer, n_steps=10, rule="left").attribute(x)
    with torch.no_grad():
        assert torch.equal(ours.prediction, model(x).argmax(1))
    reference = CaptumLayerConductance(model, model.get_submodule(layer)).attribute(
        x, baselines=torch.zeros_like(x), target=ours.prediction, n_steps=10, method="riemann_trapezoid"
    )
    assert reference.ndim == 4  # per element: N x C x h x w
    assert _rel(ours.conductance, reference.detach().sum((2, 3))) < 1e-4
    assert ours.conductance.abs().max() > 1e-3  # not trivially zero


def test_explicit_targets_match_captum() -> None:
    model = _model("resnet20")
    x = _images(3, (3, 32, 32), seed=12)
    target = torch.tensor([2, 5, 9])
    ours = LayerConductance(model, "layer3.1", n_steps=6).attribute(x, target=target)
    reference = CaptumLayerConductance(model, model.layer3[1]).attribute(
        x, baselines=torch.zeros_like(x), target=target, n_steps=6, method="riemann_trapezoid"
    )
    assert torch.equal(ours.target, target)
    assert _rel(ours.conductance, reference.detach().sum((2, 3))) < 1e-4


def test_layer_followed_by_inplace_add_is_not_corrupted() -> None:
    """torchvision's block does ``out = bn2(...); out += identity``: the recorded A must be bn2's output.

    The reference is the same conductance read at a layer whose output is never modified in place:
    completeness makes both sum to the same logit gap only if A(x_n) - A(x_0) telescopes correctly,
    so compare the telescoped activation directly with a hook that copies bn2's output.
    """
    model = _model("resnet18")
    layer = "layer3.1.bn2"
    x = _images(2, (3, 48, 48))
    result = LayerConductance(model, layer, n_steps=4).attribute(x, return_activation=True)
    copies: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: copies.append(o.clone()))
    with torch.no_grad():
        model(x)
    handle.remove()
    assert result.activation is not None
    assert torch.allclose(result.activation, copies[0], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# completeness
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["left", "right"])
def test_completeness_at_last_stage(rule: str) -> None:
    model = _model("resnet20")
    x = _images(4, (3, 32, 32), seed=1)
    result = LayerConductance(model, "layer3", n_steps=10, rule=rule).attribute(x)
    gap = _logit_gap(model, x, result.prediction)
    assert _rel(result.conductance.sum(1), gap) < 1e-4
    assert float(result.completeness_error().abs().max() / gap.abs().max()) < 1e-4


def test_completeness_for_a_chosen_target_and_shortcut() -> None:
    model = _model("resnet20")
    x = _images(4, (3, 32, 32), seed=2)
    shortcut = ShortcutConductance.from_model(model, "layer3", (3, 32, 32), samples=x)
    target = torch.tensor([0, 3, 7, 9])
    result = shortcut.attribute(x, target=target)
    assert torch.equal(result.target, target)
    assert _rel(result.conductance.sum(1), _logit_gap(model, x, target)) < 1e-4


def test_completeness_error_shrinks_with_steps_at_an_inner_layer() -> None:
    # After layer2 come six ReLU blocks, so dF/dA changes along the path and a 10-step Riemann sum
    # is far from F_p(x) - F_p(0) (measured on a trained model: ~3.7 relative, right rule; ~1e-2 on
    # this random one). The sum converges to the path integral, whose completeness is exact, so the
    # error must fall with n (roughly as 1/n for the left rule).
    model = _model("resnet20")
    x = _images(2, (3, 8, 8), seed=3)
    target = LayerConductance(model, "layer2", n_steps=1).attribute(x).prediction
    gap = _logit_gap(model, x, target)
    errors = {}
    for n in (10, 200):
        cond = LayerConductance(model, "layer2", n_steps=n).attribute(x, target=target).conductance
        errors[n] = float((cond.sum(1) - gap).abs().max() / gap.abs().max())
    assert errors[10] > 1e-3  # the inner layer really is non-linear: the test is not vacuous
    assert errors[200] < errors[10] / 5


# ---------------------------------------------------------------------------------------------
# exact shortcut
# ---------------------------------------------------------------------------------------------


def test_shortcut_equals_general_form_at_last_stage() -> None:
    model = _model("resnet20")
    x = _images(5, (3, 32, 32), seed=4)
    shortcut = ShortcutConductance.from_model(model, "layer3", (3, 32, 32), samples=x[:3])
    assert shortcut.check_ is not None and shortcut.check_.ok
    fast = shortcut.attribute(x)
    general = LayerConductance(model, "layer3").attribute(x)
    assert torch.equal(fast.prediction, general.prediction)
    assert _rel(fast.conductance, general.conductance) < 1e-5
    assert torch.allclose(fast.logits, general.logits, atol=1e-5)
    # GAP + linear head: the stored gradient is w / (h w), computed independently of the head's weights.
    h, w = shortcut.baseline_activation.shape[1:]
    assert shortcut.head_jacobian.shape == (10, 64)
    assert torch.allclose(shortcut.head_jacobian, model.fc.weight / (h * w), atol=1e-7)
    assert verify_shortcut(model, "layer3", x).ok


@pytest.mark.parametrize("layer", ["layer3.1", "layer2"])
def test_shortcut_is_refused_at_inner_layers(layer: str) -> None:
    model = _model("resnet20")
    x = _images(3, (3, 32, 32), seed=5)
    check = verify_shortcut(model, layer, x)
    assert not check.ok and check.max_rel_diff > 1e-2
    with pytest.raises(ConfigError, match="not affine"):
        ShortcutConductance.from_model(model, layer, (3, 32, 32), samples=x)
    unverified = ShortcutConductance.from_model(model, layer, (3, 32, 32))
    with pytest.raises(ConfigError, match="unverified"):
        unverified.attribute(x)
    unverified.verify(x)
    with pytest.raises(ConfigError, match="failed"):
        unverified.attribute(x)


class _FlatHead(nn.Module):
    """A linear head over the flattened C x h x w maps: affine, but not spatially uniform."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, stride=2))
        self.head = nn.Sequential(nn.Flatten(1), nn.Dropout(0.5), nn.Linear(3 * 3 * 3, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_shortcut_with_a_non_pooled_linear_head_stores_the_full_jacobian() -> None:
    torch.manual_seed(2)
    model = _FlatHead().eval()
    x = _images(4, (2, 8, 8), seed=6)
    shortcut = ShortcutConductance.from_model(model, "features", (2, 8, 8), samples=x)
    assert shortcut.head_jacobian.shape == (5, 3, 3, 3)
    assert torch.allclose(shortcut.head_jacobian, model.head[2].weight.view(5, 3, 3, 3), atol=1e-7)
    general = LayerConductance(model, "features").attribute(x)
    assert _rel(shortcut.attribute(x).conductance, general.conductance) < 1e-5


def test_shortcut_state_round_trips_through_safetensors() -> None:
    model = _model("resnet20", in_channels=1)
    x = _images(3, (1, 28, 28), seed=7)
    shortcut = ShortcutConductance.from_model(model, "layer3", (1, 28, 28), samples=x)
    tensors = st_load(st_save(shortcut.state_dict()))
    loaded = ShortcutConductance.from_state(model, "layer3", tensors)
    assert torch.equal(loaded.attribute(x).conductance, shortcut.attribute(x).conductance)
    # Constants from another model, or never verified, are refused.
    other = _trainedish(build_model("resnet20", 10, 1), seed=9)
    with pytest.raises(BundleError, match="do not match"):
        ShortcutConductance.from_state(other, "layer3", tensors)
    unverified = ShortcutConductance.from_model(model, "layer3", (1, 28, 28)).state_dict()
    with pytest.raises(BundleError, match="not verified"):
        ShortcutConductance.from_state(model, "layer3", unverified)
    with pytest.raises(BundleError, match="lack"):
        ShortcutConductance.from_state(model, "layer3", {"baseline": tensors["baseline"]})


# ---------------------------------------------------------------------------------------------
# batch invariance, step rules
# ---------------------------------------------------------------------------------------------


def test_batch_equals_one_by_one_and_chunking_changes_nothing() -> None:
    model = _model("resnet20")
    x = _images(5, (3, 32, 32), seed=8)
    general = LayerConductance(model, "layer3.1")
    batch = general.attribute(x)
    single = torch.cat([general.attribute(x[i : i + 1]).conductance for i in range(len(x))])
    assert _rel(single, batch.conductance) < 1e-5
    chunked = general.attribute(x, chunk_size=2)
    assert _rel(chunked.conductance, batch.conductance) < 1e-5
    assert torch.equal(chunked.prediction, batch.prediction)

    shortcut = ShortcutConductance.from_model(model, "layer3", (3, 32, 32), samples=x[:2])
    fast = shortcut.attribute(x)
    fast_single = torch.cat([shortcut.attribute(x[i : i + 1]).conductance for i in range(len(x))])
    assert _rel(fast_single, fast.conductance) < 1e-5
    assert _rel(shortcut.attribute(x, chunk_size=3).conductance, fast.conductance) < 1e-5


def test_right_and_left_rules_coincide_only_where_the_suffix_is_linear() -> None:
    model = _model("resnet20")
    x = _images(3, (3, 32, 32), seed=10)
    for layer, same in (("layer3", True), ("layer3.1", False)):
        left = LayerConductance(model, layer, rule="left").attribute(x).conductance
        right = LayerConductance(model, layer, rule="right").attribute(x).conductance
        assert (_rel(right, left) < 1e-5) is same, layer


def test_step_rule_dispatch() -> None:
    grads = torch.arange(4.0)
    assert step_gradients(grads, "left").tolist() == [0.0, 1.0, 2.0]
    assert step_gradients(grads, "right").tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="left.*right"):
        step_gradients(grads, "middle")
    with pytest.raises(ConfigError, match="valid choices"):
        LayerConductance(_model("resnet20"), "layer3", rule="trapezoid")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# model state and input checks
# ---------------------------------------------------------------------------------------------


def test_model_state_is_left_untouched() -> None:
    model = _model("resnet20")
    x = _images(2, (3, 32, 32), seed=11)
    model.conv1.weight.requires_grad_(False)  # a caller's own freezing must survive
    try:
        flags = {name: p.requires_grad for name, p in model.named_parameters()}
        for grad_mode in (True, False):
            with torch.set_grad_enabled(grad_mode):
                LayerConductance(model, "layer2").attribute(x)
                ShortcutConductance.from_model(model, "layer3", (3, 32, 32), samples=x).attribute(x)
                assert torch.is_grad_enabled() is grad_mode
        assert all(p.grad is None for p in model.parameters())
        assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
        assert not model.layer3._forward_hooks
    finally:
        model.conv1.weight.requires_grad_(True)


def test_training_mode_is_refused() -> None:
    model = _model("resnet20")
    x = _images(2, (3, 32, 32))
    model.layer2[0].bn1.train()
    try:
        with pytest.raises(ConfigError, match="eval mode"):
            LayerConductance(model, "layer3").attribute(x)
        with pytest.raises(ConfigError, match="eval mode"):
            ShortcutConductance.from_model(model, "layer3", (3, 32, 32))
    finally:
        model.eval()


class _TupleLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        return y, -y


class _TupleModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = _TupleLayer()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.block(x)
        return self.fc(torch.cat([a, b], 1).mean((2, 3)))


def test_bad_layers_and_inputs_are_reported() -> None:
    model = _TupleModel().eval()
    with pytest.raises(ConfigError, match="one tensor"):
        LayerConductance(model, "block").attribute(_images(1, (1, 6, 6)))
    assert LayerConductance(model, "block.conv").attribute(_images(1, (1, 6, 6))).conductance.shape == (1, 2)
    with pytest.raises(BundleError, match="no module"):
        LayerConductance(model, "nope")
    general = LayerConductance(_model("resnet20"), "layer3")
    with pytest.raises(InputError):
        general.attribute(torch.zeros(3, 32, 32))
    with pytest.raises(InputError, match="target"):
        general.attribute(_images(2, (3, 32, 32)), target=torch.tensor([1]))
    with pytest.raises(InputError, match="target classes"):
        general.attribute(_images(2, (3, 32, 32)), target=torch.tensor([1, 10]))
    with pytest.raises(InputError, match="baseline"):
        LayerConductance(_model("resnet20"), "layer3", baseline=torch.zeros(3, 16, 16)).attribute(
            _images(1, (3, 32, 32))
        )
    with pytest.raises(ConfigError, match="n_steps"):
        LayerConductance(_model("resnet20"), "layer3", n_steps=0)


def test_a_flat_layer_gets_the_same_conductance_as_the_maps_that_feed_it() -> None:
    # ResNet20's ``flatten`` output is GAP(layer3): with a linear head, conductance of channel c at
    # either layer is w_p,c * (GAP_c(x) - GAP_c(0)), reached through different code paths (2-D vs
    # 4-D activations, uniform vs per-position Jacobian shapes).
    model = _model("resnet20")
    x = _images(3, (3, 32, 32), seed=13)
    maps = LayerConductance(model, "layer3").attribute(x).conductance
    flat = LayerConductance(model, "flatten").attribute(x).conductance
    assert flat.shape == maps.shape == (3, 64)
    assert _rel(flat, maps) < 1e-5
    shortcut = ShortcutConductance.from_model(model, "flatten", (3, 32, 32), samples=x)
    assert shortcut.head_jacobian.shape == (10, 64)
    assert _rel(shortcut.attribute(x).conductance, maps) < 1e-5


def test_other_threads_running_the_model_are_not_captured() -> None:
    # A server may run the model in another thread while conductance's hook is registered: that
    # forward must neither be recorded nor have grad mode switched on in its thread.
    import threading

    from models.conductance import _LayerCapture

    model = _model("resnet20")
    x = _images(2, (3, 32, 32), seed=14)
    seen: dict[str, object] = {}

    def other_thread() -> None:
        with torch.no_grad():
            seen["logits"] = model(x)
            seen["grad_mode"] = torch.is_grad_enabled()

    capture = _LayerCapture(model.layer3, track_grad=True)
    with capture:
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
        assert capture.activation is None
    assert seen["grad_mode"] is False
    assert not seen["logits"].requires_grad  # type: ignore[union-attr]
