"""CIFAR-10 from a small archive in the real format, served on 127.0.0.1: pixels, labels, splits, cache, refusals."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pytest
from cifar10_files import (
    ARCHIVE_NAME,
    CLASS_NAMES,
    TEST_IMAGES,
    archive_members,
    pickled,
    pixel_value,
    tar_gz,
)
from helpers import assert_one_line_error, vae
from http_server import FileServer, refused_url

from vaecli.common.config import DataConfig, load_config
from vaecli.common.errors import ConfigError, DataError
from vaecli.data import cifar10, sources
from vaecli.data.datasets import load_dataset
from vaecli.data.sources import DatasetSource, RemoteFile


@pytest.fixture(scope="module")
def archive() -> bytes:
    return tar_gz(archive_members())


@pytest.fixture
def server():
    with FileServer() as running:
        yield running


def publish(monkeypatch, body: bytes) -> None:
    """Make `body` the published archive: its SHA-256 and size in the source table."""
    remote = RemoteFile(ARCHIVE_NAME, hashlib.sha256(body).hexdigest(), len(body))
    monkeypatch.setattr(sources, "CIFAR10_SOURCE", DatasetSource("cifar10", ("unused/",), (remote,), "", ""))


def serve(server: FileServer, body: bytes) -> str:
    server.routes["/mirror/" + ARCHIVE_NAME] = body
    return server.url("/mirror/")


def cifar10_config(directory: Path, *mirrors: str) -> DataConfig:
    return DataConfig(name="cifar10", dir=str(directory), mirrors=mirrors or None)


def test_pixels_labels_class_names_and_splits(server, archive, tmp_path, monkeypatch):
    publish(monkeypatch, archive)
    dataset = load_dataset(cifar10_config(tmp_path, serve(server, archive)))

    assert server.requests == ["/mirror/" + ARCHIVE_NAME]
    assert dataset.name == "cifar10" and dataset.preprocessing == "resize_crop"
    assert dataset.class_names == CLASS_NAMES
    # Training batches in order, the last 15 // 6 = 2 of their 15 images held out for validation.
    assert dataset.train_images.shape == (13, 32, 32, 3) and dataset.train_images.dtype == np.uint8
    assert dataset.val_images.shape == (2, 32, 32, 3) and dataset.test_images.shape == (TEST_IMAGES, 32, 32, 3)
    index = np.arange(15)
    assert dataset.train_labels.tolist() == (index[:13] % 2).tolist()
    assert dataset.val_labels.tolist() == (index[13:] % 2).tolist()
    assert dataset.test_labels.tolist() == (np.arange(100, 104) % 2).tolist()
    # Every value where (row, column, channel) says: the archive's planes become the last axis.
    image, channel, row, column = np.meshgrid(np.arange(15), np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    expected_train = pixel_value(image, channel, row, column).transpose(0, 2, 3, 1)
    assert np.array_equal(np.concatenate([dataset.train_images, dataset.val_images]), expected_train)
    assert dataset.test_images[0, 5, 2, 1] == pixel_value(100, channel=1, row=5, column=2)
    assert dataset.train_images[1, 0, 31, 2] == pixel_value(1, channel=2, row=0, column=31)


def test_the_second_load_reads_the_decoded_cache(server, archive, tmp_path, monkeypatch):
    publish(monkeypatch, archive)
    decoded = []
    first = load_dataset(
        cifar10_config(tmp_path, serve(server, archive)), on_decode=lambda done, total: decoded.append((done, total))
    )
    assert decoded[-1] == (7, 7)  # five training batches, the test batch and batches.meta
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cifar-10-decoded.npz", ARCHIVE_NAME]

    def archive_is_not_read(*args, **kwargs):
        raise AssertionError("the archive was read although the decoded cache is there")

    with monkeypatch.context() as patch:
        patch.setattr(cifar10, "read_members", archive_is_not_read)
        second = load_dataset(cifar10_config(tmp_path, refused_url()), on_decode=lambda *done: decoded.append(done))

    assert server.requests == ["/mirror/" + ARCHIVE_NAME]  # one download, no second request
    assert len(decoded) == 7
    for split in ("train", "val", "test"):
        assert np.array_equal(second.split(split), first.split(split))
        assert np.array_equal(getattr(second, f"{split}_labels"), getattr(first, f"{split}_labels"))
    assert second.class_names == CLASS_NAMES and second.notices == ()

    # A changed archive (here: a new modification time) is decoded again, and so is a damaged cache.
    os.utime(tmp_path / ARCHIVE_NAME, ns=(1_000_000_000, 1_000_000_000))
    load_dataset(cifar10_config(tmp_path), on_decode=lambda *done: decoded.append(done))
    assert len(decoded) == 14
    cache = tmp_path / "cifar-10-decoded.npz"
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    third = load_dataset(cifar10_config(tmp_path), on_decode=lambda *done: decoded.append(done))
    assert len(decoded) == 21 and np.array_equal(third.test_images, first.test_images)
    assert server.requests == ["/mirror/" + ARCHIVE_NAME]


def test_a_hand_placed_archive_is_used_without_a_request(archive, tmp_path):
    """With the real table the test's archive would fail the checksum; placed by hand, it is read by structure."""
    (tmp_path / ARCHIVE_NAME).write_bytes(archive)
    dataset = load_dataset(cifar10_config(tmp_path, refused_url()))
    assert dataset.test_images.shape == (TEST_IMAGES, 32, 32, 3)


