"""The training dataset against the serving-time normalisation, and augmentation against a brute-force
search."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.data import ImageArrays
from models.preprocess import Normalisation
from offline.augment import ArrayDataset, augment_images
from tests.fixtures import class_images


def _rgb_arrays(n: int = 6) -> ImageArrays:
    images, labels = class_images(n, (8, 8, 3), seed=5)
    return ImageArrays(images, labels, [str(i) for i in range(10)])


def test_unaugmented_items_equal_serving_normalisation() -> None:
    arrays = _rgb_arrays()
    norm = Normalisation.from_images(arrays.images)
    dataset = ArrayDataset(arrays, norm)
    for i in range(len(arrays)):
        tensor, label = dataset[i]
        assert tensor.shape == (3, 8, 8) and tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, norm.apply(arrays.images[i : i + 1])[0], rtol=0, atol=0)
        assert label == arrays.labels[i]
    # An independent formula for the same thing.
    by_hand = (arrays.images[2].transpose(2, 0, 1) / 255.0 - np.array(norm.mean)[:, None, None]) / np.array(
        norm.std
    )[:, None, None]
    np.testing.assert_allclose(dataset[2][0].numpy(), by_hand, atol=1e-5)
    torch.testing.assert_close(dataset[-1][0], dataset[len(arrays) - 1][0])
    with pytest.raises(IndexError):
        dataset[len(arrays)]
    batch, labels = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch.shape == (4, 3, 8, 8) and labels.dtype == torch.int64
    with pytest.raises(ValueError, match="channels"):
        ArrayDataset(arrays, Normalisation((0.5,), (0.2,)))


def test_augmented_images_are_padded_windows_or_their_mirrors() -> None:
    """Checked against a brute-force search over every crop offset and flip."""
    arrays = _rgb_arrays(16)
    pad = 2
    out = augment_images(
        torch.from_numpy(arrays.images),
        flip=True,
        crop_padding=pad,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.shape == (16, 8, 8, 3) and out.dtype == torch.uint8
    flipped_seen = unflipped_seen = False
    for image, result in zip(arrays.images, out.numpy(), strict=True):
        padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
        windows = [padded[t : t + 8, s : s + 8] for t in range(2 * pad + 1) for s in range(2 * pad + 1)]
        plain = any(np.array_equal(result, w) for w in windows)
        mirrored = any(np.array_equal(result, w[:, ::-1]) for w in windows)
        assert plain or mirrored
        unflipped_seen |= plain
        flipped_seen |= mirrored
    assert flipped_seen and unflipped_seen
    identity = augment_images(torch.from_numpy(arrays.images), flip=False, crop_padding=0)
    np.testing.assert_array_equal(identity.numpy(), arrays.images)
    only_crop = augment_images(torch.from_numpy(arrays.images), flip=False, crop_padding=1)
    assert any(not np.array_equal(a, b) for a, b in zip(only_crop.numpy(), arrays.images, strict=True))


def test_augmented_dataset_normalises_the_augmented_pixels() -> None:
    arrays = _rgb_arrays(4)
    norm = Normalisation.from_images(arrays.images)
    dataset = ArrayDataset(arrays, norm, augment=True, flip=True, crop_padding=3)
    torch.manual_seed(11)
    item, _ = dataset[1]
    torch.manual_seed(11)
    pixels = augment_images(torch.from_numpy(arrays.images[1:2]), flip=True, crop_padding=3)
    torch.testing.assert_close(item, norm.apply(pixels)[0], rtol=0, atol=0)
