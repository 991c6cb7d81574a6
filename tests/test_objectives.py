"""The objective's pieces one at a time: KL, Gaussian log densities, importance weights, ELBO terms, the sample.

The estimators built from them are checked against closed forms in test_estimators.py; the likelihoods
p(x|z) in test_likelihoods.py.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.stats import norm

from vaecli.models.objectives import (
    gaussian_log_density_of_noise,
    importance_log_weights,
    importance_weighted_bound,
    kl_per_dimension,
    kl_to_standard_normal,
    negative_elbo_terms,
    standard_normal_log_density,
)
from vaecli.models.vae import reparameterize


@pytest.fixture(autouse=True)
def no_implicit_rank_promotion():
    """Broadcasting bugs surface as errors: every broadcast must be explicit."""
    with jax.numpy_rank_promotion("raise"):
        yield


def numpy_gaussian_log_density(values: np.ndarray, mean: np.ndarray, variance: np.ndarray) -> np.ndarray:
    """log N(values; mean, diag(variance)) summed over the last axis, float64."""
    return -0.5 * np.sum((values - mean) ** 2 / variance + np.log(2 * np.pi * variance), axis=-1)


def test_kl_matches_a_monte_carlo_estimate():
    mean = jnp.array([0.5, -1.2, 0.0, 2.0, 0.3])
    log_variance = jnp.array([0.0, -1.0, 0.7, -2.5, 1.2])
    means, log_variances = jnp.broadcast_to(mean, (400_000, 5)), jnp.broadcast_to(log_variance, (400_000, 5))
    samples = reparameterize(jax.random.key(0), means, log_variances)
    # KL(q || p) = E_q[log q(z) - log p(z)], estimated from samples of q.
    log_ratio = jnp.sum(norm.logpdf(samples, means, jnp.exp(0.5 * log_variances)) - norm.logpdf(samples), axis=-1)
    estimate, standard_error = float(jnp.mean(log_ratio)), float(jnp.std(log_ratio) / np.sqrt(len(log_ratio)))

    analytic = float(kl_to_standard_normal(mean, log_variance))

    assert analytic == pytest.approx(estimate, abs=4 * standard_error)
    assert standard_error < 0.01  # the check is tight enough to catch a wrong factor or sign


def test_kl_per_dimension_is_the_closed_form_and_sums_to_the_kl():
    rng = np.random.default_rng(0)
    mean, log_variance = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    expected = 0.5 * (np.exp(log_variance) + mean**2 - 1.0 - log_variance)

    per_dimension = kl_per_dimension(jnp.asarray(mean, jnp.float32), jnp.asarray(log_variance, jnp.float32))
    total = kl_to_standard_normal(jnp.asarray(mean, jnp.float32), jnp.asarray(log_variance, jnp.float32))

    np.testing.assert_allclose(per_dimension, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(total, expected.sum(axis=-1), rtol=1e-5)


def test_gaussian_log_densities_match_the_closed_form():
    rng = np.random.default_rng(1)
    mean, log_variance, noise = rng.normal(size=(5, 4)), rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    latents = mean + np.exp(0.5 * log_variance) * noise

    prior = standard_normal_log_density(jnp.asarray(latents, jnp.float32))
    posterior = gaussian_log_density_of_noise(jnp.asarray(noise, jnp.float32), jnp.asarray(log_variance, jnp.float32))

    np.testing.assert_allclose(prior, numpy_gaussian_log_density(latents, 0.0, 1.0), rtol=1e-5)
    np.testing.assert_allclose(
        posterior, numpy_gaussian_log_density(latents, mean, np.exp(log_variance)), rtol=1e-5, atol=1e-5
    )


def test_importance_log_weights_are_log_joint_over_posterior_scaled_by_kl_weight():
    rng = np.random.default_rng(2)
    mean, log_variance, noise = rng.normal(size=(3, 4)), rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    latents = mean + np.exp(0.5 * log_variance) * noise
    log_likelihood = rng.normal(-50.0, 5.0, size=3)
    log_prior_over_posterior = numpy_gaussian_log_density(latents, 0.0, 1.0) - numpy_gaussian_log_density(
        latents, mean, np.exp(log_variance)
    )

    def log_weights(kl_weight):
        arrays = (log_likelihood, latents, noise, log_variance)
        return importance_log_weights(*(jnp.asarray(array, jnp.float32) for array in arrays), kl_weight=kl_weight)

    np.testing.assert_allclose(log_weights(1.0), log_likelihood + log_prior_over_posterior, rtol=1e-5)
    np.testing.assert_allclose(log_weights(0.25), log_likelihood + 0.25 * log_prior_over_posterior, rtol=1e-5)
    np.testing.assert_allclose(log_weights(0.0), log_likelihood, rtol=1e-6)


def test_importance_weighted_bound_is_the_log_mean_weight_along_the_sample_axis():
    weights = np.array([[1.0, 4.0], [3.0, 4.0], [5.0, 1.0]])  # 3 samples of 2 images
    expected = np.log(weights.mean(axis=0))  # [log 3, log 3]

    np.testing.assert_allclose(importance_weighted_bound(jnp.log(weights)), expected, rtol=1e-6)
    np.testing.assert_allclose(importance_weighted_bound(jnp.log(weights.T), axis=1), expected, rtol=1e-6)


def test_bound_gradient_is_the_self_normalised_importance_weights():
    # d/d log w_i of log mean(w) = w_i / sum(w): each sample's gradient is weighted by its normalised weight.
    log_weights = jnp.array([-3.0, -1.0, -2.0, -0.5])
    gradient = jax.grad(importance_weighted_bound)(log_weights)
    np.testing.assert_allclose(gradient, jax.nn.softmax(log_weights), rtol=1e-6)


def test_reparameterized_sample_has_the_posterior_mean_and_spread():
    mean, log_variance = jnp.array([1.5, -0.5]), jnp.log(jnp.array([0.25, 4.0]))
    means, log_variances = jnp.broadcast_to(mean, (200_000, 2)), jnp.broadcast_to(log_variance, (200_000, 2))
    samples = reparameterize(jax.random.key(1), means, log_variances)
    np.testing.assert_allclose(jnp.mean(samples, axis=0), mean, atol=0.02)
    np.testing.assert_allclose(jnp.std(samples, axis=0), jnp.array([0.5, 2.0]), rtol=0.01)


def test_gradients_reach_mean_and_log_variance_through_the_sample():
    key = jax.random.key(2)
    mean, log_variance = jnp.array([0.3, -0.7, 1.1]), jnp.array([0.2, -0.4, 0.0])

    def loss(mean, log_variance):
        return jnp.sum(reparameterize(key, mean, log_variance) ** 2)

    grad_mean, grad_log_variance = jax.grad(loss, argnums=(0, 1))(mean, log_variance)
    noise = jax.random.normal(key, mean.shape)
    sigma = jnp.exp(0.5 * log_variance)
    z = mean + sigma * noise
    # d/dmu z^2 = 2z;  d/dlogvar z^2 = 2z * 0.5 * sigma * eps.
    np.testing.assert_allclose(grad_mean, 2 * z, rtol=1e-6)
    np.testing.assert_allclose(grad_log_variance, z * sigma * noise, rtol=1e-6)
    assert np.all(np.abs(grad_log_variance) > 0)


def test_kl_gradients_are_the_closed_form():
    # dKL/dmu = mu and dKL/dlogvar = (exp(logvar) - 1) / 2: what pulls the posterior towards the prior.
    mean, log_variance = jnp.array([0.3, -0.7, 1.1]), jnp.array([0.2, -0.4, 0.0])
    grad_mean, grad_log_variance = jax.grad(kl_to_standard_normal, argnums=(0, 1))(mean, log_variance)
    np.testing.assert_allclose(grad_mean, mean, rtol=1e-6)
    np.testing.assert_allclose(grad_log_variance, 0.5 * jnp.expm1(log_variance), rtol=1e-6, atol=1e-7)


def test_negative_elbo_terms_are_reconstruction_loss_and_kl():
    log_likelihood = jnp.array([-4 * math.log(2.0), -1.5])  # log p(x|z) per image, from a likelihood
    mean, log_variance = jnp.ones((2, 3)), jnp.zeros((2, 3))
    reconstruction, kl = negative_elbo_terms(log_likelihood, mean, log_variance)
    np.testing.assert_allclose(reconstruction, [4 * math.log(2.0), 1.5], rtol=1e-6)  # -log p(x|z), in nats
    np.testing.assert_allclose(kl, [1.5, 1.5], rtol=1e-6)  # 0.5 * sum(mu^2) with unit variance
