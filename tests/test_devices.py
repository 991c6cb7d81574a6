"""Data-parallel training (train.devices): the same losses on 4 devices as on 1, a checkpoint that moves between
them, and a global batch the devices cannot share refused.

XLA fixes the number of devices when JAX starts, so each check on several devices runs in a child process started
with XLA_FLAGS=--xla_force_host_platform_device_count=4: four CPU devices sharing this machine's cores.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import FORCED_DEVICES, assert_one_line_error, run_child, vae
from idx_files import write_mnist_dir

from vaecli.common.config import validate_config
from vaecli.common.devices import check_batch_splits, mulhi_from_halves
from vaecli.common.errors import ConfigError
from vaecli.runs.rundir import read_metrics

# The tiny model of tests/helpers.py on 384 MNIST-format blob images in data.dir (320 to train, 10 steps an epoch,
# and 64 to validate), so that a resumed run reads the same images.
TINY_RUN = {
    "data": {"name": "mnist", "binarize": "dynamic"},
    "model": {"hidden": [32], "latent_dim": 4},
    "train": {"epochs": 2, "batch_size": 32, "tensorboard": False},
}

# Run in a child with 4 devices. Before vaecli is imported: whether jaxlib still fails to compile chlo.mulhi on
# several devices (the reason for vaecli.common.devices.lower_mulhi_from_halves). Then: sharded draws against whole
# ones, the positive control (where the first chunk's state and images live, and whether its compiled program
# all-reduces, which only a batch split over devices needs), and a run on all devices and one on a single device.
CHILD_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec

report = {"devices_seen": len(jax.local_devices())}
mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
words = jax.device_put(jnp.arange(4, dtype=jnp.uint32), NamedSharding(mesh, PartitionSpec("data")))
try:
    jax.jit(jax.lax.mulhi)(words, words).block_until_ready()
    report["chlo_mulhi_fails"] = False
except jax.errors.JaxRuntimeError:
    report["chlo_mulhi_fails"] = True

import vaecli.training.loop
from vaecli.common.config import validate_config
from vaecli.common.devices import placement_over
from vaecli.training.run import train_run

placement = placement_over(4)

def draws(key):
    noise = jax.random.normal(key, (1, 32, 4))  # [samples, batch, latent], as a step draws it
    bits = jax.random.bits(jax.random.fold_in(key, 1), (32, 784), jnp.uint16)  # dynamic binarization's
    return noise, bits

split = (NamedSharding(placement.mesh, PartitionSpec(None, "data")), placement.batch)
for impl in ("philox2x32", "threefry2x32"):
    key = jax.random.fold_in(jax.random.key(0, impl=impl), 7)
    whole = jax.jit(draws)(key)
    sharded = jax.jit(draws, out_shardings=split)(key)
    report[f"{impl}_sharded_equal"] = all(np.array_equal(a, b) for a, b in zip(whole, sharded))
    report[f"{impl}_sharded_devices"] = len(sharded[0].sharding.device_set)

make_train_chunk = vaecli.training.loop.make_train_chunk

def recording_make_train_chunk(*args, **kwargs):
    chunk = make_train_chunk(*args, **kwargs)

    def recorded(state, images, batches, first_step, steps):
        if "state_devices" not in report:
            report["state_devices"] = len(jax.tree.leaves(state.params)[0].sharding.device_set)
            report["images_devices"] = len(images.sharding.device_set)
            program = chunk.lower(state, images, batches, first_step, steps).compile().as_text()
            report["step_all_reduces"] = "all-reduce" in program
        return chunk(state, images, batches, first_step, steps)

    return recorded

vaecli.training.loop.make_train_chunk = recording_make_train_chunk
settings, out = json.loads(sys.argv[1]), sys.argv[2]
train_run(validate_config(settings, "all devices"), f"{out}/all")
settings["train"]["devices"] = 1
train_run(validate_config(settings, "one device"), f"{out}/one")
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, dict]:
    """A folder with runs all/ (4 devices) and one/ (train.devices=1) trained in one 4-device child, and its report."""
    out = tmp_path_factory.mktemp("devices")
    settings = {**TINY_RUN, "data": {**TINY_RUN["data"], "dir": str(write_mnist_dir(out / "data", 384, 64))}}
    finished = run_child(["-c", CHILD_SCRIPT, json.dumps(settings), str(out)], FORCED_DEVICES, out)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return out, json.loads(finished.stdout.strip().splitlines()[-1])


def test_four_devices_train_as_one_does_with_the_batch_really_split(two_runs):
    out, report = two_runs
    assert report["devices_seen"] == FORCED_DEVICES
    # The positive control: replicated state and images on all 4 devices, and a step whose gradient is summed
    # over them (a program that kept the whole batch on every device would need no all-reduce).
    assert (report["state_devices"], report["images_devices"], report["step_all_reduces"]) == (4, 4, True)
    everywhere, alone = read_metrics(out / "all"), read_metrics(out / "one")
    assert [row["epoch"] for row in everywhere] == [row["epoch"] for row in alone] == [1, 2]
    assert all((row["devices"], row["processes"]) == (FORCED_DEVICES, 1) for row in everywhere)
    assert all((row["devices"], row["processes"]) == (1, 1) for row in alone)
    for key in ("train_loss", "val_loss"):
        np.testing.assert_allclose([row[key] for row in everywhere], [row[key] for row in alone], rtol=1e-4)


def test_the_random_draws_of_a_split_batch_are_the_whole_batchs(two_runs):
    """Counter-based generators: element i of a draw depends on the key and i alone, not on the device holding it."""
    _, report = two_runs
    for impl in ("philox2x32", "threefry2x32"):
        assert report[f"{impl}_sharded_devices"] == FORCED_DEVICES
        assert report[f"{impl}_sharded_equal"], impl


def test_jaxlib_still_cannot_compile_chlo_mulhi_on_several_devices(two_runs):
    """Why vaecli.common.devices.lower_mulhi_from_halves exists; when this fails, jaxlib is fixed and it can go."""
    _, report = two_runs
    assert report["chlo_mulhi_fails"], "chlo.mulhi compiles on several devices now: drop lower_mulhi_from_halves"


def test_a_checkpoint_of_four_devices_resumes_in_a_process_with_one(two_runs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(two_runs[0] / "all", run_dir)
    command = ["-m", "vaecli", "train", "--resume", str(run_dir), "--set", "train.epochs=3", "--set", "train.devices=1"]
    finished = run_child(command, devices=1, cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    metrics = read_metrics(run_dir)
    assert [(row["epoch"], row["devices"]) for row in metrics] == [(1, 4), (2, 4), (3, 1)]
    assert np.isfinite(metrics[-1]["val_loss"]) and metrics[-1]["val_loss"] < metrics[0]["val_loss"]


def test_a_batch_the_devices_cannot_share_is_refused_in_one_line_before_any_run_is_written(tmp_path):
    command = ["-m", "vaecli", "train", "--config", "mnist-sample", "--set", "train.batch_size=30", "--out", "run"]
    finished = run_child(command, FORCED_DEVICES, cwd=tmp_path)
    assert finished.returncode == 2, finished.stderr
    assert "on 4 cpu devices, 1 process" in finished.stdout  # the start line names where it would have run
    lines = [line for line in finished.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in finished.stderr, finished.stderr
    assert "train.batch_size 30 does not split evenly over 4 devices" in lines[0]
    assert "multiple of 4 such as 32" in lines[0]
    assert not (tmp_path / "run").exists()


def test_more_devices_than_the_process_has_is_one_line_and_writes_nothing(tmp_path):
    result = vae("train", "--config", "mnist-sample", "--set", "train.devices=4096", "--out", tmp_path / "run")
    assert_one_line_error(result, 2, f"train.devices is 4096, but this process has {len(jax.local_devices())}")
    assert not (tmp_path / "run").exists()


def test_train_devices_is_null_or_a_positive_count():
    assert validate_config({}, "test").train.devices is None
    assert validate_config({"train": {"devices": 2}}, "test").train.devices == 2
    for bad in (0, -1, True, "2"):
        with pytest.raises(ConfigError, match=r"train\.devices"):
            validate_config({"train": {"devices": bad}}, "test")


def test_the_batch_check_names_both_numbers_and_the_fix():
    config = validate_config({"train": {"batch_size": 100}}, "test")
    check_batch_splits(config, 4)  # 25 each
    with pytest.raises(ConfigError, match=r"batch_size 100 does not split evenly over 8 devices.*such as 104"):
        check_batch_splits(config, 8)


@pytest.mark.parametrize("dtype", [np.uint32, np.int32, np.uint16, np.int16, np.uint8, np.int8])
def test_mulhi_from_halves_is_lax_mulhi(dtype):
    info = np.iinfo(dtype)
    generator = np.random.default_rng(0)
    left = generator.integers(info.min, info.max, 10_000, dtype=dtype, endpoint=True)
    right = generator.integers(info.min, info.max, 10_000, dtype=dtype, endpoint=True)
    left[:4], right[:4] = [info.min, info.max, 0, info.max], [info.min, info.max, info.max, info.min]
    expected = (left.astype(np.int64) * right.astype(np.int64)) >> (8 * np.dtype(dtype).itemsize)
    halves = np.asarray(jax.jit(mulhi_from_halves)(left, right))
    np.testing.assert_array_equal(halves, np.asarray(jax.jit(jax.lax.mulhi)(left, right)))
    np.testing.assert_array_equal(halves, expected.astype(dtype))
