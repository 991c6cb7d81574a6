"""Convolutional encoder and decoder for square images (28, 32 or 64 pixels a side, grey or colour).

Each entry of model.hidden is one stage: the encoder halves the side with a stride-2 convolution to
the stage's width, then refines at that resolution with a residual block; the decoder maps z to the
smallest map and runs the stages in reverse, a residual block then a doubling of the side (the last
doubling is the output layer). Images travel flattened in (H, W, C) order, as
`images.reshape(batch, -1)` gives, and the decoder's output is value-major: (H, W, C, P).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from vaecli.models.layers import NORM_EPSILON, depth_to_space, norm_groups

Activation = Callable[[jax.Array], jax.Array]

# The last convolution of each residual branch starts at a tenth of the usual scale, so every block
# starts near the identity and a stack of them keeps the scale of its input. Unlike a zero start,
# every weight of the branch gets a gradient from the first step.
RESIDUAL_INIT_SCALE = 0.1
# The decoder's last convolution starts as small, so that at the start the decoder's output is
# close to the per-output bias the VAE sets from the data (the data's marginal), not random noise.
OUTPUT_INIT_SCALE = 0.1
_TIMES = {1: "once", 2: "twice", 3: "three times", 4: "four times", 5: "five times", 6: "six times"}


def conv_stage_count_error(image_side: int, widths: tuple[int, ...]) -> str | None:
    """None when `widths` fits images `image_side` pixels a side, else a one-line message saying what would."""
    stages, most = len(widths), _most_stages(image_side)
    if 0 < stages <= most:
        return None
    if most == 0:
        return (
            f"model.arch conv halves the side, but {image_side} pixels cannot halve to 2x2 or more; use model.arch: mlp"
        )
    hidden, advice = f"model.hidden {list(widths)}", f"use at most {most} widths for {image_side}-pixel images"
    if stages == 0:
        return f"{hidden} needs at least one width; {advice}"
    halves = f"{hidden} halves {image_side} pixels {_TIMES.get(stages, f'{stages} times')}"
    if image_side % 2**stages:
        return f"{halves}, but {image_side} is not divisible by {2**stages}; {advice}"
    final_side = image_side // 2**stages
    return f"{halves}, leaving a {final_side}x{final_side} map where at least 2x2 is needed; {advice}"


def _most_stages(image_side: int) -> int:
    """How many halvings `image_side` takes exactly while leaving a map of at least 2x2."""
    stages = 0
    while image_side % 2 ** (stages + 1) == 0 and image_side // 2 ** (stages + 1) >= 2:
        stages += 1
    return stages


def _checked_shape(image_shape: tuple[int, ...], widths: tuple[int, ...]) -> tuple[int, int, int]:
    """(H, W) or (H, W, C) -> (H, W, C), refusing shapes the stages cannot handle."""
    height, width, *rest = image_shape
    channels = rest[0] if rest else 1
    if height != width or len(rest) > 1:
        raise ValueError(f"conv models need square (H, W) or (H, W, C) images, got {image_shape}")
    problem = conv_stage_count_error(height, widths)
    if problem is not None:
        raise ValueError(problem)
    return height, width, channels


def _scaled_lecun_normal(scale: float) -> nnx.Initializer:
    """Flax's default kernel init (LeCun normal) with its standard deviation multiplied by `scale`."""
    return nnx.initializers.variance_scaling(scale**2, "fan_in", "truncated_normal")


class ResidualBlock(nnx.Module):
    """maps + conv(act(conv(act(norm(maps))))): two 3x3 convolutions at one resolution and width."""

    def __init__(self, width: int, activation: Activation, rngs: nnx.Rngs, dtype: jnp.dtype | None = None):
        # Per-image statistics in channel groups (vaecli.models.layers.norm_groups): nothing depends on the
        # batch, and nothing is stored besides parameters. Flax computes them in float32 whatever `dtype`.
        self.norm = nnx.GroupNorm(width, num_groups=norm_groups(width), epsilon=NORM_EPSILON, dtype=dtype, rngs=rngs)
        self.conv_in = nnx.Conv(width, width, (3, 3), dtype=dtype, rngs=rngs)
        residual_init = _scaled_lecun_normal(RESIDUAL_INIT_SCALE)
        self.conv_out = nnx.Conv(width, width, (3, 3), kernel_init=residual_init, dtype=dtype, rngs=rngs)
        self.activation = activation

    def __call__(self, maps: jax.Array) -> jax.Array:
        branch = self.conv_in(self.activation(self.norm(maps)))
        return maps + self.conv_out(self.activation(branch))


