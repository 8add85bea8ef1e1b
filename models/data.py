"""Image data sets as plain uint8 arrays, the four disjoint splits of method.md section 1, and
reloading the splits a bundle was built on (:func:`load_splits`).

Every loader returns the same ``ImageArrays`` record (``N x H x W x C`` uint8, int64 labels, class
names) so that training, feature extraction and evaluation never care where the pixels came from.
Nothing here downloads: a missing file is an error that names the file.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from torchvision.datasets import CIFAR10

from models.bundle import CNN_TRAIN_INDICES_FILE, Bundle
from models.errors import PredgateError
from models.preprocess import conform_images, resize_and_crop
from models.progress import maybe_tqdm

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
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

FASHION_MNIST_ENV = "PREDGATE_FASHION_MNIST_DIR"
CIFAR10_ENV = "PREDGATE_CIFAR10_DIR"
DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # where the Debian package puts it
# The data lives beside the repository checkout, not inside it (it is too large to version).
DEFAULT_CIFAR10_DIR = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10"

Split = Literal["train", "test"]
SPLIT_NAMES = ("cnn-train", "fit", "val", "test")


class DataError(PredgateError, ValueError):
    """A data file or folder is missing, truncated or not in the expected format."""


# --------------------------------------------------------------------------------------------------
# The array record
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX files)
# --------------------------------------------------------------------------------------------------

# IDX type byte -> big-endian numpy dtype (LeCun's format description).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one IDX file (gzip-compressed when its name ends in ``.gz``).

    The header is trusted only as far as it is consistent: the magic must start with two zero
    bytes and name a known type, and the payload must hold exactly the product of the dims.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, EOFError, zlib.error) as exc:  # truncated or corrupt gzip stream
        raise DataError(f"{path}: cannot decompress ({exc})") from exc
    if len(raw) < 4:
        raise DataError(f"{path}: truncated IDX file ({len(raw)} bytes, no header)")
    zero0, zero1, type_code, ndim = raw[:4]
    if zero0 != 0 or zero1 != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise DataError(f"{path}: not an IDX file (magic bytes {raw[:4].hex()})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: IDX payload is {len(raw) - header} bytes, dims {dims} need {expected} "
            f"({'truncated' if len(raw) - header < expected else 'trailing bytes'})"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find_file(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(f"{root}: neither {stem}.gz nor {stem} found")


def _resolve_root(root: str | Path | None, env: str, default: Path) -> Path:
    if root is not None:
        return Path(root)
    return Path(os.environ[env]) if os.environ.get(env) else default


def load_fashion_mnist(root: str | Path | None = None, split: Split = "train") -> ImageArrays:
    """Fashion-MNIST from its four IDX files, as ``N x 28 x 28 x 1`` images.

    Parameters
    ----------
    root : path, optional
        Folder holding ``train-images-idx3-ubyte(.gz)`` and friends. Default: the
        ``PREDGATE_FASHION_MNIST_DIR`` environment variable, else the Debian package's folder.
    split : {"train", "test"}
        ``"test"`` reads the ``t10k-`` files.
    """
    _check_split(split)
    folder = _resolve_root(root, FASHION_MNIST_ENV, DEFAULT_FASHION_MNIST_DIR)
    prefix = "train" if split == "train" else "t10k"
    image_path = _find_file(folder, f"{prefix}-images-idx3-ubyte")
    label_path = _find_file(folder, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(image_path)
    labels = read_idx(label_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DataError(f"{image_path}: expected uint8 N x H x W images, got {images.dtype} {images.shape}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{label_path}: expected 1-D integer labels, got {labels.dtype} {labels.shape}")
    if len(labels) != len(images):
        raise DataError(f"{image_path} has {len(images)} images but {label_path} has {len(labels)} labels")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"{label_path}: label {labels.max()} outside 0-9")
    return ImageArrays(images[..., None], labels.astype(np.int64), list(FASHION_MNIST_CLASSES))


# --------------------------------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------------------------------

_CIFAR_NPZ = {"train": ("train_part0.npz", "train_part1.npz"), "test": ("test.npz",)}


def cifar10_npz_available(root: str | Path | None = None) -> bool:
    """Whether every npz file of both splits is present (decides npz versus python batches)."""
    folder = _resolve_root(root, CIFAR10_ENV, DEFAULT_CIFAR10_DIR)
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
    _check_split(split)
    folder = _resolve_root(root, CIFAR10_ENV, DEFAULT_CIFAR10_DIR)
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
    _check_split(split)
    folder = _resolve_root(root, CIFAR10_ENV, DEFAULT_CIFAR10_DIR)
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


# --------------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------------


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


def _image_folder_pools(
    root: str | Path,
    image_size: int,
    channels: Literal[1, 3] = 3,
    test_size: float | None = None,
    seed: int = 0,
    progress: bool = False,
) -> tuple[ImageArrays, ImageArrays]:
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
        folder = _resolve_root(root, CIFAR10_ENV, DEFAULT_CIFAR10_DIR)
        if not (folder / CIFAR10.base_folder).is_dir() and folder.name != CIFAR10.base_folder:
            raise DataError(f"{folder}: neither the CIFAR-10 npz files nor a {CIFAR10.base_folder} folder")
        return load_cifar10_batches(root, "train", **kwargs), load_cifar10_batches(root, "test", **kwargs)
    if name == "imagefolder":
        if root is None:
            raise ValueError("imagefolder needs a root folder")
        if "image_size" not in kwargs:
            raise ValueError("imagefolder needs image_size")
        return _image_folder_pools(root, **kwargs)
    raise ValueError(f"unknown data set {name!r}; choose one of 'fashion-mnist', 'cifar10', 'imagefolder'")


def _no_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    if kwargs:
        raise ValueError(f"{name} takes no options, got {sorted(kwargs)}")


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


# --------------------------------------------------------------------------------------------------
# Splits (method.md section 1)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitSpec:
    """Sizes of the four splits and where they come from.

    Parameters
    ----------
    cnn_train, fit, val, test : int or None
        Number of images; ``None`` takes all that remains of its pool (at most one ``None`` per
        pool). With ``fit_is_cnn_train``, ``fit`` is ``None`` (all of cnn-train) or the size of a
        random subset of cnn-train (extracting LCR on all training images is costly).
    seed : int
        Seeds both pools' permutations.
    fit_is_cnn_train : bool
        The paper's setting: detectors learn from the CNN's own training images.
    val_from : {"train", "test"}
        ``"test"`` is the paper's CIFAR-10 setting: the official test set is cut into val and test.
    """

    cnn_train: int | None
    fit: int | None
    val: int | None
    test: int | None
    seed: int
    fit_is_cnn_train: bool = False
    val_from: Literal["train", "test"] = "train"


@dataclass
class Splits:
    """Index arrays of each split into its pool (``pools[name]`` is ``"train"`` or ``"test"``).

    Indices are in permutation order, not sorted, so any prefix of a split is a random sample.
    """

    indices: dict[str, np.ndarray]
    pools: dict[str, str]
    spec: SplitSpec
    train_pool_size: int
    test_pool_size: int
    cnn_train_named: np.ndarray | None = None  # the train-pool images the CNN was trained on, if named

    def sizes(self) -> dict[str, int]:
        return {name: len(idx) for name, idx in self.indices.items()}

    def digest(self) -> str:
        """sha256 over every split's indices: lets a manifest prove which images were used without
        storing the index arrays."""
        hasher = hashlib.sha256()
        for name in SPLIT_NAMES:
            hasher.update(name.encode())
            hasher.update(np.ascontiguousarray(self.indices[name], dtype="<i8").tobytes())
        return hasher.hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """What a manifest records; :meth:`from_dict` rebuilds the indices from it."""
        return {
            "seed": self.spec.seed,
            "fit_is_cnn_train": self.spec.fit_is_cnn_train,
            "val_from": self.spec.val_from,
            "requested": {
                "cnn-train": self.spec.cnn_train,
                "fit": self.spec.fit,
                "val": self.spec.val,
                "test": self.spec.test,
            },
            "sizes": self.sizes(),
            "pools": dict(self.pools),
            "train_pool_size": self.train_pool_size,
            "test_pool_size": self.test_pool_size,
            "sha256": self.digest(),
            **(
                {"cnn_train_indices": named_indices_record(self.cnn_train_named)}
                if self.cnn_train_named is not None
                else {}
            ),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], cnn_train_named: np.ndarray | None = None) -> Splits:
        """Recompute the splits a manifest describes and check they are the same indices
        (``cnn_train_named``: the named cnn-train images, when the manifest records them)."""
        req = data["requested"]
        spec = SplitSpec(
            req["cnn-train"],
            req["fit"],
            req["val"],
            req["test"],
            int(data["seed"]),
            bool(data["fit_is_cnn_train"]),
            data["val_from"],
        )
        recorded = data.get("cnn_train_indices")
        if recorded is not None:
            if cnn_train_named is None:
                raise DataError("the splits were drawn around named cnn-train images, which were not given")
            if named_indices_record(cnn_train_named)["sha256"] != recorded["sha256"]:
                raise DataError(
                    "the named cnn-train images do not match the ones the splits were drawn around"
                )
        splits = make_splits(
            int(data["train_pool_size"]),
            int(data["test_pool_size"]),
            spec,
            cnn_train_named if recorded is not None else None,
        )
        if splits.digest() != data["sha256"]:
            raise DataError("recorded splits do not match the ones recomputed from their seed")
        return splits


def _carve(pool_size: int, requests: list[tuple[str, int | None]], pool: str) -> dict[str, tuple[int, int]]:
    """Turn requested sizes (``None`` = the rest) into consecutive ``(start, stop)`` slices."""
    for name, size in requests:
        if size is not None and (not isinstance(size, (int, np.integer)) or size < 0):
            raise ValueError(f"size of {name} must be a non-negative int or None, got {size!r}")
    open_ended = [name for name, size in requests if size is None]
    if len(open_ended) > 1:
        raise ValueError(
            f"only one split per pool may be None (all that remains); {pool} pool has {open_ended}"
        )
    fixed = sum(size for _, size in requests if size is not None)
    if fixed > pool_size:
        asked = ", ".join(f"{name}={size}" for name, size in requests if size is not None)
        raise ValueError(f"{pool} pool has {pool_size} images but the splits ask for {fixed} ({asked})")
    slices, start = {}, 0
    for name, size in requests:
        stop = start + (pool_size - fixed if size is None else size)
        slices[name] = (start, stop)
        start = stop
    return slices


def named_indices_record(indices: np.ndarray) -> dict[str, Any]:
    """What a manifest records of named images: their count and a sha256 of the sorted indices."""
    idx = np.ascontiguousarray(np.sort(np.asarray(indices, dtype=np.int64)), dtype="<i8")
    return {"count": len(idx), "sha256": hashlib.sha256(idx.tobytes()).hexdigest()}


def read_index_file(path: str | Path, pool_size: int) -> np.ndarray:
    """Indices into a data set's training files, one image each, from ``path``: ``.npy`` (no
    pickle), ``.json`` (a list) or text (integers separated by whitespace or commas). Sorted and
    unique; each must lie in ``[0, pool_size)``."""
    path = Path(path)
    try:
        if path.suffix == ".npy":
            values = np.load(path, allow_pickle=False)
        elif path.suffix == ".json":
            values = np.asarray(json.loads(path.read_text()))
        else:
            text = path.read_text().replace(",", " ").split()
            values = np.asarray([int(v) for v in text], dtype=np.int64)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: not a list of image indices ({exc})") from exc
    values = np.asarray(values)
    if values.ndim != 1 or values.size == 0 or not np.issubdtype(values.dtype, np.integer):
        raise DataError(
            f"{path}: needs a non-empty list of integer image indices, got {values.dtype} {values.shape}"
        )
    if values.min() < 0 or values.max() >= pool_size:
        raise DataError(
            f"{path}: indices span [{values.min()}, {values.max()}], the training files hold {pool_size} "
            "images (0-based)"
        )
    return np.unique(values.astype(np.int64))


def make_splits(
    train_pool_size: int, test_pool_size: int, spec: SplitSpec, cnn_train_named: np.ndarray | None = None
) -> Splits:
    """Cut the train and test pools into cnn-train, fit, val and test.

    cnn-train, fit and (with ``val_from="train"``) val are consecutive slices of one seeded
    permutation of the train pool, so they are disjoint; test (and val with ``val_from="test"``)
    are slices of a second, independent permutation of the test pool. Growing a later split never
    moves an earlier one, and the same seed gives the same indices.

    ``cnn_train_named`` (train-pool indices: the images the CNN was trained on, ``--exclude-indices``):
    cnn-train is drawn from them alone (``spec.cnn_train`` of them, or all) and fit and val from the
    rest of the train pool, so no image the CNN learnt from reaches the detectors' splits (unless
    ``fit_is_cnn_train`` asks for exactly that).
    """
    if spec.val_from not in ("train", "test"):
        raise ValueError(f"val_from must be 'train' or 'test', got {spec.val_from!r}")
    if cnn_train_named is not None:
        return _splits_around(
            train_pool_size, test_pool_size, spec, np.unique(np.asarray(cnn_train_named, np.int64))
        )
    train_requests: list[tuple[str, int | None]] = [("cnn-train", spec.cnn_train)]
    if not spec.fit_is_cnn_train:
        train_requests.append(("fit", spec.fit))
    test_requests: list[tuple[str, int | None]] = [("test", spec.test)]
    if spec.val_from == "train":
        train_requests.append(("val", spec.val))
    else:
        test_requests.insert(0, ("val", spec.val))
    train_slices = _carve(train_pool_size, train_requests, "train")
    test_slices = _carve(test_pool_size, test_requests, "test")

    # Independent streams per pool: the test pool's order does not depend on the train pool's size.
    train_perm = np.random.default_rng([spec.seed, 0]).permutation(train_pool_size)
    test_perm = np.random.default_rng([spec.seed, 1]).permutation(test_pool_size)
    indices: dict[str, np.ndarray] = {}
    pools: dict[str, str] = {}
    for slices, perm, pool in ((train_slices, train_perm, "train"), (test_slices, test_perm, "test")):
        for name, (start, stop) in slices.items():
            indices[name] = perm[start:stop].astype(np.int64)
            pools[name] = pool
    if spec.fit_is_cnn_train:
        if spec.fit is not None and not 0 < spec.fit <= len(indices["cnn-train"]):
            raise ValueError(
                f"fit_is_cnn_train: fit={spec.fit} must be a subset size of cnn-train "
                f"({len(indices['cnn-train'])})"
            )
        # cnn-train is in permutation order, so its prefix is a random subset.
        indices["fit"] = indices["cnn-train"][: spec.fit].copy()
        pools["fit"] = "train"
    ordered = {name: indices[name] for name in SPLIT_NAMES}
    return Splits(ordered, {name: pools[name] for name in SPLIT_NAMES}, spec, train_pool_size, test_pool_size)


def _splits_around(train_pool_size: int, test_pool_size: int, spec: SplitSpec, named: np.ndarray) -> Splits:
    """:func:`make_splits` with cnn-train drawn from ``named`` and fit / val from the rest."""
    if named.size and (named[0] < 0 or named[-1] >= train_pool_size):
        raise ValueError(f"named cnn-train indices must lie in [0, {train_pool_size})")
    rest = np.setdiff1d(np.arange(train_pool_size, dtype=np.int64), named)
    named_perm = named[np.random.default_rng([spec.seed, 0]).permutation(len(named))]
    rest_perm = rest[np.random.default_rng([spec.seed, 3]).permutation(len(rest))]
    if spec.cnn_train is not None and spec.cnn_train > len(named):
        raise ValueError(
            f"cnn-train={spec.cnn_train} but only {len(named)} images are named as the CNN's training images"
        )
    indices = {"cnn-train": named_perm[: spec.cnn_train].copy()}
    pools = {"cnn-train": "train"}
    rest_requests: list[tuple[str, int | None]] = [] if spec.fit_is_cnn_train else [("fit", spec.fit)]
    test_requests: list[tuple[str, int | None]] = [("test", spec.test)]
    if spec.val_from == "train":
        rest_requests.append(("val", spec.val))
    else:
        test_requests.insert(0, ("val", spec.val))
    try:
        rest_slices = _carve(len(rest), rest_requests, "train")
    except ValueError as exc:
        raise ValueError(
            f"after leaving out the {len(named)} images the CNN was trained on, {exc}: ask for smaller splits"
        ) from exc
    test_slices = _carve(test_pool_size, test_requests, "test")
    test_perm = np.random.default_rng([spec.seed, 1]).permutation(test_pool_size)
    for name, (start, stop) in rest_slices.items():
        indices[name], pools[name] = rest_perm[start:stop].astype(np.int64), "train"
    for name, (start, stop) in test_slices.items():
        indices[name], pools[name] = test_perm[start:stop].astype(np.int64), "test"
    if spec.fit_is_cnn_train:
        if spec.fit is not None and not 0 < spec.fit <= len(indices["cnn-train"]):
            raise ValueError(
                f"fit_is_cnn_train: fit={spec.fit} must be a subset size of cnn-train "
                f"({len(indices['cnn-train'])})"
            )
        indices["fit"], pools["fit"] = indices["cnn-train"][: spec.fit].copy(), "train"
    ordered = {name: indices[name] for name in SPLIT_NAMES}
    return Splits(
        ordered, {name: pools[name] for name in SPLIT_NAMES}, spec, train_pool_size, test_pool_size, named
    )


def apply_splits(train_pool: ImageArrays, test_pool: ImageArrays, splits: Splits) -> dict[str, ImageArrays]:
    """The four splits as arrays (keys ``cnn-train``, ``fit``, ``val``, ``test``)."""
    if (len(train_pool), len(test_pool)) != (splits.train_pool_size, splits.test_pool_size):
        raise ValueError(
            f"splits were made for pools of {splits.train_pool_size} / {splits.test_pool_size} images, "
            f"got {len(train_pool)} / {len(test_pool)}"
        )
    pools = {"train": train_pool, "test": test_pool}
    return {name: pools[splits.pools[name]].subset(idx) for name, idx in splits.indices.items()}


# --------------------------------------------------------------------------------------------------
# A bundle's data
# --------------------------------------------------------------------------------------------------


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
