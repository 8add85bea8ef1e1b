"""The open-world suites of a bundle: shifted copies of test images, unknown inputs, and the extra
rows an outlier-exposure detector may learn from, all made from local data.

The corruption kinds are split in two disjoint groups. ``EVAL_KINDS`` are only ever used to measure;
``EXPOSURE_KINDS`` may be shown to a detector or used to choose a threshold (the ``exposed`` variant,
as Outlier Exposure does, Hendrycks et al. 2019), so every figure on shift is measured on kinds the
detector never saw. Likewise the exposure outliers (pixel-shuffled and patch-shuffled images of the
fit split) are of none of the kinds in :mod:`offline.unknown_inputs`.

Label ``-1`` marks an unknown input: any prediction of it is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.errors import ConfigError
from offline.corruptions import COLOUR_ONLY, SEVERITIES, corrupt_images
from offline.unknown_inputs import FAR_SETS, unknown_sets

EVAL_KINDS = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "motion_blur",
    "frost",
    "brightness",
    "contrast",
    "jpeg_compression",
    "rotation",
    "occlusion",
)
EXPOSURE_KINDS = (
    "speckle_noise",
    "zoom_blur",
    "snow",
    "spatter",
    "saturate",
    "elastic_transform",
    "pixelate",
    "translation",
)
UNKNOWN_LABEL = -1


@dataclass
class Suite:
    """One set of images to measure on: ``regime`` is ``clean``, ``shift``, ``unknown`` or
    ``mixed``; ``kind``/``severity`` say which corruption or unknown set it is."""

    name: str
    regime: str
    kind: str
    severity: int
    images: np.ndarray
    labels: np.ndarray


def corruption_suites(
    images: np.ndarray, labels: np.ndarray, kinds: tuple[str, ...], severities: tuple[int, ...], seed: int
) -> list[Suite]:
    channels = images.shape[3]
    out = []
    for kind in kinds:
        if channels == 1 and kind in COLOUR_ONLY:
            continue
        for severity in severities:
            corrupted = corrupt_images(images, kind, severity, seed=seed)
            out.append(Suite(f"{kind}-{severity}", "shift", kind, severity, corrupted, labels.copy()))
    return out


def unknown_suites(
    n: int,
    shape: tuple[int, int, int],
    dataset: str,
    seed: int,
    data_roots: dict[str, str | None] | None = None,
) -> list[Suite]:
    sets = unknown_sets(n, shape, dataset=dataset, seed=seed, data_roots=data_roots)
    return [
        Suite(
            name,
            "unknown",
            "far" if name in FAR_SETS else "near",
            0,
            imgs,
            np.full(len(imgs), UNKNOWN_LABEL, dtype=np.int64),
        )
        for name, imgs in sets.items()
    ]


def mixed_suite(clean: Suite, unknowns: list[Suite], seed: int) -> Suite:
    """Clean test images and as many unknown ones (drawn evenly from every unknown set): the gate
    must reject both the CNN's errors and every unknown input (Xia & Bouganis 2022)."""
    rng = np.random.default_rng((seed, 7))
    per_set = max(1, len(clean.images) // max(len(unknowns), 1))
    picks = [
        (u.images[rng.choice(len(u.images), min(per_set, len(u.images)), replace=False)]) for u in unknowns
    ]
    unknown_images = np.concatenate(picks)
    images = np.concatenate([clean.images, unknown_images])
    labels = np.concatenate([clean.labels, np.full(len(unknown_images), UNKNOWN_LABEL, dtype=np.int64)])
    return Suite("mixed", "mixed", "clean+unknown", 0, images, labels)


def shuffled_outliers(images: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` synthetic outliers from in-distribution images: half with every pixel permuted, half
    with a 4 x 4 grid of patches shuffled (local statistics kept, the object destroyed)."""
    if n < 1:
        raise ConfigError("need at least one outlier")
    rng = np.random.default_rng((seed, 8))
    picked = images[rng.choice(len(images), n, replace=len(images) < n)].copy()
    _, h, w, _ = picked.shape
    half = n // 2
    for i in range(half):
        flat = picked[i].reshape(h * w, -1)
        picked[i] = flat[rng.permutation(h * w)].reshape(picked[i].shape)
    ph, pw = h // 4, w // 4
    for i in range(half, n):
        tiles = [
            picked[i, r * ph : (r + 1) * ph, c * pw : (c + 1) * pw].copy() for r in range(4) for c in range(4)
        ]
        for slot, src in enumerate(rng.permutation(16)):
            r, c = divmod(slot, 4)
            picked[i, r * ph : (r + 1) * ph, c * pw : (c + 1) * pw] = tiles[src]
    return picked


def exposure_rows(
    images: np.ndarray, labels: np.ndarray, *, n_outliers: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Extra rows for an exposed detector: each image once corrupted by a random exposure kind at a
    random severity, plus ``n_outliers`` shuffled outliers labelled unknown."""
    rng = np.random.default_rng((seed, 9))
    kinds = [k for k in EXPOSURE_KINDS if images.shape[3] == 3 or k not in COLOUR_ONLY]
    choice = rng.integers(0, len(kinds), len(images))
    severity = rng.integers(0, len(SEVERITIES), len(images))
    out = np.empty_like(images)
    for k in range(len(kinds)):
        for s in range(len(SEVERITIES)):
            idx = np.flatnonzero((choice == k) & (severity == s))
            if idx.size:
                out[idx] = corrupt_images(images[idx], kinds[k], SEVERITIES[s], seed=seed + 1)
    outliers = shuffled_outliers(images, n_outliers, seed)
    return (
        np.concatenate([out, outliers]),
        np.concatenate([labels, np.full(n_outliers, UNKNOWN_LABEL, dtype=np.int64)]),
    )


def evaluation_suites(
    test_images: np.ndarray,
    test_labels: np.ndarray,
    *,
    images: int,
    kinds: tuple[str, ...],
    severities: tuple[int, ...],
    dataset: str,
    seed: int,
    data_roots: dict[str, str | None] | None = None,
) -> list[Suite]:
    """Every suite the open world measures, in order: ``images`` clean test images (seeded pick),
    the same images under each corruption kind x severity, the unknown sets, and the mixed one."""
    rng = np.random.default_rng((seed, 11))
    pick = np.sort(rng.choice(len(test_images), min(images, len(test_images)), replace=False))
    clean = Suite("clean", "clean", "clean", 0, test_images[pick], test_labels[pick])
    suites = [clean] + corruption_suites(clean.images, clean.labels, kinds, severities, seed)
    unknowns = unknown_suites(images, tuple(test_images.shape[1:]), dataset, seed, data_roots)
    return suites + unknowns + [mixed_suite(clean, unknowns, seed)]
