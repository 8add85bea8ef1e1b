"""Image folders (torchvision's ImageFolder layout: one subfolder per class) decoded into uint8 arrays,
and the seeded hold-out of a test pool for a folder that has no train/test subfolders.

It exists to keep decoding arbitrary images (PIL, resizing, cropping) apart from the fixed-format loaders.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from models.data.arrays import DataError, ImageArrays
from models.preprocess import resize_and_crop
from models.progress import maybe_tqdm


def load_image_folder(
    root: str | Path,
    image_size: int,
    channels: Literal[1, 3] = 3,
    split: str | None = None,
    class_names: Sequence[str] | None = None,
    progress: bool = False,
) -> ImageArrays:
    """Decode an ImageFolder tree (one subfolder per class) into ``N x S x S x C`` uint8 arrays.

    Parameters
    ----------
    root : path
        Folder of class subfolders, or (with ``split``) the folder holding ``root/split/``.
    image_size : int
        Side ``S`` of the square output (shorter side scaled to ``S``, centre crop).
    channels : {1, 3}
        1 converts to greyscale (PIL mode ``L``), 3 to RGB (alpha dropped, palettes expanded).
    split : str, optional
        Subfolder to read (``"train"``, ``"test"``, ``"val"``).
    class_names : sequence of str, optional
        Label order to use; default: the sorted subfolder names. A test split passes the train
        split's names so that label ``k`` means the same class in both.
    progress : bool
        Show a tqdm bar while decoding.
    """
    from PIL import Image, UnidentifiedImageError
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    folder = Path(root) / split if split is not None else Path(root)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    found, _ = find_classes(str(folder))
    names = list(class_names) if class_names is not None else found
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise DataError(f"{folder}: class folders {unknown} are not among the classes {names}")
    class_to_idx = {name: i for i, name in enumerate(names) if name in found}
    try:
        samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as exc:  # a class folder without any image
        raise DataError(f"{folder}: {exc}") from exc
    mode = "L" if channels == 1 else "RGB"
    images = np.empty((len(samples), image_size, image_size, channels), dtype=np.uint8)
    labels = np.empty(len(samples), dtype=np.int64)
    for i, (path, label) in enumerate(maybe_tqdm(samples, progress, f"decoding {folder.name}")):
        try:
            with Image.open(path) as img:
                pixels = np.asarray(resize_and_crop(img.convert(mode), image_size), dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{path}: cannot decode image ({exc})") from exc
        images[i] = pixels.reshape(image_size, image_size, channels)
        labels[i] = label
    return ImageArrays(images, labels, names)


def image_folder_pools(
    root: str | Path,
    image_size: int,
    channels: Literal[1, 3] = 3,
    test_size: float | None = None,
    seed: int = 0,
    progress: bool = False,
) -> tuple[ImageArrays, ImageArrays]:
    """The train and test pools of an image folder: its ``train/`` and ``test/`` (or ``val/``)
    subfolders when it has them, else a seeded ``test_size`` hold-out of all its images."""
    folder = Path(root)
    test_dir = next((name for name in ("test", "val") if (folder / name).is_dir()), None)
    if (folder / "train").is_dir() and test_dir is not None:
        train = load_image_folder(folder, image_size, channels, "train", progress=progress)
        test = load_image_folder(folder, image_size, channels, test_dir, train.class_names, progress)
        return train, test
    if test_size is None:
        raise DataError(
            f"{folder}: has no train/ and test/ (or val/) subfolders; pass test_size to hold out a "
            "seeded random test pool"
        )
    everything = load_image_folder(folder, image_size, channels, progress=progress)
    return holdout(everything, test_size, seed)


def holdout(arrays: ImageArrays, test_size: float, seed: int) -> tuple[ImageArrays, ImageArrays]:
    """Split one pool into a train pool and a test pool by a seeded permutation.

    ``test_size`` is a count, or a fraction when it is a float in ``(0, 1)``.
    """
    n = len(arrays)
    count = round(test_size * n) if isinstance(test_size, float) and 0 < test_size < 1 else test_size
    if not isinstance(count, (int, np.integer)) or not 0 < count < n:
        raise ValueError(f"test_size {test_size!r} must leave both pools non-empty (pool of {n})")
    perm = np.random.default_rng([seed, 2]).permutation(n)
    return arrays.subset(np.sort(perm[count:])), arrays.subset(np.sort(perm[:count]))
