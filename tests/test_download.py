"""Downloads against a server the test starts on 127.0.0.1: verify, fall back, refuse, never leave partial files."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from http_server import FileServer, refused_url
from idx_files import write_mnist_dir
from typer.testing import CliRunner

from vaecli.cli.app import app
from vaecli.common.cache import data_root, default_data_dir
from vaecli.common.config import DataConfig, load_config
from vaecli.common.errors import ConfigError, DataError
from vaecli.data.datasets import load_dataset
from vaecli.data.download import download_missing
from vaecli.data.sources import IDX_FILE_STEMS, IDX_SOURCES, DatasetSource, RemoteFile


@pytest.fixture
def server():
    with FileServer() as running:
        yield running


@pytest.fixture(scope="module")
def idx_files(tmp_path_factory) -> dict[str, bytes]:
    """The four gzipped IDX files of a small MNIST-shaped dataset, by file name."""
    directory = write_mnist_dir(tmp_path_factory.mktemp("served"), n_train=120, n_test=30)
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def published(files: dict[str, bytes]) -> tuple[RemoteFile, ...]:
    """RemoteFile entries with the true checksums and sizes of `files`."""
    return tuple(RemoteFile(name, hashlib.sha256(body).hexdigest(), len(body)) for name, body in files.items())


def serve(server: FileServer, prefix: str, files: dict[str, bytes]) -> str:
    for name, body in files.items():
        server.routes[prefix + name] = body
    return server.url(prefix)


def assert_folder_empty(directory: Path) -> None:
    assert not directory.exists() or list(directory.iterdir()) == [], list(directory.iterdir())


def test_a_download_succeeds_verifies_and_reports_progress(server, idx_files, tmp_path):
    mirror = serve(server, "/a/", idx_files)
    reports = []

    download_missing("testset", tmp_path, published(idx_files), [mirror], on_progress=reports.append)

    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == idx_files  # nothing else there
    last = [report for report in reports if report.file_name == "train-images-idx3-ubyte.gz"][-1]
    assert last.bytes_done == last.bytes_total == len(idx_files["train-images-idx3-ubyte.gz"])


def test_a_wrong_checksum_is_refused_and_nothing_is_left(server, idx_files, tmp_path):
    mirror = serve(server, "/a/", idx_files)
    wrong = tuple(RemoteFile(remote.name, "0" * 64, remote.size) for remote in published(idx_files))

    with pytest.raises(DataError, match="SHA-256 does not match the published checksum"):
        download_missing("testset", tmp_path, wrong, [mirror])
    assert_folder_empty(tmp_path)


def test_a_wrong_size_is_refused_and_nothing_is_left(server, idx_files, tmp_path):
    mirror = serve(server, "/a/", idx_files)
    remote = published(idx_files)[0]
    wrong_size = RemoteFile(remote.name, remote.sha256, remote.size + 1)

    with pytest.raises(DataError, match=rf"received {remote.size:,} bytes, the published size is {remote.size + 1:,}"):
        download_missing("testset", tmp_path, [wrong_size], [mirror])
    assert_folder_empty(tmp_path)


def test_a_404_on_the_first_mirror_falls_back_to_the_second(server, idx_files, tmp_path):
    second = serve(server, "/b/", idx_files)
    download_missing("testset", tmp_path, published(idx_files), [server.url("/a/"), second])

    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(idx_files)
    first_file = next(iter(idx_files))
    assert server.requests[:2] == [f"/a/{first_file}", f"/b/{first_file}"]


def test_a_refused_connection_gives_the_clear_error(idx_files, tmp_path):
    mirror = refused_url()
    with pytest.raises(DataError) as raised:
        download_missing("testset", tmp_path, published(idx_files), [mirror])
    message = str(raised.value)
    first = next(iter(idx_files))
    assert f"could not download {first}: tried {mirror}{first} (connection refused)" in message
    assert f"Put {', '.join(idx_files)} (gzipped or not) in {tmp_path} by hand" in message
    assert "data.mirrors" in message and "\n" not in message
    assert_folder_empty(tmp_path)


def test_a_truncated_transfer_gives_the_clear_error_and_every_mirror_is_named(server, idx_files, tmp_path):
    first = serve(server, "/a/", idx_files)
    name = "train-images-idx3-ubyte.gz"
    server.truncated.add(f"/a/{name}")
    remote = next(remote for remote in published(idx_files) if remote.name == name)

    with pytest.raises(DataError) as raised:
        download_missing("testset", tmp_path, [remote], [first, server.url("/missing/")])
    message = str(raised.value)
    assert f"{first}{name} (transfer cut short: fewer bytes arrived than the server announced)" in message
    assert f"{server.url('/missing/')}{name} (HTTP 404 Not Found)" in message
    assert_folder_empty(tmp_path)


def test_the_loader_downloads_only_missing_files_and_accepts_hand_placed_ones(server, idx_files, tmp_path, monkeypatch):
    monkeypatch.setitem(IDX_SOURCES, "mnist", DatasetSource("mnist", ("unused/",), published(idx_files), "", ""))
    mirror = serve(server, "/a/", idx_files)
    # Three files placed by hand, one of them decompressed: accepted by structure, not checksum.
    import gzip

    (tmp_path / "train-images-idx3-ubyte").write_bytes(gzip.decompress(idx_files["train-images-idx3-ubyte.gz"]))
    for name in ("train-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / name).write_bytes(idx_files[name])

    dataset = load_dataset(DataConfig(name="mnist", dir=str(tmp_path), mirrors=(mirror,)))

    assert server.requests == ["/a/t10k-images-idx3-ubyte.gz"]
    assert dataset.train_images.shape == (100, 28, 28) and dataset.test_images.shape == (30, 28, 28)
    # Second load: everything is there, so no request at all.
    load_dataset(DataConfig(name="mnist", dir=str(tmp_path), mirrors=(refused_url(),)))
    assert server.requests == ["/a/t10k-images-idx3-ubyte.gz"]


def test_the_cli_refuses_files_that_do_not_match_the_real_checksums(server, idx_files, tmp_path, monkeypatch):
    """With the real table, the test's own files are impostors: refused, and the cache stays empty."""
    mirror = serve(server, "/mirror/", idx_files)
    monkeypatch.chdir(tmp_path)
    data_dir = tmp_path / "cache" / "fashion_mnist"
    result = CliRunner().invoke(
        app,
        ["train", "--config", "fashion_mnist", "--set", f"data.dir={data_dir}", "--set", f"data.mirrors=[{mirror}]"],
    )
    assert result.exit_code == 1, result.output
    assert "fashion_mnist: could not download train-images-idx3-ubyte.gz" in result.stderr
    assert "the published size is 26,421,880" in result.stderr  # checked before the hash
    assert len(result.stderr.strip().splitlines()) == 1
    assert_folder_empty(data_dir)
    assert not (tmp_path / "runs").exists()


