"""Explanations for a reviewer: where the CNN looked, and which feature maps carried its decision.

For each image the :class:`Explainer` gives

* an attribution map for the predicted class by one of three captum methods,

  - ``saliency``: ``|dF_p/dx|`` (Simonyan et al. 2014), one backward pass: which pixels, changed a
    little, would change the class score most;
  - ``grad_cam``: ``ReLU(sum_c mean_hw(dF_p/dA_c) * A_c)`` on the conductance layer (Selvaraju et al.
    2017), one backward pass, upsampled to the input: the coarse region the layer's evidence sits in;
  - ``integrated_gradients``: ``(x - x') * mean_k dF_p/dx(x' + a_k (x - x'))`` (Sundararajan et al.
    2017), ``n_steps`` forward and backward rows per image: pixel attributions that add up to
    ``F_p(x) - F_p(x')`` (completeness), from the same baseline ``x'`` as the conductance;

* an overlay PNG, the de-normalised input beside the input with the map as a heat colour on top,
  scaled up so that a person can see a 28-pixel image;
* the top feature maps (channels) of the conductance layer by conductance for the predicted class
  and for the runner-up (the paper's figures 1-2): which internal features pushed the decision, and
  which would have pushed the other way. Conductance comes from the bundle's own conductance object
  (:mod:`models.conductance`, which takes a target class), so these are the very numbers the gate's
  detector reads for the prediction, not a second implementation.

captum registers forward hooks on the module it attributes, and hooks are shared by every thread that
runs the module; the gate may run the same model on another thread at the same time. So captum
works on a private copy of the network, one call at a time (a lock), and the gate's model never
carries a foreign hook. The conductance object's own hook lets other threads through by design.
"""

from __future__ import annotations

import copy
import io
import math
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from models.architectures import check_eval, resolve_layer
from models.conductance import ConductanceResult, LayerConductance, ShortcutConductance
from models.errors import ConfigError, InputError
from models.preprocess import Normalisation

if TYPE_CHECKING:
    from models.bundle import Bundle
    from models.gate import Gate

METHODS = ("saliency", "integrated_gradients", "grad_cam")
DEFAULT_METHOD = "grad_cam"
"""One backward pass to the conductance layer only (cheaper than saliency's pass to the input) and a
map a person reads at a glance; integrated gradients costs ``n_steps`` times more."""
DEFAULT_IG_STEPS = 16
"""Gauss-Legendre points for integrated gradients: on the tiny test bundle the completeness gap is a
small fraction of ``F_p(x) - F_p(x')`` with 16, and every point is a forward and a backward row."""
DEFAULT_TOP_K = 5
OVERLAY_MIN_PX = 112
FEATURE_MAP_MIN_PX = 56
HEAT_ALPHA = 0.6
HEAT_CLIP_PERCENTILE = 99.0
"""A few extreme pixels (saliency, IG) would otherwise make the rest of the map invisible."""

# Black - purple - red - orange - pale yellow: dark means no attribution, so low values leave the
# image visible and high ones stand out, in grey-scale print too (monotone luminance).
_HEAT_ANCHORS = np.array(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64
)


@dataclass(frozen=True)
class FeatureMap:
    """One channel of the conductance layer: its conductance for a class and, optionally, its activation."""

    channel: int
    conductance: float
    png: bytes | None = None


@dataclass(frozen=True)
class Explanation:
    """What a reviewer sees for one image.

    ``heat`` is ``H x W`` in [0, 1] (the overlay's map); ``convergence_delta`` is integrated
    gradients' completeness gap ``sum(attr) - (F_p(x) - F_p(x'))`` (None for other methods).
    """

    method: str
    target: int
    runner_up: int
    heat: np.ndarray
    overlay_png: bytes
    predicted_maps: list[FeatureMap]
    runner_up_maps: list[FeatureMap]
    convergence_delta: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def check_method(method: str) -> str:
    """``method`` if it is one of :data:`METHODS`, else :class:`ConfigError` naming the choices."""
    if method not in METHODS:
        raise ConfigError(f"unknown explanation method {method!r}; valid choices: {list(METHODS)}")
    return method


