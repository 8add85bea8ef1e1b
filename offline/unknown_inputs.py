"""Inputs of no class the CNN knows, made from local data only (nothing is downloaded).

A gate in front of a camera also sees things that are none of its classes. The sets here cover the
usual range from far to near (Hendrycks & Gimpel 2017; Yang et al. 2022, OpenOOD):

- ``noise-gaussian``, ``noise-uniform``, ``constant``: synthetic images, a sensor fault or a covered
  lens ("far" unknowns: no natural image looks like them);
- ``digits``: scikit-learn's bundled 8 x 8 handwritten digits, upscaled (a different kind of object
  drawn in the same grey-on-black style as Fashion-MNIST);
- ``cifar10`` for a grey bundle, ``fashion-mnist`` for a colour one: the other data set converted
  to the bundle's size and channels (natural "near-ish" unknowns);
- for an image-folder bundle, images of a held-out class are the natural choice: they need the class
  left out at build time, which the caller does by building the bundle without that folder and
  giving it here with :func:`folder_images`.

Each generator returns ``uint8`` ``N x H x W x C`` images of the bundle's shape, seeded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from models.data import load_cifar10_npz, load_fashion_mnist, load_image_folder
from models.errors import ConfigError

FAR_SETS = ("noise-gaussian", "noise-uniform", "constant")
NEAR_SETS = ("digits", "other-dataset")


def _resize(images: np.ndarray, height: int, width: int, channels: int) -> np.ndarray:
    """``N x h x w x c`` uint8 -> ``N x height x width x channels`` (bilinear; grey <-> RGB)."""
    out = np.empty((len(images), height, width, channels), dtype=np.uint8)
    for i, image in enumerate(images):
        pil = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)
        pil = pil.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR)
        arr = np.asarray(pil)
        out[i] = arr[..., None] if channels == 1 else arr
    return out


def noise_gaussian(n: int, shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Per-pixel N(128, 50^2), clipped: a sensor with no signal, only read noise."""
    rng = np.random.default_rng((seed, 1))
    return np.clip(rng.normal(128, 50, (n, *shape)), 0, 255).astype(np.uint8)


def noise_uniform(n: int, shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Per-pixel uniform on 0..255."""
    return np.random.default_rng((seed, 2)).integers(0, 256, (n, *shape), dtype=np.uint8)


def constant(n: int, shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """One random colour per image: a covered lens, a blank frame, an over-exposed sensor."""
    rng = np.random.default_rng((seed, 3))
    values = rng.integers(0, 256, (n, 1, 1, shape[2]), dtype=np.uint8)
    return np.broadcast_to(values, (n, *shape)).copy()


def digits(n: int, shape: tuple[int, int, int], seed: int, part: tuple[int, int] = (0, 1)) -> np.ndarray:
    """scikit-learn's 1,797 handwritten digits (values 0..16), scaled to 0..255 and upscaled.
    ``part`` (K, N): draw only from the K-th of N fixed disjoint parts of them."""
    data = load_digits().images  # 1797 x 8 x 8
    if part != (0, 1):
        data = data[np.array_split(np.random.default_rng(1234).permutation(len(data)), part[1])[part[0]]]
    rng = np.random.default_rng((seed, 4))
    picked = data[rng.choice(len(data), size=n, replace=n > len(data))]
    small = np.clip(picked * (255.0 / 16.0), 0, 255).astype(np.uint8)[..., None]
    return _resize(small, shape[0], shape[1], shape[2])


def other_dataset(
    n: int,
    shape: tuple[int, int, int],
    seed: int,
    *,
    dataset: str,
    fashion_root: str | None = None,
    cifar_root: str | None = None,
) -> np.ndarray:
    """Test images of the other built-in data set, converted to ``shape`` (CIFAR-10 for a
    Fashion-MNIST bundle, Fashion-MNIST otherwise)."""
    if dataset == "fashion-mnist":
        pool = load_cifar10_npz(cifar_root, split="test").images
    else:
        pool = load_fashion_mnist(fashion_root, split="test").images
    rng = np.random.default_rng((seed, 5))
    picked = pool[np.sort(rng.choice(len(pool), size=min(n, len(pool)), replace=False))]
    return _resize(picked, shape[0], shape[1], shape[2])


def folder_images(root: str | Path, n: int, shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Up to ``n`` images from an image folder (e.g. a class held out of the bundle), resized."""
    arrays = load_image_folder(root, image_size=shape[0], channels=shape[2], progress=False)
    rng = np.random.default_rng((seed, 6))
    picked = arrays.images[np.sort(rng.choice(len(arrays), size=min(n, len(arrays)), replace=False))]
    return _resize(picked, shape[0], shape[1], shape[2])


SYNTHETIC: dict[str, Callable[[int, tuple[int, int, int], int], np.ndarray]] = {
    "noise-gaussian": noise_gaussian,
    "noise-uniform": noise_uniform,
    "constant": constant,
    "digits": digits,
}


def unknown_sets(
    n: int,
    shape: tuple[int, int, int],
    *,
    dataset: str,
    seed: int = 0,
    data_roots: dict[str, str | None] | None = None,
    holdout_folder: str | Path | None = None,
) -> dict[str, np.ndarray]:
    """Every unknown set for a bundle of ``dataset`` and image ``shape`` (``H, W, C``), ``n`` each.

    The other data set is left out, with a note in the returned dict's absence, when its files are
    not on this machine; :func:`other_dataset` raises a :class:`~models.data.DataError` then.
    """
    if n < 1:
        raise ConfigError(f"need at least 1 image per unknown set, got {n}")
    roots = data_roots or {}
    out = {name: make(n, shape, seed) for name, make in SYNTHETIC.items()}
    out["other-dataset"] = other_dataset(
        n,
        shape,
        seed,
        dataset=dataset,
        fashion_root=roots.get("fashion-mnist"),
        cifar_root=roots.get("cifar10"),
    )
    holdout_folder = holdout_folder or roots.get("held-out-class")
    if holdout_folder is not None:
        out["held-out-class"] = folder_images(holdout_folder, n, shape, seed)
    return out
