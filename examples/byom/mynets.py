"""A classifier of one's own, for ``predgate build --arch mynets:SmallVGG --code-path examples/byom``
(README: Bring your own model). Any ``nn.Module`` that takes ``N x C x H x W`` floats and returns
``N x num_classes`` logits will do; predgate passes ``num_classes`` and ``in_channels`` when the
constructor takes them, and everything else comes from ``--arch-kwargs``."""

from __future__ import annotations

import torch
from torch import nn


def _block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class SmallVGG(nn.Module):
    """Two VGG stages (two 3x3 convs each, then 2x2 max pooling) and a third conv pair; global
    average pooling and a linear head, so the conductance shortcut applies at ``features``."""

    def __init__(self, width: int = 32, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_block(in_channels, width),
            *_block(width, width),
            nn.MaxPool2d(2),
            *_block(width, 2 * width),
            *_block(2 * width, 2 * width),
            nn.MaxPool2d(2),
            *_block(2 * width, 4 * width),
            *_block(4 * width, 4 * width),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))
