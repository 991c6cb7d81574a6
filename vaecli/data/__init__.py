"""Datasets as uint8 image arrays split into train / val / test, loaded by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vaecli.config import DOWNLOADABLE_DATASETS, DataConfig
from vaecli.errors import DataError

if TYPE_CHECKING:
    from vaecli.data.download import DownloadProgress

DATASET_NAMES = (*DOWNLOADABLE_DATASETS, "mnist_sample", "folder")
SPLIT_NAMES = ("train", "val", "test")


# eq=False: the generated __eq__/__hash__ would compare or hash the arrays, which NumPy cannot do.
@dataclass(frozen=True, eq=False)
class Dataset:
    """Images (uint8 [N, H, W] grey or [N, H, W, 3] colour) and labels [N] for each of the three splits."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    # Label i names class_names[i]; empty when the images carry no names (or no labels, marked -1).
    class_names: tuple[str, ...] = ()
    # One-line remarks for the user about how the data was read (e.g. files skipped); never errors.
    notices: tuple[str, ...] = ()
    # How a user's picture becomes model input for this data: "digit" (MNIST's crop-and-centre,
    # light ink on dark) or "resize_crop" (scale the shorter side, centre-crop), see vaecli.images.
    preprocessing: str = "digit"

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The shape of one image, (H, W) or (H, W, 3)."""
        return tuple(self.train_images.shape[1:])

    def split(self, name: str) -> np.ndarray:
        """The images of split `name`: "train", "val" or "test"."""
        if name not in SPLIT_NAMES:
            raise DataError(f"unknown split {name!r}; choose one of {', '.join(SPLIT_NAMES)}")
        return getattr(self, f"{name}_images")


def take_read_only(values: np.ndarray, order: np.ndarray) -> np.ndarray:
    """The rows of `values` at `order`, as a read-only copy (like the IDX arrays, which are views of bytes)."""
    selected = values[order]
    selected.setflags(write=False)
    return selected


def resolved_data_dir(data: DataConfig) -> Path | None:
    """The folder `data` reads from: data.dir, else the per-user cache folder of a downloadable dataset."""
    if data.dir is not None:
        return Path(data.dir)
    if data.name in DOWNLOADABLE_DATASETS:
        from vaecli.cache import default_data_dir

        return default_data_dir(data.name)
    return None


def load_dataset(
    data: DataConfig,
    on_download: Callable[[DownloadProgress], None] | None = None,
    on_decode: Callable[[int, int], None] | None = None,
) -> Dataset:
    """Load the dataset `data` names, downloading or decoding (with progress callbacks) as needed."""
    # Imported here so that importing vaecli.data stays cheap and reads no file.
    directory = resolved_data_dir(data)
    if data.name in DOWNLOADABLE_DATASETS:
        from vaecli.data.idx_family import load_idx_dataset

        return load_idx_dataset(data.name, directory, data.mirrors, on_download)
    if data.name == "mnist_sample":
        from vaecli.data.mnist_sample import load_mnist_sample

        return load_mnist_sample()
    if data.name == "folder":
        from vaecli.cache import data_root
        from vaecli.data.folder import load_folder

        return load_folder(directory, data.image_size, data.channels, cache_root=data_root(), on_decode=on_decode)
    raise DataError(f"unknown dataset {data.name!r}; choose one of {', '.join(DATASET_NAMES)} (set data.name)")