def test_the_checksum_table_has_the_published_shape():
    assert set(IDX_SOURCES) == {"mnist", "fashion_mnist", "kmnist"}
    for source in IDX_SOURCES.values():
        assert [remote.name for remote in source.files] == [f"{stem}.gz" for stem in IDX_FILE_STEMS]
        for remote in source.files:
            assert re.fullmatch(r"[0-9a-f]{64}", remote.sha256), remote
            assert remote.size > 1000 if "labels" not in remote.name else remote.size > 4000
        assert source.mirrors and all(re.match(r"https?://.+/$", url) for url in source.mirrors)
        assert len({remote.sha256 for remote in source.files}) == 4
    mnist = {remote.name: remote for remote in IDX_SOURCES["mnist"].files}
    assert mnist["train-images-idx3-ubyte.gz"].sha256.startswith("440fcabf73cc546f")
    assert mnist["train-images-idx3-ubyte.gz"].size == 9912422
    assert IDX_SOURCES["mnist"].mirrors == (
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
    )


def test_the_default_data_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("VAECLI_DATA", str(tmp_path / "mine"))
    assert default_data_dir("kmnist") == tmp_path / "mine" / "kmnist"
    monkeypatch.delenv("VAECLI_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_root() == tmp_path / "xdg" / "vaecli"


def test_mirrors_in_the_config_are_base_urls():
    # One URL is a list of one, and a base URL without its trailing slash gains one.
    assert DataConfig(name="kmnist", mirrors="http://proxy.local/kmnist").mirrors == ("http://proxy.local/kmnist/",)
    # Several keep the order they were given in (the order they are tried in); a slash is never doubled.
    config = load_config(
        "mnist", ["data.mirrors=[https://second.local/mnist, http://first.local/a/, http://third.local]"]
    )
    assert config.data.mirrors == ("https://second.local/mnist/", "http://first.local/a/", "http://third.local/")


@pytest.mark.parametrize("mirror", ["ftp://mirror.local/mnist/", "mirror.local/mnist/", "file:///srv/mnist/"])
def test_a_mirror_that_is_not_http_is_refused_in_one_line(mirror):
    with pytest.raises(ConfigError) as raised:
        load_config("mnist", [f"data.mirrors=[http://good.local/, {mirror}]"])
    message = str(raised.value)
    assert f"data.mirrors: {mirror!r} is not an http:// or https:// URL" in message
    assert "\n" not in message


def test_a_mirror_without_its_slash_is_where_the_files_are_fetched(server, idx_files, tmp_path, monkeypatch):
    """The file names go under the base URL as a folder: /a/train-images..., not /atrain-images...."""
    monkeypatch.setitem(IDX_SOURCES, "mnist", DatasetSource("mnist", ("unused/",), published(idx_files), "", ""))
    serve(server, "/a/", idx_files)
    server.routes.update({f"/a{name}": b"the wrong place" for name in idx_files})
    without_slash = server.url("/a")
    assert not without_slash.endswith("/")

    dataset = load_dataset(load_config("mnist", [f"data.dir={tmp_path}", f"data.mirrors={without_slash}"]).data)

    assert sorted(server.requests) == sorted(f"/a/{name}" for name in idx_files)
    assert dataset.test_images.shape == (30, 28, 28)


def test_mirrors_are_tried_in_the_order_given(server, idx_files, tmp_path, monkeypatch):
    monkeypatch.setitem(IDX_SOURCES, "mnist", DatasetSource("mnist", ("unused/",), published(idx_files), "", ""))
    serve(server, "/second/", idx_files)
    mirrors = f"[{server.url('/first')}, {server.url('/second')}, {refused_url()}]"

    load_dataset(load_config("mnist", [f"data.dir={tmp_path}", f"data.mirrors={mirrors}"]).data)

    # Each file: the first mirror (404), then the second, which has it; the third is never asked.
    assert server.requests == [f"/{mirror}/{name}" for name in idx_files for mirror in ("first", "second")]
