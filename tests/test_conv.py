"""The convolutional encoder and decoder: shapes, stage counts, output order, gradients, initialisation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vaecli.models.conv import ConvDecoder, ConvEncoder, conv_stage_count_error, depth_to_space

WIDTHS = (4, 8)  # two stages, narrow: the tests check wiring, not capacity
IMAGE_SHAPE, LATENT_DIM, PARAMS_PER_VALUE = (32, 32, 3), 6, 2


@pytest.fixture(autouse=True)
def no_implicit_rank_promotion():
    """Broadcasting bugs surface as errors: every broadcast in the module must be explicit."""
    with jax.numpy_rank_promotion("raise"):
        yield


# Test data comes from NumPy: each new shape drawn with JAX's default PRNG costs seconds of compiling.
def random_images(seed: int, count: int, image_shape: tuple[int, ...]) -> jax.Array:
    """[count, H*W*C] values in [0, 1], flattened as images.reshape(count, -1) gives."""
    return jnp.asarray(np.random.default_rng(seed).uniform(size=(count, math.prod(image_shape))), jnp.float32)


def random_normal(seed: int, shape: tuple[int, ...]) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


class EncoderToDecoder(nnx.Module):
    """Encoder, a dense map from its features to a latent, decoder: the path a VAE's gradients take."""

    def __init__(self, rngs: nnx.Rngs):
        self.encoder = ConvEncoder(IMAGE_SHAPE, WIDTHS, jax.nn.relu, rngs)
        self.to_latent = nnx.Linear(self.encoder.feature_dim, LATENT_DIM, rngs=rngs)
        self.decoder = ConvDecoder(LATENT_DIM, WIDTHS, IMAGE_SHAPE, PARAMS_PER_VALUE, jax.nn.relu, rngs)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        return self.decoder(self.to_latent(self.encoder(pixels)))


@pytest.fixture(scope="module")
def model() -> EncoderToDecoder:
    """One model for the tests that run one.

    Its keys use XLA's RNG rather than JAX's default threefry, whose compiled code for each new
    parameter shape costs seconds on a CPU; these tests do not depend on which generator made the weights.
    """
    return EncoderToDecoder(nnx.Rngs(jax.random.key(0, impl="rbg")))


