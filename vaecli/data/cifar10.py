"""CIFAR-10 from its "python version" archive, downloaded into the cache when missing, decoded once and cached.

- Archive: cifar-10-python.tar.gz in the folder (placed by hand, or downloaded and checksum-verified);
  a hand-placed one is used as it is, validated by structure, as the MNIST family's files are.
- Members: cifar-10-batches-py/data_batch_1..5 and test_batch, each a pickled dict holding b"data",
  uint8 [N, 3072] (1024 red, 1024 green, 1024 blue values, each plane row-major 32x32) and b"labels",
  and batches.meta, whose b"label_names" names the classes. They are read straight from the archive,
  nothing is unpacked, and unpickled by an Unpickler that builds NumPy arrays and nothing else, so an
  archive that was tampered with cannot run code.
- Split: the last training images (5,000 of 50,000) are validation, as in the MNIST family; test_batch is test.
- Cache: the decoded arrays are kept beside the archive in cifar-10-decoded.npz and reused while the
  archive's size and modification time are unchanged.
"""

from __future__ import annotations

import io
import json
import pickle
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vaecli.common.errors import DataError, OutputError
from vaecli.common.files import write_atomically
from vaecli.data import sources
from vaecli.data.dataset import Dataset
from vaecli.data.download import DownloadProgress, download_missing
from vaecli.data.idx_family import validation_count

NAME = "cifar10"
MEMBER_FOLDER = "cifar-10-batches-py"
TRAIN_MEMBERS = tuple(f"{MEMBER_FOLDER}/data_batch_{index}" for index in range(1, 6))
TEST_MEMBER = f"{MEMBER_FOLDER}/test_batch"
META_MEMBER = f"{MEMBER_FOLDER}/batches.meta"
SIDE, CHANNELS = 32, 3
CACHE_NAME = "cifar-10-decoded.npz"
# Bump when decoding or the cache layout changes, so every old cache stops matching.
CACHE_FORMAT_VERSION = 1


@dataclass(frozen=True, eq=False)
class DecodedArchive:
    """Every image of the archive, training batches in order, as uint8 [N, 32, 32, 3] with its labels."""

    train_images: np.ndarray
    train_labels: np.ndarray  # uint8 [N]
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]


def load_cifar10(
    directory: Path,
    mirrors: Sequence[str] | None = None,
    on_download: Callable[[DownloadProgress], None] | None = None,
    on_decode: Callable[[int, int], None] | None = None,
) -> Dataset:
    """Load CIFAR-10 from `directory`, downloading the archive when missing; `on_decode(done, total)` counts
    the archive's members as they are read (not called when the cache is used)."""
    directory = Path(directory).expanduser().absolute()
    archive = ensure_archive(directory, mirrors, on_download)
    fingerprint = archive_fingerprint(archive)
    notices = []
    decoded = read_cache(directory / CACHE_NAME, fingerprint)
    if decoded is None:
        decoded = decode_archive(archive, on_decode)
        cache_problem = write_cache(directory / CACHE_NAME, fingerprint, decoded)
        if cache_problem is not None:
            notices.append(f"could not cache the decoded images ({cache_problem}); they will be decoded again")
    return split_validation(decoded, archive, tuple(notices))


def ensure_archive(
    directory: Path, mirrors: Sequence[str] | None, on_download: Callable[[DownloadProgress], None] | None
) -> Path:
    """The path of the archive in `directory`, downloaded (and verified) first when it is missing."""
    source = sources.CIFAR10_SOURCE
    (remote,) = source.files
    archive = directory / remote.name
    if not archive.is_file():
        if directory.exists() and not directory.is_dir():
            raise DataError(f"{NAME}: data.dir {directory} is a file; give a folder for the dataset")
        download_missing(
            NAME, directory, [remote], mirrors or source.mirrors, on_download, placed_by_hand=" (as downloaded)"
        )
    return archive


