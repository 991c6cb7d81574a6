"""The decoder's per-value likelihoods p(x|z) as pure JAX functions: Bernoulli and a discretized logistic mixture.

Images travel flattened: D values per image (pixels x channels), each an 8-bit level. Targets are float32 in
[0, 1] of shape [..., D]; the decoder output is [..., D * P], value-major (value d's P parameters sit at
[d*P:(d+1)*P]). Log-probabilities are in nats per image: summed over the D values, never averaged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

LEVELS = 256  # an 8-bit value takes one of 256 levels
# The logistic works in x' = 2x - 1, where the levels are centred 2/255 apart: each owns a bin that wide.
BIN_WIDTH = 2.0 / (LEVELS - 1)
# Log-scales are clamped from below here, as in PixelCNN++: at scale e^-7 (about a ninth of a bin) a component
# centred on a level already puts 97% of its mass in that bin, so smaller scales gain almost nothing, while the
# gradient with respect to the mean grows as 1/scale and would let a few over-confident values dominate a step.
MIN_LOG_SCALE = -7.0
# The initial log-scale of a value that never varies in the training data: just above the clamp, so the
# scale still gets a gradient, and sharp enough that 86% (93% at level 0 or 255) starts on the constant level.
INITIAL_LOG_SCALE_FLOOR = MIN_LOG_SCALE + 0.5
# Bernoulli initial probabilities stay this far from 0 and 1: a value constant in the training data would
# otherwise get an infinite logit; this one costs it at most ~0.001 nats.
PROBABILITY_MARGIN = 1e-3
# Below this width (in scales) log(1 - e^-w) comes from its series, which also covers a width that underflows.
SERIES_BELOW = 0.1


class Likelihood(Protocol):
    """What the model, the trainer and the sampler need from a per-value likelihood."""

    @property
    def params_per_value(self) -> int:
        """P: how many decoder outputs parameterise one value."""
        ...

    def log_prob(self, decoder_output: jax.Array, targets: jax.Array) -> jax.Array:
        """log p(targets | decoder_output) in nats, summed over the D values: [..., D * P], [..., D] -> [...]."""
        ...

    def mean(self, decoder_output: jax.Array) -> jax.Array:
        """The expected value of each value, in [0, 1]: [..., D * P] -> [..., D]."""
        ...

    def sample(self, key: jax.Array, decoder_output: jax.Array) -> jax.Array:
        """One draw per value, float32 in [0, 1]: [..., D * P] -> [..., D]."""
        ...

    def initial_output_bias(self, train_images_uint8: np.ndarray) -> np.ndarray:
        """A decoder output bias, float32 [D * P], under which each value follows the training data's marginal."""
        ...


@dataclass(frozen=True)
class Bernoulli:
    """One logit per value: p(x = 1) = sigmoid(logit); targets may be binary draws or grey levels in [0, 1]."""

    @property
    def params_per_value(self) -> int:
        return 1

    def log_prob(self, decoder_output: jax.Array, targets: jax.Array) -> jax.Array:
        """Summed t * l - softplus(l), the log of sigmoid(l)^t (1 - sigmoid(l))^(1-t) without a log of a sigmoid."""
        logits, targets = _broadcast_batch(decoder_output, targets, params_per_value=1)
        return jnp.sum(targets * logits - jax.nn.softplus(logits), axis=-1)

    def mean(self, decoder_output: jax.Array) -> jax.Array:
        """sigmoid(logit): the probability of a 1, which is also the expected grey level."""
        return jax.nn.sigmoid(decoder_output)

    def sample(self, key: jax.Array, decoder_output: jax.Array) -> jax.Array:
        """Binary draws, float32 0 or 1."""
        return jax.random.bernoulli(key, jax.nn.sigmoid(decoder_output)).astype(jnp.float32)

    def initial_output_bias(self, train_images_uint8: np.ndarray) -> np.ndarray:
        """The logit of each value's mean intensity (that is also the mean of its binary draws), kept off 0 and 1."""
        value_means = np.clip(_value_moments(train_images_uint8)[0], PROBABILITY_MARGIN, 1 - PROBABILITY_MARGIN)
        return (np.log(value_means) - np.log1p(-value_means)).astype(np.float32)


