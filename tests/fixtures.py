"""Writers of tiny data files in the real on-disk formats, for tests that must not need the real data.

Images are learnable: each class has its own random template plus noise, so a tiny CNN trained on
them beats chance, which end-to-end tests can rely on.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def class_images(
    n: int,
    shape: tuple[int, int, int],
    seed: int,
    n_classes: int = 10,
    signal: float = 0.7,
    template_seed: int | None = None,
):
    """``n`` uint8 images of ``shape`` (H, W, C) and int64 labels ``0..n_classes-1`` in turn.

    ``signal`` is the template's weight against noise: low values make a task a small CNN gets
    partly wrong, which detector tests need. Give train and test the same ``template_seed`` so they
    are one task."""
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 256, size=(n_classes, *shape))
    if template_seed is not None:
        templates = np.random.default_rng(template_seed).integers(0, 256, size=(n_classes, *shape))
    labels = np.arange(n, dtype=np.int64) % n_classes
    noise = rng.integers(0, 256, size=(n, *shape))
    images = (signal * templates[labels] + (1 - signal) * noise).round().clip(0, 255).astype(np.uint8)
    return images, labels


def idx_bytes(array: np.ndarray, type_code: int = 0x08, big_endian_dtype: str = ">u1") -> bytes:
    """Encode an array in LeCun's IDX format (magic ``00 00 type ndim``, big-endian int32 dims)."""
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=big_endian_dtype).tobytes()


def write_idx(path: Path, array: np.ndarray, **kwargs) -> Path:
    data = idx_bytes(array, **kwargs)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_fashion_mnist(
    folder: Path, n_train: int = 60, n_test: int = 20, gz: bool = True, seed: int = 0, signal: float = 0.7
):
    """The four Fashion-MNIST IDX files; returns ``{"train": (images N x 28 x 28, labels), "test": ...}``."""
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    written = {}
    for split, prefix, n, offset in (("train", "train", n_train, 0), ("test", "t10k", n_test, 1)):
        images, labels = class_images(n, (28, 28, 1), seed + offset, signal=signal, template_seed=seed)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", images[..., 0])
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", labels.astype(np.uint8))
        written[split] = (images[..., 0], labels)
    return written


def write_cifar_npz(folder: Path, n_part: int = 30, n_test: int = 20, seed: int = 0):
    """``train_part0.npz``, ``train_part1.npz`` and ``test.npz``; returns the arrays per file."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for i, (name, n) in enumerate((("train_part0", n_part), ("train_part1", n_part), ("test", n_test))):
        images, labels = class_images(n, (32, 32, 3), seed + i)
        np.savez_compressed(folder / f"{name}.npz", images=images, labels=labels)
        written[name] = (images, labels)
    return written


def write_cifar_batches(folder: Path, per_batch: int = 8, n_test: int = 10, seed: int = 100):
    """A ``cifar-10-batches-py`` folder in the pickled format of the official release (rows of 3072
    bytes, channel-major). Returns HWC arrays ``{"train": (images, labels), "test": ...}``."""
    base = folder / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = [], []
    for b in range(1, 6):
        images, labels = class_images(per_batch, (32, 32, 3), seed + b)
        _pickle_batch(base / f"data_batch_{b}", images, labels, f"training batch {b} of 5")
        train_images.append(images)
        train_labels.append(labels)
    test_images, test_labels = class_images(n_test, (32, 32, 3), seed)
    _pickle_batch(base / "test_batch", test_images, test_labels, "testing batch 1 of 1")
    with open(base / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": CIFAR_NAMES, "num_cases_per_batch": per_batch, "num_vis": 3072}, fh)
    return {
        "train": (np.concatenate(train_images), np.concatenate(train_labels)),
        "test": (test_images, test_labels),
    }


def _pickle_batch(path: Path, images: np.ndarray, labels: np.ndarray, batch_label: str) -> None:
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # R plane, G plane, B plane
    entry = {
        "batch_label": batch_label,
        "labels": [int(v) for v in labels],
        "data": rows,
        "filenames": [f"img_{i}.png" for i in range(len(images))],
    }
    with open(path, "wb") as fh:
        pickle.dump(entry, fh, protocol=2)


# (width, height, PIL mode) of the images written per class: different sizes and modes on purpose.
FOLDER_IMAGES = [
    (40, 30, "RGB"),
    (17, 25, "L"),
    (33, 33, "RGBA"),
    (20, 50, "P"),
    (16, 16, "LA"),
    (15, 12, "RGB"),
]


def write_image_folder(folder: Path, classes: list[str], seed: int = 0, n_per_class: int | None = None):
    """One subfolder per class with PNGs of the sizes and modes in ``FOLDER_IMAGES``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    specs = FOLDER_IMAGES if n_per_class is None else (FOLDER_IMAGES * n_per_class)[:n_per_class]
    paths = []
    for name in classes:
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i, (width, height, mode) in enumerate(specs):
            pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
            image = Image.fromarray(pixels, "RGB")
            image = image.convert(mode) if mode != "P" else image.quantize(16)
            path = folder / name / f"{i:03d}.png"
            image.save(path)
            paths.append(path)
    return paths
