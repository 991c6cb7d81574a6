"""Training: one jitted update (loss, gradient, Adam), batched evaluation, and the epoch loop.

Randomness is a pure function of (seed, purpose, counter): the batch order of epoch e comes from
NumPy's generator seeded with (stream, seed, e), and the binarization and reparameterization noise
of step s from fold_in(step_key, s), so a run is reproducible and can be resumed from any step.
The loop never prints: it reports through callbacks that the CLI renders.

Speed (see `make bench`): the dataset lives on the device as uint8 and each batch is gathered there
(only the epoch's index table crosses over, once per epoch);
steps run STEPS_PER_CHUNK at a time inside one compiled lax.scan with the state's buffers donated,
so Python dispatches a few calls per epoch instead of one per step; progress reads the loss of the
chunk before the one just dispatched, so the device never waits for the host.
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

# Purposes for jax.random.fold_in on the run's root key (and the batch order's NumPy seed): each stream of
# randomness has its own.
STEP_NOISE_STREAM = 1
BATCH_ORDER_STREAM = 2
EVALUATION_STREAM = 3
STATIC_BINARIZATION_STREAM = 4
# Validation images per evaluation batch; the last partial batch is padded and masked.
EVAL_BATCH_SIZE = 1000
# Update steps per compiled call: enough to make dispatch overhead vanish, few enough that progress
# arrives several times a second. An epoch's last chunk runs its missing steps as no-ops.
STEPS_PER_CHUNK = 64
# Philox (one of JAX's own PRNG implementations) draws bits about 4x faster than the default
# threefry on a CPU, and dynamic binarization draws one number per pixel per step.
PRNG_IMPL = "philox2x32"
# XLA's default copy insertion copies seven weight arrays (the 400x784 decoder matrix among them) on
# every step of the scan, since the skip branch of the tail's lax.cond hands the state back unchanged;
# its region analysis proves those copies unneeded and leaves none.
TRAIN_COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}
# apply_if_finite applies a non-finite update anyway after this many in a row; we never want that.
NEVER_GIVE_UP = 2**31 - 1


class TrainState(NamedTuple):
    """Everything that changes during training (a pytree, so it passes through jit and checkpoints)."""

    params: nnx.State
    opt_state: optax.OptState
    step: jax.Array  # int32 scalar: updates applied so far


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
        """The model with this epoch's weights."""
        return nnx.merge(self.graphdef, self.state.params)


def root_key(seed: int) -> jax.Array:
    """The run's root PRNG key; every other key is folded from it."""
    return jax.random.key(seed, impl=PRNG_IMPL)


def intensities(images_uint8: jax.Array) -> jax.Array:
    """uint8 [batch, H, W...] -> float32 [batch, pixels] in [0, 1]; done inside the compiled step."""
    return images_uint8.reshape(images_uint8.shape[0], -1).astype(jnp.float32) / 255.0


def bernoulli_draw(key: jax.Array, images_uint8: jax.Array) -> jax.Array:
    """A binary image per input, pixel on with probability intensity / 255 (to within 2^-16), as bool.

    16 random bits per pixel instead of a float uniform: half the random words, and compared
    against an integer threshold, since the draw is the costliest part of dynamic binarization.
    """
    random_bits = jax.random.bits(key, images_uint8.shape, jnp.uint16).astype(jnp.uint32)
    threshold = (images_uint8.astype(jnp.uint32) * 65536 + 127) // 255  # 255 -> 65536: always on
    return random_bits < threshold


def bernoulli_targets(images_uint8: jax.Array, key: jax.Array, binarize: str) -> jax.Array:
    """Flattened float32 targets in [0, 1]: fresh binary draws (dynamic) or the intensities as they are."""
    if binarize == "dynamic":
        # Drawn on the flattened batch: Philox fills a 2-D shape markedly faster than [B, H, W].
        flat_images = images_uint8.reshape(images_uint8.shape[0], -1)
        return bernoulli_draw(key, flat_images).astype(jnp.float32)
    return intensities(images_uint8)


def step_binarization(config: Config) -> str:
    """What each step does to its batch: static data was binarized once up front, so it needs nothing."""
    return "dynamic" if config.data.binarize == "dynamic" else "none"


@jax.jit
def binarize_once(images_uint8: jax.Array, key: jax.Array) -> jax.Array:
    """One fixed Bernoulli draw per pixel from its intensity, as uint8 0 or 255 (static binarization)."""
    flat_images = images_uint8.reshape(images_uint8.shape[0], -1)
    return jnp.where(bernoulli_draw(key, flat_images), 255, 0).astype(jnp.uint8).reshape(images_uint8.shape)


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
    targets = bernoulli_targets(images_uint8, binarize_key, binarize)
    logits, posterior_mean, posterior_log_variance = model(targets, noise_key)
    return negative_elbo_terms(logits, targets, posterior_mean, posterior_log_variance)


