"""generate, reconstruct and evaluate on several devices: each batch split over them, the same outputs as one device.

One child process with 4 forced CPU devices (see helpers.run_child) runs the three commands through the CLI, where
the run's train.devices (null: all) chooses 4 devices, then the same computations through the library on one device.
Each compiled call's output is recorded: on 4 devices it must be split by rows over all of them, else the equal
outputs would prove nothing.
"""

from __future__ import annotations

import json
import shutil

import jax
import pytest
from helpers import FORCED_DEVICES, run_child

from vaecli.inference.open_run import open_inference_run
from vaecli.models.sampling import inference_placement
from vaecli.runs.rundir import INFERENCE_SUBDIR

# 10 images or codes: 4 devices take 3 each, the last batch padded with 2 rows that are dropped.
COUNT = 10
K = 6

CHILD_SCRIPT = """
import json, sys
from pathlib import Path

import jax, numpy as np
from typer.testing import CliRunner

import vaecli.inference.evaluate, vaecli.inference.sample, vaecli.inference.samplers, vaecli.models.sampling
from vaecli.cli.app import app
from vaecli.data.datasets import load_dataset
from vaecli.inference.evaluate import evaluate_images
from vaecli.inference.open_run import open_inference_run
from vaecli.models.sampling import encoder_sees_binary, generate, inference_placement, reconstruct
from vaecli.inference.samplers import GaussianMixture, mixture_samples

run_dir, count, k = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
report = {"devices_seen": jax.local_device_count(), "calls": {}}
phase = "four"

def recording(module, name):
    compiled = getattr(module, name)

    def recorded(*args, **kwargs):
        result = compiled(*args, **kwargs)
        rows = jax.tree.leaves(result)[0]
        shard_rows = rows.sharding.shard_shape(rows.shape)[0]
        report["calls"].setdefault(phase, {}).setdefault(name, []).append(
            [len(rows.sharding.device_set), rows.shape[0], shard_rows]
        )
        return result

    setattr(module, name, recorded)

vaecli.inference.sample.RECONSTRUCT_DEFAULT_COUNT = count  # test images reconstruct takes by default: 12 rows padded
sampling = vaecli.models.sampling
evaluate, samplers = vaecli.inference.evaluate, vaecli.inference.samplers
for module, name in ((sampling, "_decode_prior_batch"), (sampling, "_reconstruct_batch"),
                     (evaluate, "_importance_step"), (samplers, "_decode_mixture_batch")):
    recording(module, name)

def vae(*arguments):
    result = CliRunner().invoke(app, [str(argument) for argument in arguments])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout

run = ["--run", run_dir]
vae("generate", *run, "--n", count, "--seed", 3, "--out", run_dir.parent / "generated.npz")
vae("reconstruct", *run, "--samples", 2, "--seed", 1, "--out", run_dir.parent / "reconstructed.npz")
record = json.loads(vae("evaluate", *run, "--k", k, "--images", count, "--json"))
table = vae("evaluate", *run, "--k", k, "--images", count)
report["table_names_devices"] = "on 4 devices" in table

loaded = open_inference_run(run_dir)
placement = inference_placement(loaded.config)
test_images = np.asarray(load_dataset(loaded.config.data).split("test")[:count])
binarized = encoder_sees_binary(loaded.config)
latent_dim = loaded.model.latent_dim
mixture = GaussianMixture(np.ones(1), np.full((1, latent_dim), 0.5), np.eye(latent_dim)[None])
four = {"mixture_samples": mixture_samples(loaded.model, mixture, count, seed=2, placement=placement)}

phase = "one"
one = {
    "samples": generate(loaded.model, count, seed=3),
    "reconstructions": reconstruct(loaded.model, test_images, binarized, 2, 1, False)[1],
    "mixture_samples": mixture_samples(loaded.model, mixture, count, seed=2),
}
evaluation = evaluate_images(loaded, test_images, "test", int(k), 0)
with np.load(run_dir.parent / "generated.npz") as saved:
    four["samples"] = saved["samples"]
with np.load(run_dir.parent / "reconstructed.npz") as saved:
    four["reconstructions"] = saved["reconstructions"]
report["largest_difference"] = {name: float(np.abs(four[name] - one[name]).max()) for name in one}
report["record"] = {name: record[name] for name in ("devices", "nll_nats", "neg_elbo_nats", "kl_nats", "images")}
report["one_device"] = {name: getattr(evaluation, name) for name in report["record"]}

def with_devices(devices):
    return loaded.config.model_copy(update={"train": loaded.config.train.model_copy(update={"devices": devices})})

report["placement_counts"] = [getattr(inference_placement(with_devices(devices)), "count", 1) for devices in (2, 8, 1)]
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def report(trained_run_dir, tmp_path_factory) -> dict:
    """What the 4-device child found, on a copy of the trained run (evaluate records itself in the run)."""
    run_dir = tmp_path_factory.mktemp("inference-devices") / "run"
    shutil.copytree(trained_run_dir, run_dir, ignore=shutil.ignore_patterns(INFERENCE_SUBDIR))
    open_inference_run(run_dir)  # writes the inference weights here, so the child reads them without Orbax or Flax
    finished = run_child(["-c", CHILD_SCRIPT, str(run_dir), str(COUNT), str(K)], FORCED_DEVICES, run_dir.parent)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return json.loads(finished.stdout.strip().splitlines()[-1])


def test_the_commands_split_each_batch_over_the_four_devices(report):
    """The positive control: every compiled call of the CLI's commands puts a quarter of its rows on each device."""
    assert report["devices_seen"] == FORCED_DEVICES
    calls = report["calls"]["four"]
    assert set(calls) == {"_decode_prior_batch", "_reconstruct_batch", "_importance_step", "_decode_mixture_batch"}
    for name, outputs in calls.items():
        for devices, rows, rows_per_device in outputs:
            assert (devices, rows_per_device * FORCED_DEVICES) == (FORCED_DEVICES, rows), name
    # 10 codes or images padded to 12, 3 on each device (evaluate runs twice: --json, then the table).
    expected_rows = {
        "_decode_prior_batch": [12], "_reconstruct_batch": [12], "_decode_mixture_batch": [12],
        "_importance_step": [12, 12],
    }  # fmt: skip
    for name, expected in expected_rows.items():
        assert [rows for _, rows, _ in calls[name]] == expected, name
    assert all(devices == 1 for outputs in report["calls"]["one"].values() for devices, _, _ in outputs)


def test_four_devices_generate_and_reconstruct_what_one_does(report):
    differences = report["largest_difference"]
    assert set(differences) == {"samples", "reconstructions", "mixture_samples"}
    for name, difference in differences.items():
        assert difference <= 1e-5, (name, difference)


def test_four_devices_evaluate_what_one_does_and_the_record_says_how_many(report):
    four, one = report["record"], report["one_device"]
    assert (four["devices"], one["devices"]) == (FORCED_DEVICES, 1)
    assert four["images"] == one["images"] == COUNT
    for name in ("nll_nats", "neg_elbo_nats", "kl_nats"):
        assert four[name] == pytest.approx(one[name], rel=1e-4), name
    assert report["table_names_devices"]


def test_inference_uses_the_runs_devices_or_as_many_as_are_here(report, trained_run):
    """train.devices 2 of 4 here: 2; 8 of 4: 4; 1: one device, no placement at all."""
    assert report["placement_counts"] == [2, FORCED_DEVICES, 1]
    if jax.local_device_count() == 1:  # a run trained on 4 devices, opened where there is one
        config = trained_run.config
        trained_on_four = config.model_copy(update={"train": config.train.model_copy(update={"devices": 4})})
        assert inference_placement(trained_on_four) is None
