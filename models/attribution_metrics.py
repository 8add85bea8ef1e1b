"""Numbers about attribution maps: how clean a map is, how much two maps agree, and whether a map is stable.

The seeds compare the saliency maps of naturally and adversarially trained models on clean and
adversarial inputs. Two of their numbers are computed here, for any map of
:meth:`models.explanations.Explainer.attribute` (turned into an ``N x H x W`` heat by
:func:`models.explanations.attribution_heat`):

* **cleanliness** (second seed): the inner product of ``|map|`` with the image, normalised, i.e. the
  cosine between the two as vectors. On Fashion-MNIST-like images (dark background, bright object) a
  map that sits on the object scores high, a noisy map that covers the background scores low.
* **top-k overlap** (fourth seed's "interpretation discrepancy" is one minus it): the share of the
  ``k`` most attributed pixels of one map that are among the ``k`` most attributed pixels of another,
  e.g. of an input and of its adversarial version.

A service never sees the clean twin of an adversarial input, so a signal has to come from the input
alone: :func:`attribution_instability` is one minus the top-k overlap between the map of the input and
the map of the same input with small Gaussian noise, both for the class predicted on the input. Its
cost is two attributions (two backward passes for saliency and Grad-CAM).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from models.errors import ConfigError
from models.explanations import Explainer, attribution_heat


def heat_maps(explainer: Explainer, x: Tensor, target: Tensor, method: str, batch: int = 128) -> np.ndarray:
    """``N x H x W`` non-negative maps of ``target``'s logit for normalised inputs ``x``, in batches."""
    parts = []
    for start in range(0, len(x), batch):
        attr, _ = explainer.attribute(x[start : start + batch], target[start : start + batch], method)
        parts.append(attribution_heat(attr, method).double().cpu().numpy())
    return np.concatenate(parts) if parts else np.zeros((0, *x.shape[2:]))


def cleanliness(heat: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Per image, ``<|m|, x> / (||m|| ||x||)`` with ``x`` the image's pixels (channels averaged).

    ``heat``: ``N x H x W``; ``images``: ``N x H x W x C`` uint8 (or floats). 0 where either is all zero."""
    m = np.abs(np.asarray(heat, dtype=np.float64)).reshape(len(heat), -1)
    x = np.asarray(images, dtype=np.float64).mean(axis=-1).reshape(len(images), -1)
    if m.shape != x.shape:
        raise ConfigError(f"maps {heat.shape} and images {np.shape(images)} do not have the same pixels")
    norm = np.linalg.norm(m, axis=1) * np.linalg.norm(x, axis=1)
    return np.where(norm > 0, (m * x).sum(1) / np.where(norm > 0, norm, 1.0), 0.0)


def top_k_overlap(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """Per row, ``|top_k(a) & top_k(b)| / k`` over the pixels of ``N x H x W`` maps (ties broken by
    position, as ``argsort`` does)."""
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    if a.shape != b.shape:
        raise ConfigError(f"maps of different shapes: {a.shape} and {b.shape}")
    if not 1 <= k <= a.shape[1]:
        raise ConfigError(f"k must be in [1, {a.shape[1]}], got {k}")
    top_a = np.argsort(-a, axis=1, kind="stable")[:, :k]
    top_b = np.argsort(-b, axis=1, kind="stable")[:, :k]
    hits = np.zeros(len(a), dtype=np.int64)
    for row in range(len(a)):
        hits[row] = np.intersect1d(top_a[row], top_b[row], assume_unique=True).size
    return hits / k


def attribution_instability(
    explainer: Explainer,
    x: Tensor,
    method: str,
    *,
    k: int,
    noise_std: float = 0.1,
    seed: int = 0,
) -> np.ndarray:
    """Per input, ``1 - top_k_overlap(map(x), map(x + noise))`` for the class predicted on ``x``;
    ``noise_std`` is in the normalised input's units. Higher = less stable = more suspect."""
    with torch.no_grad():
        target = explainer.model(x.to(explainer.device)).argmax(1).cpu()
    generator = torch.Generator().manual_seed(seed)
    noisy = x + noise_std * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return 1.0 - top_k_overlap(
        heat_maps(explainer, x, target, method), heat_maps(explainer, noisy, target, method), k
    )
