"""The VAE objective as pure functions of arrays: Bernoulli likelihood, KL to N(0, I), negative ELBO.

All quantities are in nats per image: sums over pixels and latent dimensions, never means.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def bernoulli_log_likelihood(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(x|z) summed over the last axis, from logits (stable: no log of a sigmoid).

    log Bernoulli(t; sigmoid(l)) = t * l - softplus(l); targets may be binary or in [0, 1].
    """
    return jnp.sum(targets * logits - jax.nn.softplus(logits), axis=-1)


def kl_to_standard_normal(mean: jax.Array, log_variance: jax.Array) -> jax.Array:
    """KL(N(mean, exp(log_variance)) || N(0, I)), analytic, summed over the last axis."""
    return 0.5 * jnp.sum(jnp.exp(log_variance) + jnp.square(mean) - 1.0 - log_variance, axis=-1)


def negative_elbo_terms(
    logits: jax.Array, targets: jax.Array, mean: jax.Array, log_variance: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Per-image (reconstruction loss, KL): their sum is the negative ELBO in nats."""
    return -bernoulli_log_likelihood(logits, targets), kl_to_standard_normal(mean, log_variance)
