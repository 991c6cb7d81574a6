"""The sample-quality measure on toy data whose answer is known, and its script entry on a trained run."""

import shutil
import sys

import numpy as np
import pytest

from vaecli.inference import quality
from vaecli.inference.quality import (
    FeatureMap,
    fit_feature_map,
    frechet_distance,
    gaussian_frechet_distance,
    mean_nearest_distance,
    sample_quality,
)

IDENTITY_2D = FeatureMap(np.eye(2), np.zeros(2), relu=False, description="the points themselves")


def test_the_frechet_distance_of_gaussians_has_its_closed_forms():
    identity = np.eye(3)
    shift = np.array([1.0, -2.0, 2.0])
    assert gaussian_frechet_distance(np.zeros(3), identity, shift, identity) == pytest.approx(9.0)
    # N(0, I) against N(0, s^2 I): d (1 - s)^2.
    assert gaussian_frechet_distance(np.zeros(3), identity, np.zeros(3), 4 * identity) == pytest.approx(3.0)
    assert gaussian_frechet_distance(shift, 2 * identity, shift, 2 * identity) == pytest.approx(0.0, abs=1e-12)


def test_the_frechet_distance_of_covariances_that_do_not_commute_matches_scipy():
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(0)
    factors = rng.normal(size=(2, 4, 4))
    first, second = factors[0] @ factors[0].T + np.eye(4), factors[1] @ factors[1].T
    mean_first, mean_second = rng.normal(size=4), rng.normal(size=4)
    expected = (
        np.sum((mean_first - mean_second) ** 2)
        + np.trace(first + second - 2 * np.real(sqrtm(first @ second)))
    )  # fmt: skip
    assert gaussian_frechet_distance(mean_first, first, mean_second, second) == pytest.approx(expected, rel=1e-8)
    assert gaussian_frechet_distance(mean_second, second, mean_first, first) == pytest.approx(expected, rel=1e-8)


def test_the_frechet_distance_of_samples_estimates_the_gaussians_distance():
    rng = np.random.default_rng(1)
    reference = rng.normal(size=(20_000, 2))
    assert frechet_distance(reference, rng.normal(size=(20_000, 2))) < 0.01
    assert frechet_distance(reference, rng.normal(size=(20_000, 2)) + np.array([3.0, 0.0])) == pytest.approx(
        9.0, abs=0.15
    )


def test_nearest_distances_are_means_of_the_closest_match(monkeypatch):
    points = np.array([[0.0, 0.0], [10.0, 0.0], [4.0, 3.0]])
    others = np.array([[1.0, 0.0], [4.0, 7.0]])
    assert mean_nearest_distance(points, others) == pytest.approx((1 + 9 + 4) / 3)
    assert mean_nearest_distance(others, points) == pytest.approx((1 + 4) / 2)
    monkeypatch.setattr(quality, "DISTANCE_CHUNK", 2)  # the same answer a few rows at a time
    assert mean_nearest_distance(points, others) == pytest.approx((1 + 9 + 4) / 3)


def two_clusters(rng, count):
    """Toy 'test images': half near (-4, 0), half near (4, 0)."""
    centres = np.where(rng.random(count) < 0.5, -4.0, 4.0)
    return np.stack([centres, np.zeros(count)], axis=1) + rng.normal(scale=0.5, size=(count, 2))


def test_good_samples_score_best_blurred_and_collapsed_ones_worse_each_where_expected():
    rng = np.random.default_rng(2)
    test = two_clusters(rng, 2000)
    good = sample_quality(two_clusters(rng, 2000), test, IDENTITY_2D)
    # "Blurred": samples between the clusters, like decoding z from a hole of the prior.
    blurred = sample_quality(rng.normal(scale=0.5, size=(2000, 2)), test, IDENTITY_2D)
    # "Collapsed": every sample from one cluster (a sampler that repeats one mode).
    collapsed = sample_quality(two_clusters(rng, 2000) * [0.0, 1.0] + [4.0, 0.0], test, IDENTITY_2D)
    assert good.images == 2000
    assert good.frechet < 0.05 and good.sample_to_test < 0.2 and good.test_to_sample < 0.2
    # Far from every test point: the clusters' inner tails reach about 2.5 of the 4 to the middle.
    assert blurred.frechet > 10 and blurred.sample_to_test > 1.5 > 10 * good.sample_to_test
    assert collapsed.sample_to_test < 0.2  # each sample looks real ...
    assert collapsed.test_to_sample > 3  # ... but half the test points have nothing near them
    assert collapsed.frechet > 10


def test_the_feature_map_is_a_classifier_hidden_layer_or_pca_without_labels():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, size=400)
    # Class 1 has a bright diagonal.
    images_uint8 = np.rint((rng.random((400, 4, 4)) * 0.2 + labels[:, None, None] * np.eye(4) * 0.8) * 255)
    images_uint8 = images_uint8.astype(np.uint8)
    images = images_uint8 / 255.0
    features = fit_feature_map(images_uint8, labels, seed=0)
    assert features.relu and "classifier" in features.description
    assert features(images).shape == (400, quality.CLASSIFIER_HIDDEN_UNITS) and features(images).min() >= 0
    # The hidden layer separates the classes: their mean features are far apart relative to the spread.
    by_class = [features(images[labels == label]) for label in (0, 1)]
    separation = np.linalg.norm(by_class[0].mean(axis=0) - by_class[1].mean(axis=0))
    assert separation > 2 * np.mean([np.linalg.norm(group.std(axis=0)) for group in by_class])
    unlabelled = fit_feature_map(images_uint8, np.full(400, -1), seed=0)
    assert not unlabelled.relu and "PC" in unlabelled.description
    assert unlabelled(images).shape == (400, 16)  # min(64, the 16 pixels)
    np.testing.assert_allclose(unlabelled(images).mean(axis=0), 0.0, atol=1e-10)  # PCA centres the training set


def test_the_script_compares_the_samplers_on_a_run(tmp_path, trained_run_dir, monkeypatch, capsys):
    run_dir = shutil.copytree(trained_run_dir, tmp_path / "run")
    monkeypatch.setattr(quality, "CLASSIFIER_MAX_IMAGES", 1000)  # a shorter training, for the test's sake
    # 16 samples, the count test_samplers draws too: the compiled decoders are shared within a test session.
    monkeypatch.setattr(sys, "argv", ["vaecli.inference.quality", str(run_dir), "--n", "16"])
    quality.main()  # what python -m vaecli.inference.quality RUN_DIR --n 16 runs
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{run_dir} step ") and lines[0].endswith("against 500 test images")
    rows = {line[:32].strip(): line[32:].split() for line in lines[3:6]}
    assert set(rows) == {"prior", "gmm (10 components)", "validation images (reference)"}
    for images, *distances in rows.values():
        assert images == "16" and all(float(distance) > 0 for distance in distances)
    (cached,) = (run_dir / "samplers").iterdir()
    assert cached.name.startswith("gmm-") and cached.name.endswith("-10.npz")
