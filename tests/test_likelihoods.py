"""The decoder's likelihoods: masses over the 256 levels, stability at extreme parameters, means, samples, init."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import chdtrc, logsumexp

from vaecli.models.likelihoods import (
    MIN_LOG_SCALE,
    Bernoulli,
    DiscretizedLogisticMixture,
    bits_per_dim,
    make_likelihood,
)

ALL_LEVELS = np.arange(256, dtype=np.float32) / np.float32(255)
BIN = 2 / 255  # a level's width in x' = 2x - 1


@pytest.fixture(autouse=True)
def no_implicit_rank_promotion():
    """Broadcasting bugs surface as errors: every broadcast in the module must be explicit."""
    with jax.numpy_rank_promotion("raise"):
        yield


def logistic_output(logits, means, log_scales) -> jax.Array:
    """Decoder output [..., D * 3M] from per-value parameters [..., D, M], in the module's value-major order."""
    parameters = np.concatenate([logits, means, log_scales], axis=-1).astype(np.float32)
    return jnp.asarray(parameters.reshape(*parameters.shape[:-2], -1))


def jitted(method):
    """The method compiled whole: one compilation instead of one per operation keeps the file fast."""
    return jax.jit(method)


def level_masses(likelihood, per_value_output) -> np.ndarray:
    """P(level) for each of the 256 levels: [V, P] parameters of V single values -> [256, V], float64."""
    outputs = jnp.asarray(per_value_output)[None, :, :]
    targets = jnp.broadcast_to(jnp.asarray(ALL_LEVELS)[:, None, None], (256, outputs.shape[1], 1))
    return np.exp(np.asarray(jitted(likelihood.log_prob)(outputs, targets), np.float64))


def log_sigmoid64(x: float) -> float:
    return -np.logaddexp(0.0, -x)


def reference_log_mass(level: int, mean: float, log_scale: float) -> float:
    """log P(level) under one logistic, in float64: the CDF at the edge levels, Simpson's rule in log space inside."""
    scale, centre, half_bin = math.exp(log_scale), 2 * level / 255 - 1, 1 / 255
    if level == 0:
        return log_sigmoid64((centre + half_bin - mean) / scale)
    if level == 255:
        return log_sigmoid64(-(centre - half_bin - mean) / scale)
    grid = np.linspace(centre - half_bin, centre + half_bin, 4001)
    standardized = np.abs((grid - mean) / scale)
    log_density = -standardized - 2 * np.log1p(np.exp(-standardized)) - log_scale
    simpson_weights = np.ones_like(grid)
    simpson_weights[1:-1:2], simpson_weights[2:-1:2] = 4, 2
    return float(logsumexp(log_density + np.log(simpson_weights * (grid[1] - grid[0]) / 3)))


@pytest.mark.parametrize("mixtures", [1, 3, 10])
def test_logistic_masses_over_the_256_levels_sum_to_one(mixtures):
    rng = np.random.default_rng(mixtures)
    extremes = np.array([(5, -7), (-5, -7), (5, 6), (-5, 6), (0.3, -20), (1, -7), (-1, -7), (0, 80), (2, 0), (0, 15)])
    values = 40
    logits = rng.normal(0, 3, (values, mixtures))
    means = rng.uniform(-5, 5, (values, mixtures))
    log_scales = rng.uniform(-9, 6, (values, mixtures))
    means[: len(extremes)], log_scales[: len(extremes)] = extremes[:, :1], extremes[:, 1:]
    outputs = logistic_output(logits[:, None], means[:, None], log_scales[:, None])  # each value its own image

    masses = level_masses(DiscretizedLogisticMixture(mixtures), outputs)

    np.testing.assert_allclose(masses.sum(axis=0), 1.0, atol=1e-5)


