"""models.explanations against computations made here by hand on a fresh copy of the bundle's CNN:
torch.autograd for saliency and Grad-CAM, completeness for integrated gradients, the general-form
conductance for the feature maps, PIL for the PNGs."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from models.architectures import resolve_layer
from models.bundle import Bundle, load_bundle
from models.conductance import LayerConductance
from models.data import load_splits
from models.errors import ConfigError
from models.explanations import (
    METHODS,
    Explainer,
    denormalise,
    feature_map_png,
    normalise_heat,
    overlay_png,
)
from models.gate import Gate, load_gate
from models.preprocess import Normalisation


@pytest.fixture(scope="module")
def setup(tiny_bundle: Path) -> tuple[Bundle, Gate, Explainer, np.ndarray, torch.Tensor]:
    bundle = load_bundle(tiny_bundle)
    gate = load_gate(bundle, "cpu")
    images = load_splits(bundle)["test"].images[:8]
    return bundle, gate, Explainer.from_gate(gate, bundle), images, bundle.normalisation.apply(images)


@pytest.fixture(scope="module")
def fresh(setup: tuple[Any, ...]) -> torch.nn.Module:
    """The CNN loaded again from the bundle: nothing the explainer holds or hooks."""
    return setup[0].load_model("cpu").eval()


def layer_name(bundle: Bundle) -> str:
    return str(bundle.manifest["conductance"]["layer"])


def predictions(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


def test_saliency_is_the_absolute_input_gradient(setup: tuple[Any, ...], fresh: torch.nn.Module) -> None:
    _, _, explainer, _, x = setup
    target = predictions(fresh, x)
    attr, delta = explainer.attribute(x, target, "saliency")
    leaf = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fresh(leaf).gather(1, target.view(-1, 1)).sum(), leaf)
    assert delta is None and attr.shape == x.shape
    torch.testing.assert_close(attr, grad.abs(), rtol=1e-5, atol=1e-7)
    assert float(attr.abs().max()) > 0


def test_grad_cam_is_relu_of_channel_weighted_activations(
    setup: tuple[Any, ...], fresh: torch.nn.Module
) -> None:
    bundle, _, explainer, _, x = setup
    target = predictions(fresh, x)
    saved: dict[str, torch.Tensor] = {}

    def keep(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> None:
        saved["a"] = output

    handle = resolve_layer(fresh, layer_name(bundle)).register_forward_hook(keep)
    try:
        logits = fresh(x)
    finally:
        handle.remove()
    act = saved["a"]
    (grad,) = torch.autograd.grad(logits.gather(1, target.view(-1, 1)).sum(), act)
    weights = grad.mean((2, 3), keepdim=True)  # mean over positions of dY/dA_c
    by_hand = torch.relu((weights * act).sum(1, keepdim=True)).detach()
    cam = explainer.grad_cam_layer(x, target)
    torch.testing.assert_close(cam, by_hand, rtol=1e-4, atol=1e-6)
    assert float(cam.max()) > 0 and float(cam.min()) >= 0
    up, _ = explainer.attribute(x, target, "grad_cam")
    assert up.shape == (x.shape[0], 1, *x.shape[2:])
    torch.testing.assert_close(
        up, F.interpolate(by_hand, size=x.shape[2:], mode="bilinear"), rtol=1e-4, atol=1e-6
    )


def test_integrated_gradients_are_complete(setup: tuple[Any, ...], fresh: torch.nn.Module) -> None:
    bundle, gate, _, _, x = setup
    x = x[:4]
    target = predictions(fresh, x)
    with torch.no_grad():  # the baseline is the conductance's: zeros in normalised space here
        gap = (fresh(x) - fresh(torch.zeros_like(x[:1]))).gather(1, target.view(-1, 1)).view(-1)
    relative = []
    for steps in (8, 64):
        attr, delta = Explainer.from_gate(gate, bundle, ig_steps=steps).attribute(
            x, target, "integrated_gradients"
        )
        assert delta is not None and attr.shape == x.shape
        total = attr.sum((1, 2, 3))
        # captum's delta is exactly the completeness gap sum(attr) - (F(x) - F(x'))
        torch.testing.assert_close(delta.float(), (total - gap).float(), rtol=0, atol=1e-4)
        relative.append(float(((total - gap).abs() / gap.abs().clamp_min(1e-6)).max()))
    # and it closes as the integration points grow: the attributions do add up to F(x) - F(x')
    assert relative[1] < 0.05 and relative[1] < relative[0]


def test_top_feature_maps_of_the_runner_up_are_its_own(
    setup: tuple[Any, ...], fresh: torch.nn.Module
) -> None:
    bundle, _, explainer, _, x = setup
    explanations = explainer.explain(x, "saliency", top_k=5)
    with torch.no_grad():
        top2 = fresh(x).topk(2, dim=1).indices
    assert [e.target for e in explanations] == top2[:, 0].tolist()
    assert [e.runner_up for e in explanations] == top2[:, 1].tolist()
    general = LayerConductance(fresh, layer_name(bundle), n_steps=10)
    for name, column in (("predicted", 0), ("runner_up", 1)):
        cond = general.attribute(x, target=top2[:, column]).conductance.double()
        for i, e in enumerate(explanations):
            maps = e.predicted_maps if name == "predicted" else e.runner_up_maps
            channels = [m.channel for m in maps]
            assert channels == torch.argsort(cond[i], descending=True)[:5].tolist(), (name, i)
            scale = float(cond[i].abs().max())
            np.testing.assert_allclose(
                [m.conductance for m in maps], cond[i, channels].numpy(), atol=1e-4 * scale
            )
    assert all(
        [m.channel for m in e.predicted_maps] != [m.channel for m in e.runner_up_maps] for e in explanations
    )


def test_overlay_and_feature_map_pngs(setup: tuple[Any, ...]) -> None:
    _, _, explainer, images, x = setup
    (e,) = explainer.explain(x[:1], top_k=3)
    overlay = Image.open(io.BytesIO(e.overlay_png))
    h, w = images.shape[1:3]
    factor = -(-112 // max(h, w))
    assert overlay.format == "PNG" and overlay.mode == "RGB" and overlay.size == (2 * w * factor, h * factor)
    pixels = np.asarray(overlay)
    # left panel: the image as sent (de-normalised), each pixel a factor x factor square
    np.testing.assert_array_equal(pixels[::factor, : w * factor : factor, 0], images[0, :, :, 0])
    assert (pixels[:, w * factor :] != pixels[:, : w * factor]).any()  # the heat shows on the right
    assert e.heat.shape == (h, w) and 0.0 <= e.heat.min() and e.heat.max() == pytest.approx(1.0)
    assert len(e.predicted_maps) == 3 and all(m.png is not None for m in e.predicted_maps)
    first = e.predicted_maps[0].png
    assert first is not None
    small = Image.open(io.BytesIO(first))
    assert small.format == "PNG" and min(small.size) >= 56
    assert set(e.seconds) == {"conductance", "attribution", "render"}


def test_rendering_helpers() -> None:
    maps = torch.tensor([[[0.0, 1.0], [2.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]])
    heat = normalise_heat(maps)
    assert heat[1].max() == 0 and heat[0].max() == 1.0 and heat[0, 0, 0] == 0
    grey = np.full((4, 4, 3), 100, dtype=np.uint8)
    png = Image.open(io.BytesIO(overlay_png(grey, np.zeros((4, 4)), min_px=8)))
    assert png.size == (16, 8) and (np.asarray(png) == 100).all()  # zero heat leaves the picture alone
    assert Image.open(io.BytesIO(feature_map_png(torch.ones(3, 3), min_px=9))).size == (9, 9)
    # de-normalising undoes the bundle's normalisation to the uint8 pixels
    pixels = denormalise(torch.tensor([[[-2.0, 0.0, 2.0]]]), Normalisation((0.5,), (0.25,)))
    assert pixels.shape == (1, 3, 3) and pixels[0, :, 0].tolist() == [0, 128, 255]


def test_bad_options_are_refused(setup: tuple[Any, ...]) -> None:
    _, gate, explainer, _, x = setup
    with pytest.raises(ConfigError, match="unknown explanation method 'lime'.*saliency"):
        explainer.explain(x[:1], "lime")
    with pytest.raises(ConfigError, match="top_k_maps"):
        explainer.explain(x[:1], top_k=0)
    assert set(METHODS) == {"saliency", "integrated_gradients", "grad_cam"}
    # captum hooks a private copy: the gate's own layer never sees them
    assert explainer.model is not gate.extractor.model
    explainer.explain(x[:2], "grad_cam")
    assert not resolve_layer(gate.extractor.model, explainer.layer_name)._forward_hooks
