"""The latent space of a trained VAE: codes of images, their plane, and paths through z to decode.

Maths and encoding only; vaecli.inference.explore draws the pictures. An image's code is its posterior mean
E[z|x] = mu(x) of q(z|x) = N(mu, sigma^2 I). A split is encoded as `vae evaluate` sees it
(evaluation_targets), a user's image as `vae reconstruct` sees it (model_views).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from statistics import NormalDist
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from vaecli.common.errors import UsageError
from vaecli.common.images import load_input_for_model
from vaecli.data.datasets import load_dataset
from vaecli.inference.evaluate import ACTIVE_UNIT_THRESHOLD, evaluation_targets
from vaecli.models.objectives import kl_per_dimension
from vaecli.models.sampling import DECODE_BATCH_SIZE, encoder_sees_binary, model_views, pixel_keys, sampling_key

if TYPE_CHECKING:
    from vaecli.inference.exported import ExportedModel
    from vaecli.inference.open_run import InferenceRun
    from vaecli.models.vae import VAE

# Images per compiled encoder call; the last batch is padded, so a split compiles once.
ENCODE_BATCH_SIZE = 1024
# An image of the run's own dataset named on the command line, e.g. test:12.
SPLIT_INDEX = re.compile(r"(train|val|test):(\d+)")
SPLIT_INDEX_HELP = "an image file, or SPLIT:INDEX for an image of the run's dataset (e.g. test:12, val:0)"
# Kingma & Welling's manifold figure: the prior's quantiles from 5 % to 95 % on each axis.
MANIFOLD_QUANTILES = (0.05, 0.95)


# ---- codes ---------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SplitCodes:
    """The posterior of every image of a split, with the images' labels."""

    split: str
    means: np.ndarray  # float32 [N, latent]: E[z|x], each image's code
    log_variances: np.ndarray  # float32 [N, latent]: log sigma^2 of q(z|x)
    labels: np.ndarray  # int [N]; -1 where an image has no label
    class_names: tuple[str, ...]  # label i names class_names[i]; empty when unknown


@jax.jit
def _encode_batch(model, views):
    return model.encode(views)


