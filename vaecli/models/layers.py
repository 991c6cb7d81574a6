"""The VAE's forward passes as pure JAX functions of its weights, named by their path in the model.

The Flax modules (vaecli.models.vae, vaecli.models.conv) build, train and save the weights; `InferenceModel` runs the
same encoder and decoder from a plain dict of those arrays ("decoder/layers/0/kernel", ...), op for op as
Flax's layers compute them, so that both give the same numbers to the bit (tests/test_inference.py). It
exists for start-up: generate and reconstruct run it without importing Flax, evaluate without restoring a
checkpoint (see vaecli.inference.open_run). Images travel flattened, [batch, values] in [0, 1], as in vaecli.models.vae.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from vaecli.common.config import ModelConfig
from vaecli.models.likelihoods import Likelihood, make_likelihood

Weights = Mapping[str, jax.Array]

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
# Channels share normalisation statistics in groups of width / 8 (fewer groups when 8 does not
# divide the width): per-image statistics, so nothing depends on the batch and nothing is stored
# besides parameters.
MAX_NORM_GROUPS = 8
# Flax's GroupNorm default, named here so that the conv model and group_norm below cannot drift apart.
NORM_EPSILON = 1e-6


def computes(config: ModelConfig) -> bool:
    """Whether InferenceModel computes what vaecli.models.vae builds from `config`: float32 layers only, for now
    (model.dtype bfloat16 rounds inside each layer as Flax does it, which is not reproduced here)."""
    return config.dtype == "float32" and config.pixel_context == 0


# ---- what the encoder is given, and the reparameterization ---------------------------------------


def intensities(images_uint8: jax.Array) -> jax.Array:
    """uint8 [batch, H, W...] -> float32 [batch, pixels] in [0, 1]; done inside the compiled step."""
    return images_uint8.reshape(images_uint8.shape[0], -1).astype(jnp.float32) / 255.0


def bernoulli_draw(key: jax.Array, images_uint8: jax.Array) -> jax.Array:
    """A binary image per input, pixel on with probability intensity / 255 (to within 2^-16), as bool.

    16 random bits per pixel instead of a float uniform: half the random words, and compared
    against an integer threshold, since the draw is the costliest part of dynamic binarization.
    """
    random_bits = jax.random.bits(key, images_uint8.shape, jnp.uint16).astype(jnp.uint32)
    threshold = (images_uint8.astype(jnp.uint32) * 65536 + 127) // 255  # 255 -> 65536: always on
    return random_bits < threshold


def latents_from_noise(mean: jax.Array, log_variance: jax.Array, noise: jax.Array) -> jax.Array:
    """z = mu + sigma * eps for given eps (any leading sample axes): q(z|x)'s samples, gradients flowing."""
    return mean + jnp.exp(0.5 * log_variance) * noise


# ---- layers: what nnx.Linear, nnx.Conv and nnx.GroupNorm compute ----------------------------------


def dense(weights: Weights, name: str, inputs: jax.Array) -> jax.Array:
    """inputs @ kernel (+ bias) over the last axis: [..., in] -> [..., out]."""
    outputs = lax.dot_general(inputs, weights[f"{name}/kernel"], (((inputs.ndim - 1,), (0,)), ((), ())))
    bias = weights.get(f"{name}/bias")
    if bias is not None:
        outputs += jnp.reshape(bias, (1,) * (outputs.ndim - 1) + (-1,))
    return outputs


def conv(weights: Weights, name: str, maps: jax.Array, stride: int = 1) -> jax.Array:
    """A 'SAME'-padded convolution of NHWC maps with an HWIO kernel (+ bias): [N, H, W, in] -> [N, H', W', out]."""
    dimension_numbers = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
    outputs = lax.conv_general_dilated(
        maps,
        weights[f"{name}/kernel"],
        (stride, stride),
        "SAME",
        lhs_dilation=(1, 1),
        rhs_dilation=(1, 1),
        dimension_numbers=dimension_numbers,
        feature_group_count=1,
    )
    bias = weights.get(f"{name}/bias")
    if bias is not None:
        outputs += bias.reshape((1,) * (outputs.ndim - bias.ndim) + bias.shape)
    return outputs


def norm_groups(width: int) -> int:
    """How many channel groups share statistics in a residual block of `width` channels."""
    return math.gcd(width, MAX_NORM_GROUPS)