CASES = [  # (level, mean, log_scale)
    (128, 0.02, -3.0),
    (100, 0.3, -1.0),
    (128, 0.0, 6.0),  # a scale far wider than [-1, 1]: each inner bin gets about its width / (4 * scale)
    (128, 5.0, -7.0),  # the bin lies 5500 scales from the mean: log mass about -5500, not -inf
    (200, -5.0, -4.0),
    (1, -1.0, -7.0),
    (254, 1.0, -7.0),
    (0, -0.9, -2.0),
    (0, 5.0, -7.0),
    (255, 0.95, -4.0),
    (255, -5.0, -7.0),
]


def test_logistic_bin_masses_match_a_float64_integral_including_the_edge_levels_and_far_tails():
    likelihood = DiscretizedLogisticMixture(1)
    levels, means, log_scales = (np.array(column, np.float64) for column in zip(*CASES, strict=True))
    outputs = logistic_output(np.zeros((len(CASES), 1, 1)), means[:, None, None], log_scales[:, None, None])
    targets = jnp.asarray(levels[:, None] / 255, jnp.float32)

    log_masses = np.asarray(jitted(likelihood.log_prob)(outputs, targets))

    expected = [reference_log_mass(*case) for case in CASES]
    # float32 places a bin edge near +-1 to within 1e-7, which at the smallest scale (e^-7 = 9e-4) moves the
    # log mass by up to ~1e-4: the error is the inputs' resolution, not the formula's.
    np.testing.assert_allclose(log_masses, expected, rtol=1e-5, atol=3e-4)
    assert log_masses[3] < -5000  # the far tail really was far


def test_logistic_mixture_weights_its_components_by_the_softmax_of_the_logits():
    likelihood = DiscretizedLogisticMixture(3)
    logits, means, log_scales = np.array([1.0, -0.5, 0.2]), np.array([-0.9, 0.1, 0.7]), np.array([-2.0, -3.5, -1.0])
    levels = [0, 40, 128, 200, 255]
    outputs = logistic_output(logits[None, None], means[None, None], log_scales[None, None])
    targets = jnp.asarray(np.array(levels, np.float32)[:, None] / 255)

    log_masses = np.asarray(jitted(likelihood.log_prob)(outputs, targets))

    log_weights = logits - logsumexp(logits)
    expected = [
        logsumexp([log_weights[m] + reference_log_mass(level, means[m], log_scales[m]) for m in range(3)])
        for level in levels
    ]
    np.testing.assert_allclose(log_masses, expected, rtol=1e-5)


def test_logistic_log_prob_sums_over_values_and_broadcasts_latent_samples_over_targets():
    likelihood = DiscretizedLogisticMixture(2)
    rng = np.random.default_rng(3)
    outputs = jnp.asarray(rng.normal(0, 1, (4, 3, 5 * 6)), jnp.float32)  # [samples, batch, D * P]
    targets = jnp.asarray(rng.integers(0, 256, (3, 5)) / 255, jnp.float32)  # [batch, D]

    log_probs = jitted(likelihood.log_prob)(outputs, targets)

    assert log_probs.shape == (4, 3)
    # The same image's five values, each as its own one-value image: value d's parameters are [6d, 6d + 6).
    per_value = jitted(likelihood.log_prob)(outputs[1, 2].reshape(5, 6), targets[2].reshape(5, 1))
    assert float(log_probs[1, 2]) == pytest.approx(float(jnp.sum(per_value)), rel=1e-6)
    assert len(set(np.asarray(per_value).tolist())) == 5  # the values really differ, so an order mix-up shows


