"""Decoding without Flax: the pure-JAX model gives the Flax model's numbers to the bit, and the weights kept
beside a run (RUN/inference/<step>.npz and .json) are a cache that is never trusted when it should not be."""

import errno
import json
import os
import shutil
import types

import jax
import numpy as np
import pytest
from flax import nnx

import vaecli.common.files
from vaecli.common.config import ModelConfig
from vaecli.common.images import make_grid, save_png
from vaecli.inference.open_run import inference_paths, open_inference_run, read_inference_files, write_inference_files
from vaecli.models.layers import InferenceModel
from vaecli.models.vae import build_model, inference_weights
from vaecli.runs.rundir import (
    CHECKPOINT_SUBDIR,
    INFERENCE_SUBDIR,
    ORBAX_COMMIT_FILE,
    ORBAX_METRICS_FILE,
    checkpoint_identity,
    checkpoint_step_dirs,
    chosen_checkpoint_step,
)
from vaecli.training.checkpoint import choose_step, load_run, open_checkpoints

# Each kind of decoder and likelihood: dense and convolutional (GroupNorm, depth-to-space), Bernoulli and the
# logistic mixture, grey and colour (whose mixture couples R, G and B).
MODELS = {
    "mlp-bernoulli-grey": (ModelConfig(hidden=(48, 24), latent_dim=4), (28, 28)),
    "mlp-logistic-grey": (ModelConfig(hidden=(40,), latent_dim=3, likelihood="logistic", mixtures=3), (12, 12)),
    "mlp-logistic-colour": (
        ModelConfig(hidden=(32,), latent_dim=3, likelihood="logistic", mixtures=2, activation="gelu"),
        (8, 8, 3),
    ),
    "conv-bernoulli-grey": (ModelConfig(arch="conv", hidden=(8, 16), latent_dim=4, activation="silu"), (28, 28)),
    "conv-logistic-colour": (
        ModelConfig(arch="conv", hidden=(8, 16), latent_dim=5, likelihood="logistic", mixtures=2),
        (16, 16, 3),
    ),
}


def model_with_random_weights(config: ModelConfig, image_shape: tuple[int, ...], seed: int = 1):
    """A VAE of `config` with random weights everywhere: zero biases and unit norm scales would hide a weight
    left out. Drawn by NumPy into an abstract model, since initialising each shape eagerly compiles a program
    per shape (minutes for a conv model on a busy CPU)."""
    graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: build_model(config, image_shape, 0)))
    rng = np.random.default_rng(seed)

    def draw(leaf):
        if len(leaf.shape) == 1:  # biases, the norms' scales and shifts, the output bias
            return 1.0 + rng.normal(0.0, 0.3, leaf.shape)
        return rng.normal(0.0, 1 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape)  # kernels, scaled by fan-in

    return nnx.merge(graphdef, jax.tree_util.tree_map(lambda leaf: draw(leaf).astype(np.float32), abstract_params))


@jax.jit
def decode_and_encode(model, latents, pixels):
    return model.likelihood.mean(model.decode(latents)), *model.encode(pixels)


@pytest.mark.parametrize("name", MODELS)
def test_the_pure_model_decodes_and_encodes_as_the_flax_model_to_the_bit(name, tmp_path):
    config, image_shape = MODELS[name]
    model = model_with_random_weights(config, image_shape)
    pure = InferenceModel(inference_weights(model), config, image_shape)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((9, config.latent_dim), dtype=np.float32)
    pixels = rng.random((3, int(np.prod(image_shape))), dtype=np.float32)

    flax_outputs, pure_outputs = decode_and_encode(model, latents, pixels), decode_and_encode(pure, latents, pixels)
    for flax_array, pure_array in zip(flax_outputs, pure_outputs, strict=True):
        np.testing.assert_array_equal(np.asarray(pure_array), np.asarray(flax_array))
    for label, (means, *_) in (("flax", flax_outputs), ("pure", pure_outputs)):
        save_png(tmp_path / f"{label}.png", make_grid(np.asarray(means).reshape(9, *image_shape)))
    assert (tmp_path / "pure.png").read_bytes() == (tmp_path / "flax.png").read_bytes()


