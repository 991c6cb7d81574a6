"""Training: one jitted update (loss, gradient, Adam), batched evaluation, and the epoch loop.

Randomness is a pure function of (seed, purpose, counter): the batch order of epoch e comes from
NumPy's generator seeded with (stream, seed, e), and the binarization and reparameterization noise
of step s from fold_in(step_key, s), so a run is reproducible and can be resumed from any step.
The loop never prints: it reports through callbacks that the CLI renders.

Speed (see `make bench`): the dataset lives on the device as uint8 and each batch is gathered there
(only the epoch's index table crosses over, once per epoch);
steps run STEPS_PER_CHUNK at a time inside one compiled lax.scan with the state's buffers donated,
so Python dispatches a few calls per epoch instead of one per step (the epoch's remainder runs as
one shorter scan of its own); progress reads the loss of the chunk before the one just dispatched,
so the device never waits for the host.

Devices (vaecli.common.devices): each batch is split over train.devices devices, the weights replicated; a
step's noise and binarization stay functions of (seed, step, image) whatever the layout.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vaecli.common.config import Config
from vaecli.common.devices import Placement, check_batch_splits, device_count_for, placement_over
from vaecli.common.errors import ConfigError
from vaecli.data.dataset import Dataset
from vaecli.models.objectives import (
    importance_log_weights,
    importance_weighted_bound,
    kl_to_standard_normal,
)
from vaecli.models.targets import SPLIT_NUMBERS, bernoulli_targets, device_split, root_key
from vaecli.models.vae import VAE, build_model, check_buildable, latents_from_noise, set_output_bias

# Purposes for jax.random.fold_in on the run's root key (and the batch order's NumPy seed): each stream of
# randomness has its own.
STEP_NOISE_STREAM = 1
BATCH_ORDER_STREAM = 2
EVALUATION_STREAM = 3
# Validation images per evaluation batch; the last partial batch is padded and masked.
EVAL_BATCH_SIZE = 1000
# Update steps per compiled call: enough to make dispatch overhead vanish, few enough that progress
# arrives several times a second. The steps an epoch has left after its whole chunks run as one
# shorter chunk, compiled for its own length.
STEPS_PER_CHUNK = 64
# Steps per iteration of that scan's loop. Two: on the reference MLP, 5% faster per step (2 CPU cores, median of
# 30 paired chunks); 4 gained no more. The gain is not the batch's gather and binarization overlapping a step (a
# chunk without them runs at 0.994 of one with them): XLA schedules the two steps as one program, and a profile
# shows it computing the second step's Adam moments from both steps' gradients in one pass over them.
STEP_UNROLL = 2
# XLA's default copy insertion copies six weight arrays (the 400x784 decoder matrix among them) on every step of
# the reference MLP, in a scan without any lax.cond and in a lone step alike: it cannot prove that the backward
# pass has read the old weights before the update overwrites them in place. Its region analysis proves it and
# leaves no copy. Each backend reads its own option; the GPU's is the same analysis, asked for the same reason.
TRAIN_COMPILER_OPTIONS = {
    "xla_cpu_copy_insertion_use_region_analysis": True,
    "xla_gpu_copy_insertion_use_region_analysis": True,
}
# apply_if_finite applies a non-finite update anyway after this many in a row; we never want that.
NEVER_GIVE_UP = 2**31 - 1


class TrainState(NamedTuple):
    """Everything that changes during training (a pytree, so it passes through jit and checkpoints)."""

    params: nnx.State
    opt_state: optax.OptState
    step: jax.Array  # int32 scalar: updates applied so far
    # The exponential moving average of params (train.ema), None when off. Validation, evaluation and
    # sampling use it; the optimizer never sees it.
    ema_params: nnx.State | None = None

    def inference_params(self) -> nnx.State:
        """The weights to evaluate and sample with: the moving average when kept, else the weights."""
        return self.params if self.ema_params is None else self.ema_params


@dataclass(frozen=True)
class StepProgress:
    """A progress report, sent every few steps without stalling the device."""

    epoch: int
    epochs: int  # the run's total, config.train.epochs
    steps_done: int  # within this epoch
    steps_per_epoch: int
    train_loss: float  # mean negative ELBO over the chunk of steps just finished, nats per image
    images_per_second: float


@dataclass(frozen=True)
class EpochResult:
    """What one epoch produced: metrics for metrics.jsonl and the state to checkpoint."""

    epoch: int
    graphdef: nnx.GraphDef
    state: TrainState
    metrics: dict[str, Any]

    def model(self) -> VAE:
        """The model with this epoch's weights (their moving average when train.ema is set)."""
        return nnx.merge(self.graphdef, self.state.inference_params())


