"""Loaders against files written here in the real formats, and splits against their stated rules."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision import transforms

from models.data import (
    CIFAR10_CLASSES,
    DEFAULT_CIFAR10_DIR,
    DEFAULT_FASHION_MNIST_DIR,
    FASHION_MNIST_CLASSES,
    DataError,
    ImageArrays,
    Splits,
    SplitSpec,
    apply_splits,
    cifar10_npz_available,
    holdout,
    load_cifar10_batches,
    load_cifar10_npz,
    load_dataset,
    load_fashion_mnist,
    load_image_folder,
    make_splits,
    read_idx,
)
from models.preprocess import Normalisation
from tests.fixtures import (
    FOLDER_IMAGES,
    class_images,
    idx_bytes,
    write_cifar_batches,
    write_cifar_npz,
    write_fashion_mnist,
    write_idx,
    write_image_folder,
)


def _assert_arrays(arrays: ImageArrays, n: int, shape: tuple[int, int, int], n_classes: int = 10) -> None:
    assert len(arrays) == n
    assert arrays.images.shape == (n, *shape) and arrays.images.dtype == np.uint8
    assert arrays.labels.shape == (n,) and arrays.labels.dtype == np.int64
    assert arrays.labels.min() >= 0 and arrays.labels.max() < n_classes
    assert len(arrays.class_names) == n_classes


# ------------------------------------------------------------------------------------------------
# ImageArrays
# ------------------------------------------------------------------------------------------------


def test_image_arrays_validates_and_subsets() -> None:
    images, labels = class_images(12, (4, 4, 3), seed=0, n_classes=3)
    arrays = ImageArrays(images, labels.astype(np.int32), ["a", "b", "c"])
    assert arrays.labels.dtype == np.int64 and arrays.image_shape == (4, 4, 3)
    sub = arrays.subset([5, 0, 5])
    np.testing.assert_array_equal(sub.images, images[[5, 0, 5]])
    np.testing.assert_array_equal(sub.labels, labels[[5, 0, 5]])
    with pytest.raises(DataError, match="uint8"):
        ImageArrays(images.astype(np.float32), labels, ["a", "b", "c"])
    with pytest.raises(DataError, match="labels"):
        ImageArrays(images, labels[:-1], ["a", "b", "c"])
    with pytest.raises(DataError, match="class names"):
        ImageArrays(images, labels, ["a", "b"])


# ------------------------------------------------------------------------------------------------
# Fashion-MNIST / IDX
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_written_idx(tmp_path: Path, gz: bool) -> None:
    written = write_fashion_mnist(tmp_path, n_train=30, n_test=12, gz=gz)
    for split, n in (("train", 30), ("test", 12)):
        arrays = load_fashion_mnist(tmp_path, split)
        _assert_arrays(arrays, n, (28, 28, 1))
        np.testing.assert_array_equal(arrays.images[..., 0], written[split][0])
        np.testing.assert_array_equal(arrays.labels, written[split][1])
        assert arrays.class_names == FASHION_MNIST_CLASSES


def test_fashion_mnist_root_from_environment(fashion_mnist_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("PREDGATE_FASHION_MNIST_DIR", str(fashion_mnist_dir))
    assert len(load_fashion_mnist(split="test")) == 20
    train, test = load_dataset("fashion-mnist")
    assert (len(train), len(test)) == (60, 20)


def test_read_idx_other_types(tmp_path: Path) -> None:
    values = np.arange(-6, 6, dtype=np.int32).reshape(3, 4) * 100_000
    path = write_idx(tmp_path / "ints-idx2", values, type_code=0x0C, big_endian_dtype=">i4")
    np.testing.assert_array_equal(read_idx(path), values)
    floats = np.linspace(-1, 1, 8, dtype=np.float32)
    path = write_idx(tmp_path / "floats-idx1.gz", floats, type_code=0x0D, big_endian_dtype=">f4")
    np.testing.assert_array_equal(read_idx(path), floats)


def test_corrupt_idx_files_are_refused_with_their_name(tmp_path: Path) -> None:
    good = idx_bytes(np.zeros((3, 28, 28), dtype=np.uint8))
    cases = {
        "wrong-magic": (b"\x08\x03\x00\x00" + good[4:], "not an IDX file"),
        "unknown-type": (good[:2] + b"\x42" + good[3:], "not an IDX file"),
        "short-header": (good[:9], "truncated IDX header"),
        "truncated": (good[:-5], "truncated"),
        "trailing": (good + b"\x00", "trailing bytes"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(DataError, match=message) as info:
            read_idx(path)
        assert str(path) in str(info.value)
    cut_gz = tmp_path / "cut.gz"
    cut_gz.write_bytes(gzip.compress(good)[:-20])
    with pytest.raises(DataError, match="cannot decompress") as info:
        read_idx(cut_gz)
    assert str(cut_gz) in str(info.value)


def test_fashion_mnist_refuses_bad_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_fashion_mnist(tmp_path / "nowhere", "train")
    write_fashion_mnist(tmp_path, n_train=20, n_test=10, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(9, dtype=np.uint8))  # 10 images, 9 labels
    with pytest.raises(DataError, match="9 labels"):
        load_fashion_mnist(tmp_path, "test")
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-1])
    with pytest.raises(DataError, match=str(labels)):
        load_fashion_mnist(tmp_path, "train")
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist(tmp_path, "validation")


# ------------------------------------------------------------------------------------------------
# CIFAR-10
# ------------------------------------------------------------------------------------------------


def test_cifar10_npz_joins_train_parts_in_order(cifar10_npz_dir: Path, tmp_path: Path) -> None:
    written = write_cifar_npz(tmp_path, n_part=7, n_test=5, seed=3)
    train = load_cifar10_npz(tmp_path, "train")
    _assert_arrays(train, 14, (32, 32, 3))
    np.testing.assert_array_equal(train.images[:7], written["train_part0"][0])
    np.testing.assert_array_equal(train.images[7:], written["train_part1"][0])
    np.testing.assert_array_equal(
        train.labels, np.concatenate([written["train_part0"][1], written["train_part1"][1]])
    )
    test = load_cifar10_npz(tmp_path, "test")
    _assert_arrays(test, 5, (32, 32, 3))
    np.testing.assert_array_equal(test.images, written["test"][0])
    assert train.class_names == CIFAR10_CLASSES
    assert len(load_cifar10_npz(cifar10_npz_dir, "train")) == 60


def test_cifar10_npz_refuses_bad_files(tmp_path: Path) -> None:
    write_cifar_npz(tmp_path, n_part=4, n_test=4)
    (tmp_path / "train_part1.npz").unlink()
    with pytest.raises(DataError, match="train_part1.npz"):
        load_cifar10_npz(tmp_path, "train")
    np.savez(tmp_path / "test.npz", images=np.zeros((4, 28, 28, 3), np.uint8), labels=np.zeros(4, np.int64))
    with pytest.raises(DataError, match="32 x 32 x 3"):
        load_cifar10_npz(tmp_path, "test")
    (tmp_path / "test.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="test.npz"):
        load_cifar10_npz(tmp_path, "test")


def test_cifar10_python_batches(tmp_path: Path) -> None:
    written = write_cifar_batches(tmp_path, per_batch=6, n_test=9)
    for split, n in (("train", 30), ("test", 9)):
        # The fixture files are not the official release, so torchvision's md5 check must be off...
        arrays = load_cifar10_batches(tmp_path, split, verify_md5=False)
        _assert_arrays(arrays, n, (32, 32, 3))
        np.testing.assert_array_equal(arrays.images, written[split][0])
        np.testing.assert_array_equal(arrays.labels, written[split][1])
        assert arrays.class_names == CIFAR10_CLASSES
    # ...and on by default, so a corrupted official copy is caught.
    with pytest.raises(DataError, match="corrupted"):
        load_cifar10_batches(tmp_path, "train")
    # The batches folder itself is accepted as root too.
    same = load_cifar10_batches(tmp_path / "cifar-10-batches-py", "test", verify_md5=False)
    np.testing.assert_array_equal(same.images, written["test"][0])
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_cifar10_batches(tmp_path / "elsewhere", "test", verify_md5=False)


def test_load_dataset_cifar10_prefers_npz(tmp_path: Path) -> None:
    batches = write_cifar_batches(tmp_path, per_batch=2, n_test=3)
    train, test = load_dataset("cifar10", tmp_path, verify_md5=False)
    np.testing.assert_array_equal(test.images, batches["test"][0])
    assert len(train) == 10
    npz = write_cifar_npz(tmp_path, n_part=3, n_test=4, seed=9)
    train, test = load_dataset("cifar10", tmp_path)
    np.testing.assert_array_equal(test.images, npz["test"][0])
    assert len(train) == 6
    with pytest.raises(DataError, match="neither the CIFAR-10 npz files"):
        load_dataset("cifar10", tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown data set"):
        load_dataset("mnist", tmp_path)


def test_default_roots_are_outside_the_package() -> None:
    package_root = Path(__file__).resolve().parents[2]
    assert not DEFAULT_CIFAR10_DIR.is_relative_to(package_root)
    assert DEFAULT_CIFAR10_DIR.parts[-3:] == ("shared", "data", "cifar10")
    assert DEFAULT_FASHION_MNIST_DIR.is_absolute()


# ------------------------------------------------------------------------------------------------
# Image folders
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [3, 1])
def test_image_folder_matches_torchvision_resize_and_crop(tmp_path: Path, channels: int) -> None:
    paths = write_image_folder(tmp_path, ["zebra", "ant", "moth"])
    arrays = load_image_folder(tmp_path, image_size=12, channels=channels)
    _assert_arrays(arrays, 3 * len(FOLDER_IMAGES), (12, 12, channels), n_classes=3)
    assert arrays.class_names == ["ant", "moth", "zebra"]
    reference = transforms.Compose([transforms.Resize(12), transforms.CenterCrop(12)])
    mode = "RGB" if channels == 3 else "L"
    expected = {}
    for path in paths:
        with Image.open(path) as img:
            pixels = np.asarray(reference(img.convert(mode))).reshape(12, 12, channels)
        expected[(path.parent.name, path.name)] = pixels
    order = sorted(expected)  # ImageFolder order: class, then file name
    for i, key in enumerate(order):
        np.testing.assert_array_equal(arrays.images[i], expected[key])
        assert arrays.class_names[arrays.labels[i]] == key[0]


def test_image_folder_train_test_layout(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "train", ["cat", "dog", "eel"], n_per_class=2)
    write_image_folder(tmp_path / "val", ["dog", "eel"], n_per_class=1)  # a class missing from val
    train, test = load_dataset("imagefolder", tmp_path, image_size=8, channels=3)
    _assert_arrays(train, 6, (8, 8, 3), n_classes=3)
    assert test.class_names == ["cat", "dog", "eel"]
    np.testing.assert_array_equal(test.labels, [1, 2])  # the train split's label indices
    write_image_folder(tmp_path / "test", ["fox"], n_per_class=1)  # test/ wins over val/
    with pytest.raises(DataError, match="fox"):
        load_dataset("imagefolder", tmp_path, image_size=8, channels=3)


def test_image_folder_flat_layout_needs_test_size(tmp_path: Path) -> None:
    write_image_folder(tmp_path, ["a", "b"], n_per_class=5)
    with pytest.raises(DataError, match="test_size"):
        load_dataset("imagefolder", tmp_path, image_size=6, channels=1)
    train, test = load_dataset("imagefolder", tmp_path, image_size=6, channels=1, test_size=0.3, seed=1)
    assert (len(train), len(test)) == (7, 3)
    everything = load_image_folder(tmp_path, image_size=6, channels=1)
    rows = {arr.tobytes() for arr in everything.images}
    assert {arr.tobytes() for arr in np.concatenate([train.images, test.images])} == rows


def test_image_folder_refuses_undecodable_files(tmp_path: Path) -> None:
    write_image_folder(tmp_path, ["a"], n_per_class=1)
    bad = tmp_path / "a" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="broken.png"):
        load_image_folder(tmp_path, image_size=8)
    with pytest.raises(ValueError, match="channels"):
        load_image_folder(tmp_path, image_size=8, channels=2)


def test_holdout_is_a_seeded_partition() -> None:
    images, labels = class_images(20, (2, 2, 1), seed=0)
    arrays = ImageArrays(images, labels, [str(i) for i in range(10)])
    a_train, a_test = holdout(arrays, 5, seed=3)
    b_train, b_test = holdout(arrays, 5, seed=3)
    np.testing.assert_array_equal(a_test.images, b_test.images)
    np.testing.assert_array_equal(a_train.labels, b_train.labels)
    rows = {img.tobytes() for img in images}
    assert {img.tobytes() for img in np.concatenate([a_train.images, a_test.images])} == rows
    assert (len(a_train), len(a_test)) == (15, 5)
    with pytest.raises(ValueError, match="non-empty"):
        holdout(arrays, 20, seed=0)


# ------------------------------------------------------------------------------------------------
# Splits
# ------------------------------------------------------------------------------------------------


def _check_disjoint_within_pools(splits: Splits) -> None:
    for pool in ("train", "test"):
        names = [
            n
            for n, p in splits.pools.items()
            if p == pool and not (n == "fit" and splits.spec.fit_is_cnn_train)
        ]
        seen: set[int] = set()
        for name in names:
            idx = set(splits.indices[name].tolist())
            assert len(idx) == len(splits.indices[name]), f"{name} repeats an index"
            assert not idx & seen, f"{name} overlaps another {pool}-pool split"
            seen |= idx
        size = splits.train_pool_size if pool == "train" else splits.test_pool_size
        assert all(0 <= i < size for i in seen)


def test_held_out_splits_are_disjoint_with_requested_sizes() -> None:
    splits = make_splits(1000, 300, SplitSpec(cnn_train=None, fit=200, val=100, test=None, seed=7))
    assert splits.sizes() == {"cnn-train": 700, "fit": 200, "val": 100, "test": 300}
    assert splits.pools == {"cnn-train": "train", "fit": "train", "val": "train", "test": "test"}
    _check_disjoint_within_pools(splits)
    assert set(np.concatenate([splits.indices[n] for n in ("cnn-train", "fit", "val")]).tolist()) == set(
        range(1000)
    )
    # A permutation, not sorted slices: the split is not the first 700 indices.
    assert not np.array_equal(np.sort(splits.indices["cnn-train"]), np.arange(700))


def test_splits_are_reproducible_from_the_seed() -> None:
    spec = SplitSpec(cnn_train=500, fit=100, val=50, test=80, seed=1)
    a, b = make_splits(1000, 100, spec), make_splits(1000, 100, spec)
    c = make_splits(1000, 100, SplitSpec(cnn_train=500, fit=100, val=50, test=80, seed=2))
    for name in a.indices:
        np.testing.assert_array_equal(a.indices[name], b.indices[name])
        assert not np.array_equal(a.indices[name], c.indices[name])
    assert a.digest() == b.digest() != c.digest()
    # Growing a later split does not move an earlier one.
    bigger = make_splits(1000, 100, SplitSpec(cnn_train=500, fit=100, val=300, test=80, seed=1))
    np.testing.assert_array_equal(bigger.indices["cnn-train"], a.indices["cnn-train"])
    np.testing.assert_array_equal(bigger.indices["val"][:50], a.indices["val"])


def test_fit_is_cnn_train_and_val_from_test() -> None:
    """The paper's CIFAR-10 setting: detectors fit on cnn-train; the test set halves into val and test."""
    spec = SplitSpec(
        cnn_train=None, fit=None, val=5000, test=None, seed=0, fit_is_cnn_train=True, val_from="test"
    )
    splits = make_splits(50_000, 10_000, spec)
    assert splits.sizes() == {"cnn-train": 50_000, "fit": 50_000, "val": 5000, "test": 5000}
    np.testing.assert_array_equal(splits.indices["fit"], splits.indices["cnn-train"])
    assert splits.pools["val"] == splits.pools["test"] == "test"
    _check_disjoint_within_pools(splits)
    assert set(splits.indices["val"].tolist()) | set(splits.indices["test"].tolist()) == set(range(10_000))


