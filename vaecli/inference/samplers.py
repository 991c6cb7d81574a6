"""Where `vae generate` draws z from: the prior N(0, T^2 I), or a Gaussian mixture fitted to the training codes.

gmm is ex-post density estimation (Ghosh et al. 2020; pythae's GaussianMixtureSampler): the aggregate
posterior q(z) = E_x q(z|x) does not fill N(0, I), and z drawn where no training image's code lies
decode to blurred or non-images. A full-covariance mixture fitted to the training images' posterior
means draws z where the decoder was trained.

The fit depends only on the run, its checkpoint and the number of components (scikit-learn's
random_state and the training images' one Bernoulli draw both come from the run's config.seed), so it
is cached as RUN_DIR/samplers/gmm-<step>-<components>.npz and reused. --seed only chooses the draws.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from vaecli.common.errors import UsageError
from vaecli.common.images import make_grid, save_npz, save_npz_streamed, save_png
from vaecli.data.datasets import load_dataset
from vaecli.inference.sample import save_prior_samples
from vaecli.models.sampling import (
    check_temperature,
    decoded_batches,
    inference_placement,
    pixel_keys,
    sampling_key,
    seed_operand,
    split_rows,
)
from vaecli.runs.rundir import SAMPLER_SUBDIR

if TYPE_CHECKING:
    from vaecli.common.devices import Placement
    from vaecli.inference.exported import ExportedModel
    from vaecli.inference.open_run import InferenceRun
    from vaecli.models.vae import VAE

SAMPLERS = ("prior", "gmm")
# fold_in purpose of the mixture's draws under --seed, apart from the prior's (sample.SAMPLING_STREAM).
MIXTURE_SAMPLING_STREAM = 9
# A full covariance has latent (latent + 1) / 2 numbers per component: fewer images than this many
# per component give components fitted to a handful of codes.
IMAGES_PER_COMPONENT = 5
# EM iterations; scikit-learn's default of 100 stops some fits of 50-D codes before they converge.
MAX_EM_ITERATIONS = 300


def check_sampler(sampler: str, components: int) -> None:
    """Refuse an unknown sampler or a component count below 1, before any model is loaded."""
    if sampler not in SAMPLERS:
        raise UsageError(f"--sampler {sampler!r}: choose {' or '.join(SAMPLERS)}")
    if components < 1:
        raise UsageError(f"--components must be at least 1, got {components}")


def required_images(components: int) -> int:
    """The fewest training images a mixture of `components` is fitted on."""
    return max(IMAGES_PER_COMPONENT * components, components + 1)


@dataclass(frozen=True, eq=False)
class GaussianMixture:
    """sum_k weights[k] N(means[k], covariances[k]) over the latent space, in float64."""

    weights: np.ndarray  # [K], summing to 1
    means: np.ndarray  # [K, latent]
    covariances: np.ndarray  # [K, latent, latent], symmetric positive definite


def check_enough_images(image_count: int, components: int) -> None:
    """Refuse a mixture with fewer than required_images(components) training images to fit it on."""
    if image_count < required_images(components):
        raise UsageError(
            f"--components {components} needs at least {required_images(components)} training images "
            f"({IMAGES_PER_COMPONENT} per component), the run has {image_count}; use --components "
            f"{max(1, image_count // IMAGES_PER_COMPONENT)} or fewer"
        )


def fit_gaussian_mixture(codes: np.ndarray, components: int, random_state: int) -> GaussianMixture:
    """A full-covariance mixture of `components` Gaussians fitted to codes [N, latent] by EM (scikit-learn)."""
    check_enough_images(len(codes), components)
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture as ExpectationMaximization
    from threadpoolctl import threadpool_limits  # scikit-learn's own dependency

    mixture = ExpectationMaximization(
        n_components=components, covariance_type="full", max_iter=MAX_EM_ITERATIONS, random_state=random_state
    )
    # One BLAS thread: the fit's matrices are small, and on a busy 2-core machine two threads waiting
    # on each other made a 4,000-code fit take 33 s instead of 0.9 s (measured).
    with warnings.catch_warnings(), threadpool_limits(1):
        # An EM that has not fully converged still gives a usable density; it is no reason to fail.
        warnings.simplefilter("ignore", ConvergenceWarning)
        mixture.fit(np.asarray(codes, np.float64))
    return GaussianMixture(mixture.weights_, mixture.means_, mixture.covariances_)


def mixture_cache_path(run_dir: Path, step: int, components: int) -> Path:
    return Path(run_dir) / SAMPLER_SUBDIR / f"gmm-{step}-{components}.npz"


def read_cached_mixture(path: Path, components: int, latent_dim: int) -> GaussianMixture | None:
    """The mixture saved at `path`, or None when there is none (or it is unreadable or of other shapes)."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            mixture = GaussianMixture(saved["weights"], saved["means"], saved["covariances"])
    except (OSError, KeyError, ValueError):
        return None
    shapes = (mixture.weights.shape, mixture.means.shape, mixture.covariances.shape)
    if shapes != ((components,), (components, latent_dim), (components, latent_dim, latent_dim)):
        return None
    return mixture