def step_binarization(config: Config) -> str:
    """What each step does to its batch: static data was binarized once up front, so it needs nothing."""
    return "dynamic" if config.data.binarize == "dynamic" else "none"


@jax.jit
class ImageLosses(NamedTuple):
    """Per-image terms of one batch, in nats: the objective trained, and the ELBO's two parts."""

    loss: jax.Array  # -ELBO with the KL weighted (k = 1), or -IWAE bound (k > 1)
    reconstruction: jax.Array  # -log p(x|z), averaged over the k samples
    kl: jax.Array  # KL(q(z|x) || p(z)), analytic


def image_losses(
    model: VAE, targets: jax.Array, noise_key: jax.Array, kl_weight: jax.Array | float = 1.0, samples: int = 1
) -> ImageLosses:
    """The objective for a batch of targets [batch, values] in [0, 1], with z ~ q(z|x) by reparameterization.

    samples = 1: reconstruction + kl_weight * KL (the analytic KL, lower variance than sampling it).
    samples = k > 1: the negative IWAE bound -log (1/k) sum_k p(x|z_k) p(z_k)^w / q(z_k|x)^w, w = kl_weight.
    """
    posterior_mean, posterior_log_variance = model.encode(targets)
    kl = kl_to_standard_normal(posterior_mean, posterior_log_variance)
    noise = jax.random.normal(noise_key, (samples, *posterior_mean.shape), posterior_mean.dtype)
    latents = latents_from_noise(posterior_mean, posterior_log_variance, noise)
    if samples == 1:  # decoded without the axis of one sample, which costs XLA two transposed copies per step
        reconstruction = -model.likelihood.log_prob(model.decode(latents[0], targets), targets)
        return ImageLosses(reconstruction + kl_weight * kl, reconstruction, kl)
    log_likelihood = model.likelihood.log_prob(model.decode(latents, targets), targets)  # [samples, batch]
    reconstruction = -jnp.mean(log_likelihood, axis=0)
    log_weights = importance_log_weights(log_likelihood, latents, noise, posterior_log_variance, kl_weight)
    return ImageLosses(-importance_weighted_bound(log_weights, axis=0), reconstruction, kl)


def batch_image_losses(
    model: VAE, images_uint8: jax.Array, key: jax.Array, binarize: str, kl_weight=1.0, samples: int = 1
) -> ImageLosses:
    """image_losses() of a uint8 batch, binarized first when `binarize` is dynamic (with part of `key`)."""
    binarize_key, noise_key = jax.random.split(key)
    targets = bernoulli_targets(images_uint8, binarize_key, binarize)
    return image_losses(model, targets, noise_key, kl_weight, samples)


def kl_weight_at(config: Config, steps_per_epoch: int, step: jax.Array) -> jax.Array:
    """The KL weight of update `step` (0-based): rising linearly to train.beta over kl_warmup_epochs."""
    warmup_steps = config.train.kl_warmup_epochs * steps_per_epoch
    if warmup_steps <= 0:
        return jnp.asarray(config.train.beta, jnp.float32)
    return config.train.beta * jnp.minimum(1.0, (step + 1).astype(jnp.float32) / warmup_steps)


