"""A local autoregressive term in p(x|z): each pixel's likelihood parameters also see the pixels just above
and to the left of it (model.pixel_context: the side of that window).

Why: a decoder that models the values independently given one global z pays for every pixel afresh. On
small photos most of the code length goes to flat areas and smooth gradients, which a value's neighbours
predict almost exactly (PNG's filters code each byte as a difference from its left and upper neighbours for
that reason), while one z of a few dozen dimensions cannot carry each pixel's exact level. So
    p(x|z) = prod_i p(x_i | z, x_<i within the window),
with i in raster order (row by row, left to right). The window is small on purpose (5 pixels a side by
default): it models local texture only, so the global content (what is in the picture, where) must still
come through z, and the latent is not ignored, which a full PixelCNN decoder is known to do (Chen et al.
2017, "Variational Lossy Autoencoder"; Gulrajani et al. 2017, "PixelVAE"). In colour the three values of a
pixel are coupled by the likelihood itself (R, then G given R, then B given both: vaecli.models.likelihoods).

Training and evaluation are one parallel pass: a masked convolution of the true image (teacher forcing).
Sampling is sequential, one pixel at a time: each step takes only the window around the pixel, so a
32x32 picture costs 1024 small steps, not 1024 passes over the image.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from vaecli.models.likelihoods import LEVELS, DiscretizedLogisticMixture, Likelihood

# Width of the per-pixel layers that join the window's features with the decoder's parameters.
CONTEXT_WIDTH = 64
# The last layer starts small, so that at the start the parameters are the decoder's own: training begins
# from the plain VAE and learns how far to lean on the neighbours.
CONTEXT_OUTPUT_INIT_SCALE = 0.1


def residuals_from_left(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W(, C)]: each value minus its left neighbour (mid-grey left of the first column), shifted by
    mid-grey and clipped to the 8-bit range: what is left to code after PNG's Sub filter, as an 8-bit image."""
    images = np.asarray(images_uint8).astype(np.int32)
    left = np.concatenate([np.full_like(images[:, :, :1], LEVELS // 2), images[:, :, :-1]], axis=2)
    return np.clip(images - left + LEVELS // 2, 0, LEVELS - 1).astype(np.uint8)


def causal_mask(size: int) -> np.ndarray:
    """[size, size, 1, 1] float32: 1 where a window position precedes its centre in raster order, else 0.

    The rows above the centre and the centre row left of the centre; not the centre itself (the value being
    predicted), nor anything after it.
    """
    centre = size // 2
    mask = np.zeros((size, size, 1, 1), np.float32)
    mask[:centre] = 1.0
    mask[centre, :centre] = 1.0
    return mask


class PixelContext(nnx.Module):
    """Decoder parameters [..., H, W, C*P] and the image they model -> parameters that also see the window."""

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        params_per_value: int,
        size: int,
        activation: Callable[[jax.Array], jax.Array],
        rngs: nnx.Rngs,
        width: int = CONTEXT_WIDTH,
    ):
        if size < 3 or size % 2 == 0:
            raise ValueError(f"a pixel context window needs an odd side of at least 3, got {size}")
        self.image_shape = tuple(image_shape)
        self.size = size
        self.activation = activation
        channels = image_shape[2]
        outputs = channels * params_per_value
        self.neighbours = nnx.Conv(channels, width, (size, size), padding="SAME", rngs=rngs)
        # A direct linear path from the window to the parameters, PNG's predictors learnt: a smooth gradient
        # continues its neighbours linearly (2 * left - left of left), which the nonlinear path only
        # approximates. Starts at zero, so training starts from the plain VAE.
        self.linear = nnx.Conv(
            channels,
            outputs,
            (size, size),
            padding="SAME",
            use_bias=False,
            kernel_init=nnx.initializers.zeros,
            rngs=rngs,
        )
        self.condition = nnx.Linear(outputs, width, rngs=rngs)
        self.hidden = nnx.Linear(width, width, rngs=rngs)
        small = nnx.initializers.variance_scaling(CONTEXT_OUTPUT_INIT_SCALE**2, "fan_in", "truncated_normal")
        self.to_params = nnx.Linear(width, outputs, kernel_init=small, use_bias=False, rngs=rngs)

    def start_from_left_neighbour(self, likelihood: DiscretizedLogisticMixture) -> None:
        """Start the linear path as PNG's Sub filter: every component mean of a value is its left neighbour's value.

        Used with an output bias fitted to the residuals from that neighbour (model.set_output_bias), so that
        training starts from a sharp local predictor instead of learning one from the data's broad marginal.
        Only for the logistic mixture, whose means are values in x' (a Bernoulli logit is not).
        """
        channels = self.image_shape[2]
        params_per_value, mixtures = likelihood.params_per_value, likelihood.mixtures
        centre = self.size // 2
        kernel = np.zeros(self.linear.kernel.shape, np.float32)
        for channel in range(channels):
            first_mean = channel * params_per_value + mixtures  # the means follow the M logits
            kernel[centre, centre - 1, channel, first_mean : first_mean + mixtures] = 1.0
        self.linear.kernel[...] = jnp.asarray(kernel)

    def _masked_kernel(self) -> jax.Array:
        """Both window kernels as one, [size, size, C, width + C*P], masked to the pixels before the centre."""
        kernel = jnp.concatenate([self.neighbours.kernel[...], self.linear.kernel[...]], axis=-1)
        # The mask is a constant of the compiled program, not a variable: nothing to train or to checkpoint.
        return kernel * causal_mask(self.size)

    def window_features(self, images: jax.Array) -> jax.Array:
        """Images [N, H, W, C] in [0, 1] -> the window's features at every pixel, [N, H, W, width + C*P].

        Works in x' = 2x - 1, so the zero padding beyond the border reads as mid-grey.
        """
        scaled = 2.0 * images - 1.0
        return lax.conv_general_dilated(
            scaled, self._masked_kernel(), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    def joined(self, decoder_params: jax.Array, features: jax.Array) -> jax.Array:
        """Decoder parameters [..., C*P] and window features [..., width + C*P] (leading axes broadcast) -> params."""
        width = self.neighbours.kernel.shape[-1]
        hidden = self.activation(features[..., :width] + self.neighbours.bias[...] + self.condition(decoder_params))
        return decoder_params + features[..., width:] + self.to_params(self.activation(self.hidden(hidden)))

    def __call__(self, decoder_output: jax.Array, targets: jax.Array) -> jax.Array:
        """Decoder output [..., B, D*P] (any leading sample axes) and targets [B, D] -> [..., B, D*P]."""
        height, width, channels = self.image_shape
        batch = targets.shape[0]
        features = self.window_features(targets.reshape(batch, height, width, channels))
        leading = decoder_output.shape[:-1]
        params = decoder_output.reshape(*leading, height, width, -1)
        return self.joined(params, features).reshape(*leading, -1)

    def sample(self, likelihood: Likelihood, decoder_output: jax.Array, row_keys: jax.Array) -> jax.Array:
        """One image per row, drawn pixel by pixel in raster order: [N, D*P] with keys [N] -> [N, D] in [0, 1].

        Pixel p of row n is drawn with fold_in(row_keys[n], p); the window of pixel p only holds pixels
        drawn before it, exactly what the masked convolution of `window_features` sees in training.
        """
        height, width, channels = self.image_shape
        count = decoder_output.shape[0]
        params = decoder_output.reshape(count, height, width, -1)
        radius = self.size // 2
        kernel = self._masked_kernel()

        def draw_pixel(position, padded):
            row, column = position // width, position % width
            window = lax.dynamic_slice(padded, (0, row, column, 0), (count, self.size, self.size, channels))
            features = jnp.einsum("nabc,abcf->nf", 2.0 * window - 1.0, kernel)
            pixel_params = lax.dynamic_slice(params, (0, row, column, 0), (count, 1, 1, params.shape[-1]))
            joined = self.joined(pixel_params[:, 0, 0], features)
            values = jax.vmap(lambda key, one: likelihood.sample(jax.random.fold_in(key, position), one))(
                row_keys, joined
            )
            return lax.dynamic_update_slice(padded, values[:, None, None, :], (0, row + radius, column + radius, 0))

        # The image drawn so far, in [0, 1], with a border of mid-grey (x' = 0: the convolution's zero padding);
        # pixels not drawn yet are masked out of every window that could see them.
        padded = jnp.full((count, height + 2 * radius, width + 2 * radius, channels), 0.5, jnp.float32)
        padded = lax.fori_loop(0, height * width, draw_pixel, padded)
        drawn = padded[:, radius : radius + height, radius : radius + width]
        return drawn.reshape(count, math.prod(self.image_shape))
