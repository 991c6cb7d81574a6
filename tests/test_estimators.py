"""The estimators against closed forms, on a linear-Gaussian model where every answer is known.

p(z) = N(0, I_d), p(x|z) = N(W z + b, s^2 I_D). Then x ~ N(b, W W^T + s^2 I) gives log p(x) exactly, the
posterior is N(Sigma W^T (x - b) / s^2, Sigma) with Sigma = (I + W^T W / s^2)^-1, and for a diagonal
Gaussian q the ELBO is analytic. The references are NumPy float64; the estimators run as the VAE runs
them, in float32 on samples z = mu + sigma * eps.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vaecli.models.objectives import (
    importance_log_weights,
    importance_weighted_bound,
    kl_per_dimension,
    kl_to_standard_normal,
    negative_elbo_terms,
)

LATENT_DIM, DATA_DIM, NOISE_SCALE = 3, 6, 0.5
OBSERVATION_COUNT = 3
# One pool of q-samples per observation, cut into repetitions of k samples for every k below.
POOL_SIZE = 1_000_000
SAMPLE_COUNTS = (1, 10, 100, 1000, 5000)
# The bias of the k-sample bound is about Var(w / p(x)) / 2k: at most 5e-4 nats here at k = 5000 (the
# relative variance of the weights is 3 to 5). What is left is the Monte-Carlo error of an average of
# 200 bounds (standard error about 0.002 nats) and float32 rounding (about 1e-5). 0.01 nats is over four
# standard errors, and far below what a missing -log k (8.5 nats) or a wrong density term moves.
BOUND_TOLERANCE_AT_5000 = 0.01
# The ELBO must sit this far below log p(x): q is deliberately wrong, so the gap is several nats.
CLEAR_MARGIN = 1.0
# log w = log p(x|z) + log p(z) - log q(z|x) sums terms of order 10 in float32: a few ulps of 10.
FLOAT32_LOG_WEIGHT_TOLERANCE = 2e-5


@dataclass(frozen=True)
class LinearGaussianModel:
    """p(z) = N(0, I), p(x|z) = N(W z + b, s^2 I), with log p(x), the posterior and the ELBO in closed form."""

    weights: np.ndarray  # W, (data_dim, latent_dim)
    bias: np.ndarray  # b, (data_dim,)
    noise_scale: float  # s

    def marginal_covariance(self) -> np.ndarray:
        return self.weights @ self.weights.T + self.noise_scale**2 * np.eye(len(self.bias))

    def log_marginal(self, observations: np.ndarray) -> np.ndarray:
        """log p(x) = log N(x; b, W W^T + s^2 I) for each row, float64."""
        covariance = self.marginal_covariance()
        _, log_determinant = np.linalg.slogdet(covariance)
        residuals = observations - self.bias
        mahalanobis = np.einsum("ni,ni->n", residuals, np.linalg.solve(covariance, residuals.T).T)
        return -0.5 * (len(self.bias) * math.log(2 * math.pi) + log_determinant + mahalanobis)

    def posterior(self, observations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The exact posterior p(z|x): a mean per row and the covariance they share, float64."""
        precision = np.eye(self.weights.shape[1]) + self.weights.T @ self.weights / self.noise_scale**2
        covariance = np.linalg.inv(precision)
        means = (observations - self.bias) @ self.weights @ covariance / self.noise_scale**2
        return means, covariance

    def analytic_elbo(self, observations: np.ndarray, mean: np.ndarray, variance: np.ndarray) -> np.ndarray:
        """E_q[log p(x|z)] - KL(q || p(z)) for q = N(mean, diag(variance)), exact, float64."""
        data_dim, s2 = len(self.bias), self.noise_scale**2
        residuals = observations - mean @ self.weights.T - self.bias
        # E_q ||x - W z - b||^2 = ||x - W mu - b||^2 + tr(W diag(v) W^T).
        expected_square = np.sum(residuals**2, axis=-1) + np.sum(variance * np.sum(self.weights**2, axis=0), axis=-1)
        expected_log_likelihood = -0.5 * data_dim * math.log(2 * math.pi * s2) - 0.5 * expected_square / s2
        kl = 0.5 * np.sum(variance + mean**2 - 1.0 - np.log(variance), axis=-1)
        return expected_log_likelihood - kl

    def log_likelihood(self, latents: jax.Array, observations: jax.Array) -> jax.Array:
        """log p(x|z) per sample, float32, as a decoder's likelihood would hand it to the objectives."""
        weights, bias = jnp.asarray(self.weights, jnp.float32), jnp.asarray(self.bias, jnp.float32)
        residuals = observations - latents @ weights.T - jnp.broadcast_to(bias, observations.shape)
        return -0.5 * jnp.sum(
            jnp.square(residuals / self.noise_scale) + math.log(2 * math.pi * self.noise_scale**2), -1
        )

    def sample_observations(self, rng: np.random.Generator, count: int) -> np.ndarray:
        latents = rng.normal(size=(count, self.weights.shape[1]))
        return latents @ self.weights.T + self.bias + self.noise_scale * rng.normal(size=(count, len(self.bias)))


