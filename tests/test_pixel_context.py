"""model.pixel_context: a local autoregressive p(x|z) that is causal, normalised, and sampled as it is scored."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_one_line_error, tiny_config, vae

from vaecli.common.config import ModelConfig
from vaecli.common.errors import ConfigError
from vaecli.models.pixel_context import causal_mask, residuals_from_left
from vaecli.models.vae import build_model, set_output_bias


def context_model(image_shape, likelihood="logistic", size=3, mixtures=2, latent_dim=4):
    config = ModelConfig(
        arch="mlp", hidden=(16,), latent_dim=latent_dim, likelihood=likelihood, mixtures=mixtures, pixel_context=size
    )
    model = build_model(config, image_shape, seed=0)
    # Large output weights and a non-zero linear path, so the neighbours change the parameters visibly through
    # both paths (they start small and at zero on purpose).
    kernel = model.context.to_params.kernel
    kernel[...] = 20.0 * kernel[...]
    linear = model.context.linear.kernel
    linear[...] = 0.5 * jax.random.normal(jax.random.key(3), linear.shape)
    return model


def latents_for(model, count, seed=1):
    return jax.random.normal(jax.random.key(seed), (count, model.latent_dim))


def test_the_window_holds_exactly_the_pixels_before_its_centre():
    mask = causal_mask(3)[..., 0, 0]
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert causal_mask(5)[..., 0, 0].sum() == 12  # two full rows and two to the left


def test_each_pixels_parameters_depend_on_earlier_pixels_only():
    model = context_model((5, 5, 3), size=5)
    latents = latents_for(model, 1)
    images = jax.random.randint(jax.random.key(2), (1, 75), 0, 256) / 255.0
    params = model.decode(latents, images).reshape(25, -1)
    position = 12  # the centre pixel, (2, 2)
    changed = images.reshape(25, 3).at[position:].set(1.0 - images.reshape(25, 3)[position:]).reshape(1, 75)
    changed_params = model.decode(latents, changed).reshape(25, -1)
    np.testing.assert_array_equal(changed_params[: position + 1], params[: position + 1])
    # Positive control: the pixel right after the changed one sees it.
    assert np.abs(changed_params[position + 1] - params[position + 1]).max() > 1e-3


@pytest.mark.parametrize(
    ("likelihood", "image_shape", "levels"),
    [("bernoulli", (2, 2), 2), ("logistic", (1, 2), 256)],
)
def test_p_x_given_z_sums_to_one_over_every_image(likelihood, image_shape, levels):
    """A proper autoregressive likelihood: summed over all images (every level of every value), p(x|z) = 1."""
    model = context_model(image_shape, likelihood=likelihood)
    values = int(np.prod(image_shape))
    every_image = np.array(list(itertools.product(range(levels), repeat=values)), np.float32) / (levels - 1)
    latents = jnp.broadcast_to(latents_for(model, 1), (len(every_image), model.latent_dim))
    log_probs = model.likelihood.log_prob(model.decode(latents, every_image), every_image)
    total = float(jnp.exp(jax.scipy.special.logsumexp(log_probs)))
    assert total == pytest.approx(1.0, abs=1e-4)
    # Positive control: the context does shape the distribution (not a product of fixed marginals).
    assert float(jnp.std(log_probs)) > 0.1


@pytest.mark.parametrize(("likelihood", "image_shape"), [("logistic", (4, 4, 3)), ("bernoulli", (6, 6))])
def test_a_draw_is_made_pixel_by_pixel_from_the_parameters_the_full_pass_gives(likelihood, image_shape):
    """Sampling and scoring agree: each drawn value is what the likelihood draws, with that pixel's key, from the
    parameters the teacher-forced pass computes on the finished image. An off-by-one window or a stale
    pixel in the sampler would break it."""
    model = context_model(image_shape, likelihood=likelihood)
    count, values = 3, int(np.prod(image_shape))
    channels = image_shape[2] if len(image_shape) == 3 else 1
    latents = latents_for(model, count)
    row_keys = jax.vmap(lambda index: jax.random.fold_in(jax.random.key(7), index))(jnp.arange(count))
    draw = jax.jit(lambda m, z, k: m.decode_images(z, k))
    drawn = draw(model, latents, row_keys)
    params = model.decode(latents, drawn).reshape(count, values // channels, -1)
    # Pixel p of row n, redrawn from the full pass's parameters with fold_in(row key n, p): all at once.
    positions = jnp.arange(values // channels)
    pixel_keys = jax.vmap(lambda key: jax.vmap(lambda position: jax.random.fold_in(key, position))(positions))(row_keys)
    redrawn = jax.vmap(jax.vmap(model.likelihood.sample))(pixel_keys, params)
    np.testing.assert_array_equal(redrawn, drawn.reshape(count, -1, channels))
    # Different keys, different pictures; the same keys, the same pictures.
    other = draw(model, latents, jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(8), jnp.arange(3)))
    assert not np.array_equal(other, drawn)
    np.testing.assert_array_equal(draw(model, latents, row_keys), drawn)


def test_decoding_without_the_image_is_refused():
    model = context_model((2, 2))
    with pytest.raises(ValueError, match="decode\\(latents, targets\\)"):
        model.decode(latents_for(model, 1))


@pytest.mark.parametrize("size", [1, 2, 4, 17])
def test_a_window_must_be_odd_and_at_least_three(size):
    with pytest.raises(ConfigError, match=r"model\.pixel_context"):
        tiny_config(model={"pixel_context": size})


def test_the_cli_names_a_bad_window_in_one_line(tmp_path):
    result = vae("train", "--config", "mnist-sample", "--set", "model.pixel_context=4", "--out", str(tmp_path / "run"))
    assert_one_line_error(result, 2, "model.pixel_context")


def smooth_pictures(count, side=8, seed=0):
    """uint8 [count, side, side]: random linear ramps, the kind of area a neighbour predicts and a marginal cannot."""
    rng = np.random.default_rng(seed)
    rows, columns = np.indices((side, side))
    start = rng.uniform(40, 215, (count, 1, 1))
    slopes = rng.uniform(-4, 4, (count, 2, 1, 1))
    return np.rint(start + slopes[:, 0] * rows + slopes[:, 1] * columns).astype(np.uint8)


def test_residuals_from_the_left_neighbour_are_shifted_to_mid_grey_and_clipped():
    images = np.array([[[10, 12, 200, 0]]], np.uint8)
    np.testing.assert_array_equal(residuals_from_left(images), [[[10, 130, 255, 0]]])


def test_a_logistic_context_model_starts_from_pngs_sub_filter():
    """At initialisation each mean is the left neighbour and the bias codes the residuals: smooth pictures cost
    less than under the plain model's marginal, before a single step."""
    pictures = smooth_pictures(64)
    targets = jnp.asarray(pictures.reshape(64, -1) / 255.0, jnp.float32)

    def initial_nats(pixel_context):
        model = build_model(
            ModelConfig(arch="mlp", hidden=(16,), latent_dim=4, likelihood="logistic", pixel_context=pixel_context),
            (8, 8),
            seed=0,
        )
        set_output_bias(model, pictures)
        latents = jnp.zeros((64, 4))
        return float(-jnp.mean(model.likelihood.log_prob(model.decode(latents, targets), targets)))

    assert initial_nats(3) < 0.8 * initial_nats(0)  # measured: 250 against 347 nats
