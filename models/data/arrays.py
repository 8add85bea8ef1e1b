"""The record every loader returns and the error every loader raises, with what the file-format loaders
share (the names of a data set's two pools, how a data set's folder is found).

Every loader returns the same ``ImageArrays`` record (``N x H x W x C`` uint8, int64 labels, class
names) so that training, feature extraction and evaluation never care where the pixels came from. It
exists as its own module so that the loaders and the splits share the record and the error from below,
without importing one another.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from models.errors import PredgateError

Split = Literal["train", "test"]


class DataError(PredgateError, ValueError):
    """A data file or folder is missing, truncated or not in the expected format."""


@dataclass
class ImageArrays:
    """Images and labels held in memory, in the layout the data files store (HWC, uint8).

    Parameters
    ----------
    images : np.ndarray
        ``N x H x W x C`` uint8.
    labels : np.ndarray
        ``N`` int64, each in ``[0, len(class_names))``.
    class_names : list of str
        Name of each label index.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.images, np.ndarray) or self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise DataError(
                "images must be a uint8 N x H x W x C array, got "
                f"{getattr(self.images, 'dtype', type(self.images))} {np.shape(self.images)}"
            )
        labels = np.asarray(self.labels)
        if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.size == 0):
            raise DataError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
        self.labels = labels.astype(np.int64, copy=False)
        if len(self.labels) != len(self.images):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.class_names = list(self.class_names)
        if self.labels.size and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise DataError(
                f"labels span [{self.labels.min()}, {self.labels.max()}] but there are "
                f"{len(self.class_names)} class names"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of every image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, indices: np.ndarray | Sequence[int]) -> ImageArrays:
        """A copy holding only ``indices`` (in that order)."""
        idx = np.asarray(indices, dtype=np.int64)
        return ImageArrays(self.images[idx], self.labels[idx], list(self.class_names))


def resolve_root(root: str | Path | None, env: str, default: Path) -> Path:
    if root is not None:
        return Path(root)
    return Path(os.environ[env]) if os.environ.get(env) else default


def check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
