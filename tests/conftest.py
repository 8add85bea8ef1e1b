"""Shared fixtures: tiny generated data sets in the real file formats (never the real data)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.fixtures import write_cifar_npz, write_fashion_mnist

# One torch thread: on two shared cores it builds the tiny bundle several times faster than the
# oversubscribed default, and keeps numbers independent of the machine's core count.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def fashion_mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gzipped Fashion-MNIST IDX files: 60 train, 20 test images, labels 0-9 in turn."""
    folder = tmp_path_factory.mktemp("fashion-mnist")
    write_fashion_mnist(folder, n_train=60, n_test=20, gz=True)
    return folder


@pytest.fixture(scope="session")
def cifar10_npz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CIFAR-10 npz files: 2 x 30 train, 20 test images, labels 0-9 in turn."""
    folder = tmp_path_factory.mktemp("cifar10")
    write_cifar_npz(folder, n_part=30, n_test=20)
    return folder


# A finished bundle built by the real pipeline on generated data: small enough for CI (about a
# minute), hard enough that the CNN makes errors for the detectors to learn from.
TINY_PROFILE = {
    "epochs": 3,
    "batch_size": 32,
    "cnn_train": 500,
    "fit": 250,
    "val": 200,
    "test": 200,
    "n_mutants": 8,
    "mutation_rate": 0.005,
    "n_boot": 50,
    "detector_seeds": 2,
}


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-fashion")
    write_fashion_mnist(folder, n_train=950, n_test=200, gz=True, seed=3, signal=0.3)
    return folder


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_data_dir: Path) -> Path:
    """Path to a finished bundle (every stage, every signal set, a report)."""
    from models.data import DataSource
    from offline.build import build_bundle
    from offline.profiles import BuildProfile

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    build_bundle(
        out,
        DataSource("fashion-mnist", str(tiny_data_dir)),
        BuildProfile(**TINY_PROFILE),
        device="cpu",
        progress=False,
    )
    return out