def ema_decay_at(decay: float, step: jax.Array) -> jax.Array:
    """The moving average's decay at update `step`: min(decay, (1 + step) / (10 + step)).

    A fixed 0.999 would still weigh the random initial weights by e^-1 after 1,000 steps; the warm-up
    (as in TensorFlow's ExponentialMovingAverage with num_updates) makes the average follow the
    weights closely at first, so short runs gain from it too.
    """
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def learning_rate_schedule(config: Config, steps_per_epoch: int) -> optax.Schedule:
    """train.learning_rate after a linear warm-up of lr_warmup_epochs; cosine-decayed to 1% when asked."""
    peak = config.train.learning_rate
    warmup_steps = round(config.train.lr_warmup_epochs * steps_per_epoch)
    total_steps = config.train.epochs * steps_per_epoch
    if config.train.lr_schedule == "cosine":
        decay_steps = max(total_steps, warmup_steps + 1)
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, decay_steps, end_value=peak / 100)
    if warmup_steps == 0:
        return optax.constant_schedule(peak)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup_steps), optax.constant_schedule(peak)], [warmup_steps]
    )


def make_optimizer(config: Config, steps_per_epoch: int = 1) -> optax.GradientTransformation:
    """Adam on the configured schedule, after global-norm clipping when train.clip_norm is set.

    With train.skip_nonfinite, optax's apply_if_finite leaves the state untouched on a step whose
    update is not finite (and counts it), instead of letting one NaN poison every weight.
    The state's structure does not depend on steps_per_epoch (only the schedule's values do).
    """
    optimizer = optax.adam(learning_rate_schedule(config, steps_per_epoch))
    if config.train.clip_norm is not None:
        optimizer = optax.chain(optax.clip_by_global_norm(config.train.clip_norm), optimizer)
    if config.train.skip_nonfinite:
        optimizer = optax.apply_if_finite(optimizer, max_consecutive_errors=NEVER_GIVE_UP)
    return optimizer


def split_model(model: VAE) -> tuple[nnx.GraphDef, nnx.State]:
    """(graph definition, parameters), refusing a model that holds state other than parameters.

    TrainState, the checkpoints and the jitted step carry parameters only: a layer with running
    statistics (BatchNorm) would silently lose them, so the conv model normalises with GroupNorm.
    """
    graphdef, params, other = nnx.split(model, nnx.Param, ...)
    other_leaves = jax.tree_util.tree_leaves_with_path(other)
    if other_leaves:
        first_path = "/".join(str(getattr(key, "key", key)) for key in other_leaves[0][0])
        raise ConfigError(
            f"the model holds {len(other_leaves)} arrays of state besides its parameters ({first_path} ...), "
            "which vaecli does not train or checkpoint; use layers without running statistics (GroupNorm, "
            "not BatchNorm)"
        )
    return graphdef, params


def init_train_state(
    config: Config, image_shape: tuple[int, ...], train_images: np.ndarray | None = None
) -> tuple[nnx.GraphDef, TrainState]:
    """A fresh model (weights from the seed; output bias from `train_images` when given) at step 0."""
    model = build_model(config.model, image_shape, config.seed)
    if train_images is not None:
        set_output_bias(model, train_images)
    graphdef, params = split_model(model)
    opt_state = make_optimizer(config).init(params)
    ema_params = None if config.train.ema is None else jax.tree.map(jnp.copy, params)
    return graphdef, TrainState(params, opt_state, jnp.zeros((), jnp.int32), ema_params)


