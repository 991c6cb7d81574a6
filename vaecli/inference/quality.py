"""How good are a VAE's samples? Their distance to the test images, in the features of a small classifier.

The measure (lower is better for all three; 0 when the samples are the test images themselves):
- features: the hidden layer (128 ReLUs) of a one-hidden-layer MLP classifier trained for the purpose
  on the training split's labels (scikit-learn); on a dataset without labels, the training images'
  first 64 principal components. Images enter as intensities in [0, 1]: test images / 255, samples
  as the means of p(x|z) that `vae generate` writes.
- frechet: ||m_s - m_t||^2 + tr(S_s + S_t - 2 (S_s S_t)^(1/2)), the Frechet distance between Gaussians
  fitted to the features of the samples and of the test images (FID's formula, Heusel et al. 2017,
  with this classifier in place of Inception). Biased by the sample count: compare at equal counts.
- sample_to_test: the mean over samples of the distance to the nearest test image (precision's
  flavour: do the samples look like some real image? Blurred or non-digit samples lie far from all).
- test_to_sample: the mean over test images of the distance to the nearest sample (recall's flavour:
  is every kind of test image produced? A sampler that repeats a few modes leaves many far away).

Run it on a trained run to compare the prior with the gmm sampler, beside validation images as the
reference a perfect sampler would reach (it fits RUN_DIR/samplers/gmm-*.npz if none is cached):

    python -m vaecli.inference.quality RUN_DIR [--checkpoint best] [--n N] [--components 10] [--seed 0] [--json]

A script entry at the bottom prints, like benchmarks.bench; the functions above it print nothing.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from vaecli.common.errors import UsageError, VaeError
from vaecli.data.datasets import load_dataset
from vaecli.inference.samplers import mixture_samples, run_mixture
from vaecli.models.sampling import generate
from vaecli.training.checkpoint import load_run

# Hidden units of the feature classifier, its passes over the data and the most images it trains on:
# on MNIST a few seconds of training give about 97 % test accuracy, enough to tell digits apart.
CLASSIFIER_HIDDEN_UNITS = 128
CLASSIFIER_EPOCHS = 15
CLASSIFIER_MAX_IMAGES = 20_000
PCA_COMPONENTS = 64
# Rows of the pairwise distance matrix computed at once: bounds memory for any number of images.
DISTANCE_CHUNK = 1024


@dataclass(frozen=True, eq=False)
class FeatureMap:
    """features(x) = act(x W + b) of images flattened to intensities in [0, 1]; act is ReLU or the identity."""

    weights: np.ndarray  # float64 [values, features]
    bias: np.ndarray  # float64 [features]
    relu: bool
    description: str

    def __call__(self, images: np.ndarray) -> np.ndarray:
        flat = np.asarray(images, np.float64).reshape(len(images), -1)
        features = flat @ self.weights + self.bias
        return np.maximum(features, 0.0) if self.relu else features


def fit_feature_map(images_uint8: np.ndarray, labels: np.ndarray, seed: int = 0) -> FeatureMap:
    """Features learnt from training images (uint8) and their labels: a classifier's hidden layer, or PCA
    when fewer than two classes are labelled. At most CLASSIFIER_MAX_IMAGES images, chosen with `seed`."""
    labels = np.asarray(labels)
    labelled = np.flatnonzero(labels >= 0)
    rng = np.random.default_rng(seed)
    if len(np.unique(labels[labelled])) < 2:
        chosen = rng.permutation(len(images_uint8))[:CLASSIFIER_MAX_IMAGES]
        return pca_feature_map(intensity_rows(images_uint8[chosen]), seed)
    chosen = rng.permutation(labelled)[:CLASSIFIER_MAX_IMAGES]
    return classifier_feature_map(intensity_rows(images_uint8[chosen]), labels[chosen], seed)


def intensity_rows(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 images [N, ...] -> float64 [N, values] in [0, 1]."""
    return np.asarray(images_uint8, np.float64).reshape(len(images_uint8), -1) / 255.0


