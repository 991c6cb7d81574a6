"""The datasets by name: load_dataset picks the loader (each in its own module here) for data.name."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from vaecli.common.config import DOWNLOADABLE_DATASETS, DataConfig
from vaecli.common.errors import DataError
from vaecli.data.dataset import Dataset

if TYPE_CHECKING:
    from vaecli.data.download import DownloadProgress

DATASET_NAMES = (*DOWNLOADABLE_DATASETS, "mnist_sample", "folder")


def resolved_data_dir(data: DataConfig) -> Path | None:
    """The folder `data` reads from: data.dir, else the per-user cache folder of a downloadable dataset."""
    if data.dir is not None:
        return Path(data.dir)
    if data.name in DOWNLOADABLE_DATASETS:
        from vaecli.common.cache import default_data_dir

        return default_data_dir(data.name)
    return None


def load_dataset(
    data: DataConfig,
    on_download: Callable[[DownloadProgress], None] | None = None,
    on_decode: Callable[[int, int], None] | None = None,
) -> Dataset:
    """Load the dataset `data` names, downloading or decoding (with progress callbacks) as needed."""
    # Imported here so that importing vaecli.data.datasets stays cheap and reads no file.
    directory = resolved_data_dir(data)
    if data.name == "cifar10":
        from vaecli.data.cifar10 import load_cifar10

        return load_cifar10(directory, data.mirrors, on_download, on_decode)
    if data.name in DOWNLOADABLE_DATASETS:
        from vaecli.data.idx_family import load_idx_dataset

        return load_idx_dataset(data.name, directory, data.mirrors, on_download)
    if data.name == "mnist_sample":
        from vaecli.data.mnist_sample import load_mnist_sample

        return load_mnist_sample()
    if data.name == "folder":
        from vaecli.common.cache import data_root
        from vaecli.data.folder import load_folder

        return load_folder(directory, data.image_size, data.channels, cache_root=data_root(), on_decode=on_decode)
    raise DataError(f"unknown dataset {data.name!r}; choose one of {', '.join(DATASET_NAMES)} (set data.name)")