def make_train_chunk(
    graphdef: nnx.GraphDef, config: Config, steps_per_epoch: int, placement: Placement | None = None
) -> Callable:
    """The jitted update, several steps per call: gather each batch on the device, loss, gradient, Adam.

    chunk(state, train_images, epoch_batches, first_step, steps) runs steps first_step .. first_step + steps - 1
    of the epoch (epoch_batches: [steps_per_epoch, batch] indices) and returns the new state and their losses.
    `steps` is static: each length compiles once, the whole chunks and the epoch's shorter tail, so the program
    is a plain scan of updates, with no step past the epoch's end to skip under a lax.cond.
    With `placement` (default: the first device), each gathered batch is split over its devices; the state,
    the images and the index table come in replicated on them (Placement.replicate) and the state and the
    losses go out replicated.
    """
    placement = placement or placement_over(1)
    update = make_update(graphdef, config, steps_per_epoch)

    def chunk(state: TrainState, train_images: jax.Array, epoch_batches: jax.Array, first_step: jax.Array, steps: int):
        def one_step(state: TrainState, step_in_epoch: jax.Array) -> tuple[TrainState, jax.Array]:
            batch_indices = jax.lax.dynamic_index_in_dim(epoch_batches, step_in_epoch, keepdims=False)
            # Each device gathers its share of the batch from its own copy of the images.
            return update(state, placement.shard_batch(train_images[batch_indices]))

        if steps == 1:  # no loop around a lone step: see steps_per_chunk_for on convolutions inside loops
            state, loss = one_step(state, first_step)
            return state, loss[None]
        # Only whole chunks unrolled: an epoch's tail runs once per epoch, where unrolling would save less than
        # the 0.3-0.6 s it adds to compiling (measured), and short runs (and tests) are all tail.
        unroll = STEP_UNROLL if steps == STEPS_PER_CHUNK else 1
        return jax.lax.scan(one_step, state, first_step + jnp.arange(steps), unroll=unroll)

    # The old state is donated: its buffers are reused for the new one instead of copied.
    return jax.jit(
        chunk,
        static_argnames="steps",
        donate_argnums=0,
        compiler_options=TRAIN_COMPILER_OPTIONS,
        **placement.jit_options(),
    )


def make_update(graphdef: nnx.GraphDef, config: Config, steps_per_epoch: int) -> Callable:
    """update(state, batch_images_uint8) -> (state after one step, the step's loss or NaN): one plain step.

    The noise (binarization, reparameterization) of step s comes from fold_in(step_key, s), so a
    step's outcome depends only on the state and the batch: the chunked loop and a plain loop agree.
    """
    optimizer = make_optimizer(config, steps_per_epoch)
    step_key = jax.random.fold_in(root_key(config.seed), STEP_NOISE_STREAM)
    binarize = step_binarization(config)
    samples = config.train.iw_samples
    ema_decay = config.train.ema

    def batch_loss(params, images_uint8, key, kl_weight):
        model = nnx.merge(graphdef, params)
        return jnp.mean(batch_image_losses(model, images_uint8, key, binarize, kl_weight, samples).loss)

    def update(state: TrainState, batch_images: jax.Array) -> tuple[TrainState, jax.Array]:
        key = jax.random.fold_in(step_key, state.step)
        kl_weight = kl_weight_at(config, steps_per_epoch, state.step)
        loss, grads = jax.value_and_grad(batch_loss)(state.params, batch_images, key, kl_weight)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        # Only the loss is checked on every step: a norm over all gradients and updates cost a quarter
        # of the step (measured). A non-finite gradient or update makes the weights, and so the next
        # loss, non-finite: caught one step later, before any checkpoint. When skipping,
        # apply_if_finite has dropped such a step (non-finite gradient) and counted it.
        finite = jnp.isfinite(loss)
        if config.train.skip_nonfinite:
            skipped_before = optax.tree_utils.tree_get(state.opt_state, "total_notfinite")
            finite &= optax.tree_utils.tree_get(opt_state, "total_notfinite") == skipped_before
        reported_loss = jnp.where(finite, loss, jnp.nan)
        params = optax.apply_updates(state.params, updates)
        ema_params = state.ema_params
        if ema_decay is not None:
            decay = ema_decay_at(ema_decay, state.step)
            ema_params = jax.tree.map(lambda ema, new: decay * ema + (1 - decay) * new, ema_params, params)
        return TrainState(params, opt_state, state.step + 1, ema_params), reported_loss

    return update


def steps_per_chunk_for(config: Config) -> int:
    """Update steps per compiled call: STEPS_PER_CHUNK, or 1 for the conv model.

    XLA's CPU backend runs convolutions inside a loop (lax.scan) an order of magnitude slower than
    the same convolutions at the top level (measured: 5 steps of the 32x32x3 conv model took 23 s in
    a scan, 1.6 s as 5 calls); a conv step is long enough that dispatching each one costs nothing.
    """
    return 1 if config.model.arch == "conv" else STEPS_PER_CHUNK


