"""vae latent, vae interpolate and vae traverse end to end: the pictures they write, and what they refuse."""

from pathlib import Path

import numpy as np
import pytest
from helpers import assert_one_line_error, tiny_config, tiny_dataset, vae
from PIL import Image

from vaecli.common.plots import STYLE
from vaecli.inference.explore import GRID_PADDING, INPUT_GAP_PADDINGS, TILE_INCHES, Traversal

DPI = STYLE["savefig.dpi"]


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG."""
    with Image.open(path) as picture:
        return picture.size


def figure_pixels(width_inches: float, height_inches: float) -> tuple[int, int]:
    return round(width_inches * DPI), round(height_inches * DPI)


@pytest.fixture(scope="module")
def untrained_runs(tmp_path_factory):
    """Runs of a freshly initialised model with a 1-D and a 2-D latent: a checkpoint is all a picture needs."""
    from vaecli.training.checkpoint import save_checkpoint
    from vaecli.training.loop import init_train_state

    runs = {}
    dataset = tiny_dataset()
    for latent_dim in (1, 2):
        config = tiny_config(model={"latent_dim": latent_dim})
        _, state = init_train_state(config, dataset.image_shape)
        runs[latent_dim] = tmp_path_factory.mktemp("runs") / f"latent{latent_dim}"
        save_checkpoint(runs[latent_dim], state, 1, config, dataset, val_loss=500.0)
    return runs


# ---- vae latent ----------------------------------------------------------------------------------


def test_latent_draws_the_codes_on_their_principal_axes_the_same_every_time(tmp_path, trained_run_dir):
    first = vae("latent", "--run", trained_run_dir, "--images", 200, "--out", tmp_path / "latent.png")
    assert first.exit_code == 0, first.output
    assert "200 test codes on PC1, PC2" in first.stdout and "manifold" not in first.stdout
    assert png_size(tmp_path / "latent.png") == figure_pixels(7.5, 5.5)
    again = vae("latent", "--run", trained_run_dir, "--images", 200, "--out", tmp_path / "again.png")
    assert again.exit_code == 0, again.output
    assert (tmp_path / "latent.png").read_bytes() == (tmp_path / "again.png").read_bytes()
    other = vae("latent", "--run", trained_run_dir, "--images", 100, "--out", tmp_path / "fewer.png")
    assert other.exit_code == 0, other.output
    assert (tmp_path / "fewer.png").read_bytes() != (tmp_path / "latent.png").read_bytes()


def test_a_two_dimensional_latent_gets_the_decoded_manifold_beside_its_codes(tmp_path, untrained_runs):
    result = vae("latent", "--run", untrained_runs[2], "--split", "val", "--out", tmp_path / "latent.png")
    assert result.exit_code == 0, result.output
    assert "500 val codes on z0, z1 and the decoded manifold" in result.stdout
    assert png_size(tmp_path / "latent.png") == figure_pixels(12.0, 5.5)


def test_latent_refuses_a_one_dimensional_latent(tmp_path, untrained_runs):
    result = vae("latent", "--run", untrained_runs[1], "--out", tmp_path / "latent.png")
    assert_one_line_error(result, 2, "the run's latent has 1 dimension; a plot of the latent space needs at least 2")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        (["--split", "holdout"], "--split 'holdout': choose test, val or train"),
        (["--out", "latent.jpg"], "must end in .png"),
        (["--images", "0"], "--images must be at least 1, got 0"),
    ],
)
def test_latent_refuses_bad_options_in_one_line(tmp_path, trained_run_dir, monkeypatch, arguments, fragment):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(vae("latent", "--run", trained_run_dir, *arguments), 2, fragment)
    assert list(tmp_path.iterdir()) == []


# ---- vae interpolate -----------------------------------------------------------------------------


def interpolation_width(steps: int, image_width: int = 28) -> int:
    end = image_width + 2 * GRID_PADDING
    middle = steps * image_width + (steps + 1) * GRID_PADDING
    return 2 * end + middle + 2 * (INPUT_GAP_PADDINGS - 2) * GRID_PADDING


@pytest.mark.parametrize("spherical", [[], ["--spherical"]])
def test_interpolate_writes_one_row_with_the_inputs_at_the_ends(tmp_path, trained_run_dir, spherical):
    arguments = ["interpolate", "test:0", "test:1", "--run", trained_run_dir, "--steps", 5, *spherical]
    result = vae(*arguments, "--out", tmp_path / "interp.png")
    assert result.exit_code == 0, result.output
    assert f"5 points on a {'spherical' if spherical else 'straight'} path" in result.stdout
    assert png_size(tmp_path / "interp.png") == (interpolation_width(5), 28 + 2 * GRID_PADDING)
    assert vae(*arguments, "--out", tmp_path / "again.png").exit_code == 0
    assert (tmp_path / "interp.png").read_bytes() == (tmp_path / "again.png").read_bytes()


def test_interpolate_reads_image_files_and_ends_at_their_codes(tmp_path, trained_run):
    from vaecli.data.datasets import load_dataset
    from vaecli.inference.explore import save_interpolation
    from vaecli.inference.latent import input_codes, read_inputs

    test_images = load_dataset(trained_run.config.data).test_images
    paper = tmp_path / "ink-on-paper.png"
    Image.fromarray(255 - np.asarray(test_images[7])).save(paper)  # read as reconstruct reads it: inverted back
    path = save_interpolation(trained_run, tmp_path / "interp.png", str(paper), "test:2", 4, False, 0)
    _, means = input_codes(trained_run, read_inputs(trained_run, ["test:7", "test:2"]))
    np.testing.assert_allclose(path[0], means[0], atol=1e-5)  # the inverted file is test image 7 again
    np.testing.assert_allclose(path[-1], means[1], atol=1e-5)
    with Image.open(tmp_path / "interp.png") as picture:
        row = np.asarray(picture)
    assert row.shape == (32, interpolation_width(4))
    assert set(np.unique(row[2:30, 2:30])) <= {0, 255}  # a binarized model's input: one Bernoulli draw


@pytest.mark.parametrize(
    ("inputs", "options", "code", "fragment"),
    [
        (["test:3", "test:3"], [], 2, "A and B have the same posterior mean"),
        (["test:3", "test:3"], ["--spherical"], 2, "A and B have the same posterior mean"),
        (["test:0", "test:500"], [], 2, "test:500: the test split of mnist_sample has 500 images (indices 0 to 499)"),
        (["test:0", "missing.png"], [], 1, "missing.png does not exist"),
        (["test:0", "test:1"], ["--steps", "1"], 2, "--steps must be at least 2"),
        (["test:0", "test:1"], ["--out", "interp.npz"], 2, "must end in .png"),
    ],
)
def test_interpolate_refuses_in_one_line(tmp_path, trained_run_dir, monkeypatch, inputs, options, code, fragment):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(vae("interpolate", *inputs, "--run", trained_run_dir, *options), code, fragment)
    assert list(tmp_path.iterdir()) == []


def test_the_same_image_file_twice_is_refused(tmp_path, trained_run_dir):
    Image.fromarray(np.eye(28, dtype=np.uint8) * 255).save(tmp_path / "digit.png")
    result = vae("interpolate", tmp_path / "digit.png", tmp_path / "digit.png", "--run", trained_run_dir)
    assert_one_line_error(result, 2, "same posterior mean")


# ---- vae traverse --------------------------------------------------------------------------------


def test_traverse_shows_every_dimension_by_kl_and_is_deterministic(tmp_path, trained_run, trained_run_dir):
    from vaecli.inference.latent import dimension_usage, split_codes

    result = vae("traverse", "--run", trained_run_dir, "--out", tmp_path / "traverse.png")
    assert result.exit_code == 0, result.output
    usage = dimension_usage(split_codes(trained_run, "val"))
    listed = ", ".join(f"z{dim}" for dim in usage.order)  # the 8-D latent: all of it, under the default 10
    assert f"wrote {tmp_path / 'traverse.png'}: {listed} around the prior mean z = 0" in result.stdout
    assert png_size(tmp_path / "traverse.png") == figure_pixels(2.4 + TILE_INCHES * 9, 1.2 + TILE_INCHES * 8)
    assert vae("traverse", "--run", trained_run_dir, "--out", tmp_path / "again.png").exit_code == 0
    assert (tmp_path / "traverse.png").read_bytes() == (tmp_path / "again.png").read_bytes()


def test_traverse_around_an_input_varies_the_chosen_dimensions(tmp_path, trained_run):
    from vaecli.inference.explore import save_traversal
    from vaecli.inference.latent import dimension_usage, split_codes

    drawn = save_traversal(trained_run, tmp_path / "t.png", "test:5", [0, 3, 5], 2.0, 5, 0)
    kl = dimension_usage(split_codes(trained_run, "val")).kl
    assert sorted(drawn.dims) == [0, 3, 5] and drawn.kl == sorted(drawn.kl, reverse=True)
    np.testing.assert_allclose(drawn.kl, kl[drawn.dims])
    assert drawn.centre == "the posterior mean of test:5"
    assert png_size(tmp_path / "t.png") == figure_pixels(2.4 + TILE_INCHES * 5, 1.2 + TILE_INCHES * 3)
    around_zero = save_traversal(trained_run, tmp_path / "zero.png", None, [0, 3, 5], 2.0, 5, 0)
    assert around_zero.dims == drawn.dims
    assert (tmp_path / "zero.png").read_bytes() != (tmp_path / "t.png").read_bytes()


def test_inactive_dimensions_are_marked_in_their_row_label():
    traversal = Traversal(dims=[4, 7], kl=[2.345, 0.0213], active=[True, False], centre="z = 0")
    assert traversal.row_labels() == ["z4 · 2.35 nats", "z7 · 0.02 nats (inactive)"]


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (["--dims", "0,8"], "--dims: there is no dimension 8; the latent has 8 dimensions, 0 to 7"),
        (["--dims=-1"], "--dims: there is no dimension -1; the latent has 8 dimensions, 0 to 7"),
        (["--dims", "one"], "--dims 'one': give dimension numbers separated by commas"),
        (["--range", "0"], "--range must be a positive number, got 0.0"),
        (["--steps", "1"], "--steps must be at least 2, got 1"),
        (["--input", "test:9999"], "test:9999: the test split of mnist_sample has 500 images"),
    ],
)
def test_traverse_refuses_in_one_line(tmp_path, trained_run_dir, monkeypatch, options, fragment):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(vae("traverse", "--run", trained_run_dir, *options), 2, fragment)
    assert list(tmp_path.iterdir()) == []
