"""The VAE: an encoder giving q(z|x) = N(mu, sigma^2 I) and a decoder giving the parameters of p(x|z).

The encoder and decoder are MLPs on the flattened image (model.arch: mlp) or residual convolutional
stages (conv, from vaecli.models.conv); the likelihood (vaecli.models.likelihoods) says how many parameters the
decoder gives per value and what they mean. Images travel flattened: [batch, values] in [0, 1].
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vaecli.common.config import ModelConfig
from vaecli.common.errors import ConfigError
from vaecli.models import sampling
from vaecli.models.layers import ACTIVATION_FUNCTIONS, LOG_VARIANCE_BOUND, latents_from_noise
from vaecli.models.likelihoods import DiscretizedLogisticMixture, Likelihood, make_likelihood


class MLP(nnx.Module):
    """Dense layers with the activation after each (also the last, when `activate_last`)."""

    def __init__(
        self,
        widths: list[int],
        activation,
        rngs: nnx.Rngs,
        activate_last: bool,
        last_bias: bool = True,
        dtype: jnp.dtype | None = None,
        output_dtype: jnp.dtype | None = None,
    ):
        """dtype: the layers' arithmetic (weights stay float32); output_dtype: the last layer's result, if another."""
        last = len(widths) - 2
        self.layers = nnx.List(
            [
                nnx.Linear(
                    width_in,
                    width_out,
                    use_bias=last_bias or index < last,
                    dtype=dtype,
                    preferred_element_type=output_dtype if index == last else None,
                    rngs=rngs,
                )
                for index, (width_in, width_out) in enumerate(itertools.pairwise(widths))
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
        # model.dtype is the layers' arithmetic; the layers that feed the loss (the decoder's last, the
        # posterior's) accumulate into float32 and return it, so the likelihood, the KL and the
        # importance weights are float32 maths on float32 inputs. In bfloat16 a logistic's mean near 1
        # would carry only 2^-8, half the width of a level's bin.
        dtype = jnp.dtype(config.dtype)
        if config.arch == "conv":
            from vaecli.models.conv import ConvDecoder, ConvEncoder

            self.encoder = ConvEncoder(self.image_shape, config.hidden, activation, rngs=rngs, dtype=dtype)
            feature_dim = self.encoder.feature_dim
            self.decoder = ConvDecoder(
                config.latent_dim,
                config.hidden,
                self.image_shape,
                self.likelihood.params_per_value,
                activation,
                rngs,
                dtype=dtype,
            )
        else:
            self.encoder = MLP([self.num_values, *config.hidden], activation, rngs, activate_last=True, dtype=dtype)
            feature_dim = config.hidden[-1]
            decoder_widths = [config.latent_dim, *reversed(config.hidden), outputs]
            self.decoder = MLP(
                decoder_widths,
                activation,
                rngs,
                activate_last=False,
                last_bias=False,
                dtype=dtype,
                output_dtype=jnp.float32,
            )
        self.to_mean = nnx.Linear(
            feature_dim, config.latent_dim, dtype=dtype, preferred_element_type=jnp.float32, rngs=rngs
        )
        self.to_log_variance = nnx.Linear(
            feature_dim, config.latent_dim, dtype=dtype, preferred_element_type=jnp.float32, rngs=rngs
        )
        # One bias per decoder output (per pixel, channel and parameter), set from the training data
        # before training starts (set_output_bias), so the first step already models the data's marginal.
        self.output_bias = nnx.Param(jnp.zeros((outputs,), jnp.float32))
        context = None
        if config.pixel_context:
            from vaecli.models.pixel_context import PixelContext

            maps_shape = (*self.image_shape[:2], channels)
            context = PixelContext(maps_shape, self.likelihood.params_per_value, config.pixel_context, activation, rngs)
        self.context = nnx.data(context)  # a submodule, or None: data either way, so the pytree's shape says which

    def encode(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[batch, values] in [0, 1] -> (posterior_mean, posterior_log_variance), each [batch, latent]."""
        features = self.encoder(pixels)
        raw_log_variance = self.to_log_variance(features)
        log_variance = LOG_VARIANCE_BOUND * jnp.tanh(raw_log_variance / LOG_VARIANCE_BOUND)
        return self.to_mean(features), log_variance

    def _params_given_z(self, latents: jax.Array) -> jax.Array:
        """The decoder's parameters before any pixel context: [..., latent] -> [..., values * params_per_value]."""
        return self.decoder(latents) + self.output_bias[...]

    def decode(self, latents: jax.Array, targets: jax.Array | None = None) -> jax.Array:
        """[..., batch, latent] -> the likelihood's parameters [..., batch, values * params_per_value].

        An autoregressive model needs the images being scored, `targets` [batch, values]: the parameters
        of each pixel depend on the pixels before it. Others ignore `targets`.
        """
        params = self._params_given_z(latents)
        if self.context is None:
            return params
        if targets is None:
            raise ValueError("this model's p(x|z) depends on the image (model.pixel_context): decode(latents, targets)")
        return self.context(params, targets)

    def decode_images(self, latents: jax.Array, row_keys: jax.Array) -> jax.Array:
        """Latents [N, latent] -> images [N, values] in [0, 1]: the mean of p(x|z), or, for an autoregressive
        model (whose mean has no closed form), one draw per row, pixel by pixel, with row_keys [N]."""
        params = self._params_given_z(latents)
        if self.context is None:
            return self.likelihood.mean(params)
        return self.context.sample(self.likelihood, params, row_keys)

    def prior_images(self, seed: jax.Array, indices: jax.Array, temperature: jax.Array) -> jax.Array:
        """Rows `indices` of --seed's prior draws decoded: see vaecli.models.sampling.prior_images."""
        return sampling.prior_images(self, seed, indices, temperature)

    def posterior_images(self, images_uint8, binarized, seed, input_indices, sample_numbers, output_indices, use_mean):
        """Draws of q(z|x) decoded, row by row: see vaecli.models.sampling.posterior_images."""
        return sampling.posterior_images(
            self, images_uint8, binarized, seed, input_indices, sample_numbers, output_indices, use_mean
        )