def make_optimizer(config: Config) -> optax.GradientTransformation:
    """Adam at the configured learning rate, after global-norm clipping when train.clip_norm is set.

    With train.skip_nonfinite, optax's apply_if_finite leaves the state untouched on a step whose
    update is not finite (and counts it), instead of letting one NaN poison every weight.
    """
    optimizer = optax.adam(config.train.learning_rate)
    if config.train.clip_norm is not None:
        optimizer = optax.chain(optax.clip_by_global_norm(config.train.clip_norm), optimizer)
    if config.train.skip_nonfinite:
        optimizer = optax.apply_if_finite(optimizer, max_consecutive_errors=NEVER_GIVE_UP)
    return optimizer


def init_train_state(config: Config, image_shape: tuple[int, ...]) -> tuple[nnx.GraphDef, TrainState]:
    """A fresh model (weights from the seed) and optimizer state at step 0."""
    model = build_model(config.model, image_shape, config.seed)
    graphdef, params = nnx.split(model, nnx.Param)
    opt_state = make_optimizer(config).init(params)
    return graphdef, TrainState(params, opt_state, jnp.zeros((), jnp.int32))


def make_train_chunk(
    graphdef: nnx.GraphDef, config: Config, steps_per_epoch: int, steps_per_chunk: int = STEPS_PER_CHUNK
) -> Callable:
    """The jitted update, K = steps_per_chunk at a time: gather each batch on the device, loss, gradient, Adam.

    chunk(state, train_images, epoch_batches, first_step) runs steps first_step .. first_step + K - 1
    of the epoch (epoch_batches: [steps rounded up to K, batch] indices); steps past the epoch's end
    leave the state untouched, so an epoch of any length needs one compilation.
    Returns the new state and the K losses (0 for the skipped steps).
    """
    optimizer = make_optimizer(config)
    step_key = jax.random.fold_in(root_key(config.seed), STEP_NOISE_STREAM)
    binarize = step_binarization(config)

    def batch_loss(params, images_uint8, key):
        reconstruction, kl = negative_elbo(nnx.merge(graphdef, params), images_uint8, key, binarize)
        return jnp.mean(reconstruction + kl)

    def update(state: TrainState, batch_images: jax.Array) -> tuple[TrainState, jax.Array]:
        key = jax.random.fold_in(step_key, state.step)
        loss, grads = jax.value_and_grad(batch_loss)(state.params, batch_images, key)
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
        return TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1), reported_loss

    def skip(state: TrainState, batch_images: jax.Array) -> tuple[TrainState, jax.Array]:
        return state, jnp.zeros((), jnp.float32)

    def chunk(state: TrainState, train_images: jax.Array, epoch_batches: jax.Array, first_step: jax.Array):
        def one_step(state, offset):
            step_in_epoch = first_step + offset
            batch_indices = jax.lax.dynamic_index_in_dim(epoch_batches, step_in_epoch, keepdims=False)
            return jax.lax.cond(step_in_epoch < steps_per_epoch, update, skip, state, train_images[batch_indices])

        return jax.lax.scan(one_step, state, jnp.arange(steps_per_chunk))

    # The old state is donated: its buffers are reused for the new one instead of copied.
    return jax.jit(chunk, donate_argnums=0, compiler_options=TRAIN_COMPILER_OPTIONS)


def epoch_batch_indices(seed: int, epoch: int, num_images: int, batch_size: int) -> np.ndarray:
    """[steps, batch] int32 indices of epoch `epoch`: a permutation from (seed, epoch), last partial batch dropped.

    Drawn on the host: NumPy shuffles 60,000 indices in about a millisecond while the device trains,
    where jax.random.permutation's sorts took the device some 22 ms at the start of every epoch.
    """
    generator = np.random.default_rng([BATCH_ORDER_STREAM, seed, epoch])
    permutation = generator.permutation(num_images).astype(np.int32)
    steps = num_images // batch_size
    return permutation[: steps * batch_size].reshape(steps, batch_size)


def padded_to_chunks(epoch_batches: np.ndarray, steps_per_chunk: int) -> np.ndarray:
    """The epoch's batch indices with rows of zeros appended up to a whole number of chunks."""
    missing = -epoch_batches.shape[0] % steps_per_chunk
    return np.pad(epoch_batches, ((0, missing), (0, 0)))


