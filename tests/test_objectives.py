"""The objective's pieces: KL, Bernoulli likelihood and the reparameterized sample."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.stats import norm

from vaecli.model import reparameterize
from vaecli.objectives import bernoulli_log_likelihood, kl_to_standard_normal, negative_elbo_terms


def test_kl_matches_a_monte_carlo_estimate():
    mean = jnp.array([0.5, -1.2, 0.0, 2.0, 0.3])
    log_variance = jnp.array([0.0, -1.0, 0.7, -2.5, 1.2])
    samples = reparameterize(jax.random.key(0), jnp.broadcast_to(mean, (400_000, 5)), log_variance)
    sigma = jnp.exp(0.5 * log_variance)
    # KL(q || p) = E_q[log q(z) - log p(z)], estimated from samples of q.
    log_ratio = jnp.sum(norm.logpdf(samples, mean, sigma) - norm.logpdf(samples), axis=-1)
    estimate, standard_error = float(jnp.mean(log_ratio)), float(jnp.std(log_ratio) / np.sqrt(len(log_ratio)))

    analytic = float(kl_to_standard_normal(mean, log_variance))

    assert analytic == pytest.approx(estimate, abs=4 * standard_error)
    assert standard_error < 0.01  # the check is tight enough to catch a wrong factor or sign


def test_kl_is_zero_exactly_at_the_prior_and_positive_elsewhere():
    assert float(kl_to_standard_normal(jnp.zeros(4), jnp.zeros(4))) == 0.0
    assert float(kl_to_standard_normal(jnp.full(4, 0.1), jnp.zeros(4))) > 0.0
    assert float(kl_to_standard_normal(jnp.zeros(4), jnp.full(4, -0.1))) > 0.0


def test_bernoulli_log_likelihood_matches_the_probability_form_and_is_summed_over_pixels():
    logits = jnp.array([[-2.0, 0.0, 3.0], [1.0, -0.5, 0.25]])
    targets = jnp.array([[0.0, 1.0, 1.0], [1.0, 0.0, 0.3]])
    probabilities = jax.nn.sigmoid(logits)
    expected = jnp.sum(targets * jnp.log(probabilities) + (1 - targets) * jnp.log1p(-probabilities), axis=-1)

    np.testing.assert_allclose(bernoulli_log_likelihood(logits, targets), expected, rtol=1e-6)


def test_bernoulli_log_likelihood_stays_finite_for_saturated_logits():
    logits = jnp.array([[200.0, -200.0]])
    # A confident wrong answer costs about |logit| nats, not infinity or NaN.
    wrong = float(bernoulli_log_likelihood(logits, jnp.array([[0.0, 1.0]]))[0])
    right = float(bernoulli_log_likelihood(logits, jnp.array([[1.0, 0.0]]))[0])
    assert wrong == pytest.approx(-400.0)
    assert right == pytest.approx(0.0, abs=1e-6)


def test_reparameterized_sample_has_the_posterior_mean_and_spread():
    mean, log_variance = jnp.array([1.5, -0.5]), jnp.log(jnp.array([0.25, 4.0]))
    samples = reparameterize(jax.random.key(1), jnp.broadcast_to(mean, (200_000, 2)), log_variance)
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


def test_negative_elbo_terms_are_reconstruction_loss_and_kl():
    logits, targets = jnp.zeros((2, 4)), jnp.ones((2, 4))
    mean, log_variance = jnp.ones((2, 3)), jnp.zeros((2, 3))
    reconstruction, kl = negative_elbo_terms(logits, targets, mean, log_variance)
    np.testing.assert_allclose(reconstruction, 4 * np.log(2.0), rtol=1e-6)  # 4 pixels at p = 1/2
    np.testing.assert_allclose(kl, 1.5, rtol=1e-6)  # 0.5 * sum(mu^2) with unit variance
