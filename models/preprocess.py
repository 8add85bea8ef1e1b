"""Turn raw uint8 images into the normalised tensors the CNN (and the conductance baseline) expect."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class Normalisation:
    """Per-channel statistics of cnn-train, in units of [0, 1] pixel values."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_images(cls, images: np.ndarray) -> Normalisation:
        """Statistics of an ``N x H x W x C`` uint8 array (computed on cnn-train only)."""
        data = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
        return cls(tuple(float(v) for v in data.mean(0)), tuple(float(v) for v in data.std(0)))

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict[str, list[float]]) -> Normalisation:
        return cls(tuple(data["mean"]), tuple(data["std"]))

    def apply(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``N x H x W x C`` uint8 -> ``N x C x H x W`` float32, normalised: ``(x / 255 - mean) / std``.

        One float32 batch is written and normalised in place (no intermediate batches), with the
        per-channel constants of :attr:`_constants` built once per normalisation, not per call; the
        arithmetic is the same, operation for operation, as the out-of-place form.
        """
        tensor = torch.as_tensor(np.asarray(images))
        if tensor.ndim != 4:
            raise ValueError(f"expected N x H x W x C images, got shape {tuple(tensor.shape)}")
        mean, std = self._constants
        channels_first = tensor.permute(0, 3, 1, 2)
        # A new batch, never the caller's tensor (normalised in place below), in the pixels' own
        # memory order (channels last, as decoded), as the out-of-place form had it: writing it
        # channels-first moved stage costs by -25% to +35% (docs/performance.md).
        out = torch.empty_like(channels_first, dtype=torch.float32)
        out.copy_(channels_first)
        return out.div_(255.0).sub_(mean).div_(std)

    @functools.cached_property
    def _constants(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)``, each ``1 x C x 1 x 1`` float32."""
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return mean, std

    def invert(self, tensor: np.ndarray | torch.Tensor) -> np.ndarray:
        """``C x H x W`` normalised floats -> ``H x W x C`` uint8, the inverse of :meth:`apply` (rounded,
        clipped to [0, 255]): how a person sees an input that arrived as a tensor."""
        x = np.asarray(tensor, dtype=np.float64)
        if x.ndim != 3 or x.shape[0] != len(self.mean):
            raise ValueError(f"expected a {len(self.mean)} x H x W tensor, got shape {x.shape}")
        mean = np.asarray(self.mean).reshape(-1, 1, 1)
        std = np.asarray(self.std).reshape(-1, 1, 1)
        pixels = np.clip(np.rint((x * std + mean) * 255.0), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(pixels.transpose(1, 2, 0))


def resize_and_crop(image: Any, image_size: int) -> Any:
    """Scale a PIL image so its shorter side is ``image_size`` (bilinear, antialiased), then cut the
    centre square: keeps the aspect ratio, unlike a plain resize.

    Rounding follows torchvision's ``Resize(size)`` + ``CenterCrop(size)`` (long side truncated,
    crop offset rounded), so images prepared either way are pixel-identical.
    """
    from PIL import Image

    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(image_size * long / short)
    new_w, new_h = (image_size, new_long) if width <= height else (new_long, image_size)
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top, left = round((new_h - image_size) / 2.0), round((new_w - image_size) / 2.0)
    return image.crop((left, top, left + image_size, top + image_size))


def conform_images(images: np.ndarray, size: int | None, channels: int) -> np.ndarray:
    """``N x H x W x C`` uint8 images as a model of ``channels`` channels and ``size`` x ``size``
    pixels takes them, converted image by image exactly as :func:`models.image_input.decode_image`
    converts an upload: PIL ``convert`` to ``L`` / ``RGB`` (grey repeated into RGB, RGB to ITU-R 601-2
    luma), then :func:`resize_and_crop`. Returns ``images`` itself when nothing changes."""
    from PIL import Image

    n, h, w, c = images.shape
    if c == channels and (size is None or (h, w) == (size, size)):
        return images
    if channels not in (1, 3) or c not in (1, 3):
        raise ValueError(f"images can be converted between 1 and 3 channels, not {c} -> {channels}")
    out_h, out_w = (h, w) if size is None else (size, size)
    out = np.empty((n, out_h, out_w, channels), dtype=np.uint8)
    mode = "L" if channels == 1 else "RGB"
    for i in range(n):
        image = Image.fromarray(np.ascontiguousarray(images[i, :, :, 0] if c == 1 else images[i]))
        if image.mode != mode:
            image = image.convert(mode)
        if size is not None and image.size != (size, size):
            image = resize_and_crop(image, size)
        out[i] = np.asarray(image, dtype=np.uint8).reshape(out_h, out_w, channels)
    return out
