"""Shared fixtures: one small trained run per test session, so tests that need a model don't each train."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vaecli.common.cache import enable_compilation_cache
from vaecli.common.config import Config, validate_config

# The suite compiles at XLA's lowest backend (LLVM) optimization level, in this process and in every child it
# starts: most of the suite's time is compiling small programs, and it cut the whole suite's time by a fifth
# (343 s to 280 s on 2 cores), every test passing. The programs are the same (XLA's own passes, fusion included,
# still run) and the arithmetic is too (no fast-math at any level); only the machine code is less tuned, which
# speed figures would notice: `make bench` compiles as a user's run does.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
# Read by XLA when JAX first starts a backend, which importing vaecli's modules does not do.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

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


def session_folder(tmp_path_factory) -> Path:
    """A folder of this test session shared by its xdist workers (each has a base folder of its own)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(autouse=True, scope="session")
def private_data_cache(tmp_path_factory):
    """Point the per-user caches at temporary folders: tests never read or write ~/.cache.

    The compilation cache (XDG_CACHE_HOME's vaecli/jax-compilation, which the commands turn on) is one for the
    session and its workers, and the library-level tests use it too: many tests compile the same small
    programs, and most of the suite's time is compiling.
    """
    xdg_cache = session_folder(tmp_path_factory) / "xdg-cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VAECLI_DATA", str(tmp_path_factory.mktemp("vaecli-data")))
        patch.setenv("XDG_CACHE_HOME", str(xdg_cache))
        enable_compilation_cache()
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