def make_evaluator(graphdef: nnx.GraphDef, config: Config, num_images: int) -> Callable:
    """evaluate(params, images) -> (mean negative ELBO, mean reconstruction, mean KL) in nats/image.

    One compiled call scans fixed-size batches (the last one padded and masked), so evaluation
    compiles once per run; a fixed key makes the estimate the same function of the weights every
    epoch, so epochs are comparable.
    """
    batch_size = min(EVAL_BATCH_SIZE, num_images)
    num_batches = -(-num_images // batch_size)
    padded_indices = np.arange(num_batches * batch_size).reshape(num_batches, batch_size)
    masks = jnp.asarray(padded_indices < num_images, jnp.float32)
    batch_indices = jnp.asarray(np.minimum(padded_indices, num_images - 1), jnp.int32)
    eval_key = jax.random.fold_in(root_key(config.seed), EVALUATION_STREAM)
    binarize = step_binarization(config)

    @jax.jit
    def totals(params, images_uint8):
        model = nnx.merge(graphdef, params)

        def batch_sums(running, batch):
            indices, mask, batch_number = batch
            key = jax.random.fold_in(eval_key, batch_number)
            reconstruction, kl = negative_elbo(model, images_uint8[indices], key, binarize)
            return running + jnp.stack([jnp.sum(reconstruction * mask), jnp.sum(kl * mask)]), None

        batches = (batch_indices, masks, jnp.arange(num_batches))
        return jax.lax.scan(batch_sums, jnp.zeros(2, jnp.float32), batches)[0]

    def evaluate(params, images_uint8: jax.Array) -> tuple[float, float, float]:
        reconstruction, kl = (float(total) / num_images for total in totals(params, images_uint8))
        return reconstruction + kl, reconstruction, kl

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
    """Refuse settings that cannot run on this dataset, before any compilation."""
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
        valid = np.asarray(chunk_losses)[: self.steps_per_epoch - chunk_start]
        bad = np.flatnonzero(~np.isfinite(valid))
        if len(bad) and not self.config.train.skip_nonfinite:
            raise NonFiniteLoss(self.epoch, (self.epoch - 1) * self.steps_per_epoch + chunk_start + int(bad[0]) + 1)
        self.losses.append(valid)
        if self.on_progress:
            steps_done = chunk_start + len(valid)
            rate = (steps_done - self.first_step) * self.config.train.batch_size / self.seconds()
            finite = valid[np.isfinite(valid)]
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
    noise follow, so the weights come out bit for bit as if training had never stopped. When
    `should_stop()` turns true, training stops after the current chunk of steps and returns.
    Raises NonFiniteLoss when a step's loss or gradient is not finite and train.skip_nonfinite is off.
    """
    check_trainable(config, dataset)

    # ---- set-up: data on the device once, as uint8 ------------------------------------------------
    train_images = device_split(config, dataset.train_images, split_number=0)
    val_images = device_split(config, dataset.val_images, split_number=1)
    if start is None:
        graphdef, state = init_train_state(config, dataset.image_shape)
    else:  # resuming: only the model's structure is needed, not a fresh random initialisation
        abstract_model = nnx.eval_shape(lambda: build_model(config.model, dataset.image_shape, config.seed))
        graphdef = nnx.split(abstract_model, nnx.Param)[0]
        state = start
    batch_size = config.train.batch_size
    steps_per_epoch = len(dataset.train_images) // batch_size
    steps_per_chunk = STEPS_PER_CHUNK
    train_chunk = make_train_chunk(graphdef, config, steps_per_epoch, steps_per_chunk)
    evaluate = make_evaluator(graphdef, config, len(dataset.val_images))
    completed_epochs, resume_at = divmod(int(state.step), steps_per_epoch)

    # ---- the loop ---------------------------------------------------------------------------------
    for epoch in range(completed_epochs + 1, config.train.epochs + 1):
        epoch_order = epoch_batch_indices(config.seed, epoch, len(dataset.train_images), batch_size)
        epoch_batches = jax.device_put(padded_to_chunks(epoch_order, steps_per_chunk))
        first_step = resume_at if epoch == completed_epochs + 1 else 0
        tracker = EpochLosses(config, epoch, steps_per_epoch, first_step, on_progress)
        pending: tuple[int, jax.Array] | None = None  # the chunk dispatched last, not yet read
        for chunk_start in range(first_step, steps_per_epoch, steps_per_chunk):
            state, losses = train_chunk(state, train_images, epoch_batches, chunk_start)
            if pending is not None:
                tracker.add_chunk(*pending)  # the chunk before: this one is already queued
            pending = (chunk_start, losses)
            if should_stop is not None and should_stop() and chunk_start + steps_per_chunk < steps_per_epoch:
                tracker.add_chunk(*pending)
                check_finite_weights(config, state, epoch)
                return TrainOutcome(graphdef, state, epoch)
        tracker.add_chunk(*pending)
        check_finite_weights(config, state, epoch)
        training = tracker.summary()

        # ---- evaluation -------------------------------------------------------------------------
        evaluation_started = time.perf_counter()
        val_loss, val_recon, val_kl = evaluate(state.params, val_images)
        val_seconds = time.perf_counter() - evaluation_started
        metrics = {
            "epoch": epoch,
            "step": int(state.step),
            **training,
            "val_loss": val_loss,
            "val_elbo": -val_loss,
            "val_recon": val_recon,
            "val_kl": val_kl,
            "val_seconds": val_seconds,
            "epoch_seconds": training["train_seconds"] + val_seconds,
        }
        if on_epoch_end:
            on_epoch_end(EpochResult(epoch, graphdef, state, metrics))
        if should_stop is not None and should_stop() and epoch < config.train.epochs:
            return TrainOutcome(graphdef, state, epoch + 1)
    return TrainOutcome(graphdef, state, None)