@dataclass(frozen=True)
class MixtureFit:
    """The mixture `vae generate --sampler gmm` draws from, where it is cached, and whether it was fitted now."""

    mixture: GaussianMixture
    path: Path
    fitted_now: bool


def run_mixture(run: InferenceRun, components: int) -> MixtureFit:
    """The mixture fitted to the run's training codes at this checkpoint: read from its cache, or fitted and cached."""
    path = mixture_cache_path(run.run_dir, run.step, components)
    cached = read_cached_mixture(path, components, run.model.latent_dim)
    if cached is not None:
        return MixtureFit(cached, path, False)
    from vaecli.inference.latent import (
        split_codes,  # imports Flax: only a fit needs it, never drawing from a cached mixture
    )

    check_enough_images(len(load_dataset(run.config.data).train_images), components)  # before encoding them
    codes = split_codes(run, "train", seed=run.config.seed).means
    mixture = fit_gaussian_mixture(codes, components, run.config.seed)
    save_npz(path, weights=mixture.weights, means=mixture.means, covariances=mixture.covariances)
    return MixtureFit(mixture, path, True)


# ---- drawing -------------------------------------------------------------------------------------


def device_mixture(mixture: GaussianMixture) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cumulative weights, means, Cholesky factors of the covariances) as float32 arrays for the jitted draw.

    Rounded to float32 by NumPy, not JAX: on the device each conversion would be a program of its own.
    """
    cumulative = np.cumsum(mixture.weights)
    return (
        np.asarray(cumulative / cumulative[-1], np.float32),
        np.asarray(mixture.means, np.float32),
        np.asarray(np.linalg.cholesky(mixture.covariances), np.float32),
    )


def _mixture_latents(seed_key, indices, cumulative_weights, means, factors, temperature):
    """One z per index: a component chosen by its weight, then mean + T * L eps.

    Each z takes latent + 1 standard normals from fold_in(seed_key, index): eps, and one more whose
    normal CDF is a uniform that picks the component by inverse CDF. One draw per sample, as the
    prior makes, compiles in half the time of a split key with random.categorical (1.7 s against
    3.5 s, measured on a 2-core CPU), a cost every new --n pays.
    """

    def draw(index):
        normals = jax.random.normal(jax.random.fold_in(seed_key, index), (means.shape[1] + 1,))
        uniform = jax.scipy.special.ndtr(normals[-1])
        component = jnp.minimum(jnp.searchsorted(cumulative_weights, uniform, side="right"), means.shape[0] - 1)
        return means[component] + temperature * factors[component] @ normals[:-1]

    return jax.vmap(draw)(indices)


@partial(jax.jit, static_argnames=("count",))
def _mixture_latents_jit(seed, mixture_arrays, temperature, count):
    seed_key = sampling_key(seed, MIXTURE_SAMPLING_STREAM)
    return _mixture_latents(seed_key, jnp.arange(count), *mixture_arrays, temperature)


def mixture_latents(mixture: GaussianMixture, n: int, seed: int = 0, temperature: float = 1.0) -> np.ndarray:
    """n latents float32 [n, latent] drawn from the mixture, its deviations from each mean scaled by `temperature`."""
    return np.asarray(_mixture_latents_jit(seed_operand(seed), device_mixture(mixture), temperature, n))


@partial(jax.jit, static_argnames=("batch_size", "placement"))
def _decode_mixture_batch(model, seed, first_index, mixture_arrays, temperature, batch_size, placement=None):
    indices = split_rows(first_index + jnp.arange(batch_size), placement)
    seed_key = sampling_key(seed, MIXTURE_SAMPLING_STREAM)
    latents = _mixture_latents(seed_key, indices, *mixture_arrays, temperature)
    return split_rows(model.decode_images(latents, pixel_keys(seed_key, indices)), placement)


def mixture_sample_batches(
    model: VAE | ExportedModel,
    mixture: GaussianMixture,
    n: int,
    seed: int = 0,
    temperature: float = 1.0,
    placement: Placement | None = None,
) -> Iterator[np.ndarray]:
    """Images decoded from z drawn from the mixture, a batch at a time (float32 [<= DECODE_BATCH_SIZE, *image_shape]).

    Image i comes from fold_in(key, i), so it is the same whatever n is, or the devices (`placement`) it is split over.
    """
    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}")
    check_temperature(temperature)
    mixture_arrays = device_mixture(mixture)
    if placement is not None:
        model, mixture_arrays = placement.replicate((model, mixture_arrays))

    def decode_batch(first: int, batch_size: int) -> jax.Array:
        return _decode_mixture_batch(
            model, seed_operand(seed), first, mixture_arrays, temperature, batch_size, placement
        )

    yield from decoded_batches(model.image_shape, n, placement, decode_batch)


def mixture_samples(
    model: VAE | ExportedModel,
    mixture: GaussianMixture,
    n: int,
    seed: int = 0,
    temperature: float = 1.0,
    placement: Placement | None = None,
):
    """n images float32 [n, *image_shape] decoded (means of p(x|z)) from z drawn from the mixture."""
    return np.concatenate(list(mixture_sample_batches(model, mixture, n, seed, temperature, placement)))


def save_mixture_samples(
    out: Path, run: InferenceRun, n: int, seed: int, temperature: float, components: int
) -> MixtureFit:
    """Fit (or reuse) the run's mixture and write a grid PNG, or an .npz holding `samples` [n, *image_shape]."""
    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}")
    check_temperature(temperature)  # before a fit is made and cached for nothing
    fit = run_mixture(run, components)
    placement = inference_placement(run.config)
    if out.suffix.lower() == ".npz":
        batches = mixture_sample_batches(run.model, fit.mixture, n, seed, temperature, placement)
        save_npz_streamed(out, "samples", (n, *run.model.image_shape), np.float32, batches)
    else:
        save_png(out, make_grid(mixture_samples(run.model, fit.mixture, n, seed, temperature, placement)))
    return fit


def save_samples(
    out: Path, run: InferenceRun, sampler: str, n: int, seed: int, temperature: float, components: int
) -> str:
    """`vae generate`: n images from `sampler` written to `out` (a PNG grid or .npz); returns where z came from."""
    check_sampler(sampler, components)
    if sampler == "prior":
        save_prior_samples(out, run.model, n, seed, temperature, inference_placement(run.config))
        return f"the prior z ~ N(0, {temperature:g}^2 I)"
    fit = save_mixture_samples(out, run, n, seed, temperature, components)
    how = "fitted now and cached in" if fit.fitted_now else "cached in"
    mixture = f"a {components}-component Gaussian mixture of the training codes"
    return f"{mixture} ({how} {fit.path}), temperature {temperature:g}"
