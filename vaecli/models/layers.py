"""What every architecture shares below its Flax layers: activations, bounds, the encoder's input, reshaping.

Pure JAX (no Flax): sampling.py draws with these too. Images travel flattened, [batch, values] in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

ACTIVATION_FUNCTIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "elu": jax.nn.elu,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
    "softplus": jax.nn.softplus,
}
# The posterior log-variance is squashed softly into [-B, B]: an unconstrained one can overflow
# exp() (and the KL) after one bad step; sigma from e^-7.5 to e^7.5 covers any useful posterior.
LOG_VARIANCE_BOUND = 15.0
# Channels share normalisation statistics in groups of width / 8 (fewer groups when 8 does not
# divide the width): per-image statistics, so nothing depends on the batch and nothing is stored
# besides parameters.
MAX_NORM_GROUPS = 8
# The GroupNorm epsilon of the conv model (Flax's default, named).
NORM_EPSILON = 1e-6


# ---- what the encoder is given, and the reparameterization ---------------------------------------


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


def latents_from_noise(mean: jax.Array, log_variance: jax.Array, noise: jax.Array) -> jax.Array:
    """z = mu + sigma * eps for given eps (any leading sample axes): q(z|x)'s samples, gradients flowing."""
    return mean + jnp.exp(0.5 * log_variance) * noise


# ---- pieces the Flax layers share ----------------------------------------------------------------


def norm_groups(width: int) -> int:
    """How many channel groups share statistics in a residual block of `width` channels."""
    return math.gcd(width, MAX_NORM_GROUPS)


def depth_to_space(maps: jax.Array) -> jax.Array:
    """[N, H, W, 4C] -> [N, 2H, 2W, C]: channel (a, b, c) of pixel (i, j) goes to pixel (2i + a, 2j + b)."""
    count, height, width, channels = maps.shape
    blocks = maps.reshape(count, height, width, 2, 2, channels // 4)
    return blocks.transpose(0, 1, 3, 2, 4, 5).reshape(count, 2 * height, 2 * width, channels // 4)
