"""Fashion-MNIST from its four IDX files (LeCun's format), as ``N x 28 x 28 x 1`` images.

It exists to keep the IDX parser and its consistency checks apart from the other formats; nothing here
downloads, a missing file is an error that names it.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from models.data.arrays import DataError, ImageArrays, Split, check_split, resolve_root

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

FASHION_MNIST_ENV = "PREDGATE_FASHION_MNIST_DIR"
DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # where the Debian package puts it

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
    check_split(split)
    folder = resolve_root(root, FASHION_MNIST_ENV, DEFAULT_FASHION_MNIST_DIR)
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
