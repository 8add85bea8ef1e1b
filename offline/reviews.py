"""Reviewed rejections read back from a server's outbox: the images people labelled, as training rows.

The review page (docs/fallback.md) stores each reviewed ``unknown`` input in the outbox's SQLite file:
the image as received in table ``items``, the label a person gave it in table ``reviews`` (a class
index of the item's bundle, or NULL for "none of these"). This module opens that file read-only (a
server may still be writing to it), decodes every reviewed image into the bundle's input layout and
gives it the label the detectors learn from: the class, or -1 for an input of no class (always a
wrong answer, whatever the CNN said).

An item is used only where its record proves it fits the bundle: its predicted class index names
the same class in this bundle, so a review made against another class list is never read as a label
of this one (it is counted and reported instead).
"""

from __future__ import annotations

import io
import json
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.bundle import Bundle
from models.data import ImageArrays
from models.errors import ConfigError, InputError
from models.image_input import DEFAULT_MAX_PIXELS, InputContract, decode_image

NPY = "application/x-npy"
NONE_OF_THESE = -1
OUTBOX_FILE = "outbox.sqlite3"


@dataclass
class ReviewedInputs:
    """Reviewed images in the bundle's layout (``N x H x W x C`` uint8), the labels people gave them
    (-1 = none of the classes), what the gate had predicted, and the outbox keys (for traceability)."""

    images: np.ndarray
    labels: np.ndarray
    predicted: np.ndarray
    keys: list[str]
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def wrong(self) -> np.ndarray:
        """Where the gate's CNN had it wrong: another class, or no class at all."""
        return self.labels != self.predicted

    def subset(self, idx: np.ndarray) -> ReviewedInputs:
        idx = np.asarray(idx, dtype=np.int64)
        return ReviewedInputs(
            self.images[idx],
            self.labels[idx],
            self.predicted[idx],
            [self.keys[i] for i in idx],
            dict(self.skipped),
        )

    def as_arrays(self, class_names: list[str]) -> ImageArrays:
        """Images with placeholder labels (ImageArrays wants class indices); the real labels are
        :attr:`labels`, where -1 marks an input of no class."""
        return ImageArrays(self.images, np.zeros(len(self), dtype=np.int64), class_names)


def outbox_file(path: Path | str) -> Path:
    """The outbox file of ``path``: the file itself, or ``outbox.sqlite3`` in a fallback directory."""
    path = Path(path)
    if path.is_dir():
        path = path / OUTBOX_FILE
    if not path.is_file():
        raise ConfigError(
            f"--reviews {path}: no such file; give the server's fallback directory (PREDGATE_FALLBACK_DIR) "
            f"or its {OUTBOX_FILE}"
        )
    return path


def _decode(data: bytes, media_type: str, bundle: Bundle, contract: InputContract) -> np.ndarray:
    if media_type == NPY:
        tensor = np.load(io.BytesIO(data), allow_pickle=False)
        return bundle.normalisation.invert(tensor)
    return decode_image(data, contract)


def read_reviews(path: Path | str, bundle: Bundle) -> ReviewedInputs:
    """Every reviewed item of the outbox at ``path`` that fits ``bundle``, in review order."""
    db_path = outbox_file(path)
    try:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        rows = db.execute(
            "SELECT i.key, i.meta, i.image, i.image_type, r.label FROM items i JOIN reviews r ON r.key = "
            "i.key ORDER BY r.reviewed_at, i.rowid"
        ).fetchall()
    except sqlite3.DatabaseError as exc:
        raise ConfigError(
            f"--reviews {db_path}: not a predgate outbox with reviews ({exc}); reviews are recorded on the "
            "review page (PREDGATE_REVIEW=1)"
        ) from None
    finally:
        if "db" in locals():
            db.close()
    class_names = bundle.class_names
    _, height, width = bundle.input_shape
    # as a server with the default resize policy decodes (crop fits only square inputs)
    contract = InputContract.from_shape(
        bundle.input_shape, "crop" if height == width else "refuse", DEFAULT_MAX_PIXELS
    )
    skipped: Counter[str] = Counter()
    images, labels, predicted, keys = [], [], [], []
    for key, meta_text, image, media_type, label in rows:
        prediction = json.loads(meta_text).get("prediction") or {}
        guess = prediction.get("primary_label", prediction.get("label"))
        if not isinstance(guess, int) or not 0 <= guess < len(class_names):
            skipped["no prediction in its record"] += 1
            continue
        if prediction.get("class_name") is not None and prediction.get("class_name") != class_names[guess]:
            skipped["made against another class list"] += 1
            continue
        if label is not None and not 0 <= int(label) < len(class_names):
            skipped["label outside this bundle's classes"] += 1
            continue
        try:
            pixels = _decode(bytes(image), str(media_type), bundle, contract)
        except (InputError, ValueError) as exc:
            skipped[f"image not readable ({type(exc).__name__})"] += 1
            continue
        if pixels.shape != (height, width, bundle.input_shape[0]):
            skipped["image of another shape"] += 1
            continue
        images.append(pixels)
        labels.append(NONE_OF_THESE if label is None else int(label))
        predicted.append(guess)
        keys.append(str(key))
    return ReviewedInputs(
        np.stack(images) if images else np.zeros((0, height, width, bundle.input_shape[0]), dtype=np.uint8),
        np.asarray(labels, dtype=np.int64),
        np.asarray(predicted, dtype=np.int64),
        keys,
        dict(skipped),
    )


def split_indices(wrong: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rest, part) row indices, ``part`` about ``fraction`` of the rows, stratified by ``wrong``."""
    rng = np.random.default_rng((seed, 18))
    rest, part = [], []
    for value in (False, True):
        idx = np.flatnonzero(np.asarray(wrong) == value)
        idx = idx[rng.permutation(len(idx))]
        cut = round(len(idx) * fraction)
        part.append(idx[:cut])
        rest.append(idx[cut:])
    return np.sort(np.concatenate(rest)), np.sort(np.concatenate(part))


def split_reviews(
    reviewed: ReviewedInputs, held_out: float, seed: int
) -> tuple[ReviewedInputs, ReviewedInputs]:
    """(refit, held-out) parts, stratified by whether the CNN was wrong, so both parts hold right and
    wrong answers in the proportions the reviews have."""
    if not 0.0 < held_out < 1.0:
        raise ConfigError(f"--review-held-out must be in (0, 1), got {held_out}")
    refit_idx, held_idx = split_indices(reviewed.wrong, held_out, seed)
    return reviewed.subset(refit_idx), reviewed.subset(held_idx)
