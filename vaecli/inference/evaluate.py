"""A trained VAE measured in the field's units: the importance-sampled log-likelihood and what stands beside it.

log p(x) >= log (1/k) sum_k p(x, z_k) / q(z_k|x), z_k ~ q(z|x) (Burda et al. 2016): a lower bound on
the log-likelihood for every k that rises towards log p(x) as k grows, so -bound is the "test NLL"
that papers report (k = 5000 in theirs). Beside it: the negative ELBO (reconstruction + KL), bits
per dimension, the active latent units, the KL of each latent dimension and how far the aggregate
posterior (the posteriors of all images, taken together) is from the prior N(0, I).

On several devices (vaecli.models.sampling.inference_placement) each call's images are split over them: sample j of
image i is keyed by (i, j) and summed in the same order on any of them, so the figures are one device's to
float rounding.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from vaecli.common.config import Config
from vaecli.common.errors import UsageError
from vaecli.data.datasets import load_dataset
from vaecli.models.layers import intensities, latents_from_noise
from vaecli.models.likelihoods import bits_per_dim
from vaecli.models.objectives import importance_log_weights, kl_per_dimension
from vaecli.models.sampling import device_count, inference_placement, rows_for_devices, sampling_key, split_rows
from vaecli.models.targets import SPLIT_NUMBERS, binarize_once, device_split

if TYPE_CHECKING:
    from vaecli.common.devices import Placement
    from vaecli.inference.open_run import InferenceRun

# Burda et al.: a unit is active when its posterior mean varies over the data by more than this.
ACTIVE_UNIT_THRESHOLD = 0.01
# fold_in purposes under --seed: the test split's one Bernoulli draw, and the importance samples.
EVALUATION_DRAW_STREAM = 7
IMPORTANCE_SAMPLE_STREAM = 8
# Decoder outputs (rows x values x parameters) per compiled step: bounds memory for any k, while
# keeping thousands of rows per matrix product so the CPU runs near its matmul peak.
DECODER_OUTPUTS_PER_STEP = 2**23
MAX_IMAGES_PER_CALL = 256


@dataclass(frozen=True)
class SplitEvaluation:
    """Every figure of `vae evaluate`, in nats per image unless named otherwise."""

    split: str
    k: int
    images: int
    latent_dim: int
    num_values: int  # D: pixels x channels
    nll_nats: float  # -log p(x) estimated by the k-sample bound (an upper bound on the true NLL)
    neg_elbo_nats: float
    recon_nats: float  # -E_q[log p(x|z)], averaged over the k samples
    kl_nats: float
    bits_per_dim: float
    active_units: int
    kl_per_dim: list[dict[str, float]]  # [{"dim": i, "kl": nats}], largest first
    aggregate_posterior: dict[str, Any]
    protocol: str
    is_likelihood: bool  # False for a Bernoulli model of grey levels
    seed: int
    seconds: float
    devices: int  # how many devices the images were split over
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "extra"} | self.extra


def evaluation_protocol(config: Config, split: str, seed: int) -> tuple[str, bool]:
    """(what the figures are a likelihood of, in words; whether they are a likelihood at all)."""
    if config.model.likelihood == "logistic":
        return f"the 8-bit levels of the {split} images under a discretized logistic mixture: a likelihood", True
    if config.data.binarize == "dynamic":
        return (
            f"binary images: one fixed Bernoulli draw of the {split} split made with --seed {seed} "
            "(dynamic binarization, the protocol of published MNIST likelihoods)",
            True,
        )
    if config.data.binarize == "static":
        return f"binary images: the run's own fixed (static) Bernoulli draw of the {split} split", True
    return (
        "NOT a likelihood: a Bernoulli model evaluated at grey levels in [0, 1] (data.binarize: none) gives no "
        "probability of the images; compare these figures only with each other",
        False,
    )


def evaluation_targets(config: Config, images_uint8: np.ndarray, split: str, seed: int) -> jax.Array:
    """The split as the likelihood sees it, float32 [N, values] in [0, 1], following evaluation_protocol."""
    if config.data.binarize == "static":
        return intensities(device_split(config, images_uint8, SPLIT_NUMBERS[split]))
    if config.data.binarize == "dynamic":
        draw_key = jax.random.fold_in(sampling_key(seed, EVALUATION_DRAW_STREAM), SPLIT_NUMBERS[split])
        return intensities(binarize_once(jnp.asarray(images_uint8), draw_key))
    return intensities(jnp.asarray(images_uint8))


def call_shape(k: int, outputs_per_row: int) -> tuple[int, int, int]:
    """(images per compiled call, samples per step, steps per call) for k samples per image."""
    rows = max(1, DECODER_OUTPUTS_PER_STEP // outputs_per_row)
    images = max(1, min(MAX_IMAGES_PER_CALL, rows // k))
    samples = max(1, min(k, rows // images))
    return images, samples, -(-k // samples)


@partial(jax.jit, static_argnames=("placement",))
def _encode(model, targets, placement=None):
    """The posterior of each image: (mean, log-variance), each [images, latent]."""
    return tuple(split_rows(array, placement) for array in model.encode(split_rows(targets, placement)))


@partial(jax.jit, static_argnames=("k", "samples_per_step", "placement"))
def _importance_step(
    model, targets, mean, log_variance, image_keys, step_index, running, k, samples_per_step, placement=None
):
    """Fold samples step_index * samples_per_step ... of each image into the running log-sum-exp of its weights.

    One compiled call per step, not a lax.scan over steps: XLA's CPU backend runs a convolutional
    decoder inside a loop an order of magnitude slower (see vaecli.training.loop.steps_per_chunk_for).
    `model`: a VAE or an ExportedModel, pytrees both (see vaecli.models.sampling). `placement`: the devices the
    images are split over (None: one device); every per-image array, the running sums among them, stays split.
    """
    targets, mean, log_variance, image_keys = (
        split_rows(array, placement) for array in (targets, mean, log_variance, image_keys)
    )
    running = tuple(split_rows(array, placement) for array in running)
    running_max, running_sum, log_likelihood_sum = running
    # Sample j of image i is drawn from fold_in(image key i, j): the same whatever the batching,
    # and the first k' samples of a larger k are those of k'.
    sample_indices = step_index * samples_per_step + jnp.arange(samples_per_step)
    noise = jax.vmap(
        lambda key: jax.vmap(lambda index: jax.random.normal(jax.random.fold_in(key, index), (model.latent_dim,)))(
            sample_indices
        )
    )(image_keys)
    noise = jnp.swapaxes(noise, 0, 1)  # [samples, images, latent]
    latents = latents_from_noise(mean, log_variance, noise)
    log_likelihood = model.likelihood.log_prob(model.decode(latents, targets), targets)
    log_weights = importance_log_weights(log_likelihood, latents, noise, log_variance)
    in_range = (sample_indices < k)[:, None]  # samples past k (the last step rounds up) take no part
    log_weights = jnp.where(in_range, log_weights, -jnp.inf)
    # A running log-sum-exp: rescale the sum so far to the new maximum, then add this step's terms.
    new_max = jnp.maximum(running_max, jnp.max(log_weights, axis=0))
    running_sum = running_sum * jnp.exp(running_max - new_max) + jnp.sum(jnp.exp(log_weights - new_max), axis=0)
    log_likelihood_sum += jnp.sum(jnp.where(in_range, log_likelihood, 0.0), axis=0)
    return tuple(split_rows(array, placement) for array in (new_max, running_sum, log_likelihood_sum))


def _batch_statistics(model, targets, image_indices, seed_key, k, samples_per_step, steps, placement=None):
    """Per image: log p(x) by the k-sample bound, reconstruction, KL per dimension, posterior mean and variance.

    `placement`: the devices the images are split over (None: one device); targets and image_indices come
    placed on them (Placement.place_batch), the model replicated.
    """
    mean, log_variance = _encode(model, targets, placement)
    image_keys = jax.vmap(lambda index: jax.random.fold_in(seed_key, index))(image_indices)
    count = targets.shape[0]
    # A finite floor, not -inf, so that the first rescale is exp(-1e30 - max) = 0, not NaN.
    running = (jnp.full(count, -1e30), jnp.zeros(count), jnp.zeros(count))
    for step_index in range(steps):
        running = _importance_step(
            model, targets, mean, log_variance, image_keys, step_index, running, k, samples_per_step, placement
        )
    log_max, weight_sum, log_likelihood_sum = running
    log_px = log_max + jnp.log(weight_sum) - math.log(k)
    return log_px, -log_likelihood_sum / k, kl_per_dimension(mean, log_variance), mean, jnp.exp(log_variance)


class _Totals:
    """Float64 running sums over images, so that 10,000 images x 5,000 samples lose no precision."""

    def __init__(self, latent_dim: int):
        self.count = 0
        self.log_px = self.reconstruction = 0.0
        self.kl = np.zeros(latent_dim)
        self.mean = np.zeros(latent_dim)
        self.mean_outer = np.zeros((latent_dim, latent_dim))
        self.variance = np.zeros(latent_dim)

    def add(self, log_px, reconstruction, kl, mean, variance) -> None:
        log_px, reconstruction, kl, mean, variance = (
            np.asarray(array, np.float64) for array in (log_px, reconstruction, kl, mean, variance)
        )
        self.count += len(log_px)
        self.log_px += log_px.sum()
        self.reconstruction += reconstruction.sum()
        self.kl += kl.sum(axis=0)
        self.mean += mean.sum(axis=0)
        self.mean_outer += mean.T @ mean
        self.variance += variance.sum(axis=0)


def aggregate_posterior_summary(totals: _Totals) -> dict[str, Any]:
    """How far the aggregate posterior q(z) = E_x q(z|x) is from the prior, from its first two moments.

    Its moment-matched Gaussian has mean E[mu] and covariance Cov(mu) + E[diag sigma^2] (law of total
    variance); KL(N(m, S) || N(0, I)) = (tr S + m.m - d - log det S) / 2 is 0 exactly when those moments
    are the prior's.
    """
    count, latent_dim = totals.count, len(totals.mean)
    mean = totals.mean / count
    covariance_of_means = totals.mean_outer / count - np.outer(mean, mean)
    covariance = covariance_of_means + np.diag(totals.variance / count)
    sign, log_det = np.linalg.slogdet(covariance)
    # None (JSON null) when the covariance is singular, e.g. fewer images than latent dimensions.
    kl = 0.5 * (np.trace(covariance) + mean @ mean - latent_dim - log_det) if sign > 0 else None
    return {
        "mean": mean.tolist(),
        "covariance_of_means": covariance_of_means.tolist() if latent_dim <= 64 else None,
        "variance_of_means": np.diag(covariance_of_means).tolist(),
        "mean_posterior_variance": (totals.variance / count).tolist(),
        "mean_norm": float(np.linalg.norm(mean)),
        "total_variance_per_dim": np.diag(covariance).tolist(),
        "kl_moment_matched_to_prior": None if kl is None else float(kl),
    }


def evaluate_images(
    run: InferenceRun,
    images_uint8: np.ndarray,
    split: str,
    k: int,
    seed: int,
    on_progress: Callable[[int, int], None] | None = None,
    placement: Placement | None = None,
) -> SplitEvaluation:
    """Every figure of SplitEvaluation for these images of split `split`, with k importance samples each.

    `placement`: the devices each call's images are split over (None: one device).
    """
    if k < 1:
        raise UsageError(f"--k must be at least 1, got {k}")
    started = time.perf_counter()
    model = run.model
    targets = evaluation_targets(run.config, images_uint8, split, seed)
    count = targets.shape[0]
    images_per_call, samples_per_step, steps = call_shape(k, model.num_values * model.likelihood.params_per_value)
    # Each device takes the images one device would, with the same samples per step: the same memory per
    # device, and each image's weights summed in the same order. Padded to a multiple of the device count.
    images_per_call = rows_for_devices(min(images_per_call * device_count(placement), count), placement)
    padded = jnp.concatenate([targets, jnp.zeros((-count % images_per_call, targets.shape[1]), targets.dtype)])
    seed_key = sampling_key(seed, IMPORTANCE_SAMPLE_STREAM)
    if placement is not None:
        model = placement.replicate(model)
    totals = _Totals(model.latent_dim)
    for first in range(0, count, images_per_call):
        indices = jnp.arange(first, first + images_per_call)
        batch = padded[first : first + images_per_call]
        if placement is not None:
            batch, indices = placement.place_batch((batch, indices))
        statistics = _batch_statistics(model, batch, indices, seed_key, k, samples_per_step, steps, placement)
        kept = min(images_per_call, count - first)
        totals.add(*(np.asarray(array)[:kept] for array in statistics))
        if on_progress:
            on_progress(first + kept, count)
    seconds = time.perf_counter() - started
    return summarize(run.config, totals, split, k, seed, model.num_values, seconds, device_count(placement))


def summarize(
    config: Config, totals: _Totals, split: str, k: int, seed: int, num_values: int, seconds: float, devices: int
):
    """SplitEvaluation from the running sums."""
    count = totals.count
    nll = -totals.log_px / count
    reconstruction = totals.reconstruction / count
    kl_by_dim = totals.kl / count
    variance_of_means = totals.mean_outer.diagonal() / count - np.square(totals.mean / count)
    protocol, is_likelihood = evaluation_protocol(config, split, seed)
    order = np.argsort(-kl_by_dim, kind="stable")
    return SplitEvaluation(
        split=split,
        k=k,
        images=count,
        latent_dim=len(kl_by_dim),
        num_values=num_values,
        nll_nats=float(nll),
        neg_elbo_nats=float(reconstruction + kl_by_dim.sum()),
        recon_nats=float(reconstruction),
        kl_nats=float(kl_by_dim.sum()),
        bits_per_dim=float(bits_per_dim(nll, num_values)),
        active_units=int(np.sum(variance_of_means > ACTIVE_UNIT_THRESHOLD)),
        kl_per_dim=[{"dim": int(dim), "kl": float(kl_by_dim[dim])} for dim in order],
        aggregate_posterior=aggregate_posterior_summary(totals),
        protocol=protocol,
        is_likelihood=is_likelihood,
        seed=seed,
        seconds=seconds,
        devices=devices,
    )


def evaluate_split(
    run: InferenceRun,
    split: str = "test",
    k: int = 5000,
    max_images: int | None = None,
    seed: int = 0,
    on_progress: Callable[[int, int], None] | None = None,
) -> SplitEvaluation:
    """evaluate_images() on split `split` of the run's dataset (its first `max_images` when given), its images
    split over the run's devices (vaecli.models.sampling.inference_placement)."""
    if max_images is not None and max_images < 1:
        raise UsageError(f"--images must be at least 1, got {max_images}")
    images = load_dataset(run.config.data).split(split)
    if len(images) == 0:
        raise UsageError(f"the {split} split of {run.dataset_name} is empty; choose another --split")
    placement = inference_placement(run.config)
    evaluation = evaluate_images(run, np.asarray(images[:max_images]), split, k, seed, on_progress, placement)
    weights = "moving average (train.ema)" if run.config.train.ema is not None else "trained weights"
    return SplitEvaluation(**{**evaluation.__dict__, "extra": {"weights": weights, "step": run.step}})


def evaluation_record(run: InferenceRun, evaluation: SplitEvaluation) -> dict[str, Any]:
    """What `vae evaluate --json` prints and the run directory keeps (see vaecli.runs.rundir.record_evaluation)."""
    return {"run": str(run.run_dir), "dataset": run.dataset_name, **evaluation.to_dict()}
