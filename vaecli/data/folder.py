"""Any folder of images as a dataset, decoded once and cached.

The rules, so a user can predict what happens to their folder:
- Files: every file under the folder, at any depth, except hidden ones (a name starting with ".")
  and anything inside hidden folders or the cache itself. Files that are not readable images are
  skipped and counted in one notice.
- Pictures: each is read with `vaecli.common.images.load_photo_input` — the shorter side scaled to
  `image_size`, the centre square kept, grey (channels 1) or RGB (channels 3), transparency as white.
- Labels: when images sit in subfolders, the name of an image's top-level subfolder is its class
  (class_names sorted, labels index them); images with no subfolder get label -1.
- Split: images are ordered by the SHA-256 of their relative path; the first max(1, n // 10) are
  validation, the next max(1, n // 10) test, the rest train. The user's seed plays no part, and a
  file keeps its place in that order when others are added, so few images change split.
- Cache: the decoded arrays are kept in `cache_root/folders/<key>/` (images.npy, labels.npy,
  meta.json) and reused while the folder's file names, sizes and modification times are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from vaecli.common.errors import DataError, ImageError, OutputError
from vaecli.common.files import write_atomically, write_text_atomically
from vaecli.common.images import load_photo_input
from vaecli.data.dataset import Dataset, take_read_only

# Bump when decoding or the cache layout changes, so every old cache entry stops matching.
CACHE_FORMAT_VERSION = 1
MINIMUM_IMAGES = 3  # one each for train, validation and test
UNLABELLED = -1


@dataclass(frozen=True, eq=False)
class DecodedFolder:
    """Every readable image of a folder in sorted path order, with its label, and what was skipped."""

    images: np.ndarray  # uint8 [N, S, S] or [N, S, S, 3]
    labels: np.ndarray  # int32 [N], UNLABELLED where an image has no class
    relative_paths: tuple[str, ...]
    class_names: tuple[str, ...]
    skipped_count: int
    skipped_example: str | None


def load_folder(
    data_dir: Path,
    image_size: int,
    channels: int,
    cache_root: Path,
    on_decode: Callable[[int, int], None] | None = None,
) -> Dataset:
    """Load every image under `data_dir` as uint8 [S, S] (channels 1) or [S, S, 3] (channels 3), split by path
    hash; `on_decode(done, total)` reports decoding progress (not called when the cache is used)."""
    if image_size < 1 or channels not in (1, 3):
        raise ValueError(f"need image_size >= 1 and channels 1 or 3, got {image_size} and {channels}")
    data_dir = Path(data_dir)
    check_is_folder(data_dir)
    cache_dir = cache_dir_for(cache_root, data_dir, image_size, channels)
    relative_paths = list_candidate_files(data_dir, skip_dir=cache_root)
    fingerprint = folder_fingerprint(data_dir, relative_paths, image_size, channels)
    notices = []
    decoded = read_cache(cache_dir, fingerprint, image_size, channels)
    if decoded is None:
        decoded = decode_folder(data_dir, relative_paths, image_size, channels, on_decode)
        check_enough_images(decoded, data_dir, len(relative_paths))
        cache_problem = write_cache(cache_dir, fingerprint, decoded)
        if cache_problem is not None:
            notices.append(f"could not cache the decoded images ({cache_problem}); they will be decoded again")
    if decoded.skipped_count:
        notices.insert(0, skipped_notice(decoded, data_dir, len(relative_paths)))
    return split_folder(decoded, tuple(notices))


# --- finding the files ----------------------------------------------------------------------------


def check_is_folder(data_dir: Path) -> None:
    """Raise DataError unless `data_dir` is an existing folder."""
    if data_dir.is_dir():
        return
    if data_dir.exists():
        raise DataError(f"{data_dir} is a file, not a folder; give the folder that holds the images")
    raise DataError(f"image folder {data_dir} does not exist; check the path (data_dir)")


def list_candidate_files(data_dir: Path, skip_dir: Path | None = None) -> list[str]:
    """Relative POSIX paths of every non-hidden file under `data_dir`, sorted; `skip_dir` is left out."""
    skipped = os.path.abspath(skip_dir) if skip_dir is not None else None
    relative_paths = []
    for directory, subdirectories, file_names in os.walk(data_dir):
        # Pruning in place stops os.walk from descending into hidden folders and the cache.
        subdirectories[:] = [
            name
            for name in subdirectories
            if not name.startswith(".") and os.path.abspath(os.path.join(directory, name)) != skipped
        ]
        relative_directory = Path(directory).relative_to(data_dir)
        relative_paths += [(relative_directory / name).as_posix() for name in file_names if not name.startswith(".")]
    return sorted(relative_paths)


def folder_fingerprint(data_dir: Path, relative_paths: Sequence[str], image_size: int, channels: int) -> str:
    """SHA-256 over the cache format, the decoding settings and every file's (path, size, mtime_ns)."""
    listing = []
    for relative_path in relative_paths:
        try:
            status = (data_dir / relative_path).stat()
            listing.append([relative_path, status.st_size, status.st_mtime_ns])
        except OSError:
            listing.append([relative_path, -1, -1])  # vanished or unreadable: decoding will skip it
    settings = [CACHE_FORMAT_VERSION, image_size, channels, listing]
    return hashlib.sha256(json.dumps(settings).encode("utf-8")).hexdigest()


