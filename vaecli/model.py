"""The VAE: an encoder giving q(z|x) = N(mu, sigma^2 I) and a decoder giving the parameters of p(x|z).

The encoder and decoder are MLPs on the flattened image (model.arch: mlp) or residual convolutional
stages (conv, from vaecli.conv); the likelihood (vaecli.likelihoods) says how many parameters the
decoder gives per value and what they mean. Images travel flattened: [batch, values] in [0, 1].
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vaecli.config import ModelConfig
from vaecli.errors import ConfigError
from vaecli.likelihoods import Likelihood, make_likelihood

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


class MLP(nnx.Module):
    """Dense layers with the activation after each (also the last, when `activate_last`)."""

    def __init__(self, widths: list[int], activation, rngs: nnx.Rngs, activate_last: bool, last_bias: bool = True):
        pairs = list(itertools.pairwise(widths))
        self.layers = nnx.List(
            [
                nnx.Linear(width_in, width_out, use_bias=last_bias or index < len(pairs) - 1, rngs=rngs)
                for index, (width_in, width_out) in enumerate(pairs)
            ]
        )
        self.activation = activation
        self.activate_last = activate_last

    def __call__(self, inputs: jax.Array) -> jax.Array:
        hidden = inputs
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden)
            if self.activate_last or index < len(self.layers) - 1:
                hidden = self.activation(hidden)
        return hidden


class VAE(nnx.Module):
    """Encoder, decoder and likelihood for images of a fixed shape; works on batches of flattened values."""

    def __init__(self, config: ModelConfig, image_shape: tuple[int, ...], rngs: nnx.Rngs):
        self.image_shape = tuple(image_shape)
        self.num_values = math.prod(image_shape)
        self.latent_dim = config.latent_dim
        channels = image_shape[2] if len(image_shape) == 3 else 1  # (H, W) grey or (H, W, C)
        self.likelihood: Likelihood = make_likelihood(config.likelihood, config.mixtures, channels)
        activation = ACTIVATION_FUNCTIONS[config.activation]
        outputs = self.num_values * self.likelihood.params_per_value
        if config.arch == "conv":
            from vaecli.conv import ConvDecoder, ConvEncoder

            self.encoder = ConvEncoder(self.image_shape, config.hidden, activation, rngs=rngs)
            feature_dim = self.encoder.feature_dim
            self.decoder = ConvDecoder(
                config.latent_dim, config.hidden, self.image_shape, self.likelihood.params_per_value, activation, rngs
            )
        else:
            self.encoder = MLP([self.num_values, *config.hidden], activation, rngs, activate_last=True)
            feature_dim = config.hidden[-1]
            decoder_widths = [config.latent_dim, *reversed(config.hidden), outputs]
            self.decoder = MLP(decoder_widths, activation, rngs, activate_last=False, last_bias=False)
        self.to_mean = nnx.Linear(feature_dim, config.latent_dim, rngs=rngs)
        self.to_log_variance = nnx.Linear(feature_dim, config.latent_dim, rngs=rngs)
        # One bias per decoder output (per pixel, channel and parameter), set from the training data
        # before training starts (set_output_bias), so the first step already models the data's marginal.
        self.output_bias = nnx.Param(jnp.zeros((outputs,), jnp.float32))

    def encode(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[batch, values] in [0, 1] -> (posterior_mean, posterior_log_variance), each [batch, latent]."""
        features = self.encoder(pixels)
        raw_log_variance = self.to_log_variance(features)
        log_variance = LOG_VARIANCE_BOUND * jnp.tanh(raw_log_variance / LOG_VARIANCE_BOUND)
        return self.to_mean(features), log_variance

    def decode(self, latents: jax.Array) -> jax.Array:
        """[..., latent] -> the likelihood's parameters [..., values * params_per_value]."""
        return self.decoder(latents) + self.output_bias[...]


def latents_from_noise(mean: jax.Array, log_variance: jax.Array, noise: jax.Array) -> jax.Array:
    """z = mu + sigma * eps for given eps (any leading sample axes): q(z|x)'s samples, gradients flowing."""
    return mean + jnp.exp(0.5 * log_variance) * noise


def reparameterize(key: jax.Array, mean: jax.Array, log_variance: jax.Array) -> jax.Array:
    """z = mu + sigma * eps with eps ~ N(0, I): a sample of q(z|x) that gradients flow through."""
    return latents_from_noise(mean, log_variance, jax.random.normal(key, mean.shape, mean.dtype))


def check_buildable(config: ModelConfig, image_shape: tuple[int, ...]) -> None:
    """Refuse, with one line, a model that cannot be built for images of `image_shape`."""
    if config.arch != "conv":
        return
    from vaecli.conv import conv_stage_count_error

    height, width = image_shape[:2]
    if height != width:
        raise ConfigError(f"model.arch conv needs square images, got {height}x{width}; use model.arch: mlp")
    problem = conv_stage_count_error(height, tuple(config.hidden))
    if problem is not None:
        raise ConfigError(problem)


def build_model(config: ModelConfig, image_shape: tuple[int, ...], seed: int) -> VAE:
    """A freshly initialised VAE for images of `image_shape`; the weights depend only on `seed`."""
    check_buildable(config, image_shape)
    return VAE(config, image_shape, rngs=nnx.Rngs(params=seed))


def set_output_bias(model: VAE, train_images_uint8: np.ndarray) -> None:
    """Start the decoder at the data's marginal: its output bias from the training images' statistics."""
    bias = model.likelihood.initial_output_bias(np.asarray(train_images_uint8))
    model.output_bias[...] = jnp.asarray(bias, jnp.float32).reshape(model.output_bias.shape)
