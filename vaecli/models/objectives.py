"""The VAE objectives as pure functions of arrays: KL to N(0, I), Gaussian densities, ELBO and IWAE bounds.

All quantities are in nats per image: sums over pixels and latent dimensions, never means. The
likelihood p(x|z) itself lives in `vaecli.models.likelihoods`; here it arrives as log p(x|z) per sample.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LOG_TWO_PI = math.log(2.0 * math.pi)


def kl_to_standard_normal(mean: jax.Array, log_variance: jax.Array) -> jax.Array:
    """KL(N(mean, exp(log_variance)) || N(0, I)), analytic, summed over the last axis."""
    return jnp.sum(kl_per_dimension(mean, log_variance), axis=-1)


def kl_per_dimension(mean: jax.Array, log_variance: jax.Array) -> jax.Array:
    """The KL of each latent dimension separately: (sigma^2 - 1 - log sigma^2 + mu^2) / 2, never negative.

    expm1, not exp(v) - 1: near the prior exp(v) - 1 - v falls below float32's resolution and came
    out as -3e-8.
    """
    return 0.5 * (jnp.expm1(log_variance) - log_variance + jnp.square(mean))


def standard_normal_log_density(latents: jax.Array) -> jax.Array:
    """log N(z; 0, I), summed over the last axis."""
    return -0.5 * jnp.sum(jnp.square(latents) + LOG_TWO_PI, axis=-1)


def gaussian_log_density_of_noise(noise: jax.Array, log_variance: jax.Array) -> jax.Array:
    """log N(z; mu, sigma^2 I) for z = mu + sigma * noise, from the noise (exact, no cancellation)."""
    return -0.5 * jnp.sum(jnp.square(noise) + LOG_TWO_PI + log_variance, axis=-1)


def importance_log_weights(
    log_likelihood: jax.Array, latents: jax.Array, noise: jax.Array, log_variance: jax.Array, kl_weight=1.0
) -> jax.Array:
    """log w = log p(x|z) + kl_weight * (log p(z) - log q(z|x)) for each sample z = mu + sigma * noise.

    kl_weight 1 gives the importance weights p(x, z) / q(z|x) of the likelihood bounds.
    """
    log_prior = standard_normal_log_density(latents)
    log_posterior = gaussian_log_density_of_noise(noise, log_variance)
    return log_likelihood + kl_weight * (log_prior - log_posterior)


def importance_weighted_bound(log_weights: jax.Array, axis: int = 0) -> jax.Array:
    """log (1/k) sum_k w_k over `axis` (k samples): the IWAE bound, <= log p(x), tight as k grows.

    With k = 1 it is a one-sample estimate of the ELBO. Log-sum-exp keeps it finite for weights of
    any size.
    """
    k = log_weights.shape[axis]
    return jax.scipy.special.logsumexp(log_weights, axis=axis) - math.log(k)


def negative_elbo_terms(
    log_likelihood: jax.Array, mean: jax.Array, log_variance: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Per-image (reconstruction loss -log p(x|z), KL to the prior): their sum is the negative ELBO in nats."""
    return -log_likelihood, kl_to_standard_normal(mean, log_variance)
