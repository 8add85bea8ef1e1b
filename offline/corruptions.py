"""Corrupted copies of images, in the style of ImageNet-C / CIFAR-10-C / MNIST-C, five severities each.

Most kinds come from the ``imagecorruptions`` package (Michaelis et al. 2019, the ImageNet-C code of
Hendrycks & Dietterich 2019). It works on RGB images of at least 32 x 32 pixels, so a grey or small
image is edge-padded to 32, copied to three channels, corrupted, averaged back to one channel and
cropped: the corruption's look is the package's, the image keeps its size and mode. Three kinds the
package does not have (rotation, translation, occlusion: a part turned on the belt, a camera knocked
sideways, a hand in front of the lens; MNIST-C has the first two) are own transforms below, with
severities that grow the way the package's do; so is impulse noise, whose draws the package takes
from an unseeded generator.

Images are ``uint8`` ``N x H x W x C`` (the project's raw layout); every corruption is seeded per
image, so a suite is reproducible whatever its batch order.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from PIL import Image

from models.errors import ConfigError

with warnings.catch_warnings():  # the package imports pkg_resources, which warns on import
    warnings.simplefilter("ignore")
    from imagecorruptions import corrupt

SEVERITIES = (1, 2, 3, 4, 5)

# imagecorruptions kinds that run with the numpy / scikit-image versions pinned here. glass_blur and
# gaussian_blur call a scikit-image argument removed in 0.19, fog a numpy alias removed in 2.0.
PACKAGE_KINDS = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "speckle_noise",
    "defocus_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "spatter",
    "brightness",
    "contrast",
    "saturate",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
OWN_KINDS = ("impulse_noise", "rotation", "translation", "occlusion")
# Saturation changes nothing a grey image has.
COLOUR_ONLY = ("saturate",)
KINDS = PACKAGE_KINDS + OWN_KINDS

# Own kinds' strength per severity 1..5. Impulse noise is the package's (salt and pepper with these
# amounts, per channel) drawn from the image's own generator: the package's draws are not seedable.
IMPULSE_AMOUNT = (0.03, 0.06, 0.09, 0.17, 0.27)
ROTATION_DEGREES = (10.0, 20.0, 30.0, 45.0, 60.0)
TRANSLATION_FRACTION = (0.07, 0.14, 0.21, 0.28, 0.36)  # of the image side, in a random direction
OCCLUSION_FRACTION = (0.2, 0.3, 0.4, 0.5, 0.6)  # side of the square patch, of the image side


def kinds_for(channels: int) -> tuple[str, ...]:
    """The kinds that change an image of ``channels`` channels."""
    return tuple(k for k in KINDS if channels == 3 or k not in COLOUR_ONLY)


def _package(image: np.ndarray, kind: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """One ``H x W x C`` uint8 image through imagecorruptions, adapted for grey and small images."""
    h, w, c = image.shape
    pad_h, pad_w = max(0, 32 - h), max(0, 32 - w)
    top, left = pad_h // 2, pad_w // 2
    padded = np.pad(image, ((top, pad_h - top), (left, pad_w - left), (0, 0)), mode="edge")
    rgb = np.repeat(padded, 3, axis=2) if c == 1 else padded
    # The package draws from numpy's global generator: seed it per image for reproducibility.
    np.random.seed(int(rng.integers(0, 2**31 - 1)))
    out = np.asarray(corrupt(rgb, corruption_name=kind, severity=severity), dtype=np.float64)
    out = out[: rgb.shape[0], : rgb.shape[1]]  # some kinds return a larger canvas
    if c == 1:
        out = out.mean(axis=2, keepdims=True)
    return np.clip(np.rint(out[top : top + h, left : left + w]), 0, 255).astype(np.uint8)


def _impulse(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    hit = rng.random(image.shape) < IMPULSE_AMOUNT[severity - 1]
    salt = rng.random(image.shape) < 0.5
    out = image.copy()
    out[hit & salt], out[hit & ~salt] = 255, 0
    return out


def _rotation(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    angle = ROTATION_DEGREES[severity - 1] * rng.choice((-1.0, 1.0))
    return _pil_apply(image, lambda im: im.rotate(angle, resample=Image.BILINEAR, fillcolor=_fill(image)))


def _translation(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    h, w, _ = image.shape
    theta = rng.uniform(0, 2 * np.pi)
    dy, dx = (np.array([np.sin(theta), np.cos(theta)]) * TRANSLATION_FRACTION[severity - 1] * (h, w)).round()
    out = np.empty_like(image)
    out[...] = np.asarray(_fill(image), dtype=np.uint8).reshape(1, 1, -1)
    dy, dx = int(dy), int(dx)
    src = image[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
    out[max(0, dy) : max(0, dy) + src.shape[0], max(0, dx) : max(0, dx) + src.shape[1]] = src
    return out


def _occlusion(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    h, w, c = image.shape
    side_h = max(1, round(OCCLUSION_FRACTION[severity - 1] * h))
    side_w = max(1, round(OCCLUSION_FRACTION[severity - 1] * w))
    top, left = rng.integers(0, h - side_h + 1), rng.integers(0, w - side_w + 1)
    out = image.copy()
    out[top : top + side_h, left : left + side_w] = rng.integers(0, 256, size=(1, 1, c), dtype=np.uint8)
    return out


def _fill(image: np.ndarray) -> tuple[int, ...] | int:
    """The border's median colour: what the background around a turned or shifted object looks like."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    median = np.median(border, axis=0).astype(int)
    return int(median[0]) if image.shape[2] == 1 else tuple(int(v) for v in median)


def _pil_apply(image: np.ndarray, op: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    grey = image.shape[2] == 1
    pil = Image.fromarray(image[..., 0] if grey else image)
    out = np.asarray(op(pil))
    return out[..., None] if grey else out


_OWN: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "impulse_noise": _impulse,
    "rotation": _rotation,
    "translation": _translation,
    "occlusion": _occlusion,
}


def corrupt_images(images: np.ndarray, kind: str, severity: int, *, seed: int = 0) -> np.ndarray:
    """Corrupted copies of ``images`` (``N x H x W x C`` uint8), image ``i`` seeded by ``(seed, i)``.

    Raises
    ------
    ConfigError : unknown kind, severity outside 1..5, or images not uint8 ``N x H x W x C``.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown corruption {kind!r}; valid: {list(KINDS)}")
    if severity not in SEVERITIES:
        raise ConfigError(f"severity must be one of {list(SEVERITIES)}, got {severity}")
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[3] not in (1, 3):
        raise ConfigError(
            f"expected uint8 N x H x W x C images with C in (1, 3), got {images.dtype} {images.shape}"
        )
    kind_index = KINDS.index(kind)
    out = np.empty_like(images)
    for i, image in enumerate(images):
        rng = np.random.default_rng((seed, kind_index, severity, i))
        if kind in _OWN:
            out[i] = _OWN[kind](image, severity, rng)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[i] = _package(image, kind, severity, rng)
    return out