def gaussian_kl(mean_q, covariance_q, mean_p, covariance_p) -> float:
    """KL(N(mean_q, covariance_q) || N(mean_p, covariance_p)), float64."""
    precision_p = np.linalg.inv(covariance_p)
    difference = mean_p - mean_q
    return 0.5 * (
        np.trace(precision_p @ covariance_q)
        + difference @ precision_p @ difference
        - len(mean_q)
        + np.linalg.slogdet(covariance_p)[1]
        - np.linalg.slogdet(covariance_q)[1]
    )


def sample_log_weights(model, observations, mean, log_variance, key, sample_count) -> tuple[jax.Array, jax.Array]:
    """log p(x|z) and log w = log p(x, z) / q(z|x) for sample_count draws z = mu + sigma * eps per observation.

    Each comes back as (sample_count, observations); the inputs are float64 NumPy, the arithmetic float32.
    """

    @jax.jit
    def draw(observations, mean, log_variance):
        samples_shape = (sample_count, *mean.shape)
        noise = jax.random.normal(key, samples_shape)
        # Explicit broadcasts: the tests run with rank promotion raised.
        mean, log_variance = jnp.broadcast_to(mean, samples_shape), jnp.broadcast_to(log_variance, samples_shape)
        latents = mean + jnp.exp(0.5 * log_variance) * noise
        log_likelihood = model.log_likelihood(
            latents, jnp.broadcast_to(observations, (sample_count, *observations.shape))
        )
        return log_likelihood, importance_log_weights(log_likelihood, latents, noise, log_variance)

    return draw(*(jnp.asarray(array, jnp.float32) for array in (observations, mean, log_variance)))