def classifier_feature_map(rows: np.ndarray, labels: np.ndarray, seed: int) -> FeatureMap:
    """The ReLU hidden layer of a one-hidden-layer MLP trained (Adam, a fixed few epochs) to classify `rows`."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    classifier = MLPClassifier(
        hidden_layer_sizes=(CLASSIFIER_HIDDEN_UNITS,), max_iter=CLASSIFIER_EPOCHS, random_state=seed
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a fixed, short training is the point
        classifier.fit(rows, labels)
    description = f"the {CLASSIFIER_HIDDEN_UNITS}-unit hidden layer of an MLP classifier of the training labels"
    return FeatureMap(classifier.coefs_[0], classifier.intercepts_[0], True, description)


def pca_feature_map(rows: np.ndarray, seed: int) -> FeatureMap:
    """Projection onto the first PCA_COMPONENTS principal components of `rows`, centred on their mean."""
    from sklearn.decomposition import PCA

    pca = PCA(n_components=min(PCA_COMPONENTS, *rows.shape), random_state=seed).fit(rows)
    weights = pca.components_.T
    return FeatureMap(weights, -pca.mean_ @ weights, False, f"the training images' first {weights.shape[1]} PCs")


def gaussian_frechet_distance(
    mean_a: np.ndarray, covariance_a: np.ndarray, mean_b: np.ndarray, covariance_b: np.ndarray
) -> float:
    """||m_a - m_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)): the squared 2-Wasserstein distance of two Gaussians.

    tr (S_a S_b)^(1/2) = tr (R S_b R)^(1/2) with R = S_a^(1/2), a symmetric matrix whose eigenvalues
    are real: no complex square roots, unlike scipy.linalg.sqrtm(S_a S_b).
    """
    eigenvalues, eigenvectors = np.linalg.eigh(covariance_a)
    root_a = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ covariance_b @ root_a), 0, None)).sum()
    difference = np.asarray(mean_a) - np.asarray(mean_b)
    return float(difference @ difference + np.trace(covariance_a) + np.trace(covariance_b) - 2 * cross)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """The Frechet distance between Gaussians fitted to two sets of feature vectors [N, features]."""
    features_a, features_b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    moments_a = features_a.mean(axis=0), np.cov(features_a, rowvar=False)
    moments_b = features_b.mean(axis=0), np.cov(features_b, rowvar=False)
    return gaussian_frechet_distance(*moments_a, *moments_b)


def mean_nearest_distance(points: np.ndarray, others: np.ndarray) -> float:
    """The mean over `points` [N, F] of the Euclidean distance to the nearest of `others` [M, F]."""
    points, others = np.asarray(points, np.float64), np.asarray(others, np.float64)
    other_norms = np.einsum("ij,ij->i", others, others)
    nearest = []
    for first in range(0, len(points), DISTANCE_CHUNK):
        chunk = points[first : first + DISTANCE_CHUNK]
        squared = np.einsum("ij,ij->i", chunk, chunk)[:, None] + other_norms[None, :] - 2 * chunk @ others.T
        nearest.append(np.sqrt(np.clip(squared.min(axis=1), 0, None)))
    return float(np.concatenate(nearest).mean())


@dataclass(frozen=True)
class SampleQuality:
    """Distances of a set of images to the test images in a feature space; lower is better."""

    images: int
    frechet: float
    sample_to_test: float
    test_to_sample: float


def sample_quality(samples: np.ndarray, test_images: np.ndarray, features: FeatureMap) -> SampleQuality:
    """Score `samples` against `test_images` (both intensities in [0, 1], any image shape) in `features`."""
    sample_features, test_features = features(samples), features(test_images)
    return SampleQuality(
        images=len(samples),
        frechet=frechet_distance(sample_features, test_features),
        sample_to_test=mean_nearest_distance(sample_features, test_features),
        test_to_sample=mean_nearest_distance(test_features, sample_features),
    )


def compare_samplers(
    run_dir: Path,
    checkpoint: str = "best",
    n: int | None = None,
    components: int = 10,
    seed: int = 0,
    temperature: float = 1.0,
) -> dict:
    """sample_quality of n prior samples, n gmm samples and n validation images against the test split.

    n defaults to the smaller of the validation and test splits, so that all three rows have the same
    count (the Frechet distance and the nearest distances depend on it).
    """
    run = load_run(Path(run_dir), checkpoint)
    dataset = load_dataset(run.config.data)
    if n is not None and n < 1:
        raise UsageError(f"--n must be at least 1, got {n}")
    n = n or min(len(dataset.val_images), len(dataset.test_images))
    started = time.perf_counter()
    features = fit_feature_map(dataset.train_images, dataset.train_labels, seed)
    test_images = dataset.test_images / 255.0
    fit = run_mixture(run, components)
    rows = {
        "prior": generate(run.model, n, seed, temperature),
        f"gmm ({components} components)": mixture_samples(run.model, fit.mixture, n, seed, temperature),
        "validation images (reference)": dataset.val_images[:n] / 255.0,
    }
    scores = {name: asdict(sample_quality(images, test_images, features)) for name, images in rows.items()}
    return {
        "run": str(run.run_dir),
        "step": run.step,
        "features": features.description,
        "test_images": len(test_images),
        "seed": seed,
        "temperature": temperature,
        "mixture": str(fit.path),
        "scores": scores,
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a trained run directory")
    parser.add_argument("--checkpoint", default="best", help="best, latest or a step")
    parser.add_argument("--n", type=int, default=None, help="samples per sampler [default: min(val, test) images]")
    parser.add_argument("--components", type=int, default=10, help="components of the gmm sampler")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples and of the classifier")
    parser.add_argument("--temperature", type=float, default=1.0, help="temperature of both samplers")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    arguments = parser.parse_args()
    try:
        result = compare_samplers(
            arguments.run_dir, arguments.checkpoint, arguments.n, arguments.components, arguments.seed,
            arguments.temperature,
        )  # fmt: skip
    except VaeError as error:
        raise SystemExit(f"error: {error}") from None
    if arguments.json:
        print(json.dumps(result))
        return
    print(f"{result['run']} step {result['step']}: against {result['test_images']} test images")
    print(f"features: {result['features']}")
    print(f"{'':32} {'images':>7} {'frechet':>9} {'sample->test':>13} {'test->sample':>13}")
    for name, score in result["scores"].items():
        print(
            f"{name:32} {score['images']:7d} {score['frechet']:9.3f} "
            f"{score['sample_to_test']:13.3f} {score['test_to_sample']:13.3f}"
        )
    print(f"lower is better; {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
