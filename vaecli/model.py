"""The VAE: an MLP encoder giving q(z|x) = N(mu, sigma^2 I) and an MLP decoder giving Bernoulli logits."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from vaecli.config import ModelConfig


class MLP(nnx.Module):
    """Dense layers with ReLU between them (none after the last)."""

    def __init__(self, widths: list[int], rngs: nnx.Rngs):
        self.layers = nnx.List(
            [nnx.Linear(width_in, width_out, rngs=rngs) for width_in, width_out in itertools.pairwise(widths)]
        )

    def __call__(self, inputs: jax.Array) -> jax.Array:
        hidden = inputs
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden)
            if index < len(self.layers) - 1:
                hidden = nnx.relu(hidden)
        return hidden


class Encoder(nnx.Module):
    """x (flattened pixels in [0, 1]) -> posterior mean and log-variance."""

    def __init__(self, num_pixels: int, hidden: tuple[int, ...], latent_dim: int, rngs: nnx.Rngs):
        self.trunk = MLP([num_pixels, *hidden], rngs=rngs)
        self.to_mean = nnx.Linear(hidden[-1], latent_dim, rngs=rngs)
        self.to_log_variance = nnx.Linear(hidden[-1], latent_dim, rngs=rngs)

    def __call__(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        features = nnx.relu(self.trunk(pixels))
        return self.to_mean(features), self.to_log_variance(features)


class Decoder(nnx.Module):
    """z -> one Bernoulli logit per pixel (flattened)."""

    def __init__(self, latent_dim: int, hidden: tuple[int, ...], num_pixels: int, rngs: nnx.Rngs):
        self.net = MLP([latent_dim, *reversed(hidden), num_pixels], rngs=rngs)

    def __call__(self, latents: jax.Array) -> jax.Array:
        return self.net(latents)


class VAE(nnx.Module):
    """Encoder and decoder for images of a fixed shape; works on batches of flattened pixels."""

    def __init__(self, config: ModelConfig, image_shape: tuple[int, ...], rngs: nnx.Rngs):
        num_pixels = math.prod(image_shape)
        self.image_shape = tuple(image_shape)
        self.latent_dim = config.latent_dim
        self.encoder = Encoder(num_pixels, config.hidden, config.latent_dim, rngs=rngs)
        self.decoder = Decoder(config.latent_dim, config.hidden, num_pixels, rngs=rngs)

    def encode(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[batch, pixels] in [0, 1] -> (posterior_mean, posterior_log_variance), each [batch, latent]."""
        return self.encoder(pixels)

    def decode(self, latents: jax.Array) -> jax.Array:
        """[batch, latent] -> Bernoulli logits [batch, pixels]."""
        return self.decoder(latents)

    def __call__(self, pixels: jax.Array, noise_key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Encode, draw z ~ q(z|x) by reparameterization, decode: (logits, mean, log_variance)."""
        posterior_mean, posterior_log_variance = self.encode(pixels)
        latents = reparameterize(noise_key, posterior_mean, posterior_log_variance)
        return self.decode(latents), posterior_mean, posterior_log_variance


def reparameterize(key: jax.Array, mean: jax.Array, log_variance: jax.Array) -> jax.Array:
    """z = mu + sigma * eps with eps ~ N(0, I): a sample of q(z|x) that gradients flow through."""
    noise = jax.random.normal(key, mean.shape, mean.dtype)
    return mean + jnp.exp(0.5 * log_variance) * noise


def build_model(config: ModelConfig, image_shape: tuple[int, ...], seed: int) -> VAE:
    """A freshly initialised VAE for images of `image_shape`; the weights depend only on `seed`."""
    return VAE(config, image_shape, rngs=nnx.Rngs(params=seed))