def reparameterize(key: jax.Array, mean: jax.Array, log_variance: jax.Array) -> jax.Array:
    """z = mu + sigma * eps with eps ~ N(0, I): a sample of q(z|x) that gradients flow through."""
    return latents_from_noise(mean, log_variance, jax.random.normal(key, mean.shape, mean.dtype))


def check_buildable(config: ModelConfig, image_shape: tuple[int, ...]) -> None:
    """Refuse, with one line, a model that cannot be built for images of `image_shape`."""
    if config.arch != "conv":
        return
    from vaecli.models.conv import conv_stage_count_error

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


def inference_weights(model: VAE) -> dict[str, np.ndarray]:
    """The model's parameters as host arrays named by their path, e.g. "decoder/layers/0/kernel": the weights
    its exported functions take (vaecli.inference.export)."""
    flat_params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {"/".join(map(str, path)): np.asarray(variable[...]) for path, variable in flat_params}


def set_output_bias(model: VAE, train_images_uint8: np.ndarray) -> None:
    """Start the decoder at the data's marginal: its output bias from the training images' statistics."""
    images = np.asarray(train_images_uint8)
    if model.context is not None and isinstance(model.likelihood, DiscretizedLogisticMixture):
        # The context's linear path starts as "each value is its left neighbour", so the bias codes what is
        # left: the residuals from that neighbour, far narrower than the values on smooth pictures.
        from vaecli.models.pixel_context import residuals_from_left

        model.context.start_from_left_neighbour(model.likelihood)
        images = residuals_from_left(images)
    bias = model.likelihood.initial_output_bias(images)
    model.output_bias[...] = jnp.asarray(bias, jnp.float32).reshape(model.output_bias.shape)
