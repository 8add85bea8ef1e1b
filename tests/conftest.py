"""Shared fixtures: tiny generated data sets in the real file formats (never the real data)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.offline.fixtures import write_cifar_npz, write_fashion_mnist


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
