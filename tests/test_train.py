"""Training, checkpoints and sampling at the library level."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_config
from flax import nnx

from vaecli.checkpoint import load_run, load_train_state, save_checkpoint
from vaecli.config import DataConfig
from vaecli.data import load_dataset
from vaecli.errors import CheckpointError, ConfigError, UsageError
from vaecli.objectives import bernoulli_log_likelihood
from vaecli.sample import generate, reconstruct
from vaecli.train import (
    device_split,
    epoch_batch_indices,
    init_train_state,
    make_train_chunk,
    padded_to_chunks,
    train,
)


def tiny_dataset(train_count=256, val_count=64):
    """A slice of the offline digits: enough for a few fast steps."""
    dataset = load_dataset(DataConfig())
    return dataclasses.replace(
        dataset, train_images=dataset.train_images[:train_count], val_images=dataset.val_images[:val_count]
    )


def leaves(tree):
    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(tree)]


def assert_trees_equal(first, second):
    for left, right in zip(leaves(first), leaves(second), strict=True):
        np.testing.assert_array_equal(left, right)


TINY = {"model": {"hidden": [32], "latent_dim": 4}, "train": {"epochs": 2, "batch_size": 32}}


def test_same_seed_gives_the_same_weights_with_or_without_progress_reports(monkeypatch):
    monkeypatch.setattr("vaecli.train.STEPS_PER_CHUNK", 3)  # 8 steps an epoch: chunks of 3, 3 and 2 (+1 skipped)
    config, dataset = small_config(**TINY), tiny_dataset()
    reports, epochs = [], []
    watched = train(config, dataset, on_progress=reports.append, on_epoch_end=epochs.append).state
    unwatched = train(config, dataset).state

    assert_trees_equal(watched.params, unwatched.params)
    assert int(watched.step) == 2 * (256 // 32)  # the skipped step of each last chunk did not count
    assert [(report.epoch, report.steps_done) for report in reports] == [(1, 3), (1, 6), (1, 8), (2, 3), (2, 6), (2, 8)]
    assert all(report.steps_per_epoch == 8 and np.isfinite(report.train_loss) for report in reports)
    assert [result.epoch for result in epochs] == [1, 2]
    assert set(epochs[0].metrics) >= {"epoch", "step", "train_loss", "val_loss", "val_recon", "val_kl"}
    assert epochs[0].metrics["val_loss"] == pytest.approx(epochs[0].metrics["val_recon"] + epochs[0].metrics["val_kl"])


def test_chunk_length_does_not_change_the_result(monkeypatch):
    config, dataset = small_config(**TINY), tiny_dataset()
    one_chunk_per_epoch = train(config, dataset).state  # 8 steps < STEPS_PER_CHUNK
    monkeypatch.setattr("vaecli.train.STEPS_PER_CHUNK", 3)
    three_chunks_per_epoch = train(config, dataset).state
    for left, right in zip(leaves(one_chunk_per_epoch.params), leaves(three_chunks_per_epoch.params), strict=True):
        np.testing.assert_allclose(left, right, rtol=1e-5, atol=1e-6)
    assert int(one_chunk_per_epoch.step) == int(three_chunks_per_epoch.step) == 16


def test_a_different_seed_gives_different_weights():
    dataset = tiny_dataset()
    first = train(small_config(**TINY), dataset).state
    second = train(small_config(seed=1, **TINY), dataset).state
    assert not np.array_equal(leaves(first.params)[0], leaves(second.params)[0])


def test_batch_order_is_a_permutation_fixed_by_seed_and_epoch():
    order = np.asarray(epoch_batch_indices(seed=0, epoch=1, num_images=100, batch_size=32))
    assert order.shape == (3, 32)
    assert len(set(order.ravel())) == 96  # no image twice; the last partial batch is dropped
    np.testing.assert_array_equal(order, epoch_batch_indices(0, 1, 100, 32))
    assert not np.array_equal(order, epoch_batch_indices(0, 2, 100, 32))
    assert not np.array_equal(order, epoch_batch_indices(1, 1, 100, 32))


def test_the_compiled_training_chunk_copies_no_weights():
    """Copies of weight matrices inside the scan cost a memory pass per step; the compiler options remove them."""
    config, dataset = small_config(**TINY), tiny_dataset()
    graphdef, state = init_train_state(config, dataset.image_shape)
    steps_per_epoch = len(dataset.train_images) // config.train.batch_size
    batches = padded_to_chunks(epoch_batch_indices(0, 1, len(dataset.train_images), config.train.batch_size), 4)
    chunk = make_train_chunk(graphdef, config, steps_per_epoch, steps_per_chunk=4)
    compiled = chunk.lower(state, device_split(config, dataset.train_images, 0), batches, 0).compile().as_text()
    copied_arrays = re.findall(r"= (f32\[\d+(?:,\d+)*\])\S* copy\(", compiled)
    assert copied_arrays == []


def test_a_batch_larger_than_the_training_set_is_refused():
    with pytest.raises(ConfigError, match=r"train\.batch_size 512 is larger than the 256 training images"):
        train(small_config(train={"batch_size": 512}), tiny_dataset())


def test_training_lowers_the_validation_loss(trained_run_dir):
    import json

    metrics = [json.loads(line) for line in (trained_run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in metrics] == list(range(1, 7))
    assert metrics[-1]["val_loss"] < metrics[0]["val_loss"] - 20
    for row in metrics:  # training speed leaves validation out; the epoch's time has both
        assert row["images_per_second"] > 0 and row["train_seconds"] > 0 and row["val_seconds"] > 0
        assert row["epoch_seconds"] == pytest.approx(row["train_seconds"] + row["val_seconds"])


def test_checkpoint_round_trips_weights_optimizer_state_and_config(tmp_path):
    config = small_config(**TINY)
    state = train(config, tiny_dataset()).state
    save_checkpoint(tmp_path, state, 2, config, tiny_dataset())

    loaded = load_run(tmp_path)
    assert (loaded.step, loaded.epoch, loaded.config, loaded.image_shape) == (16, 2, config, (28, 28))
    assert_trees_equal(nnx.state(loaded.model, nnx.Param), state.params)
    restored = load_train_state(tmp_path, 16, config, (28, 28))
    assert_trees_equal(restored.opt_state, state.opt_state)
    assert int(restored.step) == 16


def test_a_run_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_run(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_run(tmp_path / "missing")


def test_reconstructions_through_the_posterior_beat_prior_samples_by_far(trained_run):
    """The point of the tool: q(z|x) carries the image's identity, p(z) does not."""
    test_images = load_dataset(DataConfig()).split("test")[:200]
    targets = jnp.asarray(test_images.reshape(200, -1) / 255.0)

    def log_likelihood(means):  # log p(x | decoded means), nats per image
        probabilities = jnp.clip(jnp.asarray(means.reshape(200, -1)), 1e-4, 1 - 1e-4)
        return np.asarray(bernoulli_log_likelihood(jnp.log(probabilities) - jnp.log1p(-probabilities), targets))

    posterior = log_likelihood(reconstruct(trained_run.model, test_images, num_samples=1, seed=0)[:, 0])
    prior = log_likelihood(generate(trained_run.model, 200, seed=0))

    assert posterior.mean() > prior.mean() + 60
    assert np.mean(posterior > prior) > 0.95