# --- decoding -------------------------------------------------------------------------------------


def decode_folder(
    data_dir: Path,
    relative_paths: Sequence[str],
    image_size: int,
    channels: int,
    on_decode: Callable[[int, int], None] | None = None,
) -> DecodedFolder:
    """Decode every file in parallel, keeping sorted order; files that are not images are skipped."""
    total = len(relative_paths)
    images = np.empty((total, image_size, image_size, *(() if channels == 1 else (3,))), dtype=np.uint8)
    kept_paths, skipped_paths = [], []

    def decode(relative_path: str) -> np.ndarray | None:
        try:
            return load_photo_input(data_dir / relative_path, image_size, channels)
        except ImageError:
            return None

    # Pillow releases the GIL while decoding and resizing, so threads use every core.
    with ThreadPoolExecutor() as executor:
        for done, (relative_path, image) in enumerate(
            zip(relative_paths, executor.map(decode, relative_paths), strict=True), start=1
        ):
            if image is None:
                skipped_paths.append(relative_path)
            else:
                images[len(kept_paths)] = image
                kept_paths.append(relative_path)
            if on_decode is not None:
                on_decode(done, total)
    labels, class_names = labels_from_subfolders(kept_paths)
    return DecodedFolder(
        images=images[: len(kept_paths)],
        labels=labels,
        relative_paths=tuple(kept_paths),
        class_names=class_names,
        skipped_count=len(skipped_paths),
        skipped_example=skipped_paths[0] if skipped_paths else None,
    )


