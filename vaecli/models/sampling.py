"""Using a trained VAE both ways: decode z ~ p(z) = N(0, T^2 I) (generate), or z ~ q(z|x) (reconstruct).

Each sample's noise comes from fold_in(sampling_key(seed), its index), so image i is the same
whatever --n or batch size is used, and the same seed gives the same bytes. A decoded image is the
mean of p(x|z) (each pixel's probability, or the logistic mixture's expected level), not a draw.

A model here is a Flax VAE (vaecli.models.vae: training's epoch pictures) or a model file's ExportedModel
(vaecli.inference.exported: the commands): both are pytrees with the same methods, which the compiled functions
take as an argument, and both give the same numbers. prior_images and posterior_images are what each model's
methods of those names run (the exported ones traced from them). Nothing here imports Flax.

On several devices (inference_placement) each batch is split over them and the weights replicated; since every
draw is keyed by an index, the images are those of one device to float rounding. One device is left exactly as
it was: no mesh, no sharding annotation (see vaecli.common.devices.Placement.jit_options), not even that module's
import.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from vaecli.common.config import Config
from vaecli.common.errors import UsageError
from vaecli.models.layers import bernoulli_draw, intensities, latents_from_noise

if TYPE_CHECKING:
    from vaecli.common.devices import Placement

# Images decoded per compiled call: bounds device memory for any --n.
DECODE_BATCH_SIZE = 1024
# fold_in purpose of sampling's noise. Without it key(seed) would be the very key that initialised
# the weights (nnx.Rngs(params=seed)): the first prior draw of seed 0 then followed the encoder's
# first initial weights (correlation 0.997 measured).
SAMPLING_STREAM = 5
# ... and of the Bernoulli draw that turns a grey input into what a binarized model was trained on.
INPUT_DRAW_STREAM = 6
# ... and of the pixel-by-pixel draws of an autoregressive decoder (model.pixel_context).
PIXEL_DRAW_STREAM = 10


def sampling_key(seed: int | jax.Array, stream: int = SAMPLING_STREAM) -> jax.Array:
    """The root of --seed's draws, apart from every other use of the same number."""
    return jax.random.fold_in(jax.random.key(seed), stream)


def pixel_keys(seed_key: jax.Array, indices: jax.Array) -> jax.Array:
    """The key of each output image's pixel draws (autoregressive models), from its index: [N] -> keys [N]."""
    pixel_key = jax.random.fold_in(seed_key, PIXEL_DRAW_STREAM)
    return jax.vmap(lambda index: jax.random.fold_in(pixel_key, index))(indices)


def seed_operand(seed: int) -> np.uint32:
    """--seed as an argument of a compiled function, which makes its key itself: the same key as
    sampling_key(seed) outside, while two small programs made outside would each cost every command a
    compilation or a cache read."""
    if not 0 <= seed < 2**32:
        raise UsageError(f"--seed must be between 0 and {2**32 - 1}, got {seed}")
    return np.uint32(seed)


def inference_placement(config: Config) -> Placement | None:
    """The devices generate, reconstruct and evaluate split their batches over: the run's train.devices (null:
    all of this process's), or as many as are here when fewer are; None for one device, which runs as before."""
    available = jax.local_device_count()
    count = min(config.train.devices or available, available)
    if count == 1:
        return None  # vaecli.common.devices' import and a mesh are work that one device does not need
    from vaecli.common.devices import placement_over

    return placement_over(count)


def device_count(placement: Placement | None) -> int:
    """How many devices `placement` spans (None: one)."""
    return 1 if placement is None else placement.count


