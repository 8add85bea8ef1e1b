"""CIFAR-10 from ``numpy.savez`` archives or from the standard python batches (through torchvision).

It exists to hold both CIFAR-10 layouts, and the test of which one a folder has, in one place; nothing
here downloads.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
from torchvision.datasets import CIFAR10

from models.data.arrays import DataError, ImageArrays, Split, check_split, resolve_root

CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]

CIFAR10_ENV = "PREDGATE_CIFAR10_DIR"
# The data lives beside the repository checkout, not inside it (it is too large to version).
DEFAULT_CIFAR10_DIR = Path(__file__).resolve().parents[2].parent / "shared/data/cifar10"

_CIFAR_NPZ = {"train": ("train_part0.npz", "train_part1.npz"), "test": ("test.npz",)}


def cifar10_npz_available(root: str | Path | None = None) -> bool:
    """Whether every npz file of both splits is present (decides npz versus python batches)."""
    folder = resolve_root(root, CIFAR10_ENV, DEFAULT_CIFAR10_DIR)
    return all((folder / name).is_file() for names in _CIFAR_NPZ.values() for name in names)


def load_cifar10_npz(root: str | Path | None = None, split: Split = "train") -> ImageArrays:
    """CIFAR-10 from ``numpy.savez`` archives holding ``images`` (``N x 32 x 32 x 3`` uint8) and
    ``labels`` (int64); the training set is two parts joined in order.

    Parameters
    ----------
    root : path, optional
        Default: the ``PREDGATE_CIFAR10_DIR`` environment variable, else the shared data folder
        beside the repository.
    split : {"train", "test"}
    """
    check_split(split)
    folder = resolve_root(root, CIFAR10_ENV, DEFAULT_CIFAR10_DIR)
    images, labels = [], []
    for name in _CIFAR_NPZ[split]:
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        try:
            with np.load(path, allow_pickle=False) as archive:
                if "images" not in archive.files or "labels" not in archive.files:
                    raise DataError(f"{path}: needs arrays 'images' and 'labels', has {archive.files}")
                images.append(archive["images"])
                labels.append(archive["labels"])
        except DataError:
            raise
        except Exception as exc:  # zipfile.BadZipFile, zlib.error, ValueError, EOFError...
            raise DataError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from exc
        if images[-1].dtype != np.uint8 or images[-1].ndim != 4 or images[-1].shape[1:] != (32, 32, 3):
            raise DataError(
                f"{path}: images must be uint8 N x 32 x 32 x 3, got {images[-1].dtype} {images[-1].shape}"
            )
        if len(labels[-1]) != len(images[-1]):
            raise DataError(f"{path}: {len(images[-1])} images but {len(labels[-1])} labels")
    return ImageArrays(np.concatenate(images), np.concatenate(labels), list(CIFAR10_CLASSES))


def load_cifar10_batches(
    root: str | Path | None = None, split: Split = "train", verify_md5: bool = True
) -> ImageArrays:
    """CIFAR-10 from the standard python batches (``cifar-10-batches-py``) through torchvision.

    Parameters
    ----------
    root : path, optional
        The folder that holds ``cifar-10-batches-py`` (torchvision's convention) or that folder
        itself. Default as for :func:`load_cifar10_npz`.
    split : {"train", "test"}
    verify_md5 : bool
        Check each batch file against torchvision's published md5. Only files that are not the
        official release (test fixtures, a re-pickled copy) need ``False``.
    """
    check_split(split)
    folder = resolve_root(root, CIFAR10_ENV, DEFAULT_CIFAR10_DIR)
    if folder.name == CIFAR10.base_folder and not (folder / CIFAR10.base_folder).is_dir():
        folder = folder.parent
    if not (folder / CIFAR10.base_folder).is_dir():
        raise DataError(f"{folder}: no {CIFAR10.base_folder} folder")
    cls = CIFAR10 if verify_md5 else _UncheckedCIFAR10
    try:
        dataset = cls(str(folder), train=split == "train", download=False)
    except RuntimeError as exc:  # torchvision's "not found or corrupted"
        raise DataError(f"{folder / CIFAR10.base_folder}: {exc}") from exc
    return ImageArrays(
        np.ascontiguousarray(dataset.data, dtype=np.uint8),
        np.asarray(dataset.targets, dtype=np.int64),
        list(dataset.classes),
    )


class _UncheckedCIFAR10(CIFAR10):
    """torchvision's CIFAR10 with its md5s cleared: ``check_integrity(path, None)`` only tests that
    each file exists, so the rest of torchvision's parsing is kept as is."""

    train_list: ClassVar[list[list[str | None]]] = [[name, None] for name, _ in CIFAR10.train_list]
    test_list: ClassVar[list[list[str | None]]] = [[name, None] for name, _ in CIFAR10.test_list]
    meta: ClassVar[dict[str, str | None]] = {**CIFAR10.meta, "md5": None}