def bounds_by_size(log_weights: jax.Array, sample_counts: tuple[int, ...]) -> dict[int, np.ndarray]:
    """For each k, the k-sample bound on consecutive blocks of k samples: (repetitions, n), float64 for averaging."""

    @jax.jit  # one compilation for every k, not one per k
    def bounds(log_weights):
        return {
            k: importance_weighted_bound(log_weights.reshape(len(log_weights) // k, k, *log_weights.shape[1:]), axis=1)
            for k in sample_counts
        }

    return {k: np.asarray(bound, np.float64) for k, bound in bounds(log_weights).items()}


def mean_and_standard_error(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return values.mean(axis=0), values.std(axis=0, ddof=1) / math.sqrt(len(values))


@pytest.fixture(autouse=True, scope="module")
def no_implicit_rank_promotion():
    """Broadcasting bugs surface as errors: every broadcast must be explicit (module scope: the pool too)."""
    with jax.numpy_rank_promotion("raise"):
        yield


@pytest.fixture(scope="module")
def model() -> LinearGaussianModel:
    rng = np.random.default_rng(0)
    return LinearGaussianModel(
        weights=0.5 * rng.normal(size=(DATA_DIM, LATENT_DIM)), bias=rng.normal(size=DATA_DIM), noise_scale=NOISE_SCALE
    )


@pytest.fixture(scope="module")
def observations(model) -> np.ndarray:
    return model.sample_observations(np.random.default_rng(1), OBSERVATION_COUNT)


@pytest.fixture(scope="module")
def wrong_posterior(model, observations) -> tuple[np.ndarray, np.ndarray]:
    """A diagonal q(z|x), as an encoder gives: the exact mean moved 0.6 to 1 posterior sds, 2.5x the marginal variances.

    Wider than the posterior in every direction, so the weights are bounded and the bound converges fast.
    """
    posterior_mean, posterior_covariance = model.posterior(observations)
    posterior_variance = np.diag(posterior_covariance)
    shift_in_sds = np.linspace(0.6, 1.0, OBSERVATION_COUNT)[:, np.newaxis]  # a different gap for each observation
    mean = posterior_mean + shift_in_sds * np.sqrt(posterior_variance)
    variance = np.broadcast_to(2.5 * posterior_variance, mean.shape)
    return mean, variance


@pytest.fixture(scope="module")
def pool(model, observations, wrong_posterior) -> tuple[jax.Array, jax.Array]:
    """(log p(x|z), log w) for POOL_SIZE draws from the wrong q per observation, shared by the ELBO and bound tests."""
    mean, variance = wrong_posterior
    return sample_log_weights(model, observations, mean, np.log(variance), jax.random.key(2), POOL_SIZE)


# --- the references agree with each other --------------------------------------------------------


def test_the_closed_forms_agree_elbo_is_log_marginal_minus_kl_to_the_posterior(model, observations, wrong_posterior):
    mean, variance = wrong_posterior
    posterior_mean, posterior_covariance = model.posterior(observations)
    gaps = [
        gaussian_kl(mean[i], np.diag(variance[i]), posterior_mean[i], posterior_covariance)
        for i in range(OBSERVATION_COUNT)
    ]
    np.testing.assert_allclose(
        model.analytic_elbo(observations, mean, variance), model.log_marginal(observations) - gaps, rtol=0, atol=1e-9
    )
    assert min(gaps) > CLEAR_MARGIN  # q is wrong enough that the bounds have room to rise
    # ... and wider than the posterior in every direction, so p(x, z) / q(z|x) is bounded.
    assert np.linalg.eigvalsh(np.diag(variance[0]) - posterior_covariance).min() > 0


# --- the ELBO ------------------------------------------------------------------------------------


def test_elbo_estimates_match_the_analytic_elbo_below_log_marginal(model, observations, wrong_posterior, pool):
    mean, variance = wrong_posterior
    analytic = model.analytic_elbo(observations, mean, variance)
    log_marginal = model.log_marginal(observations)
    log_likelihood, log_weights = pool

    # The VAE's form: a Monte-Carlo reconstruction term plus the analytic KL.
    reconstruction, kl = negative_elbo_terms(
        log_likelihood, jnp.asarray(mean, jnp.float32), jnp.asarray(np.log(variance), jnp.float32)
    )
    reconstruction_mean, reconstruction_error = mean_and_standard_error(np.asarray(reconstruction, np.float64))
    elbo_with_analytic_kl = -(reconstruction_mean + np.asarray(kl, np.float64))
    # The importance-weighted form with one sample: log p(x|z) + log p(z) - log q(z|x), averaged.
    one_sample_elbo, one_sample_error = mean_and_standard_error(bounds_by_size(log_weights, (1,))[1])

    assert np.all(reconstruction_error < 0.01) and np.all(one_sample_error < 0.01)  # tight enough to mean something
    np.testing.assert_array_less(np.abs(elbo_with_analytic_kl - analytic), 4 * reconstruction_error)
    np.testing.assert_array_less(np.abs(one_sample_elbo - analytic), 4 * one_sample_error)
    np.testing.assert_array_less(elbo_with_analytic_kl, log_marginal - CLEAR_MARGIN)
    np.testing.assert_array_less(one_sample_elbo, log_marginal - CLEAR_MARGIN)


# --- the importance-weighted bound -------------------------------------------------------------


def test_bound_rises_with_k_towards_log_marginal(model, observations, pool):
    log_marginal = model.log_marginal(observations)
    _, log_weights = pool
    bounds = bounds_by_size(log_weights, SAMPLE_COUNTS)

    for smaller, larger in itertools.pairwise(SAMPLE_COUNTS):
        # Paired: each block of `larger` samples against the mean of its own blocks of `smaller`.
        own_smaller = bounds[smaller].reshape(len(bounds[larger]), larger // smaller, -1).mean(axis=1)
        rise, rise_error = mean_and_standard_error(bounds[larger] - own_smaller)
        assert np.all(rise > 5 * rise_error), (smaller, larger, rise, rise_error)

    final_mean, final_error = mean_and_standard_error(bounds[SAMPLE_COUNTS[-1]])
    assert np.all(4 * final_error < BOUND_TOLERANCE_AT_5000)  # the tolerance is not swamped by noise
    np.testing.assert_allclose(final_mean, log_marginal, rtol=0, atol=BOUND_TOLERANCE_AT_5000)
    for k in SAMPLE_COUNTS:
        bound_mean, bound_error = mean_and_standard_error(bounds[k])
        np.testing.assert_array_less(bound_mean, log_marginal + 3 * bound_error + 1e-5)  # a lower bound at every k


def test_with_the_exact_posterior_every_weight_is_the_marginal_likelihood():
    # Orthogonal columns make W^T W diagonal, so the exact posterior is diagonal: a VAE's q can equal it.
    rng = np.random.default_rng(4)
    orthonormal, _ = np.linalg.qr(rng.normal(size=(DATA_DIM, LATENT_DIM)))
    model = LinearGaussianModel(orthonormal * [0.5, 1.0, 2.0], rng.normal(size=DATA_DIM), NOISE_SCALE)
    observations = model.sample_observations(rng, OBSERVATION_COUNT)
    posterior_mean, posterior_covariance = model.posterior(observations)
    np.testing.assert_allclose(posterior_covariance, np.diag(np.diag(posterior_covariance)), atol=1e-12)
    log_marginal = model.log_marginal(observations)

    posterior_log_variance = np.broadcast_to(np.log(np.diag(posterior_covariance)), posterior_mean.shape)
    _, log_weights = sample_log_weights(
        model, observations, posterior_mean, posterior_log_variance, jax.random.key(5), 1000
    )

    # w = p(x|z) p(z) / p(z|x) = p(x) whatever z is: no variance, so every k gives log p(x) exactly.
    np.testing.assert_allclose(
        log_weights, np.broadcast_to(log_marginal, log_weights.shape), rtol=0, atol=FLOAT32_LOG_WEIGHT_TOLERANCE
    )
    for bounds in bounds_by_size(log_weights, (1, 10, 1000)).values():
        np.testing.assert_allclose(
            bounds, np.broadcast_to(log_marginal, bounds.shape), atol=FLOAT32_LOG_WEIGHT_TOLERANCE
        )


@pytest.mark.parametrize("shift", [-1e4, 1e4])
def test_bound_of_shifted_log_weights_shifts_by_the_same_constant(shift):
    # Weights of e^-10000 underflow to 0 in float32 (and e^10000 overflows): only log-sum-exp survives.
    k = 1000
    log_weights = jnp.asarray(np.random.default_rng(6).normal(-10.0, 3.0, size=(k, 4)), jnp.float32)
    shifted = log_weights + jnp.float32(shift)

    bound = np.asarray(importance_weighted_bound(shifted), np.float64)

    shifted_64 = np.asarray(shifted, np.float64)
    largest = shifted_64.max(axis=0)
    reference = largest + np.log(np.mean(np.exp(shifted_64 - largest), axis=0))
    # One float32 ulp at 1e4 is about 1e-3: the inputs and the output are each rounded to half of that.
    np.testing.assert_allclose(bound, reference, rtol=0, atol=1e-3)
    np.testing.assert_allclose(bound - shift, importance_weighted_bound(log_weights), rtol=0, atol=2e-3)


def test_bound_with_one_dominant_weight_is_that_weight_over_k():
    log_weights = np.full(100, -2e4, np.float32)
    log_weights[17] = -1e4
    assert float(importance_weighted_bound(jnp.asarray(log_weights))) == pytest.approx(-1e4 - math.log(100), abs=1e-3)


# --- the KL term ---------------------------------------------------------------------------------


def test_kl_is_nonnegative_and_zero_exactly_at_the_prior():
    rng = np.random.default_rng(7)
    means = jnp.asarray(rng.normal(scale=2.0, size=(10_000, 8)), jnp.float32)
    log_variances = jnp.asarray(rng.normal(scale=2.0, size=(10_000, 8)), jnp.float32)

    per_dimension = kl_per_dimension(means, log_variances)
    assert float(jnp.min(per_dimension)) >= 0.0
    assert float(jnp.min(kl_to_standard_normal(means, log_variances))) > 0.0

    # At the prior every term is exactly 0; move one dimension off it and only that term becomes positive.
    at_prior = jnp.zeros(8)
    assert float(kl_to_standard_normal(at_prior, at_prior)) == 0.0
    mean_off, log_variance_off = np.zeros(8, np.float32), np.zeros(8, np.float32)
    mean_off[2], log_variance_off[5] = 0.1, -0.1
    off_in_mean = kl_per_dimension(jnp.asarray(mean_off), at_prior)
    off_in_variance = kl_per_dimension(at_prior, jnp.asarray(log_variance_off))
    np.testing.assert_array_equal(off_in_mean == 0, np.arange(8) != 2)
    np.testing.assert_array_equal(off_in_variance == 0, np.arange(8) != 5)
    assert float(off_in_mean[2]) > 0 and float(off_in_variance[5]) > 0


def test_kl_near_the_prior_is_nonnegative_up_to_float32_rounding():
    # exp(v) - 1 - v is v^2 / 2 for small v, below float32's resolution of exp(v) near 1 when |v| < 1e-3:
    # the computed term can round to about -3e-8. A wrong sign or a missing term is off by ~|v| / 2 instead.
    log_variances = jnp.linspace(-1e-2, 1e-2, 20_001, dtype=jnp.float32)
    per_dimension = kl_per_dimension(jnp.zeros_like(log_variances), log_variances)
    assert float(jnp.min(per_dimension)) >= -1e-7
    exact = 0.5 * (np.expm1(np.asarray(log_variances, np.float64)) - np.asarray(log_variances, np.float64))
    np.testing.assert_allclose(per_dimension, exact, rtol=0, atol=1e-7)