def rows_for_devices(rows: int, placement: Placement | None) -> int:
    """`rows` rounded up to a multiple of the device count, so that every batch splits evenly: the extra rows
    are padding, computed and dropped (rather than the whole batch run on every device). Each row's draws
    depend on its index alone, so padding changes none of the real rows."""
    return -(-rows // device_count(placement)) * device_count(placement)


def split_rows(batch: jax.Array, placement: Placement | None) -> jax.Array:
    """Inside a compiled function: `batch` split by its first axis over the devices (None: left alone)."""
    return batch if placement is None else placement.shard_batch(batch)


def encoder_sees_binary(config: Config) -> bool:
    """Whether the encoder was trained on binary pixels (data.binarize dynamic or static)."""
    return config.data.binarize != "none"


def _per_index_normal(seed_key: jax.Array, indices: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """One standard-normal draw of `shape` per index, from fold_in(seed_key, index)."""
    return jax.vmap(lambda index: jax.random.normal(jax.random.fold_in(seed_key, index), shape))(indices)


def prior_images(model, seed: jax.Array, indices: jax.Array, temperature: jax.Array) -> jax.Array:
    """Rows `indices` [B] of --seed's prior draws decoded, [B, values]: z_i = temperature * eps_i, eps_i from
    fold_in(sampling_key(seed), i). Pure, for any model with decode_images: what each model's prior_images runs."""
    seed_key = sampling_key(seed)
    latents = temperature * _per_index_normal(seed_key, indices, (model.latent_dim,))
    return model.decode_images(latents, pixel_keys(seed_key, indices))


@partial(jax.jit, static_argnames=("batch_size", "placement"))
def _decode_prior_batch(model, seed, first_index, temperature, batch_size, placement=None):
    indices = split_rows(first_index + jnp.arange(batch_size, dtype=jnp.int32), placement)
    return split_rows(model.prior_images(seed, indices, jnp.float32(temperature)), placement)


def check_temperature(temperature: float) -> None:
    """Refuse a --temperature that is not a positive, finite number."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise UsageError(f"--temperature must be a positive number, got {temperature}")


def decoded_batches(
    image_shape: tuple[int, ...], n: int, placement: Placement | None, decode_batch: Callable[[int, int], jax.Array]
) -> Iterator[np.ndarray]:
    """n images a batch at a time, float32 [<= batch, *image_shape]: decode_batch(first_index, batch_size) decodes
    rows first_index ... of a batch of DECODE_BATCH_SIZE (or n) rows, padded to split evenly over `placement`."""
    batch_size = rows_for_devices(min(n, DECODE_BATCH_SIZE), placement)
    for first in range(0, n, batch_size):
        means = decode_batch(first, batch_size)
        count = min(batch_size, n - first)
        # Sliced on the host: slicing the device array would run (and compile) one more program.
        yield np.asarray(means)[:count].reshape(count, *image_shape)


def generate_batches(
    model, n: int, seed: int = 0, temperature: float = 1.0, placement: Placement | None = None
) -> Iterator[np.ndarray]:
    """generate() a batch at a time (float32 [<= DECODE_BATCH_SIZE, *image_shape]), for bounded memory.

    `placement`: the devices each batch of codes is split over (None: one device)."""
    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}")
    check_temperature(temperature)
    if placement is not None:
        model = placement.replicate(model)

    def decode_batch(first: int, batch_size: int) -> jax.Array:
        return _decode_prior_batch(model, seed_operand(seed), first, temperature, batch_size, placement)

    yield from decoded_batches(model.image_shape, n, placement, decode_batch)


def generate(model, n: int, seed: int = 0, temperature: float = 1.0, placement: Placement | None = None) -> np.ndarray:
    """n images decoded from z ~ N(0, temperature^2 I): means of p(x|z), float32 [n, *image_shape] in [0, 1]."""
    return np.concatenate(list(generate_batches(model, n, seed, temperature, placement)))


def model_views(images_uint8: jax.Array, binarized: bool | jax.Array, seed_key: jax.Array, indices) -> jax.Array:
    """What the encoder is given for each image, float32 [batch, values] in [0, 1].

    A model trained on binary pixels gets one Bernoulli draw of the image (from its index in `indices`), as in
    training: q(z|x) was never fitted to grey levels. Otherwise the grey levels themselves. `binarized` may be
    traced (an exported function takes it as an argument), so both are computed and one is chosen.
    """
    if isinstance(binarized, bool) and not binarized:
        return intensities(images_uint8)
    flat_images = images_uint8.reshape(images_uint8.shape[0], -1)
    draw_key = jax.random.fold_in(seed_key, INPUT_DRAW_STREAM)
    draws = jax.vmap(lambda index, image: bernoulli_draw(jax.random.fold_in(draw_key, index), image))(
        indices, flat_images
    ).astype(jnp.float32)
    return draws if isinstance(binarized, bool) else jnp.where(binarized, draws, intensities(images_uint8))


def posterior_images(
    model,
    images_uint8: jax.Array,
    binarized: jax.Array,
    seed: jax.Array,
    input_indices: jax.Array,
    sample_numbers: jax.Array,
    output_indices: jax.Array,
    use_mean: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Row r: draw sample_numbers[r] of z ~ q(z|x) for input input_indices[r] (images_uint8[r]), decoded.

    Returns (what the encoder saw, [B, values]; the decoded images, [B, values]). eps of draw k of input i comes
    from fold_in(fold_in(sampling_key(seed), i), k), and an autoregressive model's pixel draws from
    output_indices[r] (i * K + k): the same whatever the batching. `use_mean`: decode the posterior mean instead.
    Pure, for any model with encode and decode_images: what each model's posterior_images runs.
    """
    seed_key = sampling_key(seed)
    views = model_views(images_uint8, binarized, seed_key, input_indices)
    posterior_mean, posterior_log_variance = model.encode(views)
    noise = jax.vmap(
        lambda index, number: jax.random.normal(
            jax.random.fold_in(jax.random.fold_in(seed_key, index), number), (model.latent_dim,)
        )
    )(input_indices, sample_numbers)
    drawn = latents_from_noise(posterior_mean, posterior_log_variance, noise)
    latents = jnp.where(use_mean, posterior_mean, drawn)
    return views, model.decode_images(latents, pixel_keys(seed_key, output_indices))


@partial(jax.jit, static_argnames=("num_samples", "placement"))
def _reconstruct_batch(model, images_uint8, binarized, seed, first_index, num_samples, use_mean, placement=None):
    """(what the encoder saw, [batch, values]; the decoded means, [batch * num_samples, values])."""
    count = images_uint8.shape[0]
    input_indices = first_index + jnp.arange(count, dtype=jnp.int32)
    rows = jnp.repeat(images_uint8, num_samples, axis=0)
    row_inputs = jnp.repeat(input_indices, num_samples)
    sample_numbers = jnp.tile(jnp.arange(num_samples, dtype=jnp.int32), count)
    output_indices = row_inputs * num_samples + sample_numbers
    rows, row_inputs, sample_numbers, output_indices = (
        split_rows(array, placement) for array in (rows, row_inputs, sample_numbers, output_indices)
    )
    views, means = model.posterior_images(
        rows, jnp.bool_(binarized), seed, row_inputs, sample_numbers, output_indices, jnp.bool_(use_mean)
    )
    return split_rows(views[::num_samples], placement), split_rows(means, placement)


def reconstruct(
    model,
    images_uint8: np.ndarray,
    binarized: bool,
    num_samples: int = 1,
    seed: int = 0,
    use_mean: bool = False,
    placement: Placement | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode K draws z ~ q(z|x) per image (or the posterior mean K times).

    Returns (what the encoder saw, float32 [N, *image_shape]; the decoded means, float32 [N, K, *image_shape]).
    `binarized`: the model was trained on binary pixels, so it sees a Bernoulli draw of each image.
    `placement`: the devices each batch of images is split over (None: one device).
    """
    if num_samples < 1:
        raise UsageError(f"--samples must be at least 1, got {num_samples}")
    if tuple(images_uint8.shape[1:]) != model.image_shape:
        raise UsageError(f"images of shape {images_uint8.shape[1:]} given to a model of {model.image_shape}")
    count = len(images_uint8)
    batch_size = rows_for_devices(min(count, max(1, DECODE_BATCH_SIZE // num_samples)), placement)
    padded = np.concatenate([images_uint8, np.zeros((-count % batch_size, *model.image_shape), np.uint8)])
    if placement is not None:
        model = placement.replicate(model)
    views, means = [], []
    for first in range(0, count, batch_size):
        batch = padded[first : first + batch_size]
        batch_views, batch_means = _reconstruct_batch(
            model, batch, binarized, seed_operand(seed), first, num_samples, use_mean, placement
        )
        views.append(np.asarray(batch_views))
        means.append(np.asarray(batch_means))
    seen = np.concatenate(views).reshape(-1, *model.image_shape)[:count]
    return seen, np.concatenate(means).reshape(-1, num_samples, *model.image_shape)[:count]
