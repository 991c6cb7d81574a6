"""Atomic file output: a file appears whole under its final name, or not at all."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from vaecli.common.errors import OutputError


def ensure_directory(directory: Path) -> Path:
    """Create `directory` (and parents) or raise OutputError saying why it cannot be."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError as error:
        raise OutputError(f"cannot create directory {directory}: a file is in the way") from error
    except OSError as error:
        raise OutputError(f"cannot create directory {directory}: {error.strerror}") from error
    return directory


def write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call `write` on a temporary file beside `path`, then rename it into place.

    The rename is atomic on POSIX, so a reader (or a crash) never sees a half-written file, and an
    existing file at `path` is replaced only once the new one is complete.
    """
    path = Path(path)
    ensure_directory(path.parent)
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a directory; give a file name instead")
    try:
        handle, temporary_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise OutputError(f"cannot write to {path.parent}: {error.strerror}") from error
    try:
        with os.fdopen(handle, "wb") as temporary_file:
            write(temporary_file)
            temporary_file.flush()
            os.fsync(temporary_file.fileno())
        # mkstemp creates the file 0600; give it the permissions a normal open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary_name, 0o666 & ~umask)
        os.replace(temporary_name, path)
    except BaseException as error:
        Path(temporary_name).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise OutputError(f"cannot write {path}: {error.strerror}") from error
        raise
    return path


def write_text_atomically(path: Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return write_atomically(path, lambda handle: handle.write(text.encode("utf-8")))