def test_generate_is_deterministic_and_sample_i_does_not_depend_on_n(trained_run):
    many = generate(trained_run.model, 40, seed=3)
    assert many.shape == (40, 28, 28) and many.dtype == np.float32
    assert many.min() >= 0.0 and many.max() <= 1.0
    np.testing.assert_array_equal(many, generate(trained_run.model, 40, seed=3))
    np.testing.assert_array_equal(many[:7], generate(trained_run.model, 7, seed=3))
    assert not np.array_equal(many, generate(trained_run.model, 40, seed=4))


def test_temperature_scales_the_prior(trained_run):
    cold = generate(trained_run.model, 64, seed=0, temperature=0.01)
    warm = generate(trained_run.model, 64, seed=0, temperature=1.0)
    # Near T = 0 every z is about 0, so all samples are about the same image.
    assert cold.std(axis=0).max() < 0.05
    assert warm.std(axis=0).max() > 0.2


def test_reconstruct_samples_differ_but_the_mean_mode_repeats(trained_run):
    images = load_dataset(DataConfig()).split("test")[:3]
    sampled = reconstruct(trained_run.model, images, num_samples=3, seed=0)
    assert sampled.shape == (3, 3, 28, 28)
    assert not np.array_equal(sampled[:, 0], sampled[:, 1])
    np.testing.assert_array_equal(sampled, reconstruct(trained_run.model, images, num_samples=3, seed=0))
    np.testing.assert_array_equal(sampled[:2], reconstruct(trained_run.model, images[:2], num_samples=3, seed=0))
    means = reconstruct(trained_run.model, images, num_samples=2, use_mean=True)
    np.testing.assert_array_equal(means[:, 0], means[:, 1])


