"""Writing what generate and reconstruct produce for a run: PNG grids and figures, or .npz arrays.

The draws themselves (z ~ p(z), z ~ q(z|x), keyed by index) are vaecli.models.sampling's.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vaecli.common.images import (
    load_input_for_model,
    make_grid,
    reconstruction_figure,
    save_npz,
    save_npz_streamed,
    save_png,
)
from vaecli.data.datasets import load_dataset
from vaecli.models.sampling import encoder_sees_binary, generate, generate_batches, inference_placement, reconstruct

if TYPE_CHECKING:
    from vaecli.common.devices import Placement
    from vaecli.inference.exported import ExportedModel
    from vaecli.inference.open_run import InferenceRun
    from vaecli.models.vae import VAE

RECONSTRUCT_DEFAULT_COUNT = 16


def save_prior_samples(
    out: Path,
    model: VAE | ExportedModel,
    n: int,
    seed: int,
    temperature: float,
    placement: Placement | None = None,
) -> Path:
    """generate() and write a grid PNG, or an .npz holding `samples` [n, H, W] float32.

    The .npz is written a batch at a time, so any --n fits in memory.
    """
    if out.suffix.lower() == ".npz":
        batches = generate_batches(model, n, seed, temperature, placement)
        return save_npz_streamed(out, "samples", (n, *model.image_shape), np.float32, batches)
    return save_png(out, make_grid(generate(model, n, seed, temperature, placement)))


def model_inputs(run: InferenceRun, input_paths: list[Path]) -> tuple[np.ndarray, str]:
    """The images to reconstruct as the model sees them (uint8), and a phrase saying where they came from."""
    if input_paths:
        images = np.stack([load_input_for_model(path, run.image_shape, run.preprocessing) for path in input_paths])
        return images, f"{len(input_paths)} input image{'s' if len(input_paths) > 1 else ''}"
    test_images = load_dataset(run.config.data).split("test")[:RECONSTRUCT_DEFAULT_COUNT]
    return np.asarray(test_images), f"the first {len(test_images)} {run.dataset_name} test images"


def save_reconstructions(
    out: Path, run: InferenceRun, input_paths: list[Path], num_samples: int, seed: int, use_mean: bool
) -> str:
    """reconstruct() the inputs (or test images) and write the figure PNG or an .npz; returns the source phrase."""
    images_uint8, source = model_inputs(run, input_paths)
    binarized = encoder_sees_binary(run.config)
    placement = inference_placement(run.config)
    inputs, reconstructions = reconstruct(run.model, images_uint8, binarized, num_samples, seed, use_mean, placement)
    if out.suffix.lower() == ".npz":
        save_npz(out, inputs=inputs, reconstructions=reconstructions)
    else:
        save_png(out, reconstruction_figure(inputs, reconstructions))
    return source