def epoch_batch_indices(seed: int, epoch: int, num_images: int, batch_size: int) -> np.ndarray:
    """[steps, batch] int32 indices of epoch `epoch`: a permutation from (seed, epoch), last partial batch dropped.

    Drawn on the host: NumPy shuffles 60,000 indices in about a millisecond while the device trains,
    where jax.random.permutation's sorts took the device some 22 ms at the start of every epoch.
    """
    generator = np.random.default_rng([BATCH_ORDER_STREAM, seed, epoch])
    permutation = generator.permutation(num_images).astype(np.int32)
    steps = num_images // batch_size
    return permutation[: steps * batch_size].reshape(steps, batch_size)


def epoch_chunks(first_step: int, steps_per_epoch: int, steps_per_chunk: int) -> list[tuple[int, int]]:
    """(first step, steps) of each call that trains steps first_step .. steps_per_epoch - 1: whole chunks, then a tail.

    Counted from first_step, not from the epoch's start, so an epoch resumed at any step is covered exactly.
    """
    starts = range(first_step, steps_per_epoch, steps_per_chunk)
    return [(start, min(steps_per_chunk, steps_per_epoch - start)) for start in starts]


class Evaluation(NamedTuple):
    """A split's mean per-image figures in nats: the bound trained (k = train.iw_samples, KL weight 1), the ELBO."""

    loss: float  # -ELBO, or -IWAE bound with k = train.iw_samples
    reconstruction: float
    kl: float

    @property
    def negative_elbo(self) -> float:
        return self.reconstruction + self.kl


def make_evaluator(
    graphdef: nnx.GraphDef, config: Config, num_images: int, placement: Placement | None = None
) -> Callable:
    """evaluate(params, images) -> Evaluation (mean loss, reconstruction and KL in nats per image).

    One compiled call scans fixed-size batches (the last one padded and masked), so evaluation
    compiles once per run; a fixed key makes the estimate the same function of the weights every
    epoch, so epochs are comparable. With `placement`, each batch is split over its devices as in
    training (params and images replicated); a batch size they do not divide runs whole on each, since
    resizing the batches would change the draws and so the figures.
    """
    placement = placement or placement_over(1)
    batch_size = min(EVAL_BATCH_SIZE, num_images)
    num_batches = -(-num_images // batch_size)
    padded_indices = np.arange(num_batches * batch_size).reshape(num_batches, batch_size)
    masks = jnp.asarray(padded_indices < num_images, jnp.float32)
    batch_indices = jnp.asarray(np.minimum(padded_indices, num_images - 1), jnp.int32)
    eval_key = jax.random.fold_in(root_key(config.seed), EVALUATION_STREAM)
    binarize = step_binarization(config)
    samples = config.train.iw_samples

    split_batches = placement.splits(batch_size)

    @functools.partial(jax.jit, **placement.jit_options())
    def totals(params, images_uint8):
        model = nnx.merge(graphdef, params)

        def batch_sums(running, batch):
            indices, mask, batch_number = batch
            key = jax.random.fold_in(eval_key, batch_number)
            batch_images = images_uint8[indices]
            if split_batches:
                batch_images = placement.shard_batch(batch_images)
            terms = batch_image_losses(model, batch_images, key, binarize, 1.0, samples)
            sums = [jnp.sum(term * mask) for term in (terms.loss, terms.reconstruction, terms.kl)]
            return running + jnp.stack(sums), None

        batches = (batch_indices, masks, jnp.arange(num_batches))
        # Unrolled for the conv model: see steps_per_chunk_for for XLA's slow convolutions in loops.
        unroll = config.model.arch == "conv"
        return jax.lax.scan(batch_sums, jnp.zeros(3, jnp.float32), batches, unroll=unroll)[0]

    def evaluate(params, images_uint8: jax.Array) -> Evaluation:
        loss, reconstruction, kl = (float(total) / num_images for total in totals(params, images_uint8))
        # With one sample the bound is the ELBO: the same number, not one rounded differently.
        return Evaluation(reconstruction + kl if samples == 1 else loss, reconstruction, kl)

    return evaluate


class NonFiniteLoss(Exception):
    """Training met a non-finite loss, or non-finite weights before a save (train.skip_nonfinite off)."""

    def __init__(self, epoch: int, step: int, what: str = "the loss"):
        super().__init__(f"{what} became NaN or infinite at epoch {epoch}, step {step}")
        self.epoch, self.step = epoch, step


@jax.jit
def all_finite(tree) -> jax.Array:
    """True when no leaf of `tree` holds a NaN or an infinity."""
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(tree)]))


