"""Training, checkpoints and sampling at the library level."""

import dataclasses
import json
import logging
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import (
    assert_trees_close,
    assert_trees_equal,
    leaves,
    tiny_config,
    tiny_dataset,
    trees_differ,
)

from vaecli.common.config import Config, DataConfig
from vaecli.common.errors import CheckpointError, ConfigError, UsageError
from vaecli.data.dataset import Dataset
from vaecli.data.datasets import load_dataset
from vaecli.models.layers import bernoulli_draw
from vaecli.models.likelihoods import Bernoulli
from vaecli.models.sampling import encoder_sees_binary, generate, prior_images, reconstruct
from vaecli.models.targets import SPLIT_NUMBERS, device_split, root_key
from vaecli.models.vae import build_model
from vaecli.training.checkpoint import load_run, load_train_state, save_checkpoint
from vaecli.training.loop import (
    EVALUATION_STREAM,
    EpochResult,
    TrainOutcome,
    batch_image_losses,
    epoch_batch_indices,
    epoch_chunks,
    image_losses,
    init_train_state,
    kl_weight_at,
    learning_rate_schedule,
    make_evaluator,
    make_train_chunk,
    make_update,
    split_model,
    train,
)


def test_same_seed_gives_the_same_weights_with_or_without_progress_reports(monkeypatch):
    monkeypatch.setattr("vaecli.training.loop.STEPS_PER_CHUNK", 3)  # 8 steps an epoch: chunks of 3, 3, then a tail of 2
    config, dataset = tiny_config(), tiny_dataset()
    reports, epochs = [], []
    watched = train(config, dataset, on_progress=reports.append, on_epoch_end=epochs.append).state
    unwatched = train(config, dataset).state

    assert_trees_equal(watched.params, unwatched.params)
    assert int(watched.step) == 2 * (256 // 32)
    assert [(report.epoch, report.steps_done) for report in reports] == [(1, 3), (1, 6), (1, 8), (2, 3), (2, 6), (2, 8)]
    assert all(report.steps_per_epoch == 8 and np.isfinite(report.train_loss) for report in reports)
    assert [result.epoch for result in epochs] == [1, 2]
    assert set(epochs[0].metrics) >= {"epoch", "step", "train_loss", "val_loss", "val_recon", "val_kl"}
    assert epochs[0].metrics["val_loss"] == pytest.approx(epochs[0].metrics["val_recon"] + epochs[0].metrics["val_kl"])


@pytest.fixture(scope="module")
def plain_loop_state():
    """tiny_config()'s two epochs trained as the Flax examples train: one jitted update per batch."""
    config, dataset = tiny_config(), tiny_dataset()
    graphdef, state = init_train_state(config, dataset.image_shape, dataset.train_images)
    steps_per_epoch = len(dataset.train_images) // config.train.batch_size
    update = jax.jit(make_update(graphdef, config, steps_per_epoch))
    train_images = device_split(config, dataset.train_images, SPLIT_NUMBERS["train"])
    for epoch in range(1, config.train.epochs + 1):
        for batch in epoch_batch_indices(config.seed, epoch, len(dataset.train_images), config.train.batch_size):
            state, loss = update(state, train_images[batch])
            assert np.isfinite(loss)
    assert int(state.step) == 2 * steps_per_epoch
    return state


# 8 steps an epoch: whole chunks and a tail (3, 3, 2), whole chunks only (4, 4), a tail only (8).
@pytest.mark.parametrize("steps_per_chunk", [3, 4, 64])
def test_the_chunked_loop_matches_a_plain_loop_of_single_updates(monkeypatch, plain_loop_state, steps_per_chunk):
    """Gathering on the device, the tail's shorter scan and the step's noise key must change nothing:
    the scanned chunks give what one jitted update per batch gives, step by step."""
    monkeypatch.setattr("vaecli.training.loop.STEPS_PER_CHUNK", steps_per_chunk)
    chunked = train(tiny_config(), tiny_dataset()).state

    assert int(chunked.step) == int(plain_loop_state.step) == 16
    assert_trees_close(chunked.params, plain_loop_state.params)
    assert_trees_close(chunked.opt_state, plain_loop_state.opt_state)


def test_an_epoch_runs_as_whole_chunks_then_one_tail_of_the_steps_left():
    assert epoch_chunks(0, 8, 3) == [(0, 3), (3, 3), (6, 2)]
    assert epoch_chunks(0, 8, 4) == [(0, 4), (4, 4)]
    assert epoch_chunks(0, 8, 64) == [(0, 8)]
    # Resumed mid-epoch: counted from the first step left, whatever chunks the interrupted run used.
    assert epoch_chunks(3, 8, 4) == [(3, 4), (7, 1)]
    assert epoch_chunks(5, 8, 4) == [(5, 3)]
    assert epoch_chunks(8, 8, 4) == []


def test_an_epoch_resumed_at_a_step_off_the_chunk_grid_trains_exactly_its_remaining_steps(
    monkeypatch, plain_loop_state
):
    """A checkpoint can fall between another run's chunk boundaries: the rest of its epoch still runs each
    remaining step once (here 4 and a tail of 1 after step 3 of 8), and lands where training without a stop does."""
    monkeypatch.setattr("vaecli.training.loop.STEPS_PER_CHUNK", 3)
    config, dataset = tiny_config(), tiny_dataset()
    stopped = train(config, dataset, should_stop=lambda: True)  # after the first chunk: step 3 of epoch 1
    assert (stopped.stopped_in_epoch, int(stopped.state.step)) == (1, 3)

    monkeypatch.setattr("vaecli.training.loop.STEPS_PER_CHUNK", 4)
    reports = []
    resumed = train(config, dataset, on_progress=reports.append, start=stopped.state).state
    assert [(report.epoch, report.steps_done) for report in reports] == [(1, 7), (1, 8), (2, 4), (2, 8)]
    assert int(resumed.step) == int(plain_loop_state.step) == 16
    assert_trees_close(resumed.params, plain_loop_state.params)
    assert_trees_close(resumed.opt_state, plain_loop_state.opt_state)


def test_a_different_seed_gives_different_weights():
    dataset = tiny_dataset()
    first = train(tiny_config(), dataset).state
    second = train(tiny_config(seed=1), dataset).state
    assert not np.array_equal(leaves(first.params)[0], leaves(second.params)[0])


def test_batch_order_is_a_permutation_fixed_by_seed_and_epoch():
    order = np.asarray(epoch_batch_indices(seed=0, epoch=1, num_images=100, batch_size=32))
    assert order.shape == (3, 32)
    assert len(set(order.ravel())) == 96  # no image twice; the last partial batch is dropped
    np.testing.assert_array_equal(order, epoch_batch_indices(0, 1, 100, 32))
    assert not np.array_equal(order, epoch_batch_indices(0, 2, 100, 32))
    assert not np.array_equal(order, epoch_batch_indices(1, 1, 100, 32))


# An f32 array copied inside the compiled chunk: `%copy.6 = f32[32,784]{1,0} copy(%get-tuple-element.8)`.
ARRAY_COPY = re.compile(r"= (f32\[\d+(?:,\d+)*\])\S* copy\(")


def weights_copied_in_the_compiled_chunk(only_weights: bool = True) -> list[str]:
    """The shapes of the f32 arrays that the compiled training chunk copies (of those shaped like a weight).

    24 images a batch, so that no activation ([24, ...]) has a weight's shape.
    """
    config, dataset = tiny_config(train={"batch_size": 24}), tiny_dataset()
    graphdef, state = init_train_state(config, dataset.image_shape)
    steps_per_epoch = len(dataset.train_images) // config.train.batch_size
    batches = epoch_batch_indices(0, 1, len(dataset.train_images), config.train.batch_size)
    chunk = make_train_chunk(graphdef, config, steps_per_epoch)
    images = device_split(config, dataset.train_images, 0)
    compiled = chunk.lower(state, images, batches, 0, steps=4).compile().as_text()
    weight_shapes = {f"f32[{','.join(map(str, weight.shape))}]" for weight in leaves(state.params)}
    return [shape for shape in ARRAY_COPY.findall(compiled) if shape in weight_shapes or not only_weights]


@pytest.mark.parametrize("steps_per_chunk", [4, 64])  # 4 steps: a whole chunk (unrolled); of 64, a tail (not)
def test_the_compiled_training_chunk_copies_no_weights(monkeypatch, steps_per_chunk):
    """Copies inside the scan cost a memory pass per step: the compiler options remove the weights' copies
    (made even with no lax.cond in the scan), and decoding a single sample without its axis of one the
    activations' transposed copies."""
    monkeypatch.setattr("vaecli.training.loop.STEPS_PER_CHUNK", steps_per_chunk)
    assert weights_copied_in_the_compiled_chunk(only_weights=False) == []


def test_without_the_compiler_options_the_chunk_does_copy_weights(monkeypatch):
    """The positive control of the test above: its pattern does find the copies XLA makes by default (in a scan of
    one step per iteration; unrolled by two, XLA happens to make none)."""
    monkeypatch.setattr("vaecli.training.loop.TRAIN_COMPILER_OPTIONS", {})
    monkeypatch.setattr("vaecli.training.loop.STEP_UNROLL", 1)
    assert "f32[32,784]" in weights_copied_in_the_compiled_chunk()  # the decoder's last matrix, among others


def test_a_batch_larger_than_the_training_set_is_refused():
    with pytest.raises(ConfigError, match=r"train\.batch_size 512 is larger than the 256 training images"):
        train(tiny_config(train={"batch_size": 512}), tiny_dataset())


def test_a_model_with_state_besides_its_parameters_is_refused():
    """TrainState and the checkpoints carry parameters only: BatchNorm's running statistics would be lost."""
    model = build_model(tiny_config().model, (28, 28), seed=0)
    split_model(model)  # parameters only: accepted
    model.normalization = nnx.BatchNorm(4, rngs=nnx.Rngs(0))  # running mean and variance: two arrays
    with pytest.raises(ConfigError, match=r"holds 2 arrays of state besides its parameters \(normalization/"):
        split_model(model)


def test_training_lowers_the_validation_loss(trained_run_dir):
    metrics = [json.loads(line) for line in (trained_run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in metrics] == list(range(1, 7))
    assert metrics[-1]["val_loss"] < metrics[0]["val_loss"] - 20
    for row in metrics:  # training speed leaves validation out; the epoch's time has both
        assert row["images_per_second"] > 0 and row["train_seconds"] > 0 and row["val_seconds"] > 0
        assert row["epoch_seconds"] == pytest.approx(row["train_seconds"] + row["val_seconds"])


def test_checkpoint_round_trips_weights_optimizer_state_and_config(tmp_path):
    config = tiny_config()
    state = train(config, tiny_dataset()).state
    save_checkpoint(tmp_path, state, 2, config, tiny_dataset())

    loaded = load_run(tmp_path)
    assert (loaded.step, loaded.epoch, loaded.config, loaded.image_shape) == (16, 2, config, (28, 28))
    assert_trees_equal(nnx.state(loaded.model, nnx.Param), state.params)
    restored = load_train_state(tmp_path, 16, config, (28, 28))
    assert_trees_equal(restored.opt_state, state.opt_state)
    assert int(restored.step) == 16 and restored.ema_params is None


class KeptRun(NamedTuple):
    config: Config
    dataset: Dataset
    outcome: TrainOutcome
    epoch_results: list[EpochResult]  # as a callback kept them


@pytest.fixture(scope="module")
def ema_run() -> KeptRun:
    """Two tiny epochs with a moving average of the weights, each epoch's result kept by the callback."""
    config, dataset = tiny_config(train={"ema": 0.9}), tiny_dataset()
    kept: list[EpochResult] = []
    outcome = train(config, dataset, on_epoch_end=kept.append)
    return KeptRun(config, dataset, outcome, kept)


def test_an_epoch_result_kept_by_a_callback_stays_readable_after_training(ema_run):
    """The next chunk donates (deletes) the live state's buffers: a kept EpochResult must hold its own copy."""
    first, last = ema_run.epoch_results
    assert all(np.isfinite(leaf).all() for leaf in leaves(first.state))  # reading a deleted buffer raises
    assert int(first.state.step) == 8
    assert trees_differ(first.state.params, last.state.params)
    assert_trees_equal(last.state, ema_run.outcome.state)
    assert_trees_equal(nnx.state(first.model(), nnx.Param), first.state.ema_params)


def test_with_ema_validation_and_the_saved_model_use_the_moving_average(ema_run, tmp_path):
    config, dataset, outcome, epoch_results = ema_run
    state = outcome.state
    assert trees_differ(state.ema_params, state.params)

    evaluate = make_evaluator(outcome.graphdef, config, len(dataset.val_images))
    val_images = device_split(config, dataset.val_images, SPLIT_NUMBERS["val"])
    on_average, on_weights = evaluate(state.ema_params, val_images), evaluate(state.params, val_images)
    assert epoch_results[-1].metrics["val_loss"] == pytest.approx(on_average.loss, rel=1e-6)
    assert abs(on_weights.loss - on_average.loss) > 0.1  # so the check above tells the two apart

    save_checkpoint(tmp_path, state, 2, config, dataset, on_average.loss)
    loaded_weights = nnx.state(load_run(tmp_path).model, nnx.Param)
    assert_trees_equal(loaded_weights, state.ema_params)
    assert trees_differ(loaded_weights, state.params)
    restored = load_train_state(tmp_path, 16, config, dataset.image_shape)  # training goes on from both
    assert_trees_equal(restored.params, state.params)
    assert_trees_equal(restored.ema_params, state.ema_params)


def test_a_run_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_run(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_run(tmp_path / "missing")


# ---- the objective and its schedules ---------------------------------------------------------------


def test_the_kl_weight_rises_linearly_to_beta_over_the_warm_up():
    config = tiny_config(train={"beta": 0.5, "kl_warmup_epochs": 2})  # 2 epochs of 10 steps: 20 warm-up steps
    weights = [float(kl_weight_at(config, 10, jnp.asarray(step))) for step in (0, 4, 9, 18, 19, 20, 500)]
    np.testing.assert_allclose(weights, [0.5 / 20, 0.5 * 5 / 20, 0.5 * 10 / 20, 0.5 * 19 / 20, 0.5, 0.5, 0.5])
    without_warm_up = tiny_config(train={"beta": 0.5})
    assert float(kl_weight_at(without_warm_up, 10, jnp.asarray(0))) == 0.5


def test_with_beta_zero_the_posterior_ignores_the_kl():
    dataset = tiny_dataset()
    val_kl = {}
    for beta in (0.0, 1.0):
        results = []
        train(tiny_config(train={"beta": beta, "learning_rate": 0.01}), dataset, on_epoch_end=results.append)
        val_kl[beta] = results[-1].metrics["val_kl"]
    assert val_kl[0.0] > 5 * val_kl[1.0], val_kl


def test_the_learning_rate_warms_up_from_zero_then_decays_by_cosine_to_one_percent():
    # 4 epochs of 10 steps, 1 epoch of warm-up; optax counts the updates from 0.
    config = tiny_config(train={"epochs": 4, "learning_rate": 0.01, "lr_schedule": "cosine", "lr_warmup_epochs": 1})
    schedule = learning_rate_schedule(config, steps_per_epoch=10)
    rates = np.array([float(schedule(step)) for step in range(41)])
    np.testing.assert_allclose(rates[:11], np.linspace(0.0, 0.01, 11), atol=1e-9)  # linear from 0 to the peak
    assert np.all(np.diff(rates[10:]) < 0)  # then always decaying ...
    assert rates[25] == pytest.approx((0.01 + 0.0001) / 2)  # ... by a cosine: half-way down half-way through
    assert rates[40] == pytest.approx(0.0001)  # ... to 1% of the peak at the end

    constant = learning_rate_schedule(tiny_config(train={"learning_rate": 0.01}), steps_per_epoch=10)
    assert [float(constant(step)) for step in (0, 1, 19, 20, 1000)] == pytest.approx([0.01] * 5)
    warmed = tiny_config(train={"learning_rate": 0.01, "lr_warmup_epochs": 0.5})
    warmed_rates = [float(learning_rate_schedule(warmed, 10)(step)) for step in (0, 1, 5, 6, 1000)]
    assert warmed_rates == pytest.approx([0.0, 0.002, 0.01, 0.01, 0.01])


def test_the_importance_weighted_objective_is_tighter_than_the_elbo(trained_run):
    """For k > 1 the IWAE loss is below the one-sample ELBO loss in expectation (Burda et al. 2016)."""
    images = load_dataset(DataConfig()).split("val")[:64]
    targets = bernoulli_draw(root_key(0), jnp.asarray(images.reshape(64, -1))).astype(jnp.float32)
    keys = jax.random.split(root_key(1), 200)
    model = trained_run.model

    def mean_losses(samples: int) -> np.ndarray:  # the batch's mean loss under each key
        batch_loss = jax.vmap(lambda key: jnp.mean(image_losses(model, targets, key, 1.0, samples).loss))
        return np.asarray(jax.jit(batch_loss)(keys))

    elbo_losses, iwae_losses = mean_losses(1), mean_losses(5)
    gap = elbo_losses.mean() - iwae_losses.mean()
    standard_error = np.sqrt((elbo_losses.var() + iwae_losses.var()) / len(keys))
    assert gap > 5 * standard_error, (gap, standard_error)


# ---- sampling ---------------------------------------------------------------------------------------


def test_reconstructions_through_the_posterior_beat_prior_samples_by_far(trained_run):
    """The point of the tool: q(z|x) carries the image's identity, p(z) does not."""
    test_images = load_dataset(DataConfig()).split("test")[:200]
    targets = jnp.asarray(test_images.reshape(200, -1) / 255.0)

    def log_likelihood(means):  # log p(x | decoded means), nats per image
        probabilities = jnp.clip(jnp.asarray(means.reshape(200, -1)), 1e-4, 1 - 1e-4)
        return np.asarray(Bernoulli().log_prob(jnp.log(probabilities) - jnp.log1p(-probabilities), targets))

    _, reconstructions = reconstruct(trained_run.model, test_images, binarized=True, num_samples=1, seed=0)
    posterior = log_likelihood(reconstructions[:, 0])
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


@dataclasses.dataclass(frozen=True)
class DecoderOutputAsIs:
    """A likelihood whose mean is the decoder's output itself."""

    def mean(self, decoder_output: jax.Array) -> jax.Array:
        return decoder_output


class LatentEcho(nnx.Module):
    """Stands in for a VAE whose decoder returns its latent: generate() then gives the prior's draws themselves."""

    def __init__(self, latent_dim: int):
        self.latent_dim = latent_dim
        self.image_shape = (latent_dim,)
        self.likelihood = DecoderOutputAsIs()
        self.gain = nnx.Param(jnp.ones(()))

    def decode(self, latents: jax.Array) -> jax.Array:
        return self.gain[...] * latents

    def decode_images(self, latents: jax.Array, row_keys: jax.Array) -> jax.Array:
        return self.likelihood.mean(self.decode(latents))

    def prior_images(self, seed: jax.Array, indices: jax.Array, temperature: jax.Array) -> jax.Array:
        return prior_images(self, seed, indices, temperature)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_sampling_draws_from_its_own_stream_not_the_initialisation_key(seed):
    """The same --seed for init and generate: with one shared key, the first prior draw followed the
    encoder's first initial weights (correlation 0.997)."""
    first_latent = generate(LatentEcho(latent_dim=64), 1, seed=seed)[0]
    assert first_latent.shape == (64,) and 0.5 < first_latent.std() < 2  # standard-normal draws
    encoder_kernel = build_model(tiny_config().model, (28, 28), seed).encoder.layers[0].kernel[...]
    correlation = np.corrcoef(first_latent, np.asarray(encoder_kernel).ravel()[:64])[0, 1]
    assert abs(correlation) < 0.5, correlation


def test_temperature_scales_the_prior(trained_run):
    cold = generate(trained_run.model, 64, seed=0, temperature=0.01)
    warm = generate(trained_run.model, 64, seed=0, temperature=1.0)
    # Near T = 0 every z is about 0, so all samples are about the same image.
    assert cold.std(axis=0).max() < 0.05
    assert warm.std(axis=0).max() > 0.2


def test_reconstruct_samples_differ_but_the_mean_mode_repeats(trained_run):
    images = load_dataset(DataConfig()).split("test")[:3]
    _, sampled = reconstruct(trained_run.model, images, True, num_samples=3, seed=0)
    assert sampled.shape == (3, 3, 28, 28)
    assert not np.array_equal(sampled[:, 0], sampled[:, 1])
    np.testing.assert_array_equal(sampled, reconstruct(trained_run.model, images, True, num_samples=3, seed=0)[1])
    np.testing.assert_array_equal(sampled[:2], reconstruct(trained_run.model, images[:2], True, num_samples=3)[1])
    _, means = reconstruct(trained_run.model, images, True, num_samples=2, use_mean=True)
    np.testing.assert_array_equal(means[:, 0], means[:, 1])


def decoded_posterior_means(model, views: np.ndarray) -> np.ndarray:
    """What use_mean reconstructs from these encoder inputs: the decoded posterior mean."""
    posterior_mean, _ = model.encode(jnp.asarray(views.reshape(len(views), -1)))
    return np.asarray(model.likelihood.mean(model.decode(posterior_mean))).reshape(views.shape)


def test_a_binarized_model_encodes_a_binary_draw_of_each_input_and_a_grey_model_the_grey_levels():
    """q(z|x) is only fitted to what training fed it: binary draws, or for binarize none the grey levels."""
    assert encoder_sees_binary(tiny_config()) and encoder_sees_binary(tiny_config(data={"binarize": "static"}))
    assert not encoder_sees_binary(tiny_config(data={"binarize": "none"}))
    images = load_dataset(DataConfig()).split("test")[:32]
    model = build_model(tiny_config().model, (28, 28), seed=0)

    seen, means = reconstruct(model, images, binarized=True, num_samples=1, seed=0, use_mean=True)
    assert seen.shape == (32, 28, 28) and set(np.unique(seen)) == {0.0, 1.0}
    assert abs(seen.mean() - images.mean() / 255) < 0.01  # a draw from the intensities ...
    assert not np.array_equal(seen, images >= 128)  # ... not a threshold
    np.testing.assert_array_equal(seen, reconstruct(model, images, True, seed=0, use_mean=True)[0])
    assert not np.array_equal(seen, reconstruct(model, images, True, seed=1, use_mean=True)[0])
    np.testing.assert_allclose(means[:, 0], decoded_posterior_means(model, seen), rtol=1e-5, atol=1e-6)

    grey_seen, grey_means = reconstruct(model, images, binarized=False, num_samples=1, seed=0, use_mean=True)
    np.testing.assert_allclose(grey_seen, images / 255, rtol=1e-6)
    np.testing.assert_array_equal(grey_seen, reconstruct(model, images, False, seed=1, use_mean=True)[0])
    np.testing.assert_allclose(grey_means[:, 0], decoded_posterior_means(model, grey_seen), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("n", "samples"), [(0, 1), (1, 0)])
def test_sampling_refuses_counts_below_one(trained_run, n, samples):
    with pytest.raises(UsageError):
        generate(trained_run.model, n) if n < 1 else reconstruct(
            trained_run.model, np.zeros((1, 28, 28), np.uint8), True, samples
        )


# ---- binarization and evaluation ---------------------------------------------------------------------


def test_static_binarization_is_one_fixed_draw_per_split():
    images = load_dataset(DataConfig()).split("val")[:100]
    config = tiny_config(data={"binarize": "static"})
    first, again = np.asarray(device_split(config, images, 1)), np.asarray(device_split(config, images, 1))
    np.testing.assert_array_equal(first, again)
    assert set(np.unique(first)) <= {0, 255}
    assert abs(first.mean() - images.mean()) < 2.0  # a draw from the intensities, not a threshold
    assert not np.array_equal(first, np.asarray(device_split(config, images, 0)))
    assert not np.array_equal(
        first, np.asarray(device_split(tiny_config(seed=1, data={"binarize": "static"}), images, 1))
    )
    unchanged = np.asarray(device_split(tiny_config(data={"binarize": "dynamic"}), images, 1))
    np.testing.assert_array_equal(unchanged, images)  # dynamic draws happen inside each step instead


def test_static_binarization_trains():
    state = train(tiny_config(data={"binarize": "static"}), tiny_dataset()).state
    assert all(np.isfinite(leaf).all() for leaf in leaves(state.params))


def test_dynamic_binarization_draws_each_pixel_with_its_intensity():
    levels = jnp.array([0, 1, 64, 128, 254, 255], jnp.uint8)
    images = jnp.broadcast_to(levels, (20_000, 6))
    frequencies = np.asarray(jnp.mean(bernoulli_draw(root_key(0), images), axis=0))
    assert frequencies[0] == 0.0 and frequencies[-1] == 1.0  # black never, white always
    np.testing.assert_allclose(frequencies[1:-1], np.asarray(levels[1:-1]) / 255, atol=0.01)
    assert not np.array_equal(bernoulli_draw(root_key(0), images), bernoulli_draw(root_key(1), images))


def test_validation_padding_is_masked_out(trained_run):
    """1,500 images = one full batch of 1,000 and one padded to 1,000: the padding must not count."""
    config = trained_run.config
    images = load_dataset(DataConfig()).split("train")[:1500]
    graphdef, params = nnx.split(trained_run.model, nnx.Param)
    evaluation = make_evaluator(graphdef, config, 1500)(params, jnp.asarray(images))

    eval_key = jax.random.fold_in(root_key(config.seed), EVALUATION_STREAM)
    totals = np.zeros(2)
    for batch_number, batch in enumerate((images[:1000], images[1000:])):
        key = jax.random.fold_in(eval_key, batch_number)
        terms = batch_image_losses(trained_run.model, jnp.asarray(batch), key, "dynamic")
        totals += [float(jnp.sum(terms.reconstruction)), float(jnp.sum(terms.kl))]
    np.testing.assert_allclose([evaluation.reconstruction, evaluation.kl], totals / 1500, rtol=1e-4)
    assert evaluation.loss == pytest.approx(evaluation.negative_elbo, rel=1e-6)


def test_a_checkpoint_with_incomplete_metadata_is_a_clear_error(tmp_path):
    config = tiny_config()
    state = train(config, tiny_dataset()).state
    save_checkpoint(tmp_path, state, 2, config, tiny_dataset())
    meta_file = tmp_path / "checkpoints" / "16" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    del meta["preprocessing"]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="lacks preprocessing in its metadata"):
        load_run(tmp_path)


def test_training_and_validation_compile_once_for_any_number_of_epochs(caplog, monkeypatch):
    """Three epochs of whole chunks and a tail, validation with a padded last batch: one compilation for the
    whole chunks, one for the tail, one for validation, however many epochs."""
    monkeypatch.setattr("vaecli.training.loop.STEPS_PER_CHUNK", 4)  # 288 images in batches of 32: 9 steps, 4 + 4 + 1
    # 500 validation images: batches of 500, so no padding; 1,100 gives a full batch and a padded one.
    dataset = dataclasses.replace(
        tiny_dataset(train_count=288), val_images=load_dataset(DataConfig()).split("train")[:1100]
    )
    config = tiny_config(train={"epochs": 3})
    with caplog.at_level(logging.WARNING), jax.log_compiles(True):
        train(config, dataset)
    compiled = [record.getMessage() for record in caplog.records if "Finished XLA compilation" in record.getMessage()]
    assert sum("jit(chunk)" in message for message in compiled) == 2, compiled
    assert sum("jit(totals)" in message for message in compiled) == 1, compiled