def test_fit_can_be_a_random_subset_of_cnn_train() -> None:
    spec = SplitSpec(
        cnn_train=45_000, fit=5000, val=5000, test=5000, seed=0, fit_is_cnn_train=True, val_from="test"
    )
    splits = make_splits(50_000, 10_000, spec)
    assert splits.sizes()["fit"] == 5000
    assert set(splits.indices["fit"].tolist()) <= set(splits.indices["cnn-train"].tolist())
    # The same seed cuts the same cnn-train as the held-out setting, so one CNN serves both.
    held_out = make_splits(50_000, 10_000, SplitSpec(45_000, 5000, 5000, 5000, 0, False, "test"))
    np.testing.assert_array_equal(held_out.indices["cnn-train"], splits.indices["cnn-train"])
    assert not set(held_out.indices["fit"].tolist()) & set(held_out.indices["cnn-train"].tolist())


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (SplitSpec(cnn_train=800, fit=200, val=1, test=10, seed=0), "train pool has 1000 images"),
        (SplitSpec(cnn_train=10, fit=10, val=10, test=101, seed=0), "test pool has 100 images"),
        (SplitSpec(cnn_train=10, fit=10, val=60, test=41, seed=0, val_from="test"), "test pool"),
        (SplitSpec(cnn_train=None, fit=None, val=10, test=10, seed=0), "only one split per pool"),
        (
            SplitSpec(cnn_train=10, fit=11, val=10, test=10, seed=0, fit_is_cnn_train=True),
            "subset size of cnn-train",
        ),
        (SplitSpec(cnn_train=-1, fit=5, val=10, test=10, seed=0), "non-negative"),
        (SplitSpec(cnn_train=10, fit=5, val=10, test=10, seed=0, val_from="both"), "val_from"),
    ],
)
def test_impossible_splits_raise(spec: SplitSpec, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_splits(1000, 100, spec)


def test_splits_manifest_round_trip() -> None:
    splits = make_splits(300, 50, SplitSpec(cnn_train=200, fit=None, val=40, test=None, seed=4))
    record = json.loads(json.dumps(splits.to_dict()))
    assert record["sizes"] == {"cnn-train": 200, "fit": 60, "val": 40, "test": 50}
    assert record["seed"] == 4 and record["val_from"] == "train" and record["fit_is_cnn_train"] is False
    rebuilt = Splits.from_dict(record)
    for name in splits.indices:
        np.testing.assert_array_equal(rebuilt.indices[name], splits.indices[name])
    record["sha256"] = "0" * 64
    with pytest.raises(DataError, match="do not match"):
        Splits.from_dict(record)


def test_apply_splits_takes_each_split_from_its_pool() -> None:
    train_images, train_labels = class_images(40, (3, 3, 1), seed=0)
    test_images, test_labels = class_images(20, (3, 3, 1), seed=1)
    names = [str(i) for i in range(10)]
    train_pool, test_pool = (
        ImageArrays(train_images, train_labels, names),
        ImageArrays(test_images, test_labels, names),
    )
    splits = make_splits(40, 20, SplitSpec(cnn_train=20, fit=10, val=8, test=None, seed=0, val_from="test"))
    parts = apply_splits(train_pool, test_pool, splits)
    assert list(parts) == ["cnn-train", "fit", "val", "test"]
    np.testing.assert_array_equal(parts["fit"].images, train_images[splits.indices["fit"]])
    np.testing.assert_array_equal(parts["val"].images, test_images[splits.indices["val"]])
    np.testing.assert_array_equal(parts["test"].labels, test_labels[splits.indices["test"]])
    with pytest.raises(ValueError, match="pools of 40 / 20"):
        apply_splits(test_pool, train_pool, splits)


# ------------------------------------------------------------------------------------------------
# Real data (skipped when the files are absent)
# ------------------------------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_fashion_mnist() -> None:
    try:
        train, test = load_dataset("fashion-mnist")
    except DataError as exc:
        pytest.skip(f"real Fashion-MNIST not available: {exc}")
    _assert_arrays(train, 60_000, (28, 28, 1))
    _assert_arrays(test, 10_000, (28, 28, 1))
    np.testing.assert_array_equal(np.bincount(train.labels), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(test.labels), [1000] * 10)


@pytest.mark.realdata
def test_real_cifar10_npz() -> None:
    if not cifar10_npz_available():
        pytest.skip("real CIFAR-10 npz files not available")
    train, test = load_dataset("cifar10")
    _assert_arrays(train, 50_000, (32, 32, 3))
    _assert_arrays(test, 10_000, (32, 32, 3))
    np.testing.assert_array_equal(np.bincount(train.labels), [5000] * 10)
    np.testing.assert_array_equal(np.bincount(test.labels), [1000] * 10)
    # The data card's per-channel statistics of the training set.
    norm = Normalisation.from_images(train.images[::10])
    np.testing.assert_allclose(norm.mean, (0.4913, 0.4821, 0.4465), atol=3e-3)
    np.testing.assert_allclose(norm.std, (0.2452, 0.2428, 0.2606), atol=3e-3)