def test_logistic_log_prob_and_its_gradient_stay_finite_at_extreme_parameters():
    likelihood = DiscretizedLogisticMixture(2)
    means = np.array([[5.0, 5.0], [50.0, 40.0], [-50.0, 0.0], [0.0, 0.0], [1.0, -1.0], [3.0, 3.0]])
    log_scales = np.array([[-7.0, -7.0], [-30.0, -7.0], [-7.0, 80.0], [100.0, -100.0], [-7.0, -7.0], [20.0, -7.0]])
    logits = np.array([[80.0, -80.0], [0.0, 0.0], [-80.0, 80.0], [1.0, 1.0], [0.0, 200.0], [0.0, 0.0]])
    outputs = logistic_output(logits[None], means[None], log_scales[None])[0]
    targets = jnp.asarray(np.array([0, 255, 128, 17, 255, 1]) / 255, jnp.float32)

    def total_log_prob(decoder_output):
        return likelihood.log_prob(decoder_output, targets)

    log_prob, gradient = jax.jit(jax.value_and_grad(total_log_prob))(outputs)

    assert np.isfinite(float(log_prob))
    assert np.all(np.isfinite(np.asarray(gradient)))
    # Value 0: level 0 lies 6,575 scales below its (weighted) component, a probability of e^-6575; the gradient
    # still pulls the mean down at the full 1/scale instead of vanishing with the probability.
    weighted_mean_gradient = float(np.asarray(gradient).reshape(6, 6)[0, 2])
    assert weighted_mean_gradient == pytest.approx(-math.exp(7), rel=1e-3)


def test_logistic_log_scales_below_the_clamp_act_as_the_clamp():
    likelihood = DiscretizedLogisticMixture(1)
    targets = jnp.asarray([[0.5 + 0.5 / 255]], jnp.float32)

    log_prob = jitted(likelihood.log_prob)

    def log_prob_at(log_scale):
        return float(log_prob(logistic_output([[[0.0]]], [[[0.004]]], [[[log_scale]]]), targets)[0])

    assert log_prob_at(-20.0) == log_prob_at(MIN_LOG_SCALE)
    assert log_prob_at(MIN_LOG_SCALE + 1) != log_prob_at(MIN_LOG_SCALE)


def test_logistic_mean_is_in_the_unit_interval_and_matches_a_sharp_component():
    likelihood = DiscretizedLogisticMixture(1)
    component_means = np.array([-3.0, -0.5, 0.2, 0.9, 4.0])
    outputs = logistic_output(np.zeros((5, 1, 1)), component_means[:, None, None], np.full((5, 1, 1), -7.0))

    means = np.asarray(jitted(likelihood.mean)(outputs))[:, 0]

    np.testing.assert_allclose(means, (np.clip(component_means, -1, 1) + 1) / 2, atol=1e-6)
    # The distribution's own mean over the 256 levels agrees to within a level.
    distribution_means = ALL_LEVELS @ level_masses(likelihood, outputs)
    np.testing.assert_allclose(means, distribution_means, atol=1 / 255)


def test_logistic_mean_weights_the_clipped_component_means_and_stays_in_range():
    two_components = logistic_output([[[math.log(0.25), math.log(0.75)]]], [[[-3.0, 0.5]]], [[[-4.0, -4.0]]])
    # The first component's mean (-3) counts as -1, that is 0 in [0, 1].
    assert float(DiscretizedLogisticMixture(2).mean(two_components)[0, 0]) == pytest.approx(0.75 * 0.75)

    rng = np.random.default_rng(4)
    wild_outputs = jnp.asarray(rng.normal(0, 30, (16, 7 * 9)), jnp.float32)
    means = np.asarray(jitted(DiscretizedLogisticMixture(3).mean)(wild_outputs))
    assert means.shape == (16, 7)
    assert np.all((means >= 0) & (means <= 1))


