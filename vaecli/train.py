"""Training: one jitted update (loss, gradient, Adam), batched evaluation, and the epoch loop.

Randomness is a pure function of (seed, purpose, counter): the batch order of epoch e comes from
fold_in(order_key, e) and the binarization and reparameterization noise of step s from
fold_in(step_key, s), so a run is reproducible and can be resumed from any step.
The loop never prints: it reports through callbacks that the CLI renders.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vaecli.config import Config
from vaecli.data import Dataset
from vaecli.errors import ConfigError
from vaecli.model import VAE, build_model
from vaecli.objectives import negative_elbo_terms

# Purposes for jax.random.fold_in on the run's root key: each stream of randomness has its own.
STEP_NOISE_STREAM = 1
BATCH_ORDER_STREAM = 2
EVALUATION_STREAM = 3
STATIC_BINARIZATION_STREAM = 4
# Validation images per compiled evaluation call; the last partial batch is padded and masked.
EVAL_BATCH_SIZE = 1000


class TrainState(NamedTuple):
    """Everything that changes during training (a pytree, so it passes through jit and checkpoints)."""

    params: nnx.State
    opt_state: optax.OptState
    step: jax.Array  # int32 scalar: updates applied so far


@dataclass(frozen=True)
class StepProgress:
    """A progress report, sent every few steps without stalling the device."""

    epoch: int
    steps_done: int  # within this epoch
    steps_per_epoch: int
    train_loss: float  # mean negative ELBO of a recent step, nats per image
    images_per_second: float


@dataclass(frozen=True)
class EpochResult:
    """What one epoch produced: metrics for metrics.jsonl and the state to checkpoint."""

    epoch: int
    graphdef: nnx.GraphDef
    state: TrainState
    metrics: dict[str, Any]

    def model(self) -> VAE:
        """The model with this epoch's weights."""
        return nnx.merge(self.graphdef, self.state.params)


def root_key(seed: int) -> jax.Array:
    """The run's root PRNG key; every other key is folded from it."""
    return jax.random.key(seed)


def images_to_pixels(images_uint8: jax.Array) -> jax.Array:
    """uint8 [batch, H, W...] -> float32 [batch, pixels] in [0, 1]; done inside the compiled step."""
    return images_uint8.reshape(images_uint8.shape[0], -1).astype(jnp.float32) / 255.0


def bernoulli_targets(pixels: jax.Array, key: jax.Array, binarize: str) -> jax.Array:
    """The targets the decoder must explain: fresh binary draws (dynamic) or the pixels as they are."""
    if binarize == "dynamic":
        return jax.random.bernoulli(key, pixels).astype(pixels.dtype)
    return pixels


def step_binarization(config: Config) -> str:
    """What each step does to its batch: static data was binarized once up front, so it needs nothing."""
    return "dynamic" if config.data.binarize == "dynamic" else "none"


@jax.jit
def binarize_once(images_uint8: jax.Array, key: jax.Array) -> jax.Array:
    """One fixed Bernoulli draw per pixel from its intensity, as uint8 0 or 255 (static binarization)."""
    return jnp.where(jax.random.bernoulli(key, images_uint8 / 255.0), 255, 0).astype(jnp.uint8)


def device_split(config: Config, images_uint8: np.ndarray, split_number: int) -> jax.Array:
    """A split's images on the device as uint8; binarized once here when data.binarize is static."""
    images = jax.device_put(images_uint8)
    if config.data.binarize != "static":
        return images
    static_key = jax.random.fold_in(jax.random.fold_in(root_key(config.seed), STATIC_BINARIZATION_STREAM), split_number)
    return binarize_once(images, static_key)


def negative_elbo(model: VAE, images_uint8: jax.Array, key: jax.Array, binarize: str):
    """Per-image (reconstruction, KL) for one batch, with z drawn from q(z|x) by reparameterization."""
    binarize_key, noise_key = jax.random.split(key)
    targets = bernoulli_targets(images_to_pixels(images_uint8), binarize_key, binarize)
    logits, posterior_mean, posterior_log_variance = model(targets, noise_key)
    return negative_elbo_terms(logits, targets, posterior_mean, posterior_log_variance)


def make_optimizer(config: Config) -> optax.GradientTransformation:
    """Adam at the configured learning rate."""
    return optax.adam(config.train.learning_rate)


def init_train_state(config: Config, image_shape: tuple[int, ...]) -> tuple[nnx.GraphDef, TrainState]:
    """A fresh model (weights from the seed) and optimizer state at step 0."""
    model = build_model(config.model, image_shape, config.seed)
    graphdef, params = nnx.split(model, nnx.Param)
    opt_state = make_optimizer(config).init(params)
    return graphdef, TrainState(params, opt_state, jnp.zeros((), jnp.int32))


def make_update_step(graphdef: nnx.GraphDef, config: Config) -> Callable:
    """The jitted update: gather the batch on the device, loss, gradient and Adam step in one call."""
    optimizer = make_optimizer(config)
    step_key = jax.random.fold_in(root_key(config.seed), STEP_NOISE_STREAM)
    binarize = step_binarization(config)

    def batch_loss(params, images_uint8, key):
        reconstruction, kl = negative_elbo(nnx.merge(graphdef, params), images_uint8, key, binarize)
        return jnp.mean(reconstruction + kl)

    def update(state: TrainState, train_images: jax.Array, epoch_batches: jax.Array, batch_number: jax.Array):
        key = jax.random.fold_in(step_key, state.step)
        batch_images = train_images[epoch_batches[batch_number]]
        loss, grads = jax.value_and_grad(batch_loss)(state.params, batch_images, key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state, state.step + 1), loss

    # The old state is donated: its buffers are reused for the new one instead of copied.
    return jax.jit(update, donate_argnums=0)