# --------------------------------------------------------------------------------------------------
# Rendering (numpy + PIL; no plotting library)
# --------------------------------------------------------------------------------------------------


def heat_colours(heat: np.ndarray) -> np.ndarray:
    """``... x 3`` float RGB in [0, 255] for values in [0, 1], by linear interpolation of the anchors."""
    pos = np.clip(heat, 0.0, 1.0) * (len(_HEAT_ANCHORS) - 1)
    low = np.minimum(np.floor(pos).astype(np.int64), len(_HEAT_ANCHORS) - 2)
    frac = (pos - low)[..., None]
    return _HEAT_ANCHORS[low] * (1.0 - frac) + _HEAT_ANCHORS[low + 1] * frac


def denormalise(x: Tensor, normalisation: Normalisation) -> np.ndarray:
    """``C x H x W`` normalised image -> ``H x W x 3`` uint8 as the camera saw it (grey becomes RGB)."""
    pixels = normalisation.invert(x.detach().float().cpu().numpy())
    if pixels.shape[2] == 3:
        return pixels
    return np.repeat(pixels.mean(2, keepdims=True).round().astype(np.uint8), 3, axis=2)


def scale_factor(shape: tuple[int, ...], min_px: int) -> int:
    """The whole factor that brings the longer side of ``shape`` (``H, W, ...``) to ``min_px`` or more."""
    return max(1, math.ceil(min_px / max(shape[:2])))


def _png(rgb: np.ndarray, factor: int) -> bytes:
    """PNG of ``H x W x 3`` uint8 scaled up ``factor`` times (nearest: pixels stay visible squares)."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")
    if factor > 1:
        image = image.resize((rgb.shape[1] * factor, rgb.shape[0] * factor), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def overlay_png(image: np.ndarray, heat: np.ndarray, min_px: int = OVERLAY_MIN_PX) -> bytes:
    """The input (``H x W x 3`` uint8) beside the input with ``heat`` (``H x W``, [0, 1]) blended on it.

    The blend weight grows with the heat, so where the map is zero the picture shows through unchanged.
    Each panel's longer side is at least ``min_px``.
    """
    if heat.shape != image.shape[:2]:
        raise InputError(f"heat map is {heat.shape}, the image {image.shape[:2]}")
    alpha = HEAT_ALPHA * np.clip(heat, 0.0, 1.0)[..., None]
    blended = (1.0 - alpha) * image.astype(np.float64) + alpha * heat_colours(heat)
    panels = np.concatenate([image, blended.round().astype(np.uint8)], axis=1)
    return _png(panels, scale_factor(image.shape, min_px))


def feature_map_png(activation: Tensor, min_px: int = FEATURE_MAP_MIN_PX) -> bytes:
    """One channel's activation (``h x w``) as a heat-coloured PNG, min-max scaled within the map."""
    values = activation.detach().double().cpu().numpy()
    span = float(values.max() - values.min())
    scaled = (values - values.min()) / span if span > 0 else np.zeros_like(values)
    return _png(heat_colours(scaled).round().astype(np.uint8), scale_factor(values.shape, min_px))


def normalise_heat(maps: Tensor) -> np.ndarray:
    """``N x H x W`` non-negative maps -> [0, 1], each divided by its own 99th percentile (then clipped);
    an all-zero map stays zero."""
    values = maps.detach().double().cpu().numpy()
    flat = values.reshape(values.shape[0], -1)
    scale = np.percentile(flat, HEAT_CLIP_PERCENTILE, axis=1)
    scale = np.where(scale > 0, scale, flat.max(1))
    scale = np.where(scale > 0, scale, 1.0)
    return np.clip(values / scale[:, None, None], 0.0, 1.0)


def attribution_heat(attr: Tensor, method: str) -> Tensor:
    """``N x H x W`` non-negative map from a method's attribution: Grad-CAM's single channel as is
    (already ReLU'd), the largest absolute value over the input channels for saliency and IG (a pixel
    matters whichever way it pushes)."""
    if check_method(method) == "grad_cam":
        return attr[:, 0]
    return attr.abs().amax(1)


