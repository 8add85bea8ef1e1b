"""The four disjoint splits of method.md section 1 (cnn-train, fit, val, test), cut from a data set's
train and test pools by seeded permutations, and the index files that name the CNN's training images.

It exists so that how the splits are drawn, recorded in a manifest and checked again is one module,
independent of where the pixels come from.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from models.data.arrays import DataError, ImageArrays

SPLIT_NAMES = ("cnn-train", "fit", "val", "test")


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
