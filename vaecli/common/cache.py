"""Per-user cache folders: downloaded and decoded datasets, and JAX's compiled programs."""

from __future__ import annotations

import os
import stat
from pathlib import Path

DATA_DIR_VARIABLE = "VAECLI_DATA"


def user_cache_root() -> Path:
    """The platform's user cache folder for vaecli: $XDG_CACHE_HOME/vaecli, else ~/.cache/vaecli on Linux."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("vaecli", appauthor=False))


def data_root() -> Path:
    """Where datasets are kept: $VAECLI_DATA, else the user cache folder."""
    configured = os.environ.get(DATA_DIR_VARIABLE)
    return Path(configured).expanduser().absolute() if configured else user_cache_root()


def default_data_dir(dataset_name: str) -> Path:
    """The cache folder of one dataset, e.g. ~/.cache/vaecli/mnist."""
    return data_root() / dataset_name


def private_directory(directory: Path) -> Path | None:
    """`directory`, created if needed, readable and writable by this user only; None if that cannot be had.

    Compiled programs are loaded and run, so a folder others can write to must not hold them.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        info = directory.stat()
        if info.st_uid != os.getuid():
            return None
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            directory.chmod(stat.S_IRWXU)
    except OSError:
        return None
    return directory


def enable_compilation_cache() -> Path | None:
    """Turn on JAX's persistent compilation cache in the user cache folder, so a second run skips compiling.

    Returns the folder used, or None when no private folder could be had (then nothing is cached).
    """
    directory = private_directory(user_cache_root() / "jax-compilation")
    if directory is None:
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", str(directory))
    # Our programs compile in well under JAX's default 1 s threshold; cache them all.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory
