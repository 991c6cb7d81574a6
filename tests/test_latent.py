"""The maths behind vae latent, interpolate and traverse: paths, the PCA plane, the prior grid, dimension ranking."""

from statistics import NormalDist

import numpy as np
import pytest

from vaecli.common.errors import UsageError
from vaecli.inference.latent import (
    DimensionUsage,
    check_interpolable,
    choose_dimensions,
    dimension_usage,
    input_codes,
    interpolation_path,
    latent_plane,
    parse_dimensions,
    principal_axes,
    prior_quantile_grid,
    project,
    read_inputs,
    split_codes,
    traversal_latents,
)


def random_vector(seed, size=6, length=None):
    vector = np.random.default_rng(seed).normal(size=size).astype(np.float32)
    return vector if length is None else vector * (length / np.linalg.norm(vector))


@pytest.mark.parametrize("spherical", [False, True])
def test_a_path_starts_at_a_and_ends_at_b(spherical):
    start, end = random_vector(0, length=2.0), random_vector(1, length=5.0)
    path = np.asarray(interpolation_path(start, end, 7, spherical))
    assert path.shape == (7, 6)
    np.testing.assert_allclose(path[0], start, atol=1e-5)
    np.testing.assert_allclose(path[-1], end, atol=1e-5)


def test_a_straight_path_takes_even_steps_along_the_chord():
    start, end = random_vector(0), random_vector(1)
    path = np.asarray(interpolation_path(start, end, 5, False))
    np.testing.assert_allclose(np.diff(path, axis=0), np.broadcast_to((end - start) / 4, (4, 6)), atol=1e-6)


def test_slerp_keeps_the_length_of_equal_length_codes_and_turns_at_a_constant_rate():
    start, end = random_vector(2, length=3.0), random_vector(3, length=3.0)
    path = np.asarray(interpolation_path(start, end, 9, True), np.float64)
    np.testing.assert_allclose(np.linalg.norm(path, axis=1), 3.0, rtol=1e-5)
    unit = path / np.linalg.norm(path, axis=1, keepdims=True)
    turns = np.arccos(np.clip(np.sum(unit[1:] * unit[:-1], axis=1), -1, 1))
    total = np.arccos(np.dot(start, end) / 9.0)
    np.testing.assert_allclose(turns, total / 8, rtol=1e-3)
    # ... where the straight path sags towards the origin in the middle.
    straight = np.asarray(interpolation_path(start, end, 9, False))
    assert np.linalg.norm(straight[4]) < 3.0 - 0.1


def test_slerp_changes_the_length_linearly_between_unequal_codes():
    start, end = random_vector(4, length=1.0), random_vector(5, length=4.0)
    path = np.asarray(interpolation_path(start, end, 4, True))
    np.testing.assert_allclose(np.linalg.norm(path, axis=1), [1.0, 2.0, 3.0, 4.0], rtol=1e-5)


def test_slerp_between_parallel_codes_is_the_straight_path():
    start = random_vector(6)
    spherical = np.asarray(interpolation_path(start, 2 * start, 5, True))
    assert np.all(np.isfinite(spherical))
    np.testing.assert_allclose(spherical, np.asarray(interpolation_path(start, 2 * start, 5, False)), atol=1e-5)


@pytest.mark.parametrize(
    ("start", "end", "spherical", "fragment"),
    [
        ([1.0, 2.0], [1.0, 2.0], False, "same posterior mean"),
        ([1.0, 2.0], [1.0, 2.0], True, "same posterior mean"),
        ([0.0, 0.0], [1.0, 2.0], True, "at z = 0"),
        ([1.0, 2.0], [-2.0, -4.0], True, "opposite directions"),
    ],
)
def test_codes_that_give_no_path_are_refused(start, end, spherical, fragment):
    with pytest.raises(UsageError, match=fragment):
        check_interpolable(np.array(start), np.array(end), spherical)


def test_opposite_codes_still_have_a_straight_path():
    check_interpolable(np.array([1.0, 2.0]), np.array([-2.0, -4.0]), spherical=False)  # no error
    path = np.asarray(interpolation_path(np.array([1.0, 2.0]), np.array([-2.0, -4.0]), 3, False))
    np.testing.assert_allclose(path[1], [-0.5, -1.0])


def test_the_prior_projects_onto_the_principal_axes_with_unit_variance():
    codes = np.random.default_rng(0).normal(size=(20_000, 8))
    plane = latent_plane(codes)
    assert plane.is_pca and plane.names[0].startswith("PC1 (")
    np.testing.assert_allclose(plane.axes.T @ plane.axes, np.eye(2), atol=1e-12)
    np.testing.assert_allclose(project(codes, plane).var(axis=0), [1.0, 1.0], atol=0.05)


def test_the_plane_follows_the_widest_spread_and_keeps_the_origin_at_the_origin():
    rng = np.random.default_rng(1)
    offset = np.array([0.0, 5.0, 0.0, 0.0])
    codes = rng.normal(size=(5000, 4)) * np.array([1.0, 3.0, 0.5, 0.5]) + offset
    axes, explained = principal_axes(codes)
    assert abs(axes[1, 0]) > 0.99  # the first axis is z1, the widest
    assert explained[0] == pytest.approx(9 / (9 + 1 + 0.25 + 0.25), abs=0.02)
    plane = latent_plane(codes)
    np.testing.assert_array_equal(project(np.zeros((1, 4)), plane), [[0.0, 0.0]])
    # Not centred: the codes' mean stays where it is, 5 along z1, so the prior's circles sit at 0.
    assert abs(project(codes, plane).mean(axis=0)[0]) == pytest.approx(5.0, abs=0.1)


def test_principal_axes_have_a_fixed_sign():
    codes = np.random.default_rng(2).normal(size=(500, 5)) * np.arange(1, 6)
    first, _ = principal_axes(codes)
    second, _ = principal_axes(-codes)  # the same directions, each eigenvector's sign free to flip
    np.testing.assert_allclose(first, second, atol=1e-10)
    assert np.all(first[np.argmax(np.abs(first), axis=0), [0, 1]] > 0)


def test_a_two_dimensional_latent_is_drawn_as_it_is_and_a_one_dimensional_one_is_refused():
    plane = latent_plane(np.random.default_rng(3).normal(size=(100, 2)))
    assert not plane.is_pca and plane.names == ("z0", "z1")
    np.testing.assert_array_equal(plane.axes, np.eye(2))
    with pytest.raises(UsageError, match="latent has 1 dimension; a plot of the latent space needs at least 2"):
        latent_plane(np.zeros((10, 1)))


def test_the_manifold_grid_spans_the_prior_quantiles_like_a_plot():
    values, latents = prior_quantile_grid(5)
    expected = [NormalDist().inv_cdf(p) for p in (0.05, 0.275, 0.5, 0.725, 0.95)]
    np.testing.assert_allclose(values, expected, atol=1e-12)
    assert latents.shape == (25, 2)
    np.testing.assert_allclose(latents[0], [values[0], values[-1]])  # top left: z0 lowest, z1 highest
    np.testing.assert_allclose(latents[4], [values[-1], values[-1]])  # along the first row z0 rises
    np.testing.assert_allclose(latents[-1], [values[-1], values[0]])


def test_a_traversal_moves_one_coordinate_per_row_around_the_centre():
    centre = np.array([0.5, -1.0, 2.0, 0.0], np.float32)
    offsets = np.array([-2.0, 0.0, 2.0])
    latents = traversal_latents(centre, [2, 0], offsets)
    assert latents.shape == (2, 3, 4)
    np.testing.assert_allclose(latents[0, :, 2], centre[2] + offsets)
    np.testing.assert_allclose(latents[1, :, 0], centre[0] + offsets)
    held = np.ones((2, 3, 4), bool)
    held[0, :, 2] = held[1, :, 0] = False
    np.testing.assert_array_equal(latents[held], np.broadcast_to(centre, (2, 3, 4))[held])


def usage_with(kl):
    kl = np.asarray(kl, np.float64)
    return DimensionUsage(kl, kl > 0.1, np.argsort(-kl, kind="stable"))


def test_dimensions_are_ranked_by_kl_largest_first():
    usage = usage_with([0.01, 3.0, 0.5, 2.0, 0.0])
    assert choose_dimensions(usage, None, count=3) == [1, 3, 2]
    assert choose_dimensions(usage, None, count=10) == [1, 3, 2, 0, 4]
    assert choose_dimensions(usage, [0, 2, 3]) == [3, 2, 0]  # asked for in any order, shown by KL


@pytest.mark.parametrize("requested", [[5], [-1], [0, 9]])
def test_a_dimension_outside_the_latent_is_refused_naming_the_range(requested):
    with pytest.raises(UsageError, match=r"no dimension (5|-1|9); the latent has 5 dimensions, 0 to 4"):
        choose_dimensions(usage_with([1.0, 0.5, 0.2, 0.1, 0.0]), requested)


def test_dimension_lists_are_parsed_or_refused():
    assert parse_dimensions("3,0,3, 5") == [3, 0, 5]
    for text in ("", "a,b", "1;2"):
        with pytest.raises(UsageError, match="give dimension numbers separated by commas"):
            parse_dimensions(text)


def test_the_ranking_is_the_kl_per_dimension_that_vae_evaluate_reports(trained_run):
    from vaecli.inference.evaluate import evaluate_split

    usage = dimension_usage(split_codes(trained_run, "val", seed=3))
    evaluation = evaluate_split(trained_run, "val", k=1, seed=3)
    assert [int(dim) for dim in usage.order] == [entry["dim"] for entry in evaluation.kl_per_dim]
    np.testing.assert_allclose(usage.kl[usage.order], [entry["kl"] for entry in evaluation.kl_per_dim], rtol=1e-5)
    assert int(usage.active.sum()) == evaluation.active_units


def test_split_codes_carry_the_labels_and_identical_inputs_share_a_code(trained_run):
    codes = split_codes(trained_run, "test", max_images=20)
    assert codes.means.shape == codes.log_variances.shape == (20, trained_run.model.latent_dim)
    assert codes.labels.shape == (20,) and set(codes.labels) <= set(range(10)) and len(set(codes.labels)) > 3
    images = read_inputs(trained_run, ["test:4", "test:4", "test:5"])
    views, means = input_codes(trained_run, images)
    assert views.shape == (3, 28, 28)
    np.testing.assert_array_equal(means[0], means[1])
    assert not np.allclose(means[0], means[2])
