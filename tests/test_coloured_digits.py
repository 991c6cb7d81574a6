"""The offline colour datasets used for the colour measurement (coloured digits, photo crops), and PNG's code length."""

import numpy as np
import pytest
from PIL import Image

from vaecli.data.coloured_digits import coloured_digits, png_bits_per_dim, write_coloured_digits
from vaecli.data.photo_crops import grid_crops, shipped_photo_paths, write_photo_crops


def test_coloured_digits_are_32x32_colour_pictures_of_varied_digits_fixed_by_the_seed():
    pictures, labels = coloured_digits(40, seed=3)
    assert pictures.shape == (40, 32, 32, 3) and pictures.dtype == np.uint8
    assert len(set(labels.tolist())) > 5  # drawn across the sample, which is sorted by digit
    assert pictures.std(axis=(1, 2)).mean() > 10  # colour and structure, not flat squares
    np.testing.assert_array_equal(pictures, coloured_digits(40, seed=3)[0])
    assert not np.array_equal(pictures, coloured_digits(40, seed=4)[0])
    with pytest.raises(ValueError, match="count must be between 1 and 5000"):
        coloured_digits(0)


def test_written_folders_hold_one_png_per_picture_under_its_digit(tmp_path):
    write_coloured_digits(tmp_path, 12, seed=0)
    files = sorted(tmp_path.glob("*/*.png"))
    pictures, labels = coloured_digits(12, seed=0)
    assert len(files) == 12
    for path in files:
        index = int(path.stem)
        assert path.parent.name == str(labels[index])
        np.testing.assert_array_equal(np.asarray(Image.open(path)), pictures[index])


def test_png_bits_per_dim_is_the_file_size_in_bits_over_the_values():
    flat = np.zeros((2, 32, 32, 3), np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    assert png_bits_per_dim(flat) < 0.5  # a constant picture compresses to little more than headers
    assert 7.9 < png_bits_per_dim(noise) < 8.5  # random bytes do not compress


def test_grid_crops_tile_a_picture_without_overlap_and_drop_the_ragged_edge():
    picture = np.arange(70 * 100 * 3, dtype=np.int64).reshape(70, 100, 3).astype(np.uint8)
    crops = list(grid_crops(picture, side=32))
    assert [(top, left) for top, left, _ in crops] == [(0, 0), (0, 32), (0, 64), (32, 0), (32, 32), (32, 64)]
    for top, left, square in crops:
        np.testing.assert_array_equal(square, picture[top : top + 32, left : left + 32])


def test_photo_crops_are_32x32_colour_pictures_from_the_shipped_photographs(tmp_path):
    count = write_photo_crops(tmp_path)
    files = sorted(tmp_path.glob("*/*.png"))
    assert count == len(files) > 1000
    assert {path.parent.name for path in files} == {"china", "flower", "grace_hopper"}
    pictures = np.stack([np.asarray(Image.open(path)) for path in files[::50]])
    assert pictures.shape[1:] == (32, 32, 3)
    assert pictures.std(axis=(1, 2, 3)).mean() > 5  # photos, not flat squares
    # A full-size crop is the photo's own pixels at its place.
    china = np.asarray(Image.open(shipped_photo_paths()[0]).convert("RGB"))
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "china" / "s1.000_032_064.png")), china[32:64, 64:96]
    )