# --------------------------------------------------------------------------------------------------
# The explainer
# --------------------------------------------------------------------------------------------------


def _top(values: Tensor, k: int) -> tuple[list[list[int]], list[list[float]]]:
    """Per row, the ``k`` largest entries' indices and values (largest first)."""
    top = torch.topk(values.detach().double().cpu(), k, dim=1)
    return top.indices.tolist(), top.values.tolist()


class Explainer:
    """Attribution maps, overlays and top feature maps for a bundle's CNN.

    Parameters
    ----------
    model : nn.Module
        The torch classifier (eval mode); captum works on a private copy of it.
    layer : str
        The conductance layer's module name (Grad-CAM attributes to it too).
    conductance : ShortcutConductance or LayerConductance
        The gate's conductance object; its baseline is integrated gradients' baseline.
    normalisation : Normalisation
        To show the input as it was before normalisation.
    ig_steps : int
        Integration points of integrated gradients.
    ig_batch : int
        Rows per internal batch of integrated gradients (bounds memory: ``n_images * ig_steps`` rows).
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str,
        conductance: ShortcutConductance | LayerConductance,
        normalisation: Normalisation,
        *,
        ig_steps: int = DEFAULT_IG_STEPS,
        ig_batch: int = 256,
    ) -> None:
        if isinstance(ig_steps, bool) or not isinstance(ig_steps, int) or ig_steps < 1:
            raise ConfigError(f"ig_steps must be a positive integer, got {ig_steps!r}")
        check_eval(model, "explanations")
        self.model = copy.deepcopy(model)
        self.layer_name = layer
        self.layer = resolve_layer(self.model, layer)
        self.conductance = conductance
        self.normalisation = normalisation
        self.ig_steps = ig_steps
        self.ig_batch = ig_batch
        self._lock = threading.Lock()

    @classmethod
    def from_gate(cls, gate: Gate, bundle: Bundle, **kwargs: int) -> Explainer:
        """The explainer of a gate loaded from ``bundle``: the gate's torch model (on every backend)
        and conductance object, the bundle's layer and normalisation."""
        extractor = gate.extractor
        model = extractor.model
        if extractor.conductance is None:
            raise ConfigError("explanations need the gate's conductance layer, and this gate has none")
        layer = str(bundle.manifest["conductance"]["layer"])
        return cls(model, layer, extractor.conductance, bundle.normalisation, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def baseline(self, x: Tensor) -> Tensor:
        """The conductance's path start (zeros when it keeps none), as ``1 x C x H x W`` like ``x``."""
        base = getattr(self.conductance, "baseline", None)
        if base is None:
            return torch.zeros((1, *x.shape[1:]), dtype=x.dtype, device=x.device)
        return base.to(device=x.device, dtype=x.dtype).reshape(1, *x.shape[1:])

    # -- attribution ------------------------------------------------------------------------------

    def attribute(self, x: Tensor, target: Tensor, method: str) -> tuple[Tensor, Tensor | None]:
        """captum's attribution of ``target``'s logit for each image, and IG's convergence delta.

        Returns ``N x C x H x W`` for saliency (absolute gradient) and integrated gradients, ``N x 1 x H
        x W`` for Grad-CAM (upsampled bilinearly from the layer's size); the delta is ``N`` for
        integrated gradients, else None.
        """
        from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Saliency

        check_method(method)
        x = x.to(self.device)
        target = torch.as_tensor(target).long().to(self.device)
        if torch.is_inference_mode_enabled():
            raise ConfigError("explanations need autograd; call them outside inference_mode")
        with self._lock, torch.enable_grad():
            if method == "saliency":  # a leaf of its own: the caller's tensor is left as it was
                leaf = x.detach().clone().requires_grad_(True)
                return Saliency(self.model).attribute(leaf, target=target, abs=True).detach(), None
            if method == "grad_cam":
                cam = LayerGradCam(self.model, self.layer).attribute(x, target=target, relu_attributions=True)
                up = LayerAttribution.interpolate(cam, tuple(x.shape[2:]), interpolate_mode="bilinear")
                return up.detach(), None
            attr, delta = IntegratedGradients(self.model).attribute(
                x,
                baselines=self.baseline(x),
                target=target,
                n_steps=self.ig_steps,
                internal_batch_size=self.ig_batch,
                return_convergence_delta=True,
            )
            return attr.detach(), delta.detach()

    def grad_cam_layer(self, x: Tensor, target: Tensor) -> Tensor:
        """Grad-CAM at the layer's own resolution (``N x 1 x h x w``), before upsampling."""
        from captum.attr import LayerGradCam

        with self._lock, torch.enable_grad():
            cam = LayerGradCam(self.model, self.layer).attribute(
                x.to(self.device),
                target=torch.as_tensor(target).long().to(self.device),
                relu_attributions=True,
            )
        return cam.detach()

    # -- feature maps -----------------------------------------------------------------------------

    def class_conductance(self, x: Tensor, target: Tensor | None = None) -> ConductanceResult:
        """The gate's per-channel conductance for ``target`` (the prediction when None), with the
        layer's activation."""
        return self.conductance.attribute(x.to(self.device), target, return_activation=True)

    def _maps(
        self, channels: list[int], values: list[float], activation: Tensor | None, with_png: bool
    ) -> list[FeatureMap]:
        return [
            FeatureMap(
                channel=c,
                conductance=v,
                png=feature_map_png(activation[c]) if with_png and activation is not None else None,
            )
            for c, v in zip(channels, values, strict=True)
        ]

    # -- the whole explanation --------------------------------------------------------------------

    def explain(
        self,
        x: Tensor,
        method: str = DEFAULT_METHOD,
        top_k: int = DEFAULT_TOP_K,
        *,
        feature_map_pngs: bool = True,
    ) -> list[Explanation]:
        """One :class:`Explanation` per image of ``x`` (``N x C x H x W``, normalised), batched.

        The predicted class and the runner-up come from the conductance pass's logits (the same
        forward the gate makes); the runner-up's conductance is a second pass with it as the target.
        """
        check_method(method)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ConfigError(f"top_k_maps must be a positive integer, got {top_k!r}")
        if x.ndim != 4 or x.shape[0] == 0:
            raise InputError(f"expected N x C x H x W images, got shape {tuple(x.shape)}")
        seconds: dict[str, float] = {}
        start = time.perf_counter()
        predicted = self.class_conductance(x)
        n_classes = predicted.logits.shape[1]
        runner_up_class = (
            predicted.logits.topk(2, dim=1).indices[:, 1] if n_classes > 1 else predicted.prediction.clone()
        )
        runner = self.conductance.attribute(x.to(self.device), runner_up_class)
        seconds["conductance"] = time.perf_counter() - start
        start = time.perf_counter()
        attr, delta = self.attribute(x, predicted.prediction, method)
        heat = normalise_heat(attribution_heat(attr, method))
        seconds["attribution"] = time.perf_counter() - start
        start = time.perf_counter()
        k = min(top_k, predicted.conductance.shape[1])
        top_pred, top_runner = _top(predicted.conductance, k), _top(runner.conductance, k)
        parts = []
        for i in range(x.shape[0]):
            act = predicted.activation[i] if predicted.activation is not None else None
            parts.append(
                {
                    "overlay_png": overlay_png(denormalise(x[i], self.normalisation), heat[i]),
                    "predicted_maps": self._maps(top_pred[0][i], top_pred[1][i], act, feature_map_pngs),
                    "runner_up_maps": self._maps(top_runner[0][i], top_runner[1][i], act, feature_map_pngs),
                }
            )
        seconds["render"] = time.perf_counter() - start
        return [
            Explanation(
                method=method,
                target=int(predicted.prediction[i]),
                runner_up=int(runner_up_class[i]),
                heat=heat[i],
                convergence_delta=None if delta is None else float(delta[i]),
                seconds=dict(seconds),
                **part,
            )
            for i, part in enumerate(parts)
        ]
