"""A trained model as a model file: its weights and its functions serialized by jax.export, run with JAX alone.

A model file (`vae export`'s MODEL.vae, and the cache RUN/inference/<step>.vae that generate, reconstruct,
evaluate and the latent views read) is a zip archive, stored uncompressed:
- model.json: the format and its version, the run's config, image shape, dataset, preprocessing, step, epoch,
  the JAX version that wrote it, and (in the cache) the identity of the checkpoint it came from;
- weights.npz: the weights the functions take, named by their path in the model ("decoder/layers/0/kernel");
- one <name>.stablehlo per function in FUNCTION_NAMES, each `jax.export.Exported.serialize()` of a function
  of (weights, arrays...) whose batch dimension is symbolic.

The functions are the Flax model's own methods traced once (vaecli.inference.export), so no layer is written
twice; running them needs `jax` and `numpy` only: this module imports neither Flax nor Orbax.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vaecli.common.config import Config, ModelConfig, config_from_dict
from vaecli.common.errors import CheckpointError
from vaecli.models.likelihoods import Likelihood, make_likelihood

MODEL_FORMAT = "vaecli-model"
# Raised whenever what the archive holds changes; a reader refuses a newer version (and the cache rewrites
# an older one).
MODEL_FORMAT_VERSION = 1
RECORD_NAME = "model.json"
WEIGHTS_NAME = "weights.npz"
# encode(w, pixels[b, D]) -> (mean, log_variance) [b, L]; decode(w, latents[s, b, L], targets[b, D]) ->
# parameters [s, b, D*P]; decode_images(w, latents[b, L], key_data[b, 2]) -> pictures [b, D];
# generate(w, seed, indices[b], temperature) -> pictures [b, D]; reconstruct(w, images_uint8[b, ...], binarized,
# seed, input_indices[b], sample_numbers[b], output_indices[b], use_mean) -> (views, pictures) [b, D].
FUNCTION_NAMES = ("encode", "decode", "decode_images", "generate", "reconstruct")


class ModelFileError(CheckpointError):
    """A model file that cannot be used: not one, damaged, of a newer format, or unreadable by this JAX."""


class UnreadableFunctionsError(ModelFileError):
    """A model file whose functions another JAX exported and this one cannot deserialize."""


@dataclass(frozen=True, eq=False)
class ExportedFunctions:
    """The deserialized functions of one model file. Compared and hashed by identity: a jitted function that
    takes an ExportedModel keys its compilation on these (they are the pytree's static part)."""

    encode: jax.export.Exported
    decode: jax.export.Exported
    decode_images: jax.export.Exported
    generate: jax.export.Exported
    reconstruct: jax.export.Exported


@partial(jax.tree_util.register_dataclass, data_fields=["weights"], meta_fields=["functions", "config", "image_shape"])
@dataclass(frozen=True, eq=False)
class ExportedModel:
    """A trained model as arrays and exported functions, with the methods of vaecli.models.vae.VAE that using
    a model needs. A JAX pytree (the weights are its leaves), so a jitted function takes it as an argument."""

    weights: dict[str, jax.Array]
    functions: ExportedFunctions
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

    def encode(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[batch, values] in [0, 1] -> (posterior_mean, posterior_log_variance), each [batch, latent]."""
        return tuple(self.functions.encode.call(self.weights, pixels))

    def decode(self, latents: jax.Array, targets: jax.Array | None = None) -> jax.Array:
        """[..., batch, latent] -> the likelihood's parameters [..., batch, values * params_per_value]; `targets`
        [batch, values], the images scored, is needed by a model with model.pixel_context (as VAE.decode)."""
        *leading, batch, latent_dim = latents.shape
        if targets is None:
            if self.config.pixel_context:
                raise ValueError(
                    "this model's p(x|z) depends on the image (model.pixel_context): decode(latents, targets)"
                )
            targets = jnp.zeros((batch, self.num_values), jnp.float32)  # not read: the function ignores it
        params = self.functions.decode.call(self.weights, latents.reshape(-1, batch, latent_dim), targets)
        return params.reshape(*leading, batch, -1)

    def decode_images(self, latents: jax.Array, row_keys: jax.Array) -> jax.Array:
        """Latents [N, latent] -> pictures [N, values] in [0, 1], as VAE.decode_images (row_keys: keys [N])."""
        return self.functions.decode_images.call(self.weights, latents, jax.random.key_data(row_keys))

    def prior_images(self, seed: jax.Array, indices: jax.Array, temperature: jax.Array) -> jax.Array:
        """Rows `indices` of --seed's prior draws decoded: vaecli.models.sampling.prior_images, exported."""
        return self.functions.generate.call(self.weights, seed, indices, temperature)

    def posterior_images(self, images_uint8, binarized, seed, input_indices, sample_numbers, output_indices, use_mean):
        """Draws of q(z|x) decoded, row by row: vaecli.models.sampling.posterior_images, exported."""
        return tuple(
            self.functions.reconstruct.call(
                self.weights, images_uint8, binarized, seed, input_indices, sample_numbers, output_indices, use_mean
            )
        )


@dataclass(frozen=True)
class ModelFile:
    """What a model file holds: its record (model.json) and the model, ready to run."""

    record: dict[str, Any]
    config: Config
    model: ExportedModel

    @property
    def image_shape(self) -> tuple[int, ...]:
        return self.model.image_shape


def read_model_file(source: Path | bytes, name: str | None = None) -> ModelFile:
    """The model file at `source` (a path, or its bytes, called `name` in messages), checked and deserialized.

    Raises ModelFileError with one line naming the file and what is wrong with it.
    """
    name = name or str(source)
    try:
        archive = zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source)
    except FileNotFoundError as error:
        raise ModelFileError(f"{name}: no such file; give the path of a file `vae export` wrote") from error
    except (OSError, zipfile.BadZipFile) as error:
        raise ModelFileError(
            f"{name} is not a vaecli model file (not a zip archive); make one with `vae export`"
        ) from error
    with archive:
        record = _read_record(archive, name)
        try:
            with np.load(io.BytesIO(archive.read(WEIGHTS_NAME)), allow_pickle=False) as arrays:
                weights = {key: arrays[key] for key in arrays.files}
            serialized = {function: archive.read(f"{function}.stablehlo") for function in FUNCTION_NAMES}
        except (KeyError, OSError, ValueError, zipfile.BadZipFile) as error:
            raise ModelFileError(f"{name} is damaged ({error}); export the model again with `vae export`") from error
    functions = deserialize_functions(serialized, name, record.get("jax_version", "unknown"))
    check_platform(functions, name)
    check_weights_fit(functions, weights, name)
    try:
        config = config_from_dict(record["config"], source=f"{name} model.json")
        image_shape = tuple(int(side) for side in record["image_shape"])
    except (KeyError, TypeError, ValueError) as error:
        raise ModelFileError(f"{name}: model.json lacks a usable config or image shape ({error})") from error
    # device_put copies; jnp.asarray would compile (or read from the cache) a program per array shape.
    model = ExportedModel(jax.device_put(weights), functions, config.model, image_shape)
    return ModelFile(record, config, model)


def _read_record(archive: zipfile.ZipFile, name: str) -> dict[str, Any]:
    """model.json of `archive`, refusing another format or a newer version."""
    try:
        record = json.loads(archive.read(RECORD_NAME).decode("utf-8"))
    except KeyError as error:
        raise ModelFileError(
            f"{name} is not a vaecli model file (no {RECORD_NAME}); make one with `vae export`"
        ) from error
    except (OSError, UnicodeDecodeError, ValueError, zipfile.BadZipFile) as error:
        raise ModelFileError(f"{name} is damaged ({RECORD_NAME} unreadable); export the model again") from error
    if not isinstance(record, dict) or record.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{name} is not a vaecli model file ({RECORD_NAME} names another format)")
    version = record.get("format_version")
    if not isinstance(version, int) or version > MODEL_FORMAT_VERSION:
        raise ModelFileError(
            f"{name} is of model format version {version}, newer than this vaecli reads ({MODEL_FORMAT_VERSION}); "
            "upgrade vaecli"
        )
    return record


def check_platform(functions: ExportedFunctions, name: str) -> None:
    """Refuse functions that were not lowered for this machine's backend (JAX could not run them here)."""
    backend = jax.default_backend()
    for function in FUNCTION_NAMES:
        platforms = getattr(functions, function).platforms
        if backend not in platforms:
            raise UnreadableFunctionsError(
                f"{name}: its functions were exported for {', '.join(platforms)}, not for this machine's {backend}; "
                "export the model again here"
            )


def check_weights_fit(functions: ExportedFunctions, weights: Mapping[str, np.ndarray], name: str) -> None:
    """Refuse weights whose names, shapes or dtypes are not those every function was exported for."""
    for function in FUNCTION_NAMES:
        exported = getattr(functions, function)
        (expected, *_), _ = jax.tree.unflatten(exported.in_tree, exported.in_avals)
        fits = expected.keys() == weights.keys() and all(
            tuple(expected[key].shape) == weights[key].shape and expected[key].dtype == weights[key].dtype
            for key in expected
        )
        if not fits:
            raise ModelFileError(f"{name} is damaged (its weights do not fit its {function} function); export again")


def deserialize_functions(serialized: Mapping[str, bytes], name: str, written_by: str) -> ExportedFunctions:
    """The functions of a model file; a JAX that cannot read them raises ModelFileError saying which wrote them."""
    try:
        return ExportedFunctions(
            **{function: jax.export.deserialize(serialized[function]) for function in FUNCTION_NAMES}
        )
    except Exception as error:  # the deserializer's errors are of many types (flatbuffers, version checks)
        raise UnreadableFunctionsError(
            f"{name}: its functions were exported by JAX {written_by} and JAX {jax.__version__} cannot read them "
            f"({type(error).__name__}); export the model again with this JAX"
        ) from error
