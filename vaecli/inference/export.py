"""Writing a model file (vaecli.inference.exported): the Flax model's methods traced once by jax.export.

Each function takes the weights as its first argument (a dict named by path, as vaecli.models.vae.inference_weights
gives them) and rebuilds the Flax model from them inside the trace, so what is serialized is exactly what the
model computes, for every architecture, likelihood and model.dtype, with the batch dimension symbolic.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vaecli.inference.exported import (
    FUNCTION_NAMES,
    MODEL_FORMAT,
    MODEL_FORMAT_VERSION,
    RECORD_NAME,
    WEIGHTS_NAME,
)
from vaecli.models.sampling import encoder_sees_binary
from vaecli.models.vae import VAE, inference_weights

if TYPE_CHECKING:
    from vaecli.training.checkpoint import LoadedRun


def _weights_rebuild(model: VAE) -> tuple[dict[str, np.ndarray], Callable[[dict[str, jax.Array]], VAE]]:
    """(the model's weights by path, a function that rebuilds the model from such a dict inside a trace)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    paths = {"/".join(map(str, path)): path for path, _ in nnx.to_flat_state(params)}

    def rebuild(weights: dict[str, jax.Array]) -> VAE:
        state = nnx.from_flat_state([(paths[name], nnx.Param(value)) for name, value in weights.items()])
        return nnx.merge(graphdef, state, rest)

    return inference_weights(model), rebuild


def this_platform() -> tuple[str, ...]:
    """What a run's own model file (its cache) is lowered for: this machine's backend alone. Lowering for another
    too makes every warm `vae generate` 4% slower (0.886 s against 0.852 s, median of 6 alternating runs); a
    file of another backend is written anew when used here."""
    return (jax.default_backend(),)


def portable_platforms() -> tuple[str, ...]:
    """What `vae export`'s file is lowered for: the CPU and NVIDIA GPUs, and this machine's backend if another,
    so that a file exported on a laptop runs on a GPU and one exported on a GPU runs on a laptop."""
    return tuple(dict.fromkeys(("cpu", "cuda", jax.default_backend())))


def exported_functions(model: VAE, platforms: tuple[str, ...]) -> tuple[dict[str, np.ndarray], dict[str, bytes]]:
    """(the weights by path, each of FUNCTION_NAMES serialized) for `model`, lowered for `platforms`."""
    weights, rebuild = _weights_rebuild(model)
    weight_specs = {name: jax.ShapeDtypeStruct(array.shape, array.dtype) for name, array in weights.items()}
    values, latent_dim = model.num_values, model.latent_dim
    key_shape = jax.random.key_data(jax.random.key(0)).shape
    (batch,) = jax.export.symbolic_shape("b")
    samples, batch_of_samples = jax.export.symbolic_shape("s, b")

    def spec(shape, dtype) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype)

    def decode(weights, latents, targets):
        rebuilt = rebuild(weights)
        return rebuilt.decode(latents, targets if rebuilt.context is not None else None)

    traced: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {
        "encode": (lambda weights, pixels: rebuild(weights).encode(pixels), (spec((batch, values), jnp.float32),)),
        "decode": (
            decode,
            (spec((samples, batch_of_samples, latent_dim), jnp.float32), spec((batch_of_samples, values), jnp.float32)),
        ),
        "decode_images": (
            lambda weights, latents, key_data: rebuild(weights).decode_images(
                latents, jax.random.wrap_key_data(key_data)
            ),
            (spec((batch, latent_dim), jnp.float32), spec((batch, *key_shape), jnp.uint32)),
        ),
        "generate": (
            lambda weights, seed, indices, temperature: rebuild(weights).prior_images(seed, indices, temperature),
            (spec((), jnp.uint32), spec((batch,), jnp.int32), spec((), jnp.float32)),
        ),
        "reconstruct": (
            lambda weights, *arrays: rebuild(weights).posterior_images(*arrays),
            (
                spec((batch, *model.image_shape), jnp.uint8),
                spec((), jnp.bool_),
                spec((), jnp.uint32),
                *(spec((batch,), jnp.int32),) * 3,
                spec((), jnp.bool_),
            ),
        ),
    }
    assert tuple(traced) == FUNCTION_NAMES
    serialized = {
        name: jax.export.export(jax.jit(function), platforms=platforms)(weight_specs, *arg_specs).serialize()
        for name, (function, arg_specs) in traced.items()
    }
    return weights, serialized


def model_file_bytes(run: LoadedRun, platforms: tuple[str, ...], **extra_record: Any) -> bytes:
    """The model file of a restored run: model.json (with `extra_record`), weights.npz and the functions."""
    weights, serialized = exported_functions(run.model, platforms)
    weights_buffer = io.BytesIO()
    np.savez(weights_buffer, **weights)
    record = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "jax_version": jax.__version__,
        "step": run.step,
        "epoch": run.epoch,
        "weights": "ema_params" if run.config.train.ema is not None else "params",
        "image_shape": list(run.image_shape),
        "dataset": run.dataset_name,
        "preprocessing": run.preprocessing,
        "binarized": encoder_sees_binary(run.config),
        "config": run.config.to_dict(),
        **extra_record,
    }
    archive_buffer = io.BytesIO()
    with zipfile.ZipFile(archive_buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(RECORD_NAME, json.dumps(record, indent=1) + "\n")
        archive.writestr(WEIGHTS_NAME, weights_buffer.getvalue())
        for name, blob in serialized.items():
            archive.writestr(f"{name}.stablehlo", blob)
    return archive_buffer.getvalue()
