"""Every architecture with every likelihood: training steps, generate, reconstruct and evaluate work."""

import dataclasses

import numpy as np
import pytest
from flax import nnx
from helpers import tiny_config, tiny_dataset

from vaecli.data.coloured_digits import coloured_digits
from vaecli.inference.evaluate import evaluate_images
from vaecli.models.sampling import generate, reconstruct
from vaecli.training.checkpoint import LoadedRun
from vaecli.training.loop import train


def colour_dataset(dataset):
    """The tiny digits dataset with 32x32 colour pictures in place of its images."""
    pictures, _ = coloured_digits(len(dataset.train_images) + 2 * len(dataset.val_images), seed=0)
    train_count, val_count = len(dataset.train_images), len(dataset.val_images)
    return dataclasses.replace(
        dataset,
        train_images=pictures[:train_count],
        val_images=pictures[train_count : train_count + val_count],
        test_images=pictures[train_count + val_count :],
        test_labels=dataset.val_labels,
    )


@pytest.mark.parametrize(
    ("arch", "likelihood", "colour", "pixel_context"),
    # conv + logistic: tests/test_folder_cli.py; a local autoregressive decoder here with the logistic (with a
    # Bernoulli in tests/test_pixel_context.py).
    [
        ("conv", "bernoulli", False, 0),
        ("mlp", "logistic", True, 0),
        ("mlp", "logistic", True, 3),
    ],
)
def test_each_architecture_with_each_likelihood_trains_samples_and_evaluates(arch, likelihood, colour, pixel_context):
    binarize = "dynamic" if likelihood == "bernoulli" else "none"
    config = tiny_config(
        model={
            "arch": arch,
            "hidden": [8, 16] if arch == "conv" else [32],
            "likelihood": likelihood,
            "mixtures": 2,
            "pixel_context": pixel_context,
        },
        data={"binarize": binarize},
        train={"epochs": 1},
    )
    dataset = tiny_dataset(train_count=64, val_count=16)
    dataset = colour_dataset(dataset) if colour else dataset
    outcome = train(config, dataset)
    model = nnx.merge(outcome.graphdef, outcome.state.params)
    shape = dataset.image_shape

    samples = generate(model, 3, seed=1)
    assert samples.shape == (3, *shape) and np.all((samples >= 0) & (samples <= 1))
    views, means = reconstruct(model, dataset.test_images[:2], binarize != "none", num_samples=2, seed=0)
    assert views.shape == (2, *shape) and means.shape == (2, 2, *shape)
    assert np.all((means >= 0) & (means <= 1)) and np.isfinite(means).all()
    if pixel_context:  # pictures are draws made pixel by pixel, not means: every value sits on a level
        top_level = 1 if likelihood == "bernoulli" else 255
        for pictures in (samples, means):
            np.testing.assert_allclose(pictures * top_level, np.round(pictures * top_level), atol=1e-4)

    run = LoadedRun(None, config, model, 8, 1, shape, "tiny", "digit")
    evaluation = evaluate_images(run, np.asarray(dataset.test_images[:4]), "test", k=3, seed=0)
    assert np.isfinite(evaluation.nll_nats) and evaluation.nll_nats > 0 and np.isfinite(evaluation.neg_elbo_nats)
    assert evaluation.num_values == int(np.prod(shape)) and evaluation.is_likelihood
