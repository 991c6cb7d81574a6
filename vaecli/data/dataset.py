"""The Dataset type every loader returns: uint8 images and labels for the train, val and test splits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vaecli.common.errors import DataError

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
    # light ink on dark) or "resize_crop" (scale the shorter side, centre-crop), see vaecli.common.images.
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
