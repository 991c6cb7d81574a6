"""Helpers shared by the tests: a tiny dataset and config, tree comparisons, the CLI runner, child processes with
several devices."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
from conftest import TEST_XLA_FLAGS, small_config
from typer.testing import CliRunner

from vaecli.cli.app import app
from vaecli.common.config import Config, DataConfig
from vaecli.data.dataset import Dataset
from vaecli.data.datasets import load_dataset

# Devices of a child process started by run_child: XLA fixes their number when JAX starts, so a check on several
# devices runs in a child with XLA_FLAGS=--xla_force_host_platform_device_count (CPU devices sharing the cores).
FORCED_DEVICES = 4
# A model that compiles in a moment: 256 training images in batches of 32 make 8 steps an epoch.
TINY = {"model": {"hidden": [32], "latent_dim": 4}, "train": {"epochs": 2, "batch_size": 32}}


def tiny_config(**sections) -> Config:
    """small_config() with TINY's model and training settings, then `sections` on top of them."""
    merged = {section: dict(values) for section, values in TINY.items()}
    for section, values in sections.items():
        merged[section] = {**merged.get(section, {}), **values} if isinstance(values, dict) else values
    return small_config(**merged)


def tiny_dataset(train_count: int = 256, val_count: int = 64) -> Dataset:
    """A slice of the offline digits: enough for a few fast steps."""
    dataset = load_dataset(DataConfig())
    return dataclasses.replace(
        dataset, train_images=dataset.train_images[:train_count], val_images=dataset.val_images[:val_count]
    )


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(tree)]


def assert_trees_equal(first, second) -> None:
    """Every leaf bit for bit the same (and the same number of leaves)."""
    for left, right in zip(leaves(first), leaves(second), strict=True):
        np.testing.assert_array_equal(left, right)


def assert_trees_close(first, second, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    for left, right in zip(leaves(first), leaves(second), strict=True):
        np.testing.assert_allclose(left, right, rtol=rtol, atol=atol)


def trees_differ(first, second) -> bool:
    """True when some leaf differs (both trees must have the same structure)."""
    return any(not np.array_equal(left, right) for left, right in zip(leaves(first), leaves(second), strict=True))


def vae(*args):
    """Run the `vae` CLI in-process with `args` (each turned into a string); the Click result."""
    return CliRunner().invoke(app, [str(arg) for arg in args])


def assert_one_line_error(result, expected_code, fragment):
    """The command failed with `expected_code` and one stderr line holding `fragment`, no traceback."""
    assert result.exit_code == expected_code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


def child_environment(devices: int) -> dict[str, str]:
    """This process's environment (its private data caches among it), on the CPU, with `devices` devices."""
    environment = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    environment["JAX_PLATFORMS"] = "cpu"
    environment["XLA_FLAGS"] = TEST_XLA_FLAGS
    if devices > 1:
        environment["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={devices}"
    return environment


def run_child(command: list[str], devices: int, cwd: Path) -> subprocess.CompletedProcess:
    """`python COMMAND` in a child process with `devices` CPU devices, its output captured."""
    return subprocess.run(
        [sys.executable, *command], env=child_environment(devices), cwd=cwd, capture_output=True, text=True
    )