def test_a_corrupt_archive_is_refused_in_one_line_and_nothing_is_left(server, archive, tmp_path, monkeypatch):
    publish(monkeypatch, archive)
    corrupt = bytearray(archive)
    corrupt[len(corrupt) // 2] ^= 0xFF  # the published size, another SHA-256
    mirror = serve(server, bytes(corrupt))

    with pytest.raises(DataError) as raised:
        load_dataset(cifar10_config(tmp_path, mirror))

    message = str(raised.value)
    assert message == (
        f"cifar10: could not download {ARCHIVE_NAME}: tried {mirror}{ARCHIVE_NAME} (SHA-256 does not match the "
        f"published checksum). Put {ARCHIVE_NAME} (as downloaded) in {tmp_path} by hand, "
        "or set data.mirrors to a mirror you can reach"
    )
    assert list(tmp_path.iterdir()) == []


def test_the_cli_refuses_an_archive_that_is_not_the_published_one(server, archive, tmp_path, monkeypatch):
    """With the real table, the test's archive is an impostor: one line on stderr, the cache stays empty."""
    mirror = serve(server, archive)
    monkeypatch.chdir(tmp_path)
    data_dir = tmp_path / "cache" / "cifar10"
    result = vae(
        "train",
        "--config",
        "mnist-sample",
        "--set",
        "data.name=cifar10",
        "--set",
        "data.binarize=none",
        "--set",
        f"data.dir={data_dir}",
        "--set",
        f"data.mirrors=[{mirror}]",
    )
    assert_one_line_error(result, 1, f"cifar10: could not download {ARCHIVE_NAME}")
    assert f"received {len(archive):,} bytes, the published size is 170,498,071" in result.stderr
    assert not data_dir.exists() or list(data_dir.iterdir()) == []
    assert not (tmp_path / "runs").exists()


def test_a_missing_member_is_one_line(tmp_path):
    members = archive_members()
    del members["cifar-10-batches-py/data_batch_3"]
    (tmp_path / ARCHIVE_NAME).write_bytes(tar_gz(members))

    with pytest.raises(DataError) as raised:
        load_dataset(cifar10_config(tmp_path, refused_url()))

    message = str(raised.value)
    assert message == (
        f"cifar10: {tmp_path / ARCHIVE_NAME} lacks cifar-10-batches-py/data_batch_3; it is not the CIFAR-10 "
        "python archive: delete it so that it is downloaded again"
    )


def test_an_archive_that_is_not_gzip_is_one_line(tmp_path):
    (tmp_path / ARCHIVE_NAME).write_bytes(b"<html>moved</html>")
    with pytest.raises(DataError, match=r"cannot read .* as a gzipped tar archive \(.+\); delete it") as raised:
        load_dataset(cifar10_config(tmp_path, refused_url()))
    assert "\n" not in str(raised.value)


class RunsACommand:
    """Unpickling this calls os.system(command): what a tampered batch would do."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_malicious_pickle_is_refused_without_running_it(server, tmp_path, monkeypatch):
    marker = tmp_path / "the-command-ran"
    members = archive_members()
    members["cifar-10-batches-py/data_batch_2"] = pickled({b"labels": [0], b"data": RunsACommand(f"touch {marker}")})
    body = tar_gz(members)
    publish(monkeypatch, body)  # even an archive that passes the checksum may not run code
    data_dir = tmp_path / "data"

    with pytest.raises(DataError) as raised:
        load_dataset(cifar10_config(data_dir, serve(server, body)))

    message = str(raised.value)
    assert re.fullmatch(
        rf"cifar10: cifar-10-batches-py/data_batch_2 in {re.escape(str(data_dir / ARCHIVE_NAME))} is not a "
        rf"CIFAR-10 batch \(refused to load {os.system.__module__}\.system, which is not part of a NumPy array\); "
        "delete the archive so that it is downloaded again",
        message,
    ), message
    assert not marker.exists()
    assert not (data_dir / "cifar-10-decoded.npz").exists()


def test_a_label_outside_the_classes_is_one_line(tmp_path):
    members = archive_members()
    data = np.zeros((2, 3072), dtype=np.uint8)
    members["cifar-10-batches-py/test_batch"] = pickled({"labels": [1, 2], "data": data})
    (tmp_path / ARCHIVE_NAME).write_bytes(tar_gz(members))
    with pytest.raises(DataError, match=r"test_batch in .* holds label 2, not one of the 2 classes of"):
        load_dataset(cifar10_config(tmp_path, refused_url()))


def test_the_published_archive_and_its_mirror():
    (remote,) = sources.CIFAR10_SOURCE.files
    assert remote == RemoteFile(
        ARCHIVE_NAME, "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce", 170_498_071
    )
    assert sources.CIFAR10_SOURCE.mirrors[0] == "https://www.cs.toronto.edu/~kriz/"


def test_the_config_describes_cifar10_and_refuses_binary_pixels():
    data = load_config("mnist-sample", ["data.name=cifar10", "data.binarize=none"]).data
    assert (data.image_size, data.channels, data.binarize) == (32, 3, "none")
    assert DataConfig(name="cifar10").binarize == "none"  # the default for cifar10
    assert DataConfig(name="cifar10", mirrors="http://proxy.local/c").mirrors == ("http://proxy.local/c/",)

    for override, expected in [
        (
            "data.binarize=dynamic",
            "data.binarize: cifar10 photos are modelled at their 256 levels per channel, not as binary pixels; "
            "set data.binarize: none (got dynamic)",
        ),
        ("data.channels=1", "data.image_size and data.channels apply to data.name: folder; cifar10 images are 32x32"),
    ]:
        with pytest.raises(ConfigError) as raised:
            load_config("mnist-sample", ["data.name=cifar10", override])
        assert expected in str(raised.value) and "\n" not in str(raised.value)
