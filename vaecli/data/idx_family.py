"""MNIST from the four standard IDX files in a directory the user names (data.dir)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vaecli.data import Dataset
from vaecli.data.idx import read_idx_images, read_idx_labels
from vaecli.errors import DataError

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
MAX_VALIDATION_IMAGES = 5000
CLASS_COUNT = 10


def validation_count(train_count: int) -> int:
    """How many of the last training images to hold out: 5,000 of the real 60,000, a sixth of fewer."""
    return min(MAX_VALIDATION_IMAGES, train_count // 6)


def find_idx_file(directory: Path, name: str) -> Path:
    """Return `directory/name.gz`, else `directory/name`, else raise DataError."""
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"mnist: {directory / name}(.gz) not found; put the four MNIST IDX files in {directory} (set data.dir)"
    )


def resolve_data_dir(data_dir: Path | None) -> Path:
    """Return `data_dir` as an absolute path (so messages name files fully), or raise DataError."""
    if data_dir is None:
        raise DataError("mnist: no data directory given; put the four MNIST IDX files in one and set data.dir")
    directory = Path(os.path.abspath(Path(data_dir).expanduser()))
    if not directory.is_dir():
        raise DataError(f"mnist: data directory {directory} not found; put the four MNIST IDX files there")
    return directory


def read_split(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one images file and its labels file, checking that they describe the same digits."""
    images = read_idx_images(images_path)
    labels = read_idx_labels(labels_path)
    if len(images) != len(labels):
        raise DataError(
            f"mnist: {images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels; "
            "download both again"
        )
    if len(labels) and labels.max() >= CLASS_COUNT:
        raise DataError(f"mnist: {labels_path} holds label {labels.max()}, not a digit 0-9; download it again")
    return images, labels


def load_mnist(data_dir: Path | None) -> Dataset:
    """Load MNIST from `data_dir`; the last training images (5,000 of 60,000) become the validation split."""
    directory = resolve_data_dir(data_dir)
    train_images_path, train_labels_path, test_images_path, test_labels_path = (
        find_idx_file(directory, name) for name in (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
    )
    all_train_images, all_train_labels = read_split(train_images_path, train_labels_path)
    test_images, test_labels = read_split(test_images_path, test_labels_path)

    held_out = validation_count(len(all_train_images))
    if held_out == 0:
        raise DataError(
            f"mnist: {train_images_path} holds {len(all_train_images)} images; need at least 6 "
            "to hold out a validation split; use the full MNIST training file"
        )
    if len(test_images) == 0:
        raise DataError(f"mnist: {test_images_path} holds no images; use the full MNIST test file")
    if test_images.shape[1:] != all_train_images.shape[1:]:
        raise DataError(
            f"mnist: {test_images_path} holds images of {test_images.shape[1]}x{test_images.shape[2]} but "
            f"{train_images_path} holds {all_train_images.shape[1]}x{all_train_images.shape[2]}; "
            "use files from the same dataset"
        )
    kept = len(all_train_images) - held_out
    return Dataset(
        name="mnist",
        train_images=all_train_images[:kept],
        train_labels=all_train_labels[:kept],
        val_images=all_train_images[kept:],
        val_labels=all_train_labels[kept:],
        test_images=test_images,
        test_labels=test_labels,
    )
