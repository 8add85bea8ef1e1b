"""Cleanliness and top-k overlap against naive implementations; instability is 0 for a map that
cannot move."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.attribution_metrics import attribution_instability, cleanliness, top_k_overlap
from models.errors import ConfigError


def test_cleanliness_is_the_cosine_of_the_absolute_map_with_the_image() -> None:
    rng = np.random.default_rng(0)
    heat = rng.normal(size=(5, 6, 6))
    images = rng.integers(0, 256, (5, 6, 6, 3)).astype(np.uint8)
    got = cleanliness(heat, images)
    for i in range(5):
        m, x = np.abs(heat[i]).ravel(), images[i].astype(float).mean(-1).ravel()
        assert got[i] == pytest.approx(m @ x / (np.linalg.norm(m) * np.linalg.norm(x)))
    assert cleanliness(np.zeros((1, 6, 6)), images[:1])[0] == 0.0
    on_object = np.zeros((1, 6, 6, 1), np.uint8)
    on_object[0, 2:4, 2:4] = 255
    assert cleanliness(on_object[..., 0].astype(float), on_object)[0] == pytest.approx(1.0)


def test_top_k_overlap_counts_the_shared_top_pixels() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.random((8, 5, 5)), rng.random((8, 5, 5))
    got = top_k_overlap(a, b, 7)
    for i in range(8):
        top_a = set(np.argsort(-a[i].ravel())[:7])
        top_b = set(np.argsort(-b[i].ravel())[:7])
        assert got[i] == pytest.approx(len(top_a & top_b) / 7)
    assert np.all(top_k_overlap(a, a, 7) == 1.0)
    with pytest.raises(ConfigError, match="k must be"):
        top_k_overlap(a, b, 26)


class _Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class _Explainer:
    """Saliency of a linear model: the map is |w_target|, whatever the input."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = _Linear().eval()
        self.device = torch.device("cpu")

    def attribute(self, x: torch.Tensor, target: torch.Tensor, method: str):
        return self.model.fc.weight[target].detach().abs().reshape(len(x), 1, 4, 4), None


def test_instability_is_zero_where_the_map_does_not_depend_on_the_input() -> None:
    explainer = _Explainer()
    x = torch.randn(6, 1, 4, 4)
    # the predicted class of x + noise may differ; the target stays the class predicted on x
    assert np.all(attribution_instability(explainer, x, "saliency", k=4, noise_std=0.5) == 0.0)