def encode_views(model: VAE | ExportedModel, views: jax.Array | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(posterior means, log-variances), float32 [N, latent], of encoder inputs float32 [N, values].

    `model` a VAE or an ExportedModel: a pytree either way (see vaecli.models.sampling).
    """
    views = jnp.asarray(views, jnp.float32).reshape(len(views), -1)
    count = views.shape[0]
    batch_size = max(1, min(count, ENCODE_BATCH_SIZE))
    padded = jnp.concatenate([views, jnp.zeros((-count % batch_size, views.shape[1]), views.dtype)])
    means, log_variances = [], []
    for first in range(0, count, batch_size):
        batch_means, batch_log_variances = _encode_batch(model, padded[first : first + batch_size])
        means.append(np.asarray(batch_means))
        log_variances.append(np.asarray(batch_log_variances))
    return np.concatenate(means)[:count], np.concatenate(log_variances)[:count]


def split_codes(run: InferenceRun, split: str, max_images: int | None = None, seed: int = 0) -> SplitCodes:
    """Encode split `split` of the run's dataset (its first `max_images`) as `vae evaluate --seed` sees it."""
    if max_images is not None and max_images < 1:
        raise UsageError(f"--images must be at least 1, got {max_images}")
    dataset = load_dataset(run.config.data)
    images = np.asarray(dataset.split(split)[:max_images])
    if len(images) == 0:
        raise UsageError(f"the {split} split of {run.dataset_name} is empty; choose another --split")
    labels = np.asarray(getattr(dataset, f"{split}_labels")[:max_images]).astype(np.int64)
    means, log_variances = encode_views(run.model, evaluation_targets(run.config, images, split, seed))
    return SplitCodes(split, means, log_variances, labels, tuple(dataset.class_names))


def read_inputs(run: InferenceRun, specs: list[str]) -> np.ndarray:
    """uint8 images [N, *image_shape]: each spec an image file (read as `vae reconstruct` reads it) or SPLIT:INDEX."""
    dataset = None
    images = []
    for spec in specs:
        match = SPLIT_INDEX.fullmatch(spec)
        if match is None:
            images.append(load_input_for_model(Path(spec), run.image_shape, run.preprocessing))
            continue
        dataset = dataset or load_dataset(run.config.data)
        split, index = match.group(1), int(match.group(2))
        split_images = dataset.split(split)
        if index >= len(split_images):
            raise UsageError(
                f"{spec}: the {split} split of {run.dataset_name} has {len(split_images)} images "
                f"(indices 0 to {len(split_images) - 1})"
            )
        images.append(np.asarray(split_images[index]))
    return np.stack(images)


@partial(jax.jit, static_argnames=("binarized",))
def _views_of(images_uint8: jax.Array, binarized: bool, seed_key: jax.Array) -> jax.Array:
    return model_views(images_uint8, binarized, seed_key, jnp.zeros(images_uint8.shape[0], jnp.int32))


def input_codes(run: InferenceRun, images_uint8: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(what the encoder saw, float32 [N, *image_shape]; posterior means, float32 [N, latent]).

    A binarized model sees one Bernoulli draw of each image, as in `vae reconstruct`; every image is
    drawn with the same index, so two identical images get the identical code.
    """
    seed_key = sampling_key(seed)
    binarized = encoder_sees_binary(run.config)
    views = np.asarray(_views_of(jnp.asarray(images_uint8), binarized, seed_key))
    means, _ = encode_views(run.model, views)
    return views.reshape(len(images_uint8), *run.image_shape), means


# ---- the plane of a scatter plot ------------------------------------------------------------------


@dataclass(frozen=True)
class Plane:
    """Two orthonormal directions of the latent space to draw codes on, and what each is called."""

    axes: np.ndarray  # float64 [latent, 2], orthonormal columns
    explained: np.ndarray  # float64 [2]: the fraction of the codes' variance along each axis
    names: tuple[str, str]
    is_pca: bool


def principal_axes(codes: np.ndarray, count: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(the codes' first `count` principal directions [latent, count], the fraction of variance each explains).

    Directions from the centred covariance; each sign fixed so its largest loading is positive, so the
    same codes always give the same picture.
    """
    codes = np.asarray(codes, np.float64)
    centred = codes - codes.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred / max(len(codes) - 1, 1))
    order = np.argsort(eigenvalues, kind="stable")[::-1][:count]
    axes = eigenvectors[:, order]
    largest = axes[np.argmax(np.abs(axes), axis=0), np.arange(len(order))]
    axes = axes * np.where(largest < 0, -1.0, 1.0)
    total = float(np.clip(eigenvalues, 0, None).sum())
    explained = np.clip(eigenvalues[order], 0, None) / total if total > 0 else np.zeros(len(order))
    return axes, explained


def check_plottable(latent_dim: int) -> None:
    """Refuse a latent with no plane to draw: one dimension."""
    if latent_dim < 2:
        raise UsageError(
            f"the run's latent has {latent_dim} dimension; a plot of the latent space needs at least 2 "
            "(train with --set model.latent_dim=2 or more)"
        )


def latent_plane(codes: np.ndarray) -> Plane:
    """z itself for a 2-D latent, else the codes' first two principal directions."""
    latent_dim = codes.shape[1]
    check_plottable(latent_dim)
    if latent_dim == 2:
        variance = np.asarray(codes, np.float64).var(axis=0)
        return Plane(np.eye(2), variance / max(float(variance.sum()), 1e-300), ("z0", "z1"), False)
    axes, explained = principal_axes(codes)
    names = tuple(f"PC{index + 1} ({share:.1%} of variance)" for index, share in enumerate(explained))
    return Plane(axes, explained, names, True)


def project(codes: np.ndarray, plane: Plane) -> np.ndarray:
    """Codes [N, latent] in the plane's coordinates [N, 2], not centred: the prior's mean z = 0 stays at 0.

    The axes are orthonormal, so the prior N(0, I) projects onto them as N(0, I): its circles of
    radius 1 and 2 are exact in the picture.
    """
    return np.asarray(codes, np.float64) @ plane.axes


def prior_quantile_grid(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(z values on each axis [steps], a grid of 2-D latents [steps * steps, 2] row by row).

    The values are N(0, 1)'s quantiles evenly spaced in probability, so each tile stands for equal prior
    mass. Rows go down z1 from high to low, columns along z0 from low to high, as on a plot's axes.
    """
    values = np.array([NormalDist().inv_cdf(p) for p in np.linspace(*MANIFOLD_QUANTILES, steps)])
    rows, columns = np.meshgrid(values[::-1], values, indexing="ij")
    return values, np.stack([columns.ravel(), rows.ravel()], axis=1)


# ---- paths through z -----------------------------------------------------------------------------


@partial(jax.jit, static_argnames=("steps", "spherical"))
def interpolation_path(start: jax.Array, end: jax.Array, steps: int, spherical: bool) -> jax.Array:
    """`steps` latents [steps, latent] from `start` to `end`, both included.

    Straight: (1 - t) start + t end. Spherical: the direction moves along the great circle between the
    two (slerp) while the length changes linearly, so two codes of equal length keep it all the way,
    where a straight path cuts through the low-norm middle that the prior rarely draws.
    """
    fraction = jnp.linspace(0.0, 1.0, steps)[:, None]
    if not spherical:
        return (1 - fraction) * start + fraction * end
    start_length, end_length = jnp.linalg.norm(start), jnp.linalg.norm(end)
    start_direction, end_direction = start / start_length, end / end_length
    angle = jnp.arccos(jnp.clip(jnp.dot(start_direction, end_direction), -1.0, 1.0))
    sine = jnp.sin(angle)
    # Nearly parallel directions: the great circle's weights tend to the straight ones.
    safe_sine = jnp.where(sine > 1e-6, sine, 1.0)
    start_weight = jnp.where(sine > 1e-6, jnp.sin((1 - fraction) * angle) / safe_sine, 1 - fraction)
    end_weight = jnp.where(sine > 1e-6, jnp.sin(fraction * angle) / safe_sine, fraction)
    direction = start_weight * start_direction + end_weight * end_direction
    direction = direction / jnp.linalg.norm(direction, axis=1, keepdims=True)
    return ((1 - fraction) * start_length + fraction * end_length) * direction


def check_interpolable(start: np.ndarray, end: np.ndarray, spherical: bool) -> None:
    """Refuse two codes that give no path: the same code, or (spherical) no plane to turn in."""
    if np.allclose(start, end, rtol=0, atol=1e-6):
        raise UsageError("A and B have the same posterior mean (the same image?); give two different images")
    if not spherical:
        return
    start_length, end_length = float(np.linalg.norm(start)), float(np.linalg.norm(end))
    if min(start_length, end_length) < 1e-6:
        raise UsageError("--spherical: a posterior mean is at z = 0, which has no direction; drop --spherical")
    if np.dot(start, end) / (start_length * end_length) < -1 + 1e-6:
        raise UsageError("--spherical: A and B point in opposite directions, so no great circle is defined")


def traversal_latents(centre: np.ndarray, dims: list[int], offsets: np.ndarray) -> np.ndarray:
    """Latents [len(dims), len(offsets), latent]: row r is `centre` with coordinate dims[r] moved by each offset."""
    centre = np.asarray(centre, np.float32)
    latents = np.broadcast_to(centre, (len(dims), len(offsets), len(centre))).copy()
    for row, dim in enumerate(dims):
        latents[row, :, dim] = centre[dim] + np.asarray(offsets, np.float32)
    return latents


@jax.jit
def _decode_means(model, latents):
    # An autoregressive model draws every picture with the same pixel keys: neighbouring frames of an
    # interpolation or a traversal then differ by what z changes, not by fresh pixel noise.
    row_keys = pixel_keys(sampling_key(0), jnp.zeros(latents.shape[0], jnp.int32))
    return model.decode_images(latents, row_keys)


def decode_means(model: VAE | ExportedModel, latents: np.ndarray) -> np.ndarray:
    """The mean of p(x|z) for each latent [N, latent] (a draw, for an autoregressive model), as generate decodes:
    float32 [N, *image_shape]."""
    latents = np.asarray(latents, np.float32)
    batches = [
        np.asarray(_decode_means(model, latents[first : first + DECODE_BATCH_SIZE]))
        for first in range(0, len(latents), DECODE_BATCH_SIZE)
    ]
    return np.concatenate(batches).reshape(len(latents), *model.image_shape)


# ---- which dimensions carry information ----------------------------------------------------------


@dataclass(frozen=True)
class DimensionUsage:
    """How much each latent dimension is used over a split, as `vae evaluate` reports it."""

    kl: np.ndarray  # float64 [latent]: mean KL(q(z_i|x) || N(0, 1)) over the images, nats
    active: np.ndarray  # bool [latent]: Var_x E[z_i|x] > ACTIVE_UNIT_THRESHOLD (Burda et al.'s active unit)
    order: np.ndarray  # int [latent]: the dimensions by KL, largest first (ties by index)


def dimension_usage(codes: SplitCodes) -> DimensionUsage:
    """Per-dimension KL and activity of the codes: the figures behind evaluate's "KL per dimension"."""
    kl = np.asarray(kl_per_dimension(jnp.asarray(codes.means), jnp.asarray(codes.log_variances)), np.float64)
    kl_by_dim = kl.mean(axis=0)
    active = np.asarray(codes.means, np.float64).var(axis=0) > ACTIVE_UNIT_THRESHOLD
    return DimensionUsage(kl_by_dim, active, np.argsort(-kl_by_dim, kind="stable"))


def parse_dimensions(text: str) -> list[int]:
    """'0,3,5' -> [0, 3, 5] (duplicates dropped, order kept)."""
    try:
        dims = [int(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"--dims {text!r}: give dimension numbers separated by commas, e.g. 0,3,5") from None
    return list(dict.fromkeys(dims))


def choose_dimensions(usage: DimensionUsage, requested: list[int] | None, count: int = 10) -> list[int]:
    """The requested dimensions (default: the `count` with the most KL), ordered by KL, largest first."""
    latent_dim = len(usage.kl)
    if requested is None:
        return [int(dim) for dim in usage.order[:count]]
    unknown = [dim for dim in requested if not 0 <= dim < latent_dim]
    if unknown:
        raise UsageError(
            f"--dims: there is no dimension {unknown[0]}; the latent has {latent_dim} dimensions, 0 to {latent_dim - 1}"
        )
    rank = {int(dim): position for position, dim in enumerate(usage.order)}
    return sorted(requested, key=rank.__getitem__)