def test_logistic_samples_are_levels_drawn_with_the_probabilities_of_log_prob():
    likelihood = DiscretizedLogisticMixture(3)
    logits = np.array([[0.0, 1.0, -1.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    means = np.array([[-0.5, 0.1, 0.3], [-0.98, 0.9, 0.0], [0.99, 0.95, 1.5]])
    log_scales = np.array([[-3.0, -4.0, -2.5], [-5.0, -3.0, -6.0], [-4.0, -3.0, -5.0]])
    outputs = logistic_output(logits[:, None], means[:, None], log_scales[:, None])  # 3 one-value images
    draws_count = 20_000

    draws = np.asarray(jitted(likelihood.sample)(jax.random.key(0), jnp.broadcast_to(outputs, (draws_count, 3, 9))))

    assert draws.dtype == np.float32 and draws.shape == (draws_count, 3, 1)
    levels = np.rint(draws[..., 0] * 255)
    np.testing.assert_allclose(draws[..., 0] * 255, levels, atol=1e-4)  # only levels k / 255
    assert levels.min() >= 0 and levels.max() <= 255
    masses = level_masses(likelihood, outputs)
    for value in range(3):
        observed = np.bincount(levels[:, value].astype(int), minlength=256)
        expected = draws_count * masses[:, value]
        # Levels expected fewer than 5 times are pooled, so the chi-square approximation holds.
        rare = expected < 5
        observed = np.append(observed[~rare], observed[rare].sum())
        expected = np.append(expected[~rare], expected[rare].sum())
        statistic = np.sum((observed - expected) ** 2 / expected)
        assert chdtrc(len(expected) - 1, statistic) > 1e-3, f"value {value}: chi-square {statistic:.1f}"


def colour_output(logits, means, log_scales, coefficients) -> jax.Array:
    """Colour decoder output [..., pixels * 3 * 4M] from per-value parameters [..., pixels, 3, M]."""
    parameters = np.concatenate([logits, means, log_scales, coefficients], axis=-1).astype(np.float32)
    return jnp.asarray(parameters.reshape(*parameters.shape[:-3], -1))


def raw_coefficient(coefficient: float) -> float:
    """The decoder output whose tanh is `coefficient`."""
    return math.atanh(coefficient)


@pytest.mark.parametrize("mixtures", [1, 3])
def test_colour_masses_over_all_256_cubed_levels_of_a_pixel_sum_to_one(mixtures):
    likelihood = DiscretizedLogisticMixture(mixtures, channels=3)
    rng = np.random.default_rng(10 + mixtures)
    shape = (1, 3, mixtures)  # one pixel
    output = colour_output(
        rng.normal(0, 2, shape), rng.uniform(-1.5, 1.5, shape), rng.uniform(-5, 1, shape), rng.normal(0, 1, shape)
    )
    levels = jnp.asarray(ALL_LEVELS)
    green, blue = (grid.ravel() for grid in jnp.meshgrid(levels, levels, indexing="ij"))

    @jax.jit
    def log_mass_with_red(red):
        targets = jnp.stack([jnp.full_like(green, red), green, blue], axis=-1)
        return jax.nn.logsumexp(likelihood.log_prob(jnp.broadcast_to(output, (green.size, output.size)), targets))

    log_total = jax.nn.logsumexp(jax.lax.map(log_mass_with_red, levels))

    assert float(log_total) == pytest.approx(0.0, abs=1e-5)


def test_colour_mixture_codes_g_and_b_as_corrections_to_r():
    # Grey pixels (R = G = B) of random levels. With a = 1 (G on R) and c = 1 (B on G) and sharp G and B, the
    # pixel costs what R alone costs; with no coupling G and B each cost as much as R again.
    rng = np.random.default_rng(6)
    pixels = 200
    grey = rng.integers(0, 256, pixels) / 255
    targets = jnp.asarray(np.repeat(grey, 3)[None], jnp.float32)  # one image of 200 grey pixels
    means = np.zeros((pixels, 3, 1))
    log_scales = np.broadcast_to(np.array([0.0, -7.0, -7.0])[:, None], (pixels, 3, 1))
    wide = np.array([0.0, 0.0, 0.0])[:, None]
    coupled = np.broadcast_to(
        np.array([raw_coefficient(0.999999), 0.0, raw_coefficient(0.999999)])[:, None], (pixels, 3, 1)
    )
    logits = np.zeros((pixels, 3, 1))
    likelihood = DiscretizedLogisticMixture(1, channels=3)
    log_prob = jitted(likelihood.log_prob)

    coupled_log_prob = float(log_prob(colour_output(logits, means, log_scales, coupled)[None], targets)[0])
    red_only = DiscretizedLogisticMixture(1)
    red_targets = jnp.asarray(grey[None], jnp.float32)
    red_output = logistic_output(logits[:, 0], means[:, 0], log_scales[:, 0])[None]  # one image of 200 R values
    red_log_prob = float(jitted(red_only.log_prob)(red_output, red_targets)[0])
    wide_scales = np.broadcast_to(wide, (pixels, 3, 1))
    independent = float(log_prob(colour_output(logits, means, wide_scales, np.zeros((pixels, 3, 1)))[None], targets)[0])

    # Each of G and B puts ~97% of its mass on the level of the channel before it.
    assert coupled_log_prob - red_log_prob == pytest.approx(2 * pixels * math.log(0.97), rel=0.2)
    assert independent == pytest.approx(3 * red_log_prob, rel=1e-5)


def test_colour_samples_draw_g_and_b_given_the_levels_drawn_for_r():
    likelihood = DiscretizedLogisticMixture(2, channels=3)
    logits = np.array([[[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])  # one pixel, equal weights
    means = np.array([[[-0.6, 0.5], [0.1, 0.1], [-0.2, 0.3]]])
    log_scales = np.array([[[-3.0, -3.0], [-7.0, -7.0], [-7.0, -7.0]]])  # R spread out, 11 scales from the midpoint
    # a = 0.5 (G on R), b = -0.4 (B on R), c = 0.25 (B on G), the same in both components.
    coefficients = np.array([[[0.5, 0.5], [-0.4, -0.4], [0.25, 0.25]]])
    output = colour_output(logits, means, log_scales, np.arctanh(coefficients))
    draws_count = 4000

    draws = np.asarray(jitted(likelihood.sample)(jax.random.key(2), jnp.broadcast_to(output, (draws_count, 12 * 2))))

    assert draws.shape == (draws_count, 3) and draws.dtype == np.float32
    red, green, blue = (2 * draws[:, channel] - 1 for channel in range(3))
    np.testing.assert_allclose(draws * 255, np.rint(draws * 255), atol=1e-4)  # levels only
    # Both components occur, and G and B follow the R drawn (to within a level, their own sharp noise).
    assert 0.4 < np.mean(red > -0.05) < 0.6
    mean_green = np.where(red < -0.05, 0.1, 0.1) + 0.5 * red
    np.testing.assert_allclose(green, mean_green, atol=1.5 * BIN)
    mean_blue = np.where(red < -0.05, -0.2, 0.3) - 0.4 * red + 0.25 * green
    np.testing.assert_allclose(blue, mean_blue, atol=1.5 * BIN)
    # mean() agrees with the draws' average when the components are sharp.
    sharp = colour_output(logits, means, np.full_like(log_scales, -7.0), np.arctanh(coefficients))
    sharp_draws = np.asarray(jitted(likelihood.sample)(jax.random.key(3), jnp.broadcast_to(sharp, (draws_count, 24))))
    np.testing.assert_allclose(jitted(likelihood.mean)(sharp), sharp_draws.mean(axis=0), atol=0.01)


def test_colour_initial_bias_starts_each_channel_at_its_marginal_with_no_coupling():
    images = np.clip(np.random.default_rng(8).normal(120, 40, (500, 2, 2, 3)), 0, 255).astype(np.uint8)
    likelihood = DiscretizedLogisticMixture(4, channels=3)
    targets = jnp.asarray(images.reshape(len(images), -1) / 255, jnp.float32)

    bias = likelihood.initial_output_bias(images)

    assert bias.shape == (12 * 16,) and likelihood.params_per_value == 16
    np.testing.assert_allclose(jitted(likelihood.mean)(jnp.asarray(bias)), targets.mean(axis=0), atol=1e-5)
    assert np.all(bias.reshape(12, 4, 4)[:, 3] == 0)  # tanh(0): no channel leans on another yet
    # The same per-channel marginals as the grey mixture's, so the same likelihood at the start.
    grey = DiscretizedLogisticMixture(4)
    grey_bias = grey.initial_output_bias(images)
    colour_nats = float(jnp.sum(jitted(likelihood.log_prob)(jnp.asarray(bias)[None], targets)))
    grey_nats = float(jnp.sum(jitted(grey.log_prob)(jnp.asarray(grey_bias)[None], targets)))
    assert colour_nats > grey_nats - 0.05 * targets.size


def test_colour_mixture_refuses_values_that_are_not_whole_pixels():
    with pytest.raises(ValueError, match="not whole pixels"):
        DiscretizedLogisticMixture(2, channels=3).log_prob(jnp.zeros((1, 4 * 8)), jnp.zeros((1, 4)))
    with pytest.raises(ValueError, match="channels=2"):
        DiscretizedLogisticMixture(2, channels=2)


def test_bernoulli_log_prob_matches_the_closed_form():
    logits = jnp.asarray([[-2.0, 0.0, 3.0, 0.7], [1.0, -0.5, 0.25, -4.0]])
    targets = jnp.asarray([[0.0, 1.0, 1.0, 0.2], [1.0, 0.0, 0.3, 0.0]])
    probabilities = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
    targets64 = np.asarray(targets, np.float64)
    expected = np.sum(targets64 * np.log(probabilities) + (1 - targets64) * np.log1p(-probabilities), axis=-1)

    np.testing.assert_allclose(Bernoulli().log_prob(logits, targets), expected, rtol=1e-6)


def test_bernoulli_log_prob_and_gradient_stay_finite_for_saturated_logits():
    logits = jnp.asarray([[200.0, -200.0]])

    def log_prob(decoder_output, targets):
        return Bernoulli().log_prob(decoder_output, targets)[0]

    # A confident wrong answer costs about |logit| nats, not infinity or NaN.
    assert float(log_prob(logits, jnp.asarray([[0.0, 1.0]]))) == pytest.approx(-400.0)
    assert float(log_prob(logits, jnp.asarray([[1.0, 0.0]]))) == pytest.approx(0.0, abs=1e-6)
    gradient = np.asarray(jax.grad(log_prob)(logits, jnp.asarray([[0.0, 1.0]])))
    np.testing.assert_allclose(gradient, [[-1.0, 1.0]])


def test_bernoulli_mean_and_samples_follow_the_sigmoid():
    logits = jnp.asarray([-2.0, 0.0, 1.5])
    probabilities = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
    np.testing.assert_allclose(Bernoulli().mean(logits), probabilities, rtol=1e-6)

    draws = np.asarray(jitted(Bernoulli().sample)(jax.random.key(1), jnp.broadcast_to(logits, (20_000, 3))))

    assert draws.dtype == np.float32 and set(np.unique(draws)) <= {0.0, 1.0}
    standard_errors = np.sqrt(probabilities * (1 - probabilities) / 20_000)
    np.testing.assert_array_less(np.abs(draws.mean(axis=0) - probabilities), 4 * standard_errors)


def training_images(count: int = 2500) -> np.ndarray:
    """uint8 [count, 4, 4, 2] whose 32 values differ in kind: constant black or white, two-level, spread out."""
    rng = np.random.default_rng(5)
    constant = np.zeros((count, 6))
    constant[:, 4:] = 255
    two_level = 255.0 * (rng.uniform(size=(count, 10)) < np.linspace(0.1, 0.9, 10))
    spread = rng.normal(np.linspace(10, 245, 16), 25, (count, 16))
    values = np.concatenate([constant, two_level, spread], axis=1)
    return np.clip(np.rint(values), 0, 255).astype(np.uint8).reshape(count, 4, 4, 2)


def test_bernoulli_initial_bias_starts_at_the_data_mean_and_fits_better_than_zero():
    images = training_images()
    targets = jnp.asarray(images.reshape(len(images), -1) / 255, jnp.float32)

    bias = Bernoulli().initial_output_bias(images)

    assert bias.dtype == np.float32 and bias.shape == (32,)
    expected_mean = np.clip(images.reshape(len(images), -1).mean(axis=0) / 255, 1e-3, 1 - 1e-3)
    np.testing.assert_allclose(Bernoulli().mean(jnp.asarray(bias)), expected_mean, rtol=1e-5)
    likelihood_at_bias = float(jnp.sum(Bernoulli().log_prob(jnp.asarray(bias)[None], targets)))
    likelihood_at_zero = float(jnp.sum(Bernoulli().log_prob(jnp.zeros((1, 32)), targets)))
    assert likelihood_at_bias > likelihood_at_zero


@pytest.mark.parametrize("mixtures", [1, 5])
def test_logistic_initial_bias_starts_at_the_data_mean_and_fits_better_than_zero(mixtures):
    likelihood = DiscretizedLogisticMixture(mixtures)
    images = training_images()
    targets = jnp.asarray(images.reshape(len(images), -1) / 255, jnp.float32)

    bias = likelihood.initial_output_bias(images)

    assert bias.dtype == np.float32 and bias.shape == (32 * 3 * mixtures,)
    np.testing.assert_allclose(jitted(likelihood.mean)(jnp.asarray(bias)), targets.mean(axis=0), atol=1e-5)
    log_prob = jitted(likelihood.log_prob)
    outputs = jnp.asarray(bias)[None]
    likelihood_at_bias = float(jnp.sum(log_prob(outputs, targets)))
    likelihood_at_zero = float(jnp.sum(log_prob(jnp.zeros_like(outputs), targets)))
    # Each value's marginal instead of the unit-scale logistic at 0: about 0.85 nats per value on these images.
    assert likelihood_at_bias - likelihood_at_zero > 0.5 * targets.size
    component_means, log_scales = bias.reshape(32, 3, mixtures)[:, 1], bias.reshape(32, 3, mixtures)[:, 2]
    assert np.all(component_means >= -1) and np.all(component_means <= 1)
    # Before clipping, the mixture's spread is the data's in x' = 2x - 1 (a logistic's variance is s^2 pi^2 / 3).
    mixture_variances = np.mean(np.exp(2 * log_scales) * math.pi**2 / 3, axis=1) + np.var(component_means, axis=1)
    data_stds = 2 * np.asarray(targets, np.float64).std(axis=0)
    np.testing.assert_allclose(np.sqrt(mixture_variances[6:]), data_stds[6:], rtol=1e-4)
    # Components start apart wherever the value varies, so they can specialise from the first step.
    assert np.all(np.ptp(component_means[6:], axis=1) > 0) == (mixtures > 1)


def test_make_likelihood_builds_the_named_likelihood_with_its_parameter_count():
    assert make_likelihood("bernoulli", 5).params_per_value == 1
    logistic = make_likelihood("logistic", 4)
    assert logistic == DiscretizedLogisticMixture(4) and logistic.params_per_value == 12
    colour = make_likelihood("logistic", 4, channels=3)
    assert colour == DiscretizedLogisticMixture(4, channels=3) and colour.params_per_value == 16
    with pytest.raises(ValueError, match="gaussian"):
        make_likelihood("gaussian", 5)
    with pytest.raises(ValueError, match="mixtures=0"):
        DiscretizedLogisticMixture(0)


def test_logistic_refuses_a_decoder_output_that_is_not_whole_values():
    with pytest.raises(ValueError, match="not a whole number"):
        DiscretizedLogisticMixture(2).mean(jnp.zeros((3, 13)))


def test_bits_per_dim_converts_nats_per_image_to_bits_per_value():
    # D values each uniform over 256 levels cost D * ln 256 nats: 8 bits per value.
    assert bits_per_dim(784 * math.log(256), 784) == pytest.approx(8.0)
    nats = jnp.asarray([100.0, 2500.0])
    np.testing.assert_allclose(bits_per_dim(nats, 3072), nats / (3072 * math.log(2)), rtol=1e-6)