def group_norm(weights: Weights, name: str, maps: jax.Array) -> jax.Array:
    """Each image's channels normalised in groups over (H, W, group), then scaled and shifted: NHWC -> NHWC.

    The variance is E[x^2] - E[x]^2 (clipped at 0) and the scale folds into 1/sqrt(var + eps) before it
    multiplies, the order in which Flax computes them: another order rounds differently.
    """
    count, height, width, channels = maps.shape
    groups = norm_groups(channels)
    grouped = maps.reshape(count, height, width, groups, channels // groups)
    mean = grouped.mean((1, 2, 4))
    mean_of_squares = lax.square(grouped).mean((1, 2, 4))
    variance = jnp.maximum(0.0, mean_of_squares - lax.square(mean))
    stats_shape = (count, 1, 1, channels)
    mean = jnp.repeat(mean, channels // groups, axis=1).reshape(stats_shape)
    variance = jnp.repeat(variance, channels // groups, axis=1).reshape(stats_shape)
    multiplier = lax.rsqrt(variance + NORM_EPSILON)
    multiplier *= weights[f"{name}/scale"].reshape(1, 1, 1, channels)
    normalised = maps - mean
    normalised *= multiplier
    normalised += weights[f"{name}/bias"].reshape(1, 1, 1, channels)
    return normalised


def depth_to_space(maps: jax.Array) -> jax.Array:
    """[N, H, W, 4C] -> [N, 2H, 2W, C]: channel (a, b, c) of pixel (i, j) goes to pixel (2i + a, 2j + b)."""
    count, height, width, channels = maps.shape
    blocks = maps.reshape(count, height, width, 2, 2, channels // 4)
    return blocks.transpose(0, 1, 3, 2, 4, 5).reshape(count, 2 * height, 2 * width, channels // 4)


# ---- the networks of vaecli.models.vae and vaecli.models.conv -------------------------------------------------


def mlp(weights: Weights, name: str, inputs: jax.Array, layer_count: int, activation, activate_last: bool):
    """model.MLP: dense layers name/layers/0, 1, ..., the activation after each but (unless activate_last) the last."""
    hidden = inputs
    for index in range(layer_count):
        hidden = dense(weights, f"{name}/layers/{index}", hidden)
        if activate_last or index < layer_count - 1:
            hidden = activation(hidden)
    return hidden


def residual_block(weights: Weights, name: str, maps: jax.Array, activation) -> jax.Array:
    """conv.ResidualBlock: maps + conv(act(conv(act(norm(maps)))))."""
    branch = conv(weights, f"{name}/conv_in", activation(group_norm(weights, f"{name}/norm", maps)))
    return maps + conv(weights, f"{name}/conv_out", activation(branch))


def conv_encoder(weights: Weights, pixels: jax.Array, image_shape: tuple[int, int, int], stages: int, activation):
    """conv.ConvEncoder: flattened pixels [..., H*W*C] -> features [..., feature_dim], after the activation."""
    maps = pixels.reshape(-1, *image_shape)
    for index in range(stages):
        downsampled = conv(weights, f"encoder/downsamples/{index}", maps if index == 0 else activation(maps), stride=2)
        maps = residual_block(weights, f"encoder/blocks/{index}", downsampled, activation)
    features = activation(maps)
    return features.reshape(*pixels.shape[:-1], math.prod(features.shape[1:]))


def conv_decoder(weights: Weights, latents: jax.Array, first_map_shape: tuple[int, int, int], stages: int, activation):
    """conv.ConvDecoder: latents [..., latent] -> [..., H*W*C*P], the P outputs of each value adjacent."""
    maps = dense(weights, "decoder/to_first_map", latents.reshape(-1, latents.shape[-1])).reshape(-1, *first_map_shape)
    for index in range(stages - 1):
        block = residual_block(weights, f"decoder/blocks/{index}", maps, activation)
        maps = depth_to_space(dense(weights, f"decoder/upsamples/{index}", activation(block)))
    last_block = residual_block(weights, f"decoder/blocks/{stages - 1}", maps, activation)
    values = depth_to_space(conv(weights, "decoder/to_values", activation(last_block)))
    return values.reshape(*latents.shape[:-1], -1)


@partial(jax.tree_util.register_dataclass, data_fields=["weights"], meta_fields=["config", "image_shape"])
@dataclass(frozen=True, eq=False)
class InferenceModel:
    """A trained VAE as arrays: encode and decode as model.VAE does, for images of `image_shape`.

    A JAX pytree (the weights are its leaves), so a jitted function takes it as an argument, as it takes a VAE.
    """

    weights: dict[str, jax.Array]
    config: ModelConfig
    image_shape: tuple[int, ...]

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    @property
    def num_values(self) -> int:
        return math.prod(self.image_shape)

    @property
    def likelihood(self) -> Likelihood:
        channels = self.image_shape[2] if len(self.image_shape) == 3 else 1
        return make_likelihood(self.config.likelihood, self.config.mixtures, channels)

    @property
    def activation(self) -> Callable[[jax.Array], jax.Array]:
        return ACTIVATION_FUNCTIONS[self.config.activation]

    def _maps_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the conv model's input."""
        height, width, *channels = self.image_shape
        return height, width, channels[0] if channels else 1

    def encode(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[batch, values] in [0, 1] -> (posterior_mean, posterior_log_variance), each [batch, latent]."""
        if self.config.arch == "conv":
            stages = len(self.config.hidden)
            features = conv_encoder(self.weights, pixels, self._maps_shape(), stages, self.activation)
        else:
            layer_count = len(self.config.hidden)
            features = mlp(self.weights, "encoder", pixels, layer_count, self.activation, activate_last=True)
        raw_log_variance = dense(self.weights, "to_log_variance", features)
        log_variance = LOG_VARIANCE_BOUND * jnp.tanh(raw_log_variance / LOG_VARIANCE_BOUND)
        return dense(self.weights, "to_mean", features), log_variance

    def decode_images(self, latents: jax.Array, row_keys: jax.Array) -> jax.Array:
        """Latents [N, latent] -> the means of p(x|z), [N, values] (row_keys: unused; see model.VAE.decode_images)."""
        del row_keys
        return self.likelihood.mean(self.decode(latents))

    def decode(self, latents: jax.Array, targets: jax.Array | None = None) -> jax.Array:
        """[..., latent] -> the likelihood's parameters [..., values * params_per_value] (targets: unused, as in
        model.VAE.decode for a model without model.pixel_context, the only kind computed here)."""
        del targets
        if self.config.arch == "conv":
            stages = len(self.config.hidden)
            side = self.image_shape[0] // 2**stages
            first_map_shape = (side, side, self.config.hidden[-1])
            outputs = conv_decoder(self.weights, latents, first_map_shape, stages, self.activation)
        else:
            layer_count = len(self.config.hidden) + 1  # the hidden widths reversed, then the output layer
            outputs = mlp(self.weights, "decoder", latents, layer_count, self.activation, activate_last=False)
        return outputs + self.weights["output_bias"]
