"""Write small IDX files (the MNIST format) for tests, so no test needs the real dataset."""

from __future__ import annotations

import gzip as gzip_module
from pathlib import Path

import numpy as np

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049


def idx_bytes(magic: int, sizes: tuple[int, ...], payload_uint8: np.ndarray) -> bytes:
    """An IDX file: big-endian int32 magic and sizes, then the raw uint8 payload."""
    header = np.array((magic, *sizes), dtype=">i4").tobytes()
    return header + np.ascontiguousarray(payload_uint8, dtype=np.uint8).tobytes()


def write_bytes(path: Path, file_bytes: bytes, gzip: bool) -> Path:
    """Write `file_bytes` to `path`, gzipped when asked; return `path`."""
    path = Path(path)
    path.write_bytes(gzip_module.compress(file_bytes) if gzip else file_bytes)
    return path


def write_idx_images(path: Path, images_uint8: np.ndarray, gzip: bool) -> Path:
    """Write images uint8 [N, rows, cols] as an IDX images file (magic 2051)."""
    return write_bytes(path, idx_bytes(IMAGES_MAGIC, images_uint8.shape, images_uint8), gzip)


def write_idx_labels(path: Path, labels: np.ndarray, gzip: bool) -> Path:
    """Write labels uint8 [N] as an IDX labels file (magic 2049)."""
    return write_bytes(path, idx_bytes(LABELS_MAGIC, labels.shape, labels), gzip)


def blob_images(count: int, rng: np.random.Generator, side: int = 28) -> np.ndarray:
    """Bright blobs at random places on black, uint8 [count, side, side]: learnable, unlike noise."""
    rows, cols = np.mgrid[0:side, 0:side]
    centers = rng.uniform(side * 0.3, side * 0.7, size=(count, 2, 1, 1))
    radii = rng.uniform(side * 0.1, side * 0.25, size=(count, 1, 1))
    squared_distance = (rows - centers[:, 0]) ** 2 + (cols - centers[:, 1]) ** 2
    return (255 * np.exp(-squared_distance / (2 * radii**2))).astype(np.uint8)


def write_mnist_dir(directory: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Write the four gzipped MNIST IDX files with `n_train` + `n_test` blob images; return `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, count in (("train", n_train), ("t10k", n_test)):
        write_idx_images(directory / f"{prefix}-images-idx3-ubyte.gz", blob_images(count, rng), gzip=True)
        labels = rng.integers(0, 10, size=count, dtype=np.uint8)
        write_idx_labels(directory / f"{prefix}-labels-idx1-ubyte.gz", labels, gzip=True)
    return directory
