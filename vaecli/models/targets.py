"""What a model is fitted to and scored on: a split's images as intensities or Bernoulli draws, keyed by the run's seed.

Shared by training (each step's targets) and evaluation (the same draws, without importing the training loop).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vaecli.common.config import Config
from vaecli.models.layers import bernoulli_draw, intensities

STATIC_BINARIZATION_STREAM = 4
# The number each split's static binarization (and evaluation's fixed draw) is folded with.
SPLIT_NUMBERS = {"train": 0, "val": 1, "test": 2}
# Philox (one of JAX's own PRNG implementations) draws bits about 4x faster than the default
# threefry on a CPU, and dynamic binarization draws one number per pixel per step.
PRNG_IMPL = "philox2x32"


def root_key(seed: int) -> jax.Array:
    """The run's root PRNG key; every other key is folded from it."""
    return jax.random.key(seed, impl=PRNG_IMPL)


def bernoulli_targets(images_uint8: jax.Array, key: jax.Array, binarize: str) -> jax.Array:
    """Flattened float32 targets in [0, 1]: fresh binary draws (dynamic) or the intensities as they are."""
    if binarize == "dynamic":
        # Drawn on the flattened batch: Philox fills a 2-D shape markedly faster than [B, H, W].
        flat_images = images_uint8.reshape(images_uint8.shape[0], -1)
        return bernoulli_draw(key, flat_images).astype(jnp.float32)
    return intensities(images_uint8)


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
