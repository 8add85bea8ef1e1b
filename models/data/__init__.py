"""Image data sets as plain uint8 arrays, the four disjoint splits of method.md section 1, and
reloading the splits a bundle was built on (:func:`load_splits`).

This is the package's public interface; import from here (``from models.data import load_splits``).
Nothing here downloads: a missing file is an error that names the file. Which module holds what:

- :mod:`models.data.arrays`: the record every loader returns (:class:`ImageArrays`), the error every
  loader raises (:class:`DataError`), the pool names (``Split``) and how a data set's folder is found.
- :mod:`models.data.fashion_mnist`: Fashion-MNIST's IDX files (:func:`read_idx`,
  :func:`load_fashion_mnist`).
- :mod:`models.data.cifar10`: CIFAR-10 as npz archives or python batches (:func:`cifar10_npz_available`,
  :func:`load_cifar10_npz`, :func:`load_cifar10_batches`).
- :mod:`models.data.image_folder`: ImageFolder trees (:func:`load_image_folder`) and the seeded
  hold-out of a test pool (:func:`holdout`).
- :mod:`models.data.splits`: the splits (:class:`SplitSpec`, :class:`Splits`, :func:`make_splits`,
  :func:`apply_splits`) and the index files naming the CNN's training images (:func:`read_index_file`,
  :func:`named_indices_record`).
- :mod:`models.data.sources`: a data set by name (:func:`load_dataset`), a bundle's record of its data
  (:class:`DataSource`), and a bundle's splits as the model takes them (:func:`conform_splits`,
  :func:`load_splits`).
"""

from __future__ import annotations

from models.data.arrays import DataError, ImageArrays, Split
from models.data.cifar10 import (
    CIFAR10_CLASSES,
    CIFAR10_ENV,
    DEFAULT_CIFAR10_DIR,
    cifar10_npz_available,
    load_cifar10_batches,
    load_cifar10_npz,
)
from models.data.fashion_mnist import (
    DEFAULT_FASHION_MNIST_DIR,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ENV,
    load_fashion_mnist,
    read_idx,
)
from models.data.image_folder import holdout, load_image_folder
from models.data.sources import DataSource, conform_splits, load_dataset, load_splits
from models.data.splits import (
    SPLIT_NAMES,
    Splits,
    SplitSpec,
    apply_splits,
    make_splits,
    named_indices_record,
    read_index_file,
)

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_ENV",
    "DEFAULT_CIFAR10_DIR",
    "DEFAULT_FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ENV",
    "SPLIT_NAMES",
    "DataError",
    "DataSource",
    "ImageArrays",
    "Split",
    "SplitSpec",
    "Splits",
    "apply_splits",
    "cifar10_npz_available",
    "conform_splits",
    "holdout",
    "load_cifar10_batches",
    "load_cifar10_npz",
    "load_dataset",
    "load_fashion_mnist",
    "load_image_folder",
    "load_splits",
    "make_splits",
    "named_indices_record",
    "read_idx",
    "read_index_file",
]