@dataclass(frozen=True)
class DiscretizedLogisticMixture:
    """A mixture of logistics over the 256 levels of each value (PixelCNN++), values independent given z.

    Grey (channels=1): each value has its own mixture; per value, P = 3 * mixtures outputs in this order: the
    mixtures' logits, their means and their log-scales, the means and scales in x' = 2x - 1 in [-1, 1].

    Colour (channels=3, values in R, G, B order within each pixel): PixelCNN++'s colour mixture. The three values
    of a pixel share one mixture (its logits are the sum of the three values' logit outputs), and within a
    component G's mean moves with R's level and B's with R's and G's, by coefficients in [-1, 1]:
        mean_G = mu_G + a * x'_R,   mean_B = mu_B + b * x'_R + c * x'_G.
    Natural colours are strongly correlated across channels; with this the model codes G and B as corrections
    to R instead of paying for each afresh. Per value, P = 4 * mixtures: logits, means, log-scales, then one
    coefficient each: R's slot holds a, G's holds b and B's holds c.
    """

    mixtures: int = 5
    channels: int = 1

    def __post_init__(self):
        if self.mixtures < 1:
            raise ValueError(f"a logistic mixture needs at least one component, got mixtures={self.mixtures}")
        if self.channels not in (1, 3):
            raise ValueError(f"a logistic mixture models 1 or 3 channels, got channels={self.channels}")

    @property
    def params_per_value(self) -> int:
        return (3 if self.channels == 1 else 4) * self.mixtures

    def log_prob(self, decoder_output: jax.Array, targets: jax.Array) -> jax.Array:
        """Summed log of the mixture's mass on each target's level; targets are level / 255."""
        parameters, targets = _broadcast_batch(decoder_output, targets, self.params_per_value)
        # Rounding makes the level exact whatever float error the division by 255 left.
        levels = jnp.round(targets * (LEVELS - 1))
        if self.channels == 1:
            logits, means, log_scales = self._components(parameters)
            log_masses = jax.nn.log_softmax(logits, axis=-1) + _log_bin_mass(levels[..., None], means, log_scales)
            return jnp.sum(jax.nn.logsumexp(log_masses, axis=-1), axis=-1)
        logits, means, log_scales, coefficients = self._colour_components(parameters)
        levels = _pixel_values(levels)  # [..., pixels, 3]
        centres = levels * BIN_WIDTH - 1.0
        coupled_means = _coupled_means(means, coefficients, centres[..., 0, None], centres[..., 1, None])
        log_channel_masses = _log_bin_mass(levels[..., None], coupled_means, log_scales)  # [..., pixels, 3, M]
        log_masses = jax.nn.log_softmax(logits, axis=-1) + jnp.sum(log_channel_masses, axis=-2)
        return jnp.sum(jax.nn.logsumexp(log_masses, axis=-1), axis=-1)

    def mean(self, decoder_output: jax.Array) -> jax.Array:
        """The mixture's mean with each component's mean clipped to [-1, 1], mapped to [0, 1].

        It approximates the mean of the clipped, discretized distribution: to within half a level as the scales go
        to 0, while for wide components near -1 or 1 it ignores that the tail beyond the edge piles up on the edge.
        In colour, G's and B's component means take R's (and G's) clipped component means for their levels.
        """
        parameters = _split_values(decoder_output, self.params_per_value)
        if self.channels == 1:
            logits, means, _ = self._components(parameters)
            expected = jnp.sum(jax.nn.softmax(logits, axis=-1) * jnp.clip(means, -1.0, 1.0), axis=-1)
        else:
            logits, means, _, coefficients = self._colour_components(parameters)
            red = jnp.clip(means[..., 0, :], -1.0, 1.0)
            green = jnp.clip(means[..., 1, :] + coefficients[..., 0, :] * red, -1.0, 1.0)
            blue = jnp.clip(means[..., 2, :] + coefficients[..., 1, :] * red + coefficients[..., 2, :] * green, -1, 1)
            weights = jax.nn.softmax(logits, axis=-1)
            expected = jnp.stack([jnp.sum(weights * channel, axis=-1) for channel in (red, green, blue)], axis=-1)
            expected = expected.reshape(*expected.shape[:-2], -1)
        # The weights sum to 1 only to within rounding: a mean of 1.0000001 would not be an image.
        return jnp.clip((expected + 1.0) / 2.0, 0.0, 1.0)

    def sample(self, key: jax.Array, decoder_output: jax.Array) -> jax.Array:
        """Per value (per pixel in colour): a component drawn by its weight, a logistic draw from it, clipped and
        rounded to a level; in colour R first, then G and B given the levels drawn before them."""
        component_key, noise_key = jax.random.split(key)
        parameters = _split_values(decoder_output, self.params_per_value)
        if self.channels == 1:
            logits, means, log_scales = self._components(parameters)
            chosen = jax.random.categorical(component_key, logits, axis=-1)[..., None]
            noise = jax.random.logistic(noise_key, chosen.shape[:-1], means.dtype)
            return _draw_level(_take(means, chosen), _take(log_scales, chosen), noise)
        logits, means, log_scales, coefficients = self._colour_components(parameters)
        chosen = jax.random.categorical(component_key, logits, axis=-1)[..., None, None]  # one per pixel
        chosen = jnp.broadcast_to(chosen, (*means.shape[:-1], 1))
        means, log_scales, coefficients = (_take(array, chosen) for array in (means, log_scales, coefficients))
        noise = jax.random.logistic(noise_key, means.shape, means.dtype)  # [..., pixels, 3]
        red = _draw_level(means[..., 0], log_scales[..., 0], noise[..., 0])
        red_centre = red * 2.0 - 1.0
        green = _draw_level(means[..., 1] + coefficients[..., 0] * red_centre, log_scales[..., 1], noise[..., 1])
        green_centre = green * 2.0 - 1.0
        blue_mean = means[..., 2] + coefficients[..., 1] * red_centre + coefficients[..., 2] * green_centre
        blue = _draw_level(blue_mean, log_scales[..., 2], noise[..., 2])
        levels = jnp.stack([red, green, blue], axis=-1)
        return levels.reshape(*levels.shape[:-2], -1)

    def initial_output_bias(self, train_images_uint8: np.ndarray) -> np.ndarray:
        """Equal weights; component means around each value's mean, scales from its spread (in x'); no coupling."""
        means_01, stds_01 = _value_moments(train_images_uint8)
        value_means, value_stds = 2.0 * means_01 - 1.0, 2.0 * stds_01  # in x' = 2x - 1
        # Components that start identical get identical gradients whenever the decoder's weights are symmetric
        # (a zero-initialised last layer), and would then stay identical; spreading them apart lets them
        # specialise. The spread is symmetric and stays inside [-1, 1], so the mixture's mean is still the
        # value's mean, and the components narrow to keep the mixture's variance the value's variance.
        half_spread = np.minimum(value_stds / 2, 1.0 - np.abs(value_means))
        offsets = np.linspace(-1.0, 1.0, self.mixtures) if self.mixtures > 1 else np.zeros(1)
        component_means = value_means[:, None] + half_spread[:, None] * offsets
        component_variances = np.maximum(value_stds**2 - half_spread**2 * np.mean(offsets**2), 0.0)
        # A logistic of scale s has standard deviation s * pi / sqrt(3).
        component_scales = np.sqrt(component_variances) * math.sqrt(3.0) / math.pi
        log_scales = np.log(np.maximum(component_scales, math.exp(INITIAL_LOG_SCALE_FLOOR)))
        zeros = np.zeros_like(component_means)
        blocks = [zeros, component_means, np.repeat(log_scales[:, None], self.mixtures, 1)]
        if self.channels == 3:
            blocks.append(zeros)  # coefficients tanh(0) = 0: each channel starts with its own marginal
        return np.concatenate(blocks, 1).reshape(-1).astype(np.float32)

    def _components(self, parameters: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """[..., D, 3M] -> (logits, means, log-scales clamped at MIN_LOG_SCALE), each [..., D, M]."""
        logits, means, raw_log_scales = jnp.split(parameters, 3, axis=-1)
        return logits, means, jnp.maximum(raw_log_scales, MIN_LOG_SCALE)

    def _colour_components(self, parameters: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """[..., D, 4M] -> logits [..., pixels, M]; means, clamped log-scales, coefficients [..., pixels, 3, M]."""
        logits, means, raw_log_scales, raw_coefficients = jnp.split(
            _pixel_values(parameters, per_value=True), 4, axis=-1
        )
        return (
            jnp.sum(logits, axis=-2),
            means,
            jnp.maximum(raw_log_scales, MIN_LOG_SCALE),
            jnp.tanh(raw_coefficients),
        )


def make_likelihood(name: str, mixtures: int = 5, channels: int = 1) -> Likelihood:
    """The likelihood a config names: "bernoulli", or "logistic" with `mixtures` components (per pixel in colour)."""
    if name == "bernoulli":
        return Bernoulli()
    if name == "logistic":
        return DiscretizedLogisticMixture(mixtures, channels)
    raise ValueError(f"unknown likelihood {name!r}: expected 'bernoulli' or 'logistic'")


def bits_per_dim(nats: float | jax.Array, num_values: int) -> float | jax.Array:
    """Nats per image as bits per value (per pixel and channel), the usual unit of image likelihoods."""
    return nats / (num_values * math.log(2.0))


def _log_bin_mass(levels: jax.Array, means: jax.Array, log_scales: jax.Array) -> jax.Array:
    """log P(level) under each logistic component, x' binned at 2/255: [..., D, 1] levels, [..., D, M] components.

    Level 0 takes all the mass below its upper edge and level 255 all the mass above its lower edge.
    """
    centres = levels * BIN_WIDTH - 1.0
    inverse_scales = jnp.exp(-log_scales)
    upper = (centres + BIN_WIDTH / 2 - means) * inverse_scales
    lower = (centres - BIN_WIDTH / 2 - means) * inverse_scales
    log_below_upper = jax.nn.log_sigmoid(upper)
    log_above_lower = jax.nn.log_sigmoid(-lower)
    # sigmoid(u) - sigmoid(l) = sigmoid(u) * sigmoid(-l) * (1 - e^-(u - l)), each factor taken in log space:
    # no two nearly equal probabilities are subtracted, so a bin far in a tail keeps its tiny mass (log -5000,
    # not -inf) and no fallback to the density at the centre is needed. The width u - l is taken from the
    # log-scale directly, so it stays exact (and its log finite) when 1/scale underflows.
    log_width = math.log(BIN_WIDTH) - log_scales
    log_interior = log_below_upper + log_above_lower + _log_one_minus_exp(log_width)
    return jnp.where(levels == 0, log_below_upper, jnp.where(levels == LEVELS - 1, log_above_lower, log_interior))


def _log_one_minus_exp(log_width: jax.Array) -> jax.Array:
    """log(1 - e^-w) from log w, accurate for every w > 0, including w = e^log_width underflowing to 0."""
    width = jnp.exp(log_width)
    small = width < SERIES_BELOW
    # log((1 - e^-w) / w) = -w/2 + w^2/24 - w^4/2880 ...: the series is exact to 4e-8 below 0.1.
    series = log_width - width / 2 + width**2 / 24
    # The branch jnp.where discards still gets a gradient, so it is fed a harmless width instead of log(0).
    direct = jnp.log(-jnp.expm1(-jnp.where(small, 1.0, width)))
    return jnp.where(small, series, direct)


def _value_moments(images_uint8: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Each value's mean and standard deviation over the images, in [0, 1]: [N, ...] uint8 -> ([D], [D]).

    Integer sums over chunks of images: exact, and never a float copy of the whole training set (1.2 GB for CIFAR).
    """
    images = np.asarray(images_uint8)
    if images.shape[0] == 0:
        raise ValueError("the output bias needs at least one training image")
    flat_images = images.reshape(images.shape[0], -1)
    sums = np.zeros(flat_images.shape[1], np.int64)
    sums_of_squares = np.zeros(flat_images.shape[1], np.int64)
    for start in range(0, len(flat_images), chunk):
        block = flat_images[start : start + chunk].astype(np.int64)
        sums += block.sum(axis=0)
        sums_of_squares += np.square(block).sum(axis=0)
    means = sums / len(flat_images)
    variances = np.maximum(sums_of_squares / len(flat_images) - np.square(means), 0.0)
    return means / (LEVELS - 1), np.sqrt(variances) / (LEVELS - 1)


def _pixel_values(values: jax.Array, per_value: bool = False) -> jax.Array:
    """Group each pixel's R, G and B: levels [..., D] -> [..., D/3, 3]; parameters [..., D, P] -> [..., D/3, 3, P]."""
    value_axis = values.ndim - (2 if per_value else 1)
    count = values.shape[value_axis]
    if count % 3:
        raise ValueError(f"{count} values are not whole pixels of 3 channels (R, G, B)")
    return values.reshape(*values.shape[:value_axis], count // 3, 3, *values.shape[value_axis + 1 :])


def _coupled_means(means: jax.Array, coefficients: jax.Array, red: jax.Array, green: jax.Array) -> jax.Array:
    """Each channel's component means given the pixel's R and G (in x'): [..., 3, M] with red, green [..., 1]."""
    green_means = means[..., 1, :] + coefficients[..., 0, :] * red
    blue_means = means[..., 2, :] + coefficients[..., 1, :] * red + coefficients[..., 2, :] * green
    return jnp.stack([means[..., 0, :], green_means, blue_means], axis=-2)


def _take(per_component: jax.Array, chosen: jax.Array) -> jax.Array:
    """The chosen component's entry: [..., M] with indices [..., 1] -> [...]."""
    return jnp.take_along_axis(per_component, chosen, axis=-1)[..., 0]


def _draw_level(means: jax.Array, log_scales: jax.Array, logistic_noise: jax.Array) -> jax.Array:
    """A logistic draw clipped to [-1, 1] and rounded to its level, as level / 255 (the binning log_prob uses:
    level k owns x' within half a bin of its centre)."""
    draws = means + jnp.exp(log_scales) * logistic_noise
    levels = jnp.round((jnp.clip(draws, -1.0, 1.0) + 1.0) / BIN_WIDTH)
    return (levels / (LEVELS - 1)).astype(jnp.float32)


def _split_values(decoder_output: jax.Array, params_per_value: int) -> jax.Array:
    """[..., D * P] -> [..., D, P]: each value's parameters on the last axis."""
    outputs = decoder_output.shape[-1]
    if outputs % params_per_value:
        raise ValueError(f"decoder output of {outputs} is not a whole number of values of {params_per_value} each")
    return decoder_output.reshape(*decoder_output.shape[:-1], outputs // params_per_value, params_per_value)


def _broadcast_batch(
    decoder_output: jax.Array, targets: jax.Array, params_per_value: int
) -> tuple[jax.Array, jax.Array]:
    """([..., D * P], [..., D]) -> ([B..., D, P] or [B..., D] when P is 1, [B..., D]) on one common batch shape.

    Broadcasting explicitly lets decoder outputs for several latent samples [S, B, D * P] meet targets [B, D]
    even where JAX is told to refuse implicit rank promotion.
    """
    batch_shape = jnp.broadcast_shapes(decoder_output.shape[:-1], targets.shape[:-1])
    parameters = jnp.broadcast_to(decoder_output, (*batch_shape, decoder_output.shape[-1]))
    targets = jnp.broadcast_to(targets, (*batch_shape, targets.shape[-1]))
    if params_per_value == 1:
        return parameters, targets
    return _split_values(parameters, params_per_value), targets
