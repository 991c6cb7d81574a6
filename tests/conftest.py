"""Shared fixtures: one small trained run per test session, so tests that need a model don't each train."""

from __future__ import annotations

from pathlib import Path

import pytest

from vaecli.common.config import Config, validate_config

# A deliberately small model: big enough to learn digits in seconds, small enough to compile fast.
SMALL_MODEL_SETTINGS = {
    "seed": 0,
    "data": {"name": "mnist_sample", "binarize": "dynamic"},
    "model": {"hidden": [128], "latent_dim": 8},
    "train": {"epochs": 6, "batch_size": 64, "learning_rate": 0.002},
}


def small_config(**sections) -> Config:
    """SMALL_MODEL_SETTINGS with some sections replaced or extended."""
    raw = {key: dict(value) if isinstance(value, dict) else value for key, value in SMALL_MODEL_SETTINGS.items()}
    for section, values in sections.items():
        if isinstance(values, dict):
            raw[section].update(values)
        else:
            raw[section] = values
    return validate_config(raw, source="test")


@pytest.fixture(autouse=True, scope="session")
def private_data_cache(tmp_path_factory):
    """Point the per-user caches at temporary folders: tests never read or write ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VAECLI_DATA", str(tmp_path_factory.mktemp("vaecli-data")))
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        yield


@pytest.fixture(scope="session")
def trained_run_dir(tmp_path_factory) -> Path:
    """A run directory trained for a few epochs on the offline mnist_sample digits."""
    from vaecli.training.run import train_run

    run_dir = tmp_path_factory.mktemp("runs") / "sample"
    train_run(small_config(), run_dir)
    return run_dir


@pytest.fixture(scope="session")
def trained_run(trained_run_dir):
    """The trained run loaded back from its checkpoint."""
    from vaecli.training.checkpoint import load_run

    return load_run(trained_run_dir)