def check_finite_weights(config: Config, state: TrainState, epoch: int) -> None:
    """Before anything is saved: the last update of a stretch has no later loss to reveal a NaN it made."""
    if not config.train.skip_nonfinite and not bool(all_finite(state.params)):
        raise NonFiniteLoss(epoch, int(state.step), what="the weights")


class TrainOutcome(NamedTuple):
    """How train() ended: the model's graph definition, the state, and whether it was stopped early."""

    graphdef: nnx.GraphDef
    state: TrainState
    stopped_in_epoch: int | None  # the epoch a stop request interrupted, None when it ran to the end


def check_trainable(config: Config, dataset: Dataset) -> None:
    """Refuse settings that cannot run on this dataset or on these devices, before any compilation."""
    check_buildable(config.model, dataset.image_shape)
    check_batch_splits(config, device_count_for(config))
    num_train = len(dataset.train_images)
    if config.train.batch_size > num_train:
        raise ConfigError(
            f"train.batch_size {config.train.batch_size} is larger than the {num_train} training images "
            f"of {dataset.name}; set train.batch_size to at most {num_train}"
        )
    if len(dataset.val_images) == 0:
        raise ConfigError(f"{dataset.name} has no validation images; use a dataset with more images")


class EpochLosses:
    """The losses of one epoch's chunks as they finish: checked for NaN, kept, reported as progress."""

    def __init__(self, config: Config, epoch: int, steps_per_epoch: int, first_step: int, on_progress):
        self.config, self.epoch, self.steps_per_epoch, self.first_step = config, epoch, steps_per_epoch, first_step
        self.on_progress = on_progress
        self.started = time.perf_counter()
        self.losses: list[np.ndarray] = []

    def add_chunk(self, chunk_start: int, chunk_losses: jax.Array) -> None:
        """Take a chunk's losses (waiting for that chunk only); raise NonFiniteLoss unless skipping is on."""
        losses = np.asarray(chunk_losses)
        bad = np.flatnonzero(~np.isfinite(losses))
        if len(bad) and not self.config.train.skip_nonfinite:
            raise NonFiniteLoss(self.epoch, (self.epoch - 1) * self.steps_per_epoch + chunk_start + int(bad[0]) + 1)
        self.losses.append(losses)
        if self.on_progress:
            steps_done = chunk_start + len(losses)
            rate = (steps_done - self.first_step) * self.config.train.batch_size / self.seconds()
            finite = losses[np.isfinite(losses)]
            mean_loss = float(finite.mean()) if len(finite) else float("nan")
            epochs = self.config.train.epochs
            self.on_progress(StepProgress(self.epoch, epochs, steps_done, self.steps_per_epoch, mean_loss, rate))

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def summary(self) -> dict[str, Any]:
        """Mean finite loss, skipped (non-finite) steps, seconds and images/s of the steps run (no validation)."""
        all_losses = np.concatenate(self.losses)
        finite = all_losses[np.isfinite(all_losses)]
        seconds = self.seconds()
        return {
            "train_loss": float(finite.mean()) if len(finite) else float("nan"),
            "skipped_steps": int(len(all_losses) - len(finite)),
            "train_seconds": seconds,
            "images_per_second": len(all_losses) * self.config.train.batch_size / seconds,
        }