def split_validation(decoded: DecodedArchive, archive: Path, notices: tuple[str, ...]) -> Dataset:
    """The Dataset, with the last training images held out for validation (the MNIST family's rule)."""
    held_out = validation_count(len(decoded.train_images))
    if held_out == 0:
        raise DataError(
            f"{NAME}: {archive} holds {len(decoded.train_images)} training images; need at least 6 "
            "to hold out a validation split; delete it so that the full archive is downloaded"
        )
    if len(decoded.test_images) == 0:
        raise DataError(
            f"{NAME}: {TEST_MEMBER} in {archive} holds no images; delete the archive so that it is downloaded again"
        )
    kept = len(decoded.train_images) - held_out
    return Dataset(
        name=NAME,
        train_images=decoded.train_images[:kept],
        train_labels=decoded.train_labels[:kept],
        val_images=decoded.train_images[kept:],
        val_labels=decoded.train_labels[kept:],
        test_images=decoded.test_images,
        test_labels=decoded.test_labels,
        class_names=decoded.class_names,
        notices=notices,
        preprocessing="resize_crop",
    )


# --- reading the archive --------------------------------------------------------------------------


# The globals a pickled NumPy array names. The batches were pickled by Python 2 with NumPy 1, whose arrays
# are rebuilt by numpy.core.multiarray._reconstruct (numpy._core in NumPy 2), numpy.ndarray and numpy.dtype.
ARRAY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class ArraysOnlyUnpickler(pickle.Unpickler):
    """Builds dicts, lists, bytes, numbers and NumPy arrays; any other global (a function to call) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ARRAY_GLOBALS[module, name]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused to load {module}.{name}, which is not part of a NumPy array"
            ) from None


def unpickle_member(archive: Path, member: str, payload: bytes) -> dict:
    """The dict pickled in `member`, its Python 2 strings as bytes; DataError if it holds anything else."""
    try:
        loaded = ArraysOnlyUnpickler(io.BytesIO(payload), encoding="bytes").load()
    except Exception as error:  # a damaged or hostile pickle can fail in many ways; all mean the same
        raise DataError(
            f"{NAME}: {member} in {archive} is not a CIFAR-10 batch ({error}); "
            "delete the archive so that it is downloaded again"
        ) from error
    if not isinstance(loaded, dict):
        raise DataError(
            f"{NAME}: {member} in {archive} holds a {type(loaded).__name__}, not a dict; "
            "delete the archive so that it is downloaded again"
        )
    return loaded


def read_members(archive: Path, names: Sequence[str], on_member: Callable[[], None] | None = None) -> dict[str, bytes]:
    """The bytes of each member `names` lists, read in one pass over the compressed archive."""
    wanted, found = set(names), {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if member.name in wanted and member.isfile():
                    found[member.name] = tar.extractfile(member).read()  # type: ignore[union-attr]
                    if on_member is not None:
                        on_member()
                    if len(found) == len(wanted):
                        break
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
        raise DataError(
            f"{NAME}: cannot read {archive} as a gzipped tar archive ({reason}); "
            "delete it so that it is downloaded again"
        ) from error
    missing = [name for name in names if name not in found]
    if missing:
        raise DataError(
            f"{NAME}: {archive} lacks {', '.join(missing)}; it is not the CIFAR-10 python archive: "
            "delete it so that it is downloaded again"
        )
    return found


def decode_archive(archive: Path, on_decode: Callable[[int, int], None] | None = None) -> DecodedArchive:
    """Read and check every batch of the archive into arrays."""
    names = (*TRAIN_MEMBERS, TEST_MEMBER, META_MEMBER)
    done = 0

    def count_member() -> None:
        nonlocal done
        done += 1
        if on_decode is not None:
            on_decode(done, len(names))

    payloads = read_members(archive, names, count_member)
    class_names = decode_class_names(archive, unpickle_member(archive, META_MEMBER, payloads[META_MEMBER]))
    train = [decode_batch(archive, name, payloads[name], len(class_names)) for name in TRAIN_MEMBERS]
    test_images, test_labels = decode_batch(archive, TEST_MEMBER, payloads[TEST_MEMBER], len(class_names))
    return DecodedArchive(
        train_images=np.concatenate([images for images, _ in train]),
        train_labels=np.concatenate([labels for _, labels in train]),
        test_images=test_images,
        test_labels=test_labels,
        class_names=class_names,
    )


def decode_class_names(archive: Path, meta: dict) -> tuple[str, ...]:
    """The class names that batches.meta lists under b"label_names"."""
    names = meta.get(b"label_names")
    # At most 256 classes, so that a label fits the uint8 that every dataset's labels are.
    if not isinstance(names, list) or not 0 < len(names) <= 256 or not all(isinstance(name, bytes) for name in names):
        raise DataError(
            f"{NAME}: {META_MEMBER} in {archive} has no list of class names (label_names); "
            "delete the archive so that it is downloaded again"
        )
    return tuple(name.decode("utf-8", errors="replace") for name in names)


def decode_batch(archive: Path, member: str, payload: bytes, class_count: int) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 32, 32, 3] and labels uint8 [N] of one pickled batch."""
    batch = unpickle_member(archive, member, payload)
    data, labels = batch.get(b"data"), batch.get(b"labels")

    def refuse(problem: str) -> DataError:
        return DataError(f"{NAME}: {member} in {archive} {problem}; delete the archive so that it is downloaded again")

    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape[1:] == (CHANNELS * SIDE * SIDE,)):
        raise refuse(f"holds no uint8 [N, {CHANNELS * SIDE * SIDE}] array under data")
    if not (isinstance(labels, list) and all(isinstance(label, int) for label in labels)):
        raise refuse("holds no list of labels")
    if len(labels) != len(data):
        raise refuse(f"holds {len(data)} images but {len(labels)} labels")
    stray = next((label for label in labels if not 0 <= label < class_count), None)
    if stray is not None:
        raise refuse(f"holds label {stray}, not one of the {class_count} classes of {META_MEMBER}")
    # Each row is three planes (red, green, blue) of 32 rows of 32 values: put the channel last.
    images = np.ascontiguousarray(data.reshape(-1, CHANNELS, SIDE, SIDE).transpose(0, 2, 3, 1))
    return images, np.array(labels, dtype=np.uint8)


