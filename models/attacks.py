"""Adversarial attacks on a bundle's CNN, from torchattacks (never hand-written).

torchattacks expects inputs in ``[0, 1]`` and clips to that box, so the CNN is wrapped with the
bundle's normalisation (:class:`PixelModel`): budgets (``eps``, step sizes) are in pixel units
(e.g. Fashion-MNIST l-inf 0.1 = 25.5 grey levels), as in the literature.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from models.errors import ConfigError
from models.preprocess import Normalisation

ATTACKS = ("fgsm", "pgd-linf", "pgd-l2", "cw-l2", "deepfool", "square")


class PixelModel(nn.Module):
    """The CNN on ``N x C x H x W`` images in ``[0, 1]``: normalise, then the bundle's model."""

    def __init__(self, model: nn.Module, normalisation: Normalisation) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(normalisation.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(normalisation.std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


@dataclass(frozen=True)
class AttackSpec:
    """One attack and its budget. ``eps`` is the l-inf or l2 radius in pixel units (unused by the
    minimal-perturbation attacks C&W and DeepFool); ``alpha`` the step size (None: the seeds'
    rule ``2.5 * eps / steps``); ``steps`` iterations (queries for Square)."""

    name: str
    eps: float = 0.1
    steps: int = 10
    alpha: float | None = None
    cw_c: float = 1.0
    cw_lr: float = 0.01

    def __post_init__(self) -> None:
        if self.name not in ATTACKS:
            raise ConfigError(f"unknown attack {self.name!r}; valid: {list(ATTACKS)}")
        if self.eps <= 0 or self.steps < 1:
            raise ConfigError(
                f"attack budget must have eps > 0 and steps >= 1, got eps={self.eps}, steps={self.steps}"
            )

    @property
    def step_size(self) -> float:
        return self.alpha if self.alpha is not None else 2.5 * self.eps / self.steps

    @property
    def tag(self) -> str:
        """Folder name of this attack's outputs: the attack and every setting that changes them."""
        if self.name == "fgsm":
            return f"fgsm-eps{self.eps:g}"
        if self.name in ("pgd-linf", "pgd-l2"):
            return f"{self.name}-eps{self.eps:g}-steps{self.steps}-alpha{self.step_size:g}"
        if self.name == "cw-l2":
            return f"cw-l2-c{self.cw_c:g}-steps{self.steps}-lr{self.cw_lr:g}"
        if self.name == "deepfool":
            return f"deepfool-steps{self.steps}"
        return f"square-linf-eps{self.eps:g}-queries{self.steps}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "step_size": self.step_size, "tag": self.tag}


def make_attack(spec: AttackSpec, pixel_model: nn.Module, seed: int = 0) -> Any:
    """The torchattacks object for ``spec`` on ``pixel_model`` (eval mode, inputs in [0, 1])."""
    import torchattacks as ta  # heavy, loaded only by the attack job

    pixel_model.eval()
    if spec.name == "fgsm":
        return ta.FGSM(pixel_model, eps=spec.eps)
    if spec.name == "pgd-linf":
        return ta.PGD(pixel_model, eps=spec.eps, alpha=spec.step_size, steps=spec.steps, random_start=True)
    if spec.name == "pgd-l2":
        return ta.PGDL2(pixel_model, eps=spec.eps, alpha=spec.step_size, steps=spec.steps, random_start=True)
    if spec.name == "cw-l2":
        return ta.CW(pixel_model, c=spec.cw_c, kappa=0.0, steps=spec.steps, lr=spec.cw_lr)
    if spec.name == "deepfool":
        return ta.DeepFool(pixel_model, steps=spec.steps, overshoot=0.02)
    return ta.Square(pixel_model, norm="Linf", eps=spec.eps, n_queries=spec.steps, n_restarts=1, seed=seed)


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """``N x H x W x C`` uint8 -> ``N x C x H x W`` float32 in [0, 1]."""
    return torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).to(torch.float32).div(255.0).contiguous()


def to_uint8(pixels: torch.Tensor | np.ndarray) -> np.ndarray:
    """``N x C x H x W`` in [0, 1] -> ``N x H x W x C`` uint8, rounded: what a PNG of the
    adversarial image carries to the service."""
    arr = torch.as_tensor(pixels).detach().clamp(0, 1).mul(255.0).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).contiguous().numpy()


def attack_batch(
    spec: AttackSpec,
    model: nn.Module,
    normalisation: Normalisation,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Adversarial versions (``N x C x H x W`` float in [0, 1]) of raw uint8 ``images`` against
    their true ``labels``; seeded, so the same call gives the same images (random starts too)."""
    pixel_model = PixelModel(model, normalisation).to(device).eval()
    attack = make_attack(spec, pixel_model, seed=seed)
    x = to_pixels(images).to(device)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=device)
    torch.manual_seed(seed)
    with torch.enable_grad():
        adv = attack(x, y)
    return adv.detach().cpu()


def predict_pixels(
    model: nn.Module, normalisation: Normalisation, pixels: torch.Tensor, batch: int = 512
) -> np.ndarray:
    """The CNN's labels of ``N x C x H x W`` images in [0, 1]."""
    pixel_model = PixelModel(model, normalisation).eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        return np.concatenate(
            [
                pixel_model(pixels[s : s + batch].to(device)).argmax(1).cpu().numpy()
                for s in range(0, len(pixels), batch)
            ]
        )
