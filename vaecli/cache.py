"""Where downloaded and decoded datasets live: one per-user cache folder, one sub-folder per dataset."""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_VARIABLE = "VAECLI_DATA"


def data_root() -> Path:
    """$VAECLI_DATA, else the platform's user cache folder for vaecli.

    On Linux that is $XDG_CACHE_HOME/vaecli, else ~/.cache/vaecli (platformdirs knows each platform's).
    """
    configured = os.environ.get(DATA_DIR_VARIABLE)
    if configured:
        return Path(configured).expanduser().absolute()
    import platformdirs

    return Path(platformdirs.user_cache_dir("vaecli", appauthor=False))


def default_data_dir(dataset_name: str) -> Path:
    """The cache folder of one dataset, e.g. ~/.cache/vaecli/mnist."""
    return data_root() / dataset_name
