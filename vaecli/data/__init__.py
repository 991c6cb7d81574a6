"""Datasets as uint8 image arrays split into train / val / test, loaded by name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vaecli.errors import DataError

DATASET_NAMES = ("mnist", "mnist_sample")
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


def load_dataset(name: str, data_dir: Path | None) -> Dataset:
    """Load dataset `name`; `data_dir` holds the files of datasets that need them (mnist)."""
    # Imported here so that importing vaecli.data stays cheap and reads no file.
    if name == "mnist":
        from vaecli.data.mnist import load_mnist

        return load_mnist(data_dir)
    if name == "mnist_sample":
        from vaecli.data.mnist_sample import load_mnist_sample

        return load_mnist_sample()
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)} (set data.name)")
