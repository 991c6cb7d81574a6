"""The offline colour dataset used for the colour measurement: what it makes, and PNG's code length."""

import numpy as np
import pytest
from PIL import Image

from vaecli.data.coloured_digits import coloured_digits, png_bits_per_dim, write_coloured_digits


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