# ---- the kept inference weights -------------------------------------------------------------------


@pytest.fixture
def run_copy(tmp_path, trained_run_dir):
    """The session's trained run, copied without any inference files: these tests damage what they write."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run_dir, run_dir, ignore=shutil.ignore_patterns(INFERENCE_SUBDIR))
    return run_dir


@pytest.fixture
def flax_weights(trained_run):
    """The weights the Flax model of the trained run decodes with (its best checkpoint)."""
    return trained_run.step, inference_weights(trained_run.model)


def assert_weights_equal(model: InferenceModel, expected: dict[str, np.ndarray]) -> None:
    assert sorted(model.weights) == sorted(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(np.asarray(model.weights[name]), array)


def test_the_first_use_keeps_the_weights_and_the_next_reads_them(run_copy, flax_weights):
    step, expected = flax_weights
    opened = open_inference_run(run_copy)
    assert opened.step == step
    assert_weights_equal(opened.model, expected)
    record = json.loads(inference_paths(run_copy, step)[1].read_text())
    assert record["checkpoint"] == checkpoint_identity(run_copy, step) and record["weights"] == "params"

    kept = read_inference_files(run_copy, step, checkpoint_identity(run_copy, step))
    assert kept is not None and kept.config == opened.config and kept.image_shape == opened.image_shape
    assert_weights_equal(kept.model, expected)


def altered(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: array + 1.0 for name, array in weights.items()}


def damage_npz_truncated(npz_path, json_path, weights):
    npz_path.write_bytes(npz_path.read_bytes()[: npz_path.stat().st_size // 2])


def damage_npz_replaced_by_other_weights(npz_path, json_path, weights):
    np.savez(npz_path, **altered(weights))  # a valid file, but not the one the .json names


def damage_json_not_json(npz_path, json_path, weights):
    json_path.write_text("{not json")


def damage_json_of_another_version(npz_path, json_path, weights):
    record = json.loads(json_path.read_text())
    json_path.write_text(json.dumps({**record, "version": record["version"] + 1}))


def damage_json_missing(npz_path, json_path, weights):
    json_path.unlink()


@pytest.mark.parametrize(
    "damage",
    [
        damage_npz_truncated,
        damage_npz_replaced_by_other_weights,
        damage_json_not_json,
        damage_json_of_another_version,
        damage_json_missing,
    ],
)
def test_a_damaged_inference_file_is_ignored_and_written_anew(run_copy, flax_weights, damage):
    step, expected = flax_weights
    open_inference_run(run_copy)
    npz_path, json_path = inference_paths(run_copy, step)
    damage(npz_path, json_path, expected)
    assert read_inference_files(run_copy, step, checkpoint_identity(run_copy, step)) is None

    assert_weights_equal(open_inference_run(run_copy).model, expected)
    rewritten = read_inference_files(run_copy, step, checkpoint_identity(run_copy, step))
    assert rewritten is not None
    assert_weights_equal(rewritten.model, expected)


def test_files_of_another_checkpoint_of_the_same_step_are_not_used(run_copy, flax_weights):
    """A run trained again into the same folder reaches the same step with other weights."""
    step, expected = flax_weights
    opened = open_inference_run(run_copy)
    record = json.loads(inference_paths(run_copy, step)[1].read_text())
    write_inference_files(run_copy, step, altered(expected), record)  # whole, consistent, and wrong
    assert_weights_equal(open_inference_run(run_copy).model, altered(expected))  # the files are what is read

    commit_record = run_copy / CHECKPOINT_SUBDIR / str(step) / ORBAX_COMMIT_FILE
    commit_record.write_text(commit_record.read_text().replace("commit_timestamp_nsecs", "commit_timestamp_nsecs "))
    assert_weights_equal(open_inference_run(run_copy).model, expected)
    assert opened.config == open_inference_run(run_copy).config


def test_a_failed_write_leaves_the_kept_files_whole_and_nothing_half_written(run_copy, flax_weights, monkeypatch):
    step, expected = flax_weights
    open_inference_run(run_copy)
    npz_path, json_path = inference_paths(run_copy, step)
    # Files of other weights, so that the files the next use writes differ from them byte for byte.
    write_inference_files(run_copy, step, altered(expected), json.loads(json_path.read_text()))
    kept = npz_path.read_bytes(), json_path.read_bytes()
    commit_record = run_copy / CHECKPOINT_SUBDIR / str(step) / ORBAX_COMMIT_FILE
    commit_record.write_bytes(commit_record.read_bytes() + b" ")  # the next use writes the files again

    def disk_full(file_descriptor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(vaecli.common.files, "os", types.SimpleNamespace(**{**vars(os), "fsync": disk_full}))
    assert_weights_equal(open_inference_run(run_copy).model, expected)  # decoding goes on without them
    assert (npz_path.read_bytes(), json_path.read_bytes()) == kept
    assert sorted(path.name for path in npz_path.parent.iterdir()) == sorted([npz_path.name, json_path.name])


def test_files_of_checkpoints_that_are_gone_are_removed(run_copy, flax_weights):
    step, _ = flax_weights
    stale = inference_paths(run_copy, 1)
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"left by a checkpoint Orbax has since deleted")
    open_inference_run(run_copy)
    assert not any(path.exists() for path in stale)
    assert all(path.exists() for path in inference_paths(run_copy, step))


# ---- which checkpoint, without Orbax -------------------------------------------------------------------------


def assert_same_choice_as_orbax(run_dir, choices):
    with open_checkpoints(run_dir) as manager:
        for which in choices:
            assert chosen_checkpoint_step(run_dir, which) == choose_step(manager, run_dir, which), which


def test_the_files_name_the_checkpoint_orbax_chooses(run_copy):
    steps = [int(path.name) for path in checkpoint_step_dirs(run_copy)]
    assert len(steps) >= 3
    assert_same_choice_as_orbax(run_copy, ["best", "latest", *map(str, steps)])
    assert chosen_checkpoint_step(run_copy, str(max(steps) + 1)) is None  # Orbax's own error is then raised

    # Ties go to the newest step; a checkpoint without metrics (saved mid-epoch) takes no part.
    for step in steps:
        (run_copy / CHECKPOINT_SUBDIR / str(step) / ORBAX_METRICS_FILE).write_text(json.dumps({"val_loss": 7.5}))
    (run_copy / CHECKPOINT_SUBDIR / str(max(steps)) / ORBAX_METRICS_FILE).unlink()
    assert_same_choice_as_orbax(run_copy, ["best"])
    assert chosen_checkpoint_step(run_copy, "best") == sorted(steps)[-2]

    for step in steps:  # none ranked: the newest
        (run_copy / CHECKPOINT_SUBDIR / str(step) / ORBAX_METRICS_FILE).unlink(missing_ok=True)
    assert_same_choice_as_orbax(run_copy, ["best"])


def test_unreadable_metrics_leave_the_choice_to_orbax(run_copy):
    newest = checkpoint_step_dirs(run_copy)[-1]
    (newest / ORBAX_METRICS_FILE).write_text("{not json")
    assert chosen_checkpoint_step(run_copy, "best") is None
    assert chosen_checkpoint_step(run_copy, "latest") == int(newest.name)


def test_a_bfloat16_model_decodes_through_flax_and_keeps_no_weights(run_copy):
    """InferenceModel computes in float32 only: a model whose layers round to bfloat16 is left to Flax."""
    for metadata_path in (run_copy / CHECKPOINT_SUBDIR).glob("*/meta/metadata"):
        metadata = json.loads(metadata_path.read_text())
        metadata["config"]["model"]["dtype"] = "bfloat16"
        metadata_path.write_text(json.dumps(metadata))
    opened = open_inference_run(run_copy)
    assert opened.config.model.dtype == "bfloat16" and not isinstance(opened.model, InferenceModel)
    assert not (run_copy / INFERENCE_SUBDIR).exists()


def test_the_inference_run_matches_the_loaded_run(run_copy):
    loaded, opened = load_run(run_copy, "latest"), open_inference_run(run_copy, "latest")
    for field in ("config", "step", "epoch", "image_shape", "dataset_name", "preprocessing"):
        assert getattr(opened, field) == getattr(loaded, field), field
    assert opened.model.latent_dim == loaded.model.latent_dim and opened.model.image_shape == loaded.model.image_shape
