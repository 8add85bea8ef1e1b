"""Training-time augmentation on raw pixels and the torch ``Dataset`` that feeds training."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from models.data import ImageArrays
from models.preprocess import Normalisation


def augment_images(
    images: torch.Tensor, flip: bool, crop_padding: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crop after zero padding, then random horizontal flip, on raw pixels.

    Works on a whole batch at once (on any device) so GPU training need not go image by image;
    padding is black pixels, as torchvision's ``RandomCrop(padding=...)`` does.

    Parameters
    ----------
    images : torch.Tensor
        ``N x H x W x C`` uint8.
    flip : bool
        Flip each image left-right with probability 1/2 (not for digits or text).
    crop_padding : int
        Pad by this many pixels on each side, then cut a random ``H x W`` window.
    generator : torch.Generator, optional
        On the CPU; default: torch's global generator.
    """
    n, height, width, _ = images.shape
    device = images.device
    out = images
    if crop_padding > 0:
        pad = crop_padding
        padded = torch.nn.functional.pad(images, (0, 0, pad, pad, pad, pad))
        top = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(device)
        left = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(device)
        rows = top[:, None] + torch.arange(height, device=device)[None, :]
        cols = left[:, None] + torch.arange(width, device=device)[None, :]
        out = padded[torch.arange(n, device=device)[:, None, None], rows[:, :, None], cols[:, None, :]]
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(device)
        out = torch.where(mask[:, None, None, None], out.flip(2), out)
    return out


class ArrayDataset(Dataset):
    """``(normalised C x H x W float32 tensor, label)`` pairs for a ``DataLoader``.

    Normalisation goes through ``Normalisation.apply``, the same call the gate makes at serve
    time, so a trained model never sees inputs scaled differently from what it is served.

    Parameters
    ----------
    arrays : ImageArrays
    normalisation : Normalisation
        Per-channel statistics (of cnn-train).
    augment : bool
        Apply ``augment_images`` to each item; ``False`` for every split but cnn-train.
    flip : bool
        With ``augment``: random horizontal flips (natural images such as CIFAR-10 only).
    crop_padding : int
        With ``augment``: random crops after padding by this many pixels.
    """

    def __init__(
        self,
        arrays: ImageArrays,
        normalisation: Normalisation,
        augment: bool = False,
        flip: bool = False,
        crop_padding: int = 0,
    ) -> None:
        if len(normalisation.mean) != arrays.images.shape[-1]:
            raise ValueError(
                f"normalisation has {len(normalisation.mean)} channels, images have {arrays.images.shape[-1]}"
            )
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        self.arrays = arrays
        self.normalisation = normalisation
        self.augment, self.flip, self.crop_padding = augment, flip, crop_padding

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = range(len(self))[index]  # negative indices; IndexError past the end
        image = torch.from_numpy(self.arrays.images[index : index + 1])
        if self.augment:
            image = augment_images(image, self.flip, self.crop_padding)
        return self.normalisation.apply(image)[0], int(self.arrays.labels[index])
