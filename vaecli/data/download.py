"""Download dataset files from a list of mirrors with pooch: verified, atomic, never partial.

pooch streams each file into a temporary file in the target folder, checks its SHA-256 and only
then renames it into place, so a file in the cache has always passed verification. We add the
published size check and a mirror list: the first mirror that delivers a verified file wins.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vaecli.common.errors import DataError
from vaecli.data.sources import RemoteFile

# Seconds without an answer before a mirror counts as unreachable.
DOWNLOAD_TIMEOUT = 30


@dataclass(frozen=True)
class DownloadProgress:
    """Bytes of one file received so far (sent many times per file)."""

    file_name: str
    url: str
    bytes_done: int
    bytes_total: int


class _ProgressReporter:
    """The progress-bar object pooch's HTTPDownloader drives, turned into callbacks."""

    def __init__(self, file_name: str, url: str, on_progress: Callable[[DownloadProgress], None]):
        self.file_name, self.url, self.on_progress = file_name, url, on_progress
        self.total, self.done = 0, 0

    def update(self, byte_count: int) -> None:
        self.done = min(self.done + byte_count, self.total) if self.total else self.done + byte_count
        self.on_progress(DownloadProgress(self.file_name, self.url, self.done, self.total))

    def reset(self) -> None:
        self.done = 0

    def close(self) -> None:
        pass


class _SizeCheckedDownloader:
    """pooch's HTTP downloader, then a check of the published size before pooch checks the hash."""

    def __init__(self, expected_size: int, progress: _ProgressReporter | None):
        import pooch

        self.expected_size = expected_size
        self.http = pooch.HTTPDownloader(progressbar=progress or False, timeout=DOWNLOAD_TIMEOUT)

    def __call__(self, url: str, output_file: str, pooch_instance) -> None:
        self.http(url, output_file, pooch_instance)
        received = os.path.getsize(output_file)
        if received != self.expected_size:
            raise ValueError(f"received {received:,} bytes, the published size is {self.expected_size:,}")


def describe_failure(error: BaseException) -> str:
    """A few words on why one download attempt failed."""
    import requests

    if isinstance(error, requests.Timeout):
        return f"no answer within {DOWNLOAD_TIMEOUT} s"
    if isinstance(error, requests.exceptions.ChunkedEncodingError):
        return "transfer cut short: fewer bytes arrived than the server announced"
    if isinstance(error, requests.HTTPError) and error.response is not None:
        return f"HTTP {error.response.status_code} {error.response.reason}".strip()
    if isinstance(error, requests.exceptions.SSLError):
        return "TLS/SSL error"
    if isinstance(error, requests.ConnectionError):
        text = str(error)
        if "refused" in text:
            return "connection refused"
        if "resolve" in text or "Name or service not known" in text or "nodename" in text:
            return "host name not found"
        return "could not connect"
    if isinstance(error, ValueError) and "hash" in str(error).lower():
        return "SHA-256 does not match the published checksum"
    if isinstance(error, ValueError):
        return str(error)
    if isinstance(error, OSError):
        return error.strerror or type(error).__name__
    return f"{type(error).__name__}: {error}"


def download_file(
    remote: RemoteFile,
    directory: Path,
    mirrors: Sequence[str],
    on_progress: Callable[[DownloadProgress], None] | None = None,
) -> tuple[Path | None, list[tuple[str, str]]]:
    """Fetch `remote` into `directory` from the first mirror that delivers it verified.

    Returns (path, []) on success, or (None, [(url, why it failed), ...]) when every mirror failed.
    """
    import pooch

    # pooch logs every download at INFO to stderr; progress reaches the user through on_progress.
    pooch.get_logger().setLevel(logging.WARNING)
    failures: list[tuple[str, str]] = []
    for base_url in mirrors:
        url = base_url + remote.name
        reporter = _ProgressReporter(remote.name, url, on_progress) if on_progress else None
        try:
            fetched = pooch.retrieve(
                url,
                known_hash=f"sha256:{remote.sha256}",
                fname=remote.name,
                path=directory,
                downloader=_SizeCheckedDownloader(remote.size, reporter),
            )
            return Path(fetched), []
        except Exception as error:  # any failure of one mirror means: try the next one
            failures.append((url, describe_failure(error)))
    return None, failures


def download_missing(
    dataset_name: str,
    directory: Path,
    missing: Sequence[RemoteFile],
    mirrors: Sequence[str],
    on_progress: Callable[[DownloadProgress], None] | None = None,
    placed_by_hand: str = " (gzipped or not)",
) -> None:
    """Download each missing file, or raise one DataError naming the files, the folder and every failure.

    `placed_by_hand` follows the file names in the error's advice to put them in the folder yourself.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(
            f"{dataset_name}: cannot create data folder {directory} ({error.strerror}); set data.dir"
        ) from error
    for index, remote in enumerate(missing):
        path, failures = download_file(remote, directory, mirrors, on_progress)
        if path is None:
            still_needed = ", ".join(file.name for file in missing[index:])
            tried = "; ".join(f"{url} ({reason})" for url, reason in failures)
            raise DataError(
                f"{dataset_name}: could not download {remote.name}: tried {tried}. "
                f"Put {still_needed}{placed_by_hand} in {directory} by hand, "
                "or set data.mirrors to a mirror you can reach"
            )
