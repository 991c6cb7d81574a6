"""MNIST, Fashion-MNIST and KMNIST from their four IDX files, downloaded into the cache when missing.

Files already in the folder (placed by hand, gzipped or raw) are used as they are and validated by
structure, not by checksum; only missing ones are downloaded, and those are checksum-verified.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from vaecli.common.errors import DataError
from vaecli.data.dataset import Dataset
from vaecli.data.download import DownloadProgress, download_missing
from vaecli.data.idx import read_idx_images, read_idx_labels
from vaecli.data.sources import IDX_FILE_STEMS, IDX_SOURCES

MAX_VALIDATION_IMAGES = 5000
CLASS_COUNT = 10


def validation_count(train_count: int) -> int:
    """How many of the last training images to hold out: 5,000 of the real 60,000, a sixth of fewer."""
    return min(MAX_VALIDATION_IMAGES, train_count // 6)


def existing_idx_file(directory: Path, stem: str) -> Path | None:
    """`directory/stem.gz`, else `directory/stem`, else None."""
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def ensure_idx_files(
    name: str,
    directory: Path,
    mirrors: Sequence[str] | None = None,
    on_download: Callable[[DownloadProgress], None] | None = None,
) -> list[Path]:
    """The paths of the four IDX files in `directory`, downloading (and verifying) any that are missing."""
    source = IDX_SOURCES[name]
    missing = [
        remote for remote in source.files if existing_idx_file(directory, remote.name.removesuffix(".gz")) is None
    ]
    if missing:
        if directory.exists() and not directory.is_dir():
            raise DataError(f"{name}: data.dir {directory} is a file; give a folder for the dataset")
        download_missing(name, directory, missing, mirrors or source.mirrors, on_download)
    return [existing_idx_file(directory, stem) for stem in IDX_FILE_STEMS]  # type: ignore[misc]


def read_split(name: str, images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one images file and its labels file, checking that they describe the same images."""
    images = read_idx_images(images_path)
    labels = read_idx_labels(labels_path)
    if len(images) != len(labels):
        raise DataError(
            f"{name}: {images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels; "
            "download both again"
        )
    if len(labels) and labels.max() >= CLASS_COUNT:
        raise DataError(f"{name}: {labels_path} holds label {labels.max()}, not a class 0-9; download it again")
    return images, labels


def load_idx_dataset(
    name: str,
    directory: Path,
    mirrors: Sequence[str] | None = None,
    on_download: Callable[[DownloadProgress], None] | None = None,
) -> Dataset:
    """Load `name` from `directory`; the last training images (5,000 of 60,000) become the validation split."""
    directory = Path(directory).expanduser().absolute()
    train_images_path, train_labels_path, test_images_path, test_labels_path = ensure_idx_files(
        name, directory, mirrors, on_download
    )
    all_train_images, all_train_labels = read_split(name, train_images_path, train_labels_path)
    test_images, test_labels = read_split(name, test_images_path, test_labels_path)

    held_out = validation_count(len(all_train_images))
    if held_out == 0:
        raise DataError(
            f"{name}: {train_images_path} holds {len(all_train_images)} images; need at least 6 "
            "to hold out a validation split; use the full training file"
        )
    if len(test_images) == 0:
        raise DataError(f"{name}: {test_images_path} holds no images; use the full test file")
    if test_images.shape[1:] != all_train_images.shape[1:]:
        raise DataError(
            f"{name}: {test_images_path} holds images of {test_images.shape[1]}x{test_images.shape[2]} but "
            f"{train_images_path} holds {all_train_images.shape[1]}x{all_train_images.shape[2]}; "
            "use files from the same dataset"
        )
    kept = len(all_train_images) - held_out
    return Dataset(
        name=name,
        train_images=all_train_images[:kept],
        train_labels=all_train_labels[:kept],
        val_images=all_train_images[kept:],
        val_labels=all_train_labels[kept:],
        test_images=test_images,
        test_labels=test_labels,
    )