def epoch_batch_indices(seed: int, epoch: int, num_images: int, batch_size: int) -> jax.Array:
    """[steps, batch] indices of epoch `epoch`: a permutation from (seed, epoch), last partial batch dropped."""
    order_key = jax.random.fold_in(jax.random.fold_in(root_key(seed), BATCH_ORDER_STREAM), epoch)
    permutation = jax.random.permutation(order_key, num_images)
    steps = num_images // batch_size
    return permutation[: steps * batch_size].reshape(steps, batch_size)


def make_evaluator(graphdef: nnx.GraphDef, config: Config, num_images: int) -> Callable:
    """evaluate(params, images) -> (mean negative ELBO, mean reconstruction, mean KL) in nats/image.

    Fixed-size batches (the last one padded and masked) keep it to one compilation; a fixed key
    makes the estimate the same function of the weights every epoch, so epochs are comparable.
    """
    batch_size = min(EVAL_BATCH_SIZE, num_images)
    num_batches = -(-num_images // batch_size)
    padded_indices = np.arange(num_batches * batch_size).reshape(num_batches, batch_size)
    masks = jnp.asarray(padded_indices < num_images, jnp.float32)
    batch_indices = jnp.asarray(np.minimum(padded_indices, num_images - 1), jnp.int32)
    eval_key = jax.random.fold_in(root_key(config.seed), EVALUATION_STREAM)
    binarize = step_binarization(config)

    @jax.jit
    def batch_sums(params, images_uint8, indices, mask, batch_number):
        key = jax.random.fold_in(eval_key, batch_number)
        reconstruction, kl = negative_elbo(nnx.merge(graphdef, params), images_uint8[indices], key, binarize)
        return jnp.sum(reconstruction * mask), jnp.sum(kl * mask)

    def evaluate(params, images_uint8: jax.Array) -> tuple[float, float, float]:
        totals = [batch_sums(params, images_uint8, batch_indices[b], masks[b], b) for b in range(num_batches)]
        reconstruction, kl = (float(total) / num_images for total in jnp.sum(jnp.array(totals), axis=0))
        return reconstruction + kl, reconstruction, kl

    return evaluate


def check_trainable(config: Config, dataset: Dataset) -> None:
    """Refuse settings that cannot run on this dataset, before any compilation."""
    num_train = len(dataset.train_images)
    if config.train.batch_size > num_train:
        raise ConfigError(
            f"train.batch_size {config.train.batch_size} is larger than the {num_train} training images "
            f"of {dataset.name}; set train.batch_size to at most {num_train}"
        )
    if len(dataset.val_images) == 0:
        raise ConfigError(f"{dataset.name} has no validation images; use a dataset with more images")


def train(
    config: Config,
    dataset: Dataset,
    on_progress: Callable[[StepProgress], None] | None = None,
    on_epoch_end: Callable[[EpochResult], None] | None = None,
    progress_every: int = 20,
) -> tuple[nnx.GraphDef, TrainState]:
    """Train for config.train.epochs epochs; return the model's graph definition and final state."""
    check_trainable(config, dataset)

    # ---- set-up: data on the device once, as uint8 ------------------------------------------------
    train_images = device_split(config, dataset.train_images, split_number=0)
    val_images = device_split(config, dataset.val_images, split_number=1)
    graphdef, state = init_train_state(config, dataset.image_shape)
    update = make_update_step(graphdef, config)
    evaluate = make_evaluator(graphdef, config, len(dataset.val_images))
    batch_size = config.train.batch_size

    # ---- the loop ---------------------------------------------------------------------------------
    for epoch in range(1, config.train.epochs + 1):
        batches = epoch_batch_indices(config.seed, epoch, len(dataset.train_images), batch_size)
        steps_per_epoch = batches.shape[0]
        started = time.perf_counter()
        step_losses = []
        reported_loss = None  # a loss some steps old: reading it does not wait on the newest step
        for step_in_epoch in range(steps_per_epoch):
            state, loss = update(state, train_images, batches, step_in_epoch)
            step_losses.append(loss)
            done = step_in_epoch + 1
            if on_progress and (done % progress_every == 0 or done == steps_per_epoch):
                if reported_loss is not None:
                    elapsed = time.perf_counter() - started
                    on_progress(
                        StepProgress(epoch, done, steps_per_epoch, float(reported_loss), done * batch_size / elapsed)
                    )
                reported_loss = loss
        train_loss = float(jnp.mean(jnp.stack(step_losses)))  # waits for the epoch's last step
        epoch_seconds = time.perf_counter() - started
        if on_progress:
            on_progress(
                StepProgress(
                    epoch, steps_per_epoch, steps_per_epoch, train_loss, steps_per_epoch * batch_size / epoch_seconds
                )
            )

        # ---- evaluation -------------------------------------------------------------------------
        val_loss, val_recon, val_kl = evaluate(state.params, val_images)
        metrics = {
            "epoch": epoch,
            "step": int(state.step),
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_elbo": -val_loss,
            "val_recon": val_recon,
            "val_kl": val_kl,
            "epoch_seconds": epoch_seconds,
            "images_per_second": steps_per_epoch * batch_size / epoch_seconds,
        }
        if on_epoch_end:
            on_epoch_end(EpochResult(epoch, graphdef, state, metrics))
    return graphdef, state