# --- the cache ------------------------------------------------------------------------------------


def archive_fingerprint(archive: Path) -> str:
    """The cache format with the archive's size and modification time: a changed archive is decoded again."""
    status = archive.stat()
    return json.dumps([CACHE_FORMAT_VERSION, status.st_size, status.st_mtime_ns])


def read_cache(path: Path, fingerprint: str) -> DecodedArchive | None:
    """The cached decode when its fingerprint matches and its arrays are whole; None otherwise."""
    try:
        # Opened here, not by np.load, which leaves its file open when the zip is damaged.
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as stored:
            if str(stored["fingerprint"]) != fingerprint:
                return None
            decoded = DecodedArchive(
                train_images=stored["train_images"],
                train_labels=stored["train_labels"],
                test_images=stored["test_images"],
                test_labels=stored["test_labels"],
                class_names=tuple(str(name) for name in stored["class_names"]),
            )
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error):
        return None  # missing, truncated or garbled: decode again and overwrite it
    return decoded if cache_is_consistent(decoded) else None


def cache_is_consistent(decoded: DecodedArchive) -> bool:
    """Whether cached arrays have the shapes, types and label range of a decoded archive."""
    return all(
        images.dtype == np.uint8
        and labels.dtype == np.uint8
        and images.shape == (len(labels), SIDE, SIDE, CHANNELS)
        and bool(np.all(labels < len(decoded.class_names)))
        for images, labels in (
            (decoded.train_images, decoded.train_labels),
            (decoded.test_images, decoded.test_labels),
        )
    )


def write_cache(path: Path, fingerprint: str, decoded: DecodedArchive) -> str | None:
    """Write the decoded arrays and the fingerprint into one .npz, atomically; return why it failed, or None."""
    arrays = {
        "fingerprint": np.array(fingerprint),
        "train_images": decoded.train_images,
        "train_labels": decoded.train_labels,
        "test_images": decoded.test_images,
        "test_labels": decoded.test_labels,
        "class_names": np.array(decoded.class_names, dtype=str),
    }
    try:
        write_atomically(path, lambda handle: np.savez(handle, allow_pickle=False, **arrays))
    except OutputError as error:
        return str(error)
    return None