@pytest.mark.parametrize(("n", "samples"), [(0, 1), (1, 0)])
def test_sampling_refuses_counts_below_one(trained_run, n, samples):
    with pytest.raises(UsageError):
        generate(trained_run.model, n) if n < 1 else reconstruct(
            trained_run.model, np.zeros((1, 28, 28), np.uint8), samples
        )


def test_static_binarization_is_one_fixed_draw_per_split():
    from vaecli.train import device_split

    images = load_dataset(DataConfig()).split("val")[:100]
    config = small_config(data={"binarize": "static"})
    first, again = np.asarray(device_split(config, images, 1)), np.asarray(device_split(config, images, 1))
    np.testing.assert_array_equal(first, again)
    assert set(np.unique(first)) <= {0, 255}
    assert abs(first.mean() - images.mean()) < 2.0  # a draw from the intensities, not a threshold
    assert not np.array_equal(first, np.asarray(device_split(config, images, 0)))
    assert not np.array_equal(
        first, np.asarray(device_split(small_config(seed=1, data={"binarize": "static"}), images, 1))
    )
    unchanged = np.asarray(device_split(small_config(data={"binarize": "dynamic"}), images, 1))
    np.testing.assert_array_equal(unchanged, images)  # dynamic draws happen inside each step instead


def test_static_binarization_trains():
    state = train(small_config(data={"binarize": "static"}, **TINY), tiny_dataset()).state
    assert all(np.isfinite(leaf).all() for leaf in leaves(state.params))


def test_dynamic_binarization_draws_each_pixel_with_its_intensity():
    from vaecli.train import bernoulli_draw, root_key

    levels = jnp.array([0, 1, 64, 128, 254, 255], jnp.uint8)
    images = jnp.broadcast_to(levels, (20_000, 6))
    frequencies = np.asarray(jnp.mean(bernoulli_draw(root_key(0), images), axis=0))
    assert frequencies[0] == 0.0 and frequencies[-1] == 1.0  # black never, white always
    np.testing.assert_allclose(frequencies[1:-1], np.asarray(levels[1:-1]) / 255, atol=0.01)
    assert not np.array_equal(bernoulli_draw(root_key(0), images), bernoulli_draw(root_key(1), images))


def test_validation_padding_is_masked_out(trained_run):
    """1,500 images = one full batch of 1,000 and one padded to 1,000: the padding must not count."""
    from vaecli.train import EVALUATION_STREAM, make_evaluator, negative_elbo, root_key

    config = trained_run.config
    images = np.concatenate([load_dataset(DataConfig()).split("train")[:1500]])
    graphdef, params = nnx.split(trained_run.model, nnx.Param)
    loss, reconstruction, kl = make_evaluator(graphdef, config, 1500)(params, jnp.asarray(images))

    eval_key = jax.random.fold_in(root_key(config.seed), EVALUATION_STREAM)
    totals = np.zeros(2)
    for batch_number, batch in enumerate((images[:1000], images[1000:])):
        terms = negative_elbo(
            trained_run.model, jnp.asarray(batch), jax.random.fold_in(eval_key, batch_number), "dynamic"
        )
        totals += [float(jnp.sum(term)) for term in terms]
    np.testing.assert_allclose([reconstruction, kl], totals / 1500, rtol=1e-4)
    assert loss == pytest.approx(reconstruction + kl)


def test_a_checkpoint_with_incomplete_metadata_is_a_clear_error(tmp_path):
    import json

    config = small_config(**TINY)
    state = train(config, tiny_dataset()).state
    save_checkpoint(tmp_path, state, 2, config, tiny_dataset())
    meta_file = tmp_path / "checkpoints" / "16" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    del meta["preprocessing"]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="lacks preprocessing in its metadata"):
        load_run(tmp_path)


def test_training_and_validation_compile_once_for_any_number_of_epochs(caplog):
    """Three epochs whose last chunk is partial, validation with a padded last batch: one compilation each."""
    import logging

    # 500 validation images: batches of 500, so no padding; 1,100 gives a full batch and a padded one.
    dataset = dataclasses.replace(
        tiny_dataset(train_count=288), val_images=load_dataset(DataConfig()).split("train")[:1100]
    )
    config = small_config(model={"hidden": [32], "latent_dim": 4}, train={"epochs": 3, "batch_size": 32})
    with caplog.at_level(logging.WARNING), jax.log_compiles(True):
        train(config, dataset)
    compiled = [record.getMessage() for record in caplog.records if "Finished XLA compilation" in record.getMessage()]
    assert sum("jit(chunk)" in message for message in compiled) == 1, compiled
    assert sum("jit(totals)" in message for message in compiled) == 1, compiled