def labels_from_subfolders(relative_paths: Sequence[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    """int32 labels naming each path's top-level folder in the sorted class names; UNLABELLED at the top."""
    top_folders = [path.split("/", 1)[0] if "/" in path else None for path in relative_paths]
    class_names = tuple(sorted({folder for folder in top_folders if folder is not None}))
    class_index = {name: index for index, name in enumerate(class_names)}
    labels = np.array([class_index.get(folder, UNLABELLED) for folder in top_folders], dtype=np.int32)
    return labels, class_names


def check_enough_images(decoded: DecodedFolder, data_dir: Path, file_count: int) -> None:
    """Raise DataError when the folder holds fewer readable images than the three splits need."""
    found = len(decoded.relative_paths)
    if found == 0:
        raise DataError(
            f"no readable images in {data_dir} ({file_count} files looked at); "
            "put PNG or JPEG files in it or in its subfolders"
        )
    if found < MINIMUM_IMAGES:
        raise DataError(
            f"only {found} readable image(s) in {data_dir}; at least {MINIMUM_IMAGES} are needed "
            "(one each for train, validation and test)"
        )


def skipped_notice(decoded: DecodedFolder, data_dir: Path, file_count: int) -> str:
    """One line saying how many files were not readable images, with one for example."""
    return (
        f"skipped {decoded.skipped_count} of {file_count} files under {data_dir} that are not readable images "
        f"(e.g. {decoded.skipped_example})"
    )


# --- splitting ------------------------------------------------------------------------------------


def split_folder(decoded: DecodedFolder, notices: tuple[str, ...]) -> Dataset:
    """Cut validation, test and train by the path-hash order (see the module docstring)."""
    order = path_hash_order(decoded.relative_paths)
    held_out = max(1, len(order) // 10)
    val_order, test_order, train_order = np.split(order, [held_out, 2 * held_out])
    return Dataset(
        name="folder",
        train_images=take_read_only(decoded.images, train_order),
        train_labels=take_read_only(decoded.labels, train_order),
        val_images=take_read_only(decoded.images, val_order),
        val_labels=take_read_only(decoded.labels, val_order),
        test_images=take_read_only(decoded.images, test_order),
        test_labels=take_read_only(decoded.labels, test_order),
        class_names=decoded.class_names,
        notices=notices,
        preprocessing="resize_crop",
    )


def path_hash_order(relative_paths: Sequence[str]) -> np.ndarray:
    """Indices of `relative_paths` ordered by the SHA-256 of each path: a fixed shuffle, whatever the seed."""
    digests = [hashlib.sha256(path.encode("utf-8")).hexdigest() for path in relative_paths]
    return np.array(sorted(range(len(digests)), key=digests.__getitem__), dtype=np.int64)


# --- the cache ------------------------------------------------------------------------------------


def cache_dir_for(cache_root: Path, data_dir: Path, image_size: int, channels: int) -> Path:
    """`cache_root/folders/<16 hex digits>`: one entry per (absolute folder, image size, channels)."""
    key = json.dumps([str(Path(data_dir).resolve()), image_size, channels])
    return Path(cache_root) / "folders" / hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def read_cache(cache_dir: Path, fingerprint: str, image_size: int, channels: int) -> DecodedFolder | None:
    """The cached decode when its fingerprint matches and its arrays are whole; None otherwise."""
    try:
        meta = json.loads((cache_dir / "meta.json").read_text(encoding="utf-8"))
        if meta["fingerprint"] != fingerprint:
            return None
        images = np.load(cache_dir / "images.npy", allow_pickle=False)
        labels = np.load(cache_dir / "labels.npy", allow_pickle=False)
        decoded = DecodedFolder(
            images=images,
            labels=labels,
            relative_paths=tuple(meta["relative_paths"]),
            class_names=tuple(meta["class_names"]),
            skipped_count=int(meta["skipped_count"]),
            skipped_example=meta["skipped_example"],
        )
    except (OSError, ValueError, EOFError, KeyError, TypeError):
        return None  # missing, truncated or garbled: decode again and overwrite it
    return decoded if cache_is_consistent(decoded, image_size, channels) else None


def cache_is_consistent(decoded: DecodedFolder, image_size: int, channels: int) -> bool:
    """Whether cached arrays have the shapes, types and label range that the metadata promises."""
    count = len(decoded.relative_paths)
    image_shape = (count, image_size, image_size, *(() if channels == 1 else (3,)))
    return (
        decoded.images.dtype == np.uint8
        and decoded.images.shape == image_shape
        and decoded.labels.dtype == np.int32
        and decoded.labels.shape == (count,)
        and count >= MINIMUM_IMAGES
        and bool(np.all((decoded.labels >= UNLABELLED) & (decoded.labels < len(decoded.class_names))))
    )


def write_cache(cache_dir: Path, fingerprint: str, decoded: DecodedFolder) -> str | None:
    """Write images.npy, labels.npy, then meta.json; return why it failed, or None."""
    meta = {
        "fingerprint": fingerprint,
        "class_names": list(decoded.class_names),
        "relative_paths": list(decoded.relative_paths),
        "skipped_count": decoded.skipped_count,
        "skipped_example": decoded.skipped_example,
    }
    try:
        # The old metadata goes first and the new comes last, so a crash in between leaves no
        # fingerprint that could vouch for arrays it was not written with.
        (cache_dir / "meta.json").unlink(missing_ok=True)
        write_atomically(cache_dir / "images.npy", npy_writer(decoded.images))
        write_atomically(cache_dir / "labels.npy", npy_writer(decoded.labels))
        write_text_atomically(cache_dir / "meta.json", json.dumps(meta, indent=1))
    except OutputError as error:
        return str(error)
    except OSError as error:
        return f"cannot write {cache_dir}: {error.strerror}"
    return None


def npy_writer(array: np.ndarray) -> Callable[[BinaryIO], None]:
    """A writer for write_atomically that stores `array` in .npy format."""
    return lambda handle: np.save(handle, array, allow_pickle=False)