def train(
    config: Config,
    dataset: Dataset,
    on_progress: Callable[[StepProgress], None] | None = None,
    on_epoch_end: Callable[[EpochResult], None] | None = None,
    start: TrainState | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainOutcome:
    """Train until config.train.epochs epochs are done, from `start` (a checkpoint's state) or from scratch.

    Resuming from a state saved at step s continues exactly where s left off: the same batches and
    noise follow, so the weights come out bit for bit as if training had never stopped (on as many
    devices as before; on another number, to float rounding). When
    `should_stop()` turns true, training stops after the current chunk of steps and returns.
    Raises NonFiniteLoss when a step's loss or gradient is not finite and train.skip_nonfinite is off.
    """
    check_trainable(config, dataset)

    # ---- set-up: data on the devices once, as uint8; the weights replicated on each ---------------
    placement = placement_over(device_count_for(config))
    # Replicated, images and index tables alike (see vaecli.common.devices): every device gathers its share of a batch.
    train_images = placement.replicate(device_split(config, dataset.train_images, SPLIT_NUMBERS["train"]))
    val_images = placement.replicate(device_split(config, dataset.val_images, SPLIT_NUMBERS["val"]))
    if start is None:
        graphdef, state = init_train_state(config, dataset.image_shape, dataset.train_images)
    else:  # resuming: only the model's structure is needed, not a fresh random initialisation
        abstract_model = nnx.eval_shape(lambda: build_model(config.model, dataset.image_shape, config.seed))
        graphdef = split_model(abstract_model)[0]
        state = start
    state = placement.replicate(state)
    batch_size = config.train.batch_size
    steps_per_epoch = len(dataset.train_images) // batch_size
    steps_per_chunk = steps_per_chunk_for(config)
    learning_rate = learning_rate_schedule(config, steps_per_epoch)  # to report it; the optimizer has its own
    train_chunk = make_train_chunk(graphdef, config, steps_per_epoch, placement)
    evaluate = make_evaluator(graphdef, config, len(dataset.val_images), placement)
    completed_epochs, resume_at = divmod(int(state.step), steps_per_epoch)

    # ---- the loop ---------------------------------------------------------------------------------
    for epoch in range(completed_epochs + 1, config.train.epochs + 1):
        epoch_order = epoch_batch_indices(config.seed, epoch, len(dataset.train_images), batch_size)
        epoch_batches = placement.replicate(epoch_order)
        first_step = resume_at if epoch == completed_epochs + 1 else 0
        tracker = EpochLosses(config, epoch, steps_per_epoch, first_step, on_progress)
        pending: tuple[int, jax.Array] | None = None  # the chunk dispatched last, not yet read
        for chunk_start, chunk_steps in epoch_chunks(first_step, steps_per_epoch, steps_per_chunk):
            state, losses = train_chunk(state, train_images, epoch_batches, chunk_start, chunk_steps)
            if pending is not None:
                tracker.add_chunk(*pending)  # the chunk before: this one is already queued
            pending = (chunk_start, losses)
            if should_stop is not None and should_stop() and chunk_start + chunk_steps < steps_per_epoch:
                tracker.add_chunk(*pending)
                check_finite_weights(config, state, epoch)
                return TrainOutcome(graphdef, placement.copy_to_one_device(state), epoch)
        tracker.add_chunk(*pending)
        check_finite_weights(config, state, epoch)
        training = tracker.summary()

        # ---- evaluation -------------------------------------------------------------------------
        evaluation_started = time.perf_counter()
        validation = evaluate(state.inference_params(), val_images)
        val_seconds = time.perf_counter() - evaluation_started
        metrics = {
            "epoch": epoch,
            "step": int(state.step),
            # The rate of the epoch's last update (Adam's schedule is read at the count of updates before it).
            "learning_rate": float(learning_rate(int(state.step) - 1)),
            **training,
            "val_loss": validation.loss,
            "val_elbo": -validation.negative_elbo,
            "val_recon": validation.reconstruction,
            "val_kl": validation.kl,
            "val_seconds": val_seconds,
            "epoch_seconds": training["train_seconds"] + val_seconds,
            "devices": placement.count,
            "processes": jax.process_count(),
        }
        if on_epoch_end:
            # A copy: the next chunk donates (deletes) the state's buffers, and a callback may keep it.
            on_epoch_end(EpochResult(epoch, graphdef, placement.copy_to_one_device(state), metrics))
        if should_stop is not None and should_stop() and epoch < config.train.epochs:
            return TrainOutcome(graphdef, placement.copy_to_one_device(state), epoch + 1)
    return TrainOutcome(graphdef, placement.copy_to_one_device(state), None)