@pytest.mark.parametrize("side", [28, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_encoder_and_decoder_shapes(side, channels):
    image_shape = (side, side) if channels == 1 else (side, side, channels)
    feature_dims = []

    def build_and_run(pixels, latents):
        encoder = ConvEncoder(image_shape, WIDTHS, jax.nn.relu, nnx.Rngs(0))
        decoder = ConvDecoder(5, WIDTHS, image_shape, 2, jax.nn.relu, nnx.Rngs(1))
        feature_dims.append(encoder.feature_dim)
        return encoder(pixels), decoder(latents)

    # Traced, not run: building and running the modules abstractly gives every shape in no time.
    pixels = jax.ShapeDtypeStruct((2, side * side * channels), jnp.float32)
    latents = jax.ShapeDtypeStruct((3, 2, 5), jnp.float32)  # [k samples, batch, latent]
    features, outputs = jax.eval_shape(build_and_run, pixels, latents)

    assert feature_dims == [(side // 4) ** 2 * WIDTHS[-1]]
    assert features.shape == (2, feature_dims[0])
    assert outputs.shape == (3, 2, side * side * channels * 2)


@pytest.mark.parametrize(("side", "stages"), [(28, 1), (28, 2), (32, 4), (64, 5), (64, 1)])
def test_stage_counts_that_fit_give_no_error(side, stages):
    assert conv_stage_count_error(side, (16,) * stages) is None


def test_stage_count_errors_name_the_setting_the_side_and_what_would_work():
    not_divisible = conv_stage_count_error(28, (32, 64, 128))
    assert not_divisible == (
        "model.hidden [32, 64, 128] halves 28 pixels three times, but 28 is not divisible by 8; "
        "use at most 2 widths for 28-pixel images"
    )
    too_small = conv_stage_count_error(32, (8,) * 5)
    assert "1x1" in too_small and "use at most 4 widths for 32-pixel images" in too_small
    assert "model.hidden" in conv_stage_count_error(64, (8,) * 6)
    assert "model.arch: mlp" in conv_stage_count_error(27, (8,))
    assert "\n" not in not_divisible + too_small


def test_encoder_and_decoder_refuse_shapes_their_stages_cannot_handle():
    with pytest.raises(ValueError, match="not divisible by 8"):
        ConvEncoder((28, 28), (4, 8, 16), jax.nn.relu, nnx.Rngs(0))
    with pytest.raises(ValueError, match="not divisible by 8"):
        ConvDecoder(5, (4, 8, 16), (28, 28, 3), 1, jax.nn.relu, nnx.Rngs(0))
    with pytest.raises(ValueError, match="square"):
        ConvEncoder((28, 32), WIDTHS, jax.nn.relu, nnx.Rngs(0))


def test_depth_to_space_puts_each_channel_group_on_its_own_pixel():
    maps = jnp.arange(2 * 3 * 5 * 4 * 6, dtype=jnp.float32).reshape(2, 3, 5, 4 * 6)
    doubled = np.asarray(depth_to_space(maps))
    assert doubled.shape == (2, 6, 10, 6)
    groups = np.asarray(maps).reshape(2, 3, 5, 2, 2, 6)  # channel (a, b, c) of low-resolution pixel (i, j)
    for a in range(2):
        for b in range(2):
            np.testing.assert_array_equal(doubled[:, a::2, b::2, :], groups[:, :, :, a, b, :])


def test_decoder_output_is_value_major(model):
    channels, params_per_value = IMAGE_SHAPE[2], PARAMS_PER_VALUE
    decoder = nnx.clone(model.decoder)
    # Set the output layer by hand: the output for sub-pixel (a, b), channel c and parameter p is
    # factor[a, b, c, p] times the sum of the layer's inputs at its kernel's centre.
    factor = 1 + np.arange(2 * 2 * channels * params_per_value, dtype=np.float32).reshape(2, 2, channels, -1)
    kernel = np.zeros(decoder.to_values.kernel.shape, np.float32)
    kernel[1, 1, :, :] = factor.reshape(1, -1)
    decoder.to_values.kernel[...] = jnp.asarray(kernel)

    outputs = np.asarray(jax.jit(decoder)(random_normal(1, (2, LATENT_DIM))))
    # Value-major: [batch, (H, W, C, P)], with row 2i + a and column 2j + b of the image.
    side = IMAGE_SHAPE[0] // 2
    values = outputs.reshape(2, side, 2, side, 2, channels, params_per_value)
    centre_sums = values[:, :, 0, :, 0, 0, 0] / factor[0, 0, 0, 0]
    assert np.mean(centre_sums > 0) > 0.5  # the layer's inputs come through a ReLU: many, not all, positive
    expected = centre_sums[:, :, None, :, None, None, None] * factor[None, None, :, None, :, :, :]
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-6)


def test_decoder_treats_each_row_of_the_leading_dims_as_its_own_latent(model):
    @jax.jit
    def decode_three_ways(latents):
        return model.decoder(latents), model.decoder(latents[1]), model.decoder(latents.reshape(6, LATENT_DIM))

    latents = random_normal(2, (3, 2, LATENT_DIM))  # [k samples, batch, latent]
    outputs, second_sample, flat = decode_three_ways(latents)
    np.testing.assert_allclose(outputs[1], second_sample, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outputs.reshape(6, -1), flat, rtol=1e-5, atol=1e-6)


def test_the_gradient_of_a_loss_reaches_every_parameter(model):
    pixels = random_images(1, 8, IMAGE_SHAPE)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params):
        outputs = nnx.merge(graphdef, params)(pixels).reshape(8, -1, PARAMS_PER_VALUE)
        return jnp.mean((outputs - pixels[:, :, None]) ** 2)

    leaves = jax.tree_util.tree_leaves_with_path(jax.jit(jax.grad(loss))(params))
    # Encoder 16 (2 downsampling convolutions, 2 blocks of a norm and 2 convolutions), to_latent 2,
    # decoder 17 (first map 2, 2 blocks, 1 upsampling layer, the output layer's kernel).
    assert len(leaves) == 35
    dead = [jax.tree_util.keystr(path) for path, gradient in leaves if not np.any(np.asarray(gradient))]
    assert dead == []


def test_encoder_features_depend_on_the_image_and_on_nothing_else_in_the_batch(model):
    @jax.jit
    def encode_both(first_batch, second_batch):
        return model.encoder(first_batch), model.encoder(second_batch)

    images, other_images = random_images(2, 3, IMAGE_SHAPE), random_images(3, 3, IMAGE_SHAPE)
    batch_mates_changed = images.at[1:].set(other_images[1:])
    features, features_beside_others = map(np.asarray, encode_both(images, batch_mates_changed))

    assert np.max(np.abs(features[0] - features[1])) > 1e-3
    # Per-image normalisation: an image's features do not change with the rest of its batch.
    np.testing.assert_allclose(features_beside_others[0], features[0], rtol=1e-5, atol=1e-6)


def test_residual_blocks_start_near_the_identity(model):
    block = model.encoder.blocks[1]
    maps = random_normal(3, (4, 8, 8, WIDTHS[1]))
    change = float(jnp.linalg.norm(jax.jit(block)(maps) - maps) / jnp.linalg.norm(maps))
    assert 0 < change < 0.2
