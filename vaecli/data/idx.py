"""Read IDX files (the format MNIST ships in), raw or gzipped, checking the header against the payload."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from vaecli.common.errors import DataError

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
BIG_ENDIAN_INT32 = np.dtype(">i4")


def read_file_bytes(path: Path) -> bytes:
    """Return the contents of `path`, gunzipped when its name ends in .gz."""
    try:
        stored_bytes = Path(path).read_bytes()
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror}; check the file and its permissions") from error
    if Path(path).suffix != ".gz":
        return stored_bytes
    try:
        return gzip.decompress(stored_bytes)
    except (OSError, EOFError, zlib.error) as error:
        # BadGzipFile is an OSError; a cut-off download ends in EOFError; bad deflate data in zlib.error.
        raise DataError(f"{path} is not a valid gzip file ({error}); download it again") from error


def read_header(file_bytes: bytes, path: Path, magic: int, field_count: int) -> tuple[int, ...]:
    """Check the magic number and return the `field_count` big-endian int32 sizes after it."""
    header_length = 4 * (1 + field_count)
    if len(file_bytes) < header_length:
        raise DataError(
            f"{path} is too short for an IDX header ({len(file_bytes)} bytes, need {header_length}); download it again"
        )
    magic_found, *sizes = np.frombuffer(file_bytes, dtype=BIG_ENDIAN_INT32, count=1 + field_count).tolist()
    if magic_found != magic:
        kind = "images" if magic == IMAGES_MAGIC else "labels"
        raise DataError(
            f"{path} is not an IDX {kind} file: magic number {magic_found}, expected {magic}; "
            "check the file name or download it again"
        )
    if min(sizes) < 0:
        raise DataError(f"{path} has a negative size {sizes} in its header; download it again")
    return tuple(sizes)


def check_payload_length(file_bytes: bytes, path: Path, header_length: int, what: str, expected: int) -> None:
    """Raise DataError when the bytes after the header are not exactly what the header declares."""
    payload_length = len(file_bytes) - header_length
    if payload_length < expected:
        raise DataError(
            f"{path} is truncated: header says {what} ({expected} bytes) "
            f"but it holds {payload_length} bytes; download it again"
        )
    if payload_length > expected:
        raise DataError(
            f"{path} has {payload_length - expected} unexpected bytes after the {what} "
            "its header declares; download it again"
        )


def read_idx_images(path: Path) -> np.ndarray:
    """Read an IDX images file (magic 2051) into a read-only uint8 array [N, rows, cols]."""
    file_bytes = read_file_bytes(path)
    image_count, rows, cols = read_header(file_bytes, path, IMAGES_MAGIC, field_count=3)
    check_payload_length(file_bytes, path, 16, f"{image_count} images of {rows}x{cols}", image_count * rows * cols)
    # A view of the decompressed bytes: no copy, and read-only because bytes are immutable.
    return np.frombuffer(file_bytes, dtype=np.uint8, offset=16).reshape(image_count, rows, cols)


def read_idx_labels(path: Path) -> np.ndarray:
    """Read an IDX labels file (magic 2049) into a read-only uint8 array [N]."""
    file_bytes = read_file_bytes(path)
    (label_count,) = read_header(file_bytes, path, LABELS_MAGIC, field_count=1)
    check_payload_length(file_bytes, path, 8, f"{label_count} labels", label_count)
    return np.frombuffer(file_bytes, dtype=np.uint8, offset=8)