class ConvEncoder(nnx.Module):
    """Flattened pixels [..., H*W*C] in [0, 1] -> features [..., feature_dim] (after the activation).

    feature_dim is the smallest map's size, (side / 2**len(widths))**2 * widths[-1]. dtype: the layers' arithmetic
    (None: that of their inputs and float32 weights); the weights are float32 either way.
    """

    def __init__(
        self,
        image_shape: tuple[int, ...],
        widths: tuple[int, ...],
        activation: Activation,
        rngs: nnx.Rngs,
        dtype: jnp.dtype | None = None,
    ):
        self.image_shape = _checked_shape(image_shape, tuple(widths))
        self.activation = activation
        # A stride-2 3x3 convolution halves the side exactly, since every side met here is even.
        self.downsamples = nnx.List(
            [
                nnx.Conv(width_in, width, (3, 3), strides=2, dtype=dtype, rngs=rngs)
                for width_in, width in itertools.pairwise((self.image_shape[2], *widths))
            ]
        )
        self.blocks = nnx.List([ResidualBlock(width, activation, rngs, dtype) for width in widths])
        final_side = self.image_shape[0] // 2 ** len(widths)
        self.feature_dim = final_side * final_side * widths[-1]

    def __call__(self, pixels: jax.Array) -> jax.Array:
        maps = pixels.reshape(-1, *self.image_shape)
        for index, (downsample, block) in enumerate(zip(self.downsamples, self.blocks, strict=True)):
            # The residual stream is left unnormalised and un-activated, so the skip paths carry it
            # unchanged; every convolution after the first reads it through the activation.
            maps = block(downsample(maps if index == 0 else self.activation(maps)))
        return self.activation(maps).reshape(*pixels.shape[:-1], self.feature_dim)


class ConvDecoder(nnx.Module):
    """Latents [..., latent_dim] -> [..., H*W*C*params_per_value], the P outputs of each value adjacent.

    dtype: the layers' arithmetic, as in ConvEncoder; the output layer accumulates into and returns float32.
    """

    def __init__(
        self,
        latent_dim: int,
        widths: tuple[int, ...],
        image_shape: tuple[int, ...],
        params_per_value: int,
        activation: Activation,
        rngs: nnx.Rngs,
        dtype: jnp.dtype | None = None,
    ):
        self.image_shape = _checked_shape(image_shape, tuple(widths))
        self.activation = activation
        self.first_map_shape = (self.image_shape[0] // 2 ** len(widths),) * 2 + (widths[-1],)
        self.to_first_map = nnx.Linear(latent_dim, math.prod(self.first_map_shape), dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([ResidualBlock(width, activation, rngs, dtype) for width in reversed(widths)])
        # The inner doublings are 2x2 stride-2 transposed convolutions, written as a per-pixel dense
        # layer to 4x the channels and a depth-to-space step: XLA's CPU transposed convolution runs
        # an order of magnitude slower for the same result.
        self.upsamples = nnx.List(
            [
                nnx.Linear(width_in, 4 * width, dtype=dtype, rngs=rngs)
                for width_in, width in itertools.pairwise(reversed(widths))
            ]
        )
        # The last doubling is the output layer itself: a 3x3 convolution at half the side to the
        # values of 2x2 pixels, then depth-to-space (a sub-pixel convolution). Each output sees a
        # 3x3 neighbourhood of the half-side map, and no full-side map of widths[0] channels is
        # made, which would cost more than all the rest of the decoder on a CPU.
        # No bias: the VAE adds its own per-output bias, set from the data.
        self.to_values = nnx.Conv(
            widths[0],
            4 * self.image_shape[2] * params_per_value,
            (3, 3),
            use_bias=False,
            kernel_init=_scaled_lecun_normal(OUTPUT_INIT_SCALE),
            dtype=dtype,
            preferred_element_type=jnp.float32,
            rngs=rngs,
        )

    def __call__(self, latents: jax.Array) -> jax.Array:
        maps = self.to_first_map(latents.reshape(-1, latents.shape[-1])).reshape(-1, *self.first_map_shape)
        *inner_blocks, last_block = self.blocks
        for block, upsample in zip(inner_blocks, self.upsamples, strict=True):
            maps = depth_to_space(upsample(self.activation(block(maps))))
        # Output channel c * P + p of a pixel is parameter p of its channel c: flattening (H, W, C * P)
        # gives the value-major order.
        values = depth_to_space(self.to_values(self.activation(last_block(maps))))
        return values.reshape(*latents.shape[:-1], -1)
