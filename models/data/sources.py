"""A data set by name (:func:`load_dataset`), how a bundle records its data (:class:`DataSource`), and
reloading the splits a bundle was built on (:func:`load_splits`).

It exists as the one place that knows every loader and the bundle: the loaders and the splits stay
ignorant of bundles, and offline, bench and cli reach a bundle's data through here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchvision.datasets import CIFAR10

from models.bundle import CNN_TRAIN_INDICES_FILE, Bundle
from models.data.arrays import DataError, ImageArrays, resolve_root
from models.data.cifar10 import (
    CIFAR10_ENV,
    DEFAULT_CIFAR10_DIR,
    cifar10_npz_available,
    load_cifar10_batches,
    load_cifar10_npz,
)
from models.data.fashion_mnist import load_fashion_mnist
from models.data.image_folder import image_folder_pools
from models.data.splits import Splits, apply_splits
from models.preprocess import conform_images


def load_dataset(name: str, root: str | Path | None = None, **kwargs: Any) -> tuple[ImageArrays, ImageArrays]:
    """The train pool and the test pool of a named data set.

    Parameters
    ----------
    name : {"fashion-mnist", "cifar10", "imagefolder"}
    root : path, optional
        Required for ``"imagefolder"``; the others have defaults (see their loaders).
    **kwargs
        ``"cifar10"``: ``verify_md5`` (python batches only). ``"imagefolder"``: ``image_size``,
        ``channels``, ``test_size`` and ``seed`` (only for a folder without train/test
        subfolders), ``progress``.
    """
    if name == "fashion-mnist":
        _no_kwargs(name, kwargs)
        return load_fashion_mnist(root, "train"), load_fashion_mnist(root, "test")
    if name == "cifar10":
        if cifar10_npz_available(root):
            _no_kwargs(name, kwargs)
            return load_cifar10_npz(root, "train"), load_cifar10_npz(root, "test")
        folder = resolve_root(root, CIFAR10_ENV, DEFAULT_CIFAR10_DIR)
        if not (folder / CIFAR10.base_folder).is_dir() and folder.name != CIFAR10.base_folder:
            raise DataError(f"{folder}: neither the CIFAR-10 npz files nor a {CIFAR10.base_folder} folder")
        return load_cifar10_batches(root, "train", **kwargs), load_cifar10_batches(root, "test", **kwargs)
    if name == "imagefolder":
        if root is None:
            raise ValueError("imagefolder needs a root folder")
        if "image_size" not in kwargs:
            raise ValueError("imagefolder needs image_size")
        return image_folder_pools(root, **kwargs)
    raise ValueError(f"unknown data set {name!r}; choose one of 'fashion-mnist', 'cifar10', 'imagefolder'")


def _no_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    if kwargs:
        raise ValueError(f"{name} takes no options, got {sorted(kwargs)}")


@dataclass
class DataSource:
    """How to reload the data a bundle was built from (recorded in its manifest)."""

    name: str
    root: str | None = None
    image_size: int | None = None
    channels: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def load(self) -> tuple[ImageArrays, ImageArrays]:
        kwargs: dict[str, Any] = {}
        if self.name == "imagefolder":
            kwargs = {"image_size": self.image_size, "channels": self.channels or 3}
        return load_dataset(self.name, self.root, **kwargs)


def conform_splits(arrays: dict[str, ImageArrays], size: int | None, channels: int) -> dict[str, ImageArrays]:
    """Every split's images as the model takes them (:func:`models.preprocess.conform_images`)."""
    return {
        name: ImageArrays(conform_images(a.images, size, channels), a.labels, a.class_names)
        for name, a in arrays.items()
    }


def load_splits(bundle: Bundle) -> dict[str, ImageArrays]:
    """Reload the four splits a bundle was built on (checked against the recorded digest), with
    their images converted to the model's input (the manifest's ``preprocessing``)."""
    source = DataSource(**bundle.manifest["dataset"]["source"])
    train_pool, test_pool = source.load()
    named = None
    if bundle.manifest["splits"].get("cnn_train_indices") is not None:
        named = bundle.read_arrays(CNN_TRAIN_INDICES_FILE)["indices"]
    splits = Splits.from_dict(bundle.manifest["splits"], named)
    arrays = apply_splits(train_pool, test_pool, splits)
    pre = bundle.preprocessing
    if pre is not None and pre.converts:
        arrays = conform_splits(arrays, int(pre.input_size[0]), pre.channels)
    return arrays
