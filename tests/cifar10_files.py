"""Write a small CIFAR-10 "python version" archive in the real format for tests, so no test needs the real one.

The real archive: cifar-10-batches-py/ with data_batch_1..5, test_batch and batches.meta (and a readme), each
batch a dict pickled by Python 2 with NumPy 1, holding b"data" uint8 [N, 3072] (red, green and blue planes,
each 32 rows of 32) and b"labels".
"""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
from pathlib import Path
from typing import ClassVar

import numpy as np

ARCHIVE_NAME = "cifar-10-python.tar.gz"
CLASS_NAMES = ("cat", "ship")
IMAGES_PER_TRAIN_BATCH = 3  # 15 training images: the last 15 // 6 = 2 are validation
TEST_IMAGES = 4


def pixel_value(image_index: int, channel: int, row: int, column: int) -> int:
    """A value that changes differently with each of image, channel, row and column (so no two axes mix)."""
    return (image_index * 11 + channel * 97 + row * 7 + column * 3) % 256


def batch_row(image_index: int) -> list[int]:
    """One image as the archive stores it: 1024 red, then 1024 green, then 1024 blue values, each plane by rows."""
    return [
        pixel_value(image_index, channel, row, column)
        for channel in range(3)
        for row in range(32)
        for column in range(32)
    ]


class Python2Pickler(pickle._Pickler):
    """Pickles as Python 2's cPickle wrote the real batches (protocol 2): text and bytes alike as its str."""

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)

    def save_python2_str(self, value: str | bytes) -> None:
        data = value.encode("ascii") if isinstance(value, str) else value
        # SHORT_BINSTRING or BINSTRING: what unpickling with encoding="bytes" turns into bytes.
        self.write(b"U" + bytes([len(data)]) + data if len(data) < 256 else b"T" + struct.pack("<i", len(data)) + data)
        self.memoize(value)

    dispatch[str] = save_python2_str
    dispatch[bytes] = save_python2_str


def pickled(value: object) -> bytes:
    """`value` pickled as the real files are, arrays naming numpy.core.multiarray as NumPy 1 wrote it."""
    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump(value)
    # Protocol 2 writes globals as text lines, so the module NumPy 2 names can be put back.
    return buffer.getvalue().replace(
        b"cnumpy._core.multiarray\n_reconstruct\n", b"cnumpy.core.multiarray\n_reconstruct\n"
    )


def batch_pickle(first_image: int, count: int) -> bytes:
    data = np.array([batch_row(first_image + offset) for offset in range(count)], dtype=np.uint8)
    labels = [(first_image + offset) % len(CLASS_NAMES) for offset in range(count)]
    return pickled({b"batch_label": b"a batch", b"labels": labels, b"data": data, b"filenames": [b"x.png"] * count})


def archive_members() -> dict[str, bytes]:
    """The members of the python archive, in its order, with small batches: image i has label i % 2."""
    members = {
        "cifar-10-batches-py/data_batch_4": batch_pickle(9, IMAGES_PER_TRAIN_BATCH),
        "cifar-10-batches-py/readme.html": b"<html></html>",
        "cifar-10-batches-py/test_batch": batch_pickle(100, TEST_IMAGES),
        "cifar-10-batches-py/data_batch_3": batch_pickle(6, IMAGES_PER_TRAIN_BATCH),
        "cifar-10-batches-py/data_batch_2": batch_pickle(3, IMAGES_PER_TRAIN_BATCH),
        "cifar-10-batches-py/data_batch_5": batch_pickle(12, IMAGES_PER_TRAIN_BATCH),
        "cifar-10-batches-py/batches.meta": pickled(
            {"num_cases_per_batch": IMAGES_PER_TRAIN_BATCH, "label_names": ["cat", "ship"], "num_vis": 3072}
        ),
        "cifar-10-batches-py/data_batch_1": batch_pickle(0, IMAGES_PER_TRAIN_BATCH),
    }
    return members


def tar_gz(members: dict[str, bytes]) -> bytes:
    """A gzipped tar holding the folder cifar-10-batches-py/ and `members`."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        folder = tarfile.TarInfo("cifar-10-batches-py")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return buffer.getvalue()


def write_cifar10_dir(directory: Path) -> Path:
    """Write the small archive into `directory` as it is downloaded; return `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ARCHIVE_NAME).write_bytes(tar_gz(archive_members()))
    return directory
