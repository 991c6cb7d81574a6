"""Tests for vaecli.common.images: reading user pictures into MNIST-style input, grids, and atomic writing."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from vaecli.common import images
from vaecli.common.errors import ImageError, OutputError
from vaecli.common.images import (
    load_input_for_model,
    load_model_input,
    load_photo_input,
    make_grid,
    prepare_grey_image,
    reconstruction_figure,
    save_npz,
    save_png,
)

MNIST_SHAPE = (28, 28)
ORIENTATION_TAG = 0x0112


# --- helpers -------------------------------------------------------------------------------------


def gamma_digit(height: int = 40, width: int = 60) -> np.ndarray:
    """Black 'Γ' (top bar + left stem) on white: no symmetry, so every rotation looks different."""
    grey = np.full((height, width), 255, dtype=np.uint8)
    grey[8:14, 10:50] = 0
    grey[8:34, 10:16] = 0
    return grey


def save_grey(path, grey: np.ndarray):
    Image.fromarray(grey).save(path)
    return path


def stored_mode_and_frames(path) -> tuple[str, int]:
    """How Pillow sees the file we wrote, to be sure the test exercises the format it claims to."""
    with Image.open(path) as stored:
        return stored.mode, getattr(stored, "n_frames", 1)


def ink_quadrants(model_input: np.ndarray) -> dict[str, float]:
    """Ink in each quadrant of a model input, split at its centre."""
    half_height, half_width = model_input.shape[0] // 2, model_input.shape[1] // 2
    ink = model_input.astype(np.float64)
    return {
        "top-left": ink[:half_height, :half_width].sum(),
        "top-right": ink[:half_height, half_width:].sum(),
        "bottom-left": ink[half_height:, :half_width].sum(),
        "bottom-right": ink[half_height:, half_width:].sum(),
    }


def centre_of_mass(pixels: np.ndarray) -> tuple[float, float]:
    rows, columns = np.indices(pixels.shape)
    total = pixels.astype(np.float64).sum()
    return float((rows * pixels).sum() / total), float((columns * pixels).sum() / total)


def ink_box_size(pixels: np.ndarray) -> tuple[int, int]:
    rows = np.flatnonzero(pixels.any(axis=1))
    columns = np.flatnonzero(pixels.any(axis=0))
    return int(rows[-1] - rows[0] + 1), int(columns[-1] - columns[0] + 1)


def assert_light_digit_on_black(model_input: np.ndarray) -> None:
    assert model_input.shape == MNIST_SHAPE
    assert model_input.dtype == np.uint8
    assert model_input.max() > 200, "the stroke should be light"
    assert np.median(model_input) < 10, "the background should be dark"


# --- reading: orientation, transparency, polarity -----------------------------------------------


# EXIF orientation 6 means "rotate 90 degrees clockwise to display", 8 means counter-clockwise.
# Rotating the Γ clockwise empties its bottom-left; counter-clockwise empties its top-right.
@pytest.mark.parametrize(
    ("orientation", "empty_quadrant"),
    [(None, "bottom-right"), (6, "bottom-left"), (8, "top-right")],
)
@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_exif_orientation_is_honoured(tmp_path, orientation, empty_quadrant, suffix):
    path = tmp_path / f"digit{suffix}"
    picture = Image.fromarray(gamma_digit())
    if orientation is None:
        picture.save(path)
    else:
        exif = Image.Exif()
        exif[ORIENTATION_TAG] = orientation
        picture.save(path, exif=exif)

    model_input = load_model_input(path, MNIST_SHAPE)

    quadrants = ink_quadrants(model_input)
    assert min(quadrants, key=quadrants.get) == empty_quadrant, quadrants


def test_exif_rotation_matches_the_pre_rotated_picture_exactly(tmp_path):
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = 6
    Image.fromarray(gamma_digit()).save(tmp_path / "tagged.png", exif=exif)
    upright = Image.fromarray(gamma_digit()).transpose(Image.Transpose.ROTATE_270)
    upright.save(tmp_path / "upright.png")

    tagged_input = load_model_input(tmp_path / "tagged.png", MNIST_SHAPE)

    np.testing.assert_array_equal(tagged_input, load_model_input(tmp_path / "upright.png", MNIST_SHAPE))


def transparent_stroke(mode: str) -> Image.Image:
    """The Γ as opaque black on a fully transparent *black* background, in `mode`."""
    stroke = gamma_digit() == 0
    if mode == "RGBA":
        pixels = np.zeros((*stroke.shape, 4), dtype=np.uint8)
        pixels[..., 3] = np.where(stroke, 255, 0)
        return Image.fromarray(pixels)  # RGBA
    if mode == "LA":
        return Image.merge(
            "LA", [Image.new("L", stroke.shape[::-1], 0), Image.fromarray(stroke.astype(np.uint8) * 255)]
        )
    # Palette: index 0 (black, transparent) is the background, index 1 (black) the stroke.
    palette_picture = Image.fromarray(stroke.astype(np.uint8)).convert("P")
    palette_picture.putpalette([0, 0, 0, 0, 0, 0])
    palette_picture.info["transparency"] = 0  # PNG saving writes this as a tRNS chunk
    return palette_picture


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_background_is_treated_as_white_paper(tmp_path, mode):
    path = tmp_path / "transparent.png"
    picture = transparent_stroke(mode)
    picture.save(path)
    assert stored_mode_and_frames(path)[0] == mode

    model_input = load_model_input(path, MNIST_SHAPE)

    assert_light_digit_on_black(model_input)
    on_paper = save_grey(tmp_path / "paper.png", gamma_digit())
    np.testing.assert_array_equal(model_input, load_model_input(on_paper, MNIST_SHAPE))


def test_dark_on_light_and_light_on_dark_give_the_same_input(tmp_path):
    dark_on_light = save_grey(tmp_path / "dark.png", gamma_digit())
    light_on_dark = save_grey(tmp_path / "light.png", 255 - gamma_digit())

    from_dark = load_model_input(dark_on_light, MNIST_SHAPE)

    assert_light_digit_on_black(from_dark)
    np.testing.assert_array_equal(from_dark, load_model_input(light_on_dark, MNIST_SHAPE))


def test_right_size_image_is_only_inverted_when_needed():
    rng = np.random.default_rng(0)
    light_on_dark = rng.integers(0, 60, size=MNIST_SHAPE, dtype=np.uint8)
    light_on_dark[6:22, 12:16] = rng.integers(180, 256, size=(16, 4), dtype=np.uint8)

    np.testing.assert_array_equal(prepare_grey_image(light_on_dark, MNIST_SHAPE), light_on_dark)
    np.testing.assert_array_equal(prepare_grey_image(255 - light_on_dark, MNIST_SHAPE), light_on_dark)


def test_trailing_channel_axis_in_image_shape_is_kept():
    grey = np.zeros((50, 50), dtype=np.uint8)
    grey[10:40, 20:30] = 255

    assert prepare_grey_image(grey, (28, 28, 1)).shape == (28, 28, 1)


# --- reading: MNIST-style cropping, scaling and centring -----------------------------------------


def test_large_off_centre_digit_is_fitted_in_the_box_and_centred_by_mass():
    grey = np.zeros((120, 100), dtype=np.uint8)
    grey[5:85, 4:40] = 255  # a tall block in the top-left corner ...
    grey[5:20, 40:70] = 255  # ... with an arm, so its mass is off its box's centre

    model_input = prepare_grey_image(grey, MNIST_SHAPE)

    assert model_input.shape == MNIST_SHAPE
    box_height, box_width = ink_box_size(model_input)
    assert box_height == 20 and box_width <= 20
    mass_row, mass_column = centre_of_mass(model_input)
    assert abs(mass_row - 13.5) <= 0.5 and abs(mass_column - 13.5) <= 0.5
    assert abs(mass_row - 14) <= 1 and abs(mass_column - 14) <= 1


@pytest.mark.parametrize(
    ("bar_rows", "bar_columns", "long_axis"),
    [(slice(10, 70), slice(45, 55), 0), (slice(45, 55), slice(10, 70), 1)],
)
def test_aspect_ratio_is_kept(bar_rows, bar_columns, long_axis):
    grey = np.zeros((100, 100), dtype=np.uint8)
    grey[bar_rows, bar_columns] = 255

    box = ink_box_size(prepare_grey_image(grey, MNIST_SHAPE))

    assert box[long_axis] == 20
    assert 2 <= box[1 - long_axis] <= 4  # 10/60 of 20 is 3.3


def test_small_digit_is_scaled_up_to_the_box():
    grey = np.zeros((100, 100), dtype=np.uint8)
    grey[50:58, 50:54] = 255

    assert ink_box_size(prepare_grey_image(grey, MNIST_SHAPE)) == (20, 10)


def test_faint_noise_does_not_widen_the_ink_box():
    grey = np.zeros((100, 100), dtype=np.uint8)
    grey[30:70, 40:60] = 255
    noisy = grey.copy()
    noisy[2, 2] = noisy[97, 95] = 30

    np.testing.assert_array_equal(prepare_grey_image(noisy, MNIST_SHAPE), prepare_grey_image(grey, MNIST_SHAPE))


@pytest.mark.parametrize("level", [0, 255, 90])
def test_blank_image_gives_all_zeros(level):
    model_input = prepare_grey_image(np.full((50, 40), level, dtype=np.uint8), MNIST_SHAPE)

    np.testing.assert_array_equal(model_input, np.zeros(MNIST_SHAPE, dtype=np.uint8))


# --- reading: file formats ------------------------------------------------------------------------


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    levels = np.full(MNIST_SHAPE, 10_000, dtype=np.uint16)
    levels[5:23, 12:16] = 60_000
    path = tmp_path / "deep.png"
    Image.fromarray(levels).save(path)
    assert stored_mode_and_frames(path)[0].startswith("I")

    model_input = load_model_input(path, MNIST_SHAPE)

    expected = np.where(levels == 60_000, round(60_000 / 257), round(10_000 / 257)).astype(np.uint8)
    np.testing.assert_array_equal(model_input, expected)


def test_sixteen_bit_transparent_level_is_white_paper(tmp_path):
    levels = np.full(MNIST_SHAPE, 1_000, dtype=np.uint16)
    levels[5:23, 12:16] = 60_000
    path = tmp_path / "deep_transparent.png"
    Image.fromarray(levels).save(path, transparency=1_000)

    model_input = load_model_input(path, MNIST_SHAPE)

    # The background reads as white paper, so the picture is inverted: 60000 -> 233 -> 22.
    expected = np.where(levels == 60_000, 255 - round(60_000 / 257), 0).astype(np.uint8)
    np.testing.assert_array_equal(model_input, expected)


def test_palette_png_loads_like_its_grey_twin(tmp_path):
    palette_picture = Image.fromarray((gamma_digit() == 0).astype(np.uint8)).convert("P")
    palette_picture.putpalette([255, 255, 255, 0, 0, 0])  # 0 is paper, 1 is ink
    palette_picture.save(tmp_path / "palette.png")
    assert stored_mode_and_frames(tmp_path / "palette.png")[0] == "P"

    model_input = load_model_input(tmp_path / "palette.png", MNIST_SHAPE)

    grey_twin = save_grey(tmp_path / "grey.png", gamma_digit())
    np.testing.assert_array_equal(model_input, load_model_input(grey_twin, MNIST_SHAPE))


def test_cmyk_jpeg_loads_like_its_grey_twin(tmp_path):
    cmyk = np.zeros((*gamma_digit().shape, 4), dtype=np.uint8)
    cmyk[..., 3] = 255 - gamma_digit()  # black ink on the K plate, nothing elsewhere
    Image.frombytes("CMYK", cmyk.shape[1::-1], cmyk.tobytes()).save(tmp_path / "cmyk.jpg", quality=95)
    assert stored_mode_and_frames(tmp_path / "cmyk.jpg")[0] == "CMYK"

    model_input = load_model_input(tmp_path / "cmyk.jpg", MNIST_SHAPE)

    assert_light_digit_on_black(model_input)
    grey_twin = load_model_input(save_grey(tmp_path / "grey.png", gamma_digit()), MNIST_SHAPE)
    assert np.abs(model_input.astype(int) - grey_twin).mean() < 4


def test_animated_gif_uses_its_first_frame(tmp_path):
    first_frame = Image.fromarray(gamma_digit())
    second_frame = Image.fromarray(255 - gamma_digit()[::-1, ::-1].copy())
    path = tmp_path / "animated.gif"
    first_frame.save(path, save_all=True, append_images=[second_frame], duration=100)
    assert stored_mode_and_frames(path)[1] == 2

    model_input = load_model_input(path, MNIST_SHAPE)

    grey_twin = save_grey(tmp_path / "first.png", gamma_digit())
    np.testing.assert_array_equal(model_input, load_model_input(grey_twin, MNIST_SHAPE))


# --- reading: errors ------------------------------------------------------------------------------


def truncated_png(path):
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BAD_FILES = {
    "missing": (lambda path: None, "does not exist"),
    "directory": (lambda path: path.mkdir(), "is a directory"),
    "empty": (lambda path: path.write_bytes(b""), "is empty"),
    "random bytes": (lambda path: path.write_bytes(b"\x13\x37" * 250), "not an image Pillow can read"),
    "truncated png": (truncated_png, "could not be decoded"),
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_unreadable_input_raises_image_error_naming_the_file(tmp_path, kind):
    path = tmp_path / "input.png"
    make_bad_file, problem = BAD_FILES[kind]
    make_bad_file(path)

    with pytest.raises(ImageError, match=problem) as raised:
        load_model_input(path, MNIST_SHAPE)

    message = str(raised.value)
    assert str(path) in message and "\n" not in message


def test_not_an_image_message_says_what_to_give(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not a picture at all")

    with pytest.raises(ImageError, match=r"not an image Pillow can read.*give a PNG or JPEG"):
        load_model_input(path, MNIST_SHAPE)


@pytest.mark.parametrize("side", [12, 30])  # 144 pixels only warns; 900 is over twice the limit
def test_decompression_bomb_is_an_image_error(tmp_path, monkeypatch, side):
    path = save_grey(tmp_path / "bomb.png", np.zeros((side, side), dtype=np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)

    # Even where the warning itself is ignored, the image must be refused.
    with warnings.catch_warnings(), pytest.raises(ImageError, match="too large"):
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        load_model_input(path, MNIST_SHAPE)


# --- figures --------------------------------------------------------------------------------------


def tile_at(grid: np.ndarray, row: int, column: int, tile_shape=MNIST_SHAPE, padding: int = 2) -> np.ndarray:
    top = padding + row * (tile_shape[0] + padding)
    left = padding + column * (tile_shape[1] + padding)
    return grid[top : top + tile_shape[0], left : left + tile_shape[1]]


def test_grid_of_64_is_eight_by_eight():
    grid = make_grid(np.zeros((64, 28, 28)))

    assert grid.shape == (8 * 28 + 9 * 2, 8 * 28 + 9 * 2)
    assert grid.dtype == np.uint8


def test_grid_places_clipped_tiles_in_row_order_with_grey_padding():
    levels = np.array([0.0, 0.2, 1.0, 1.5, -0.3])
    tiles = np.ones((5, 28, 28)) * levels[:, None, None]

    grid = make_grid(tiles)

    assert grid.shape == (2 * 28 + 3 * 2, 3 * 28 + 4 * 2)  # 3 columns by default, 2 rows
    for index, expected in enumerate([0, 51, 255, 255, 0]):
        assert (tile_at(grid, index // 3, index % 3) == expected).all(), index
    assert 64 <= grid[0, 0] <= 192, "padding should be mid-grey, apart from black tile backgrounds"
    assert (tile_at(grid, 1, 2) == images.PADDING_GREY).all(), "the empty cell keeps the padding colour"
    assert (grid[:2, :] == images.PADDING_GREY).all() and (grid[:, 30:32] == images.PADDING_GREY).all()


def test_grid_with_explicit_columns_and_no_padding():
    grid = make_grid(np.ones((6, 4, 5)), columns=6, padding=0)

    np.testing.assert_array_equal(grid, np.full((4, 30), 255, dtype=np.uint8))


def test_reconstruction_figure_sets_the_input_column_apart():
    inputs = np.full((3, 28, 28), 1.0)
    reconstructions = np.full((3, 4, 28, 28), 0.2)

    figure = reconstruction_figure(inputs, reconstructions, padding=2)

    assert figure.shape == (3 * 28 + 4 * 2, 5 * 28 + 2 + 3 * 2 + 3 * 2 + 2)
    first_reconstruction_left = 2 + 28 + 3 * 2
    assert (figure[2:30, 2:30] == 255).all()
    assert (figure[2:30, 30:first_reconstruction_left] == images.PADDING_GREY).all()
    assert (figure[2:30, first_reconstruction_left : first_reconstruction_left + 28] == 51).all()


def test_reconstruction_figure_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="do not match"):
        reconstruction_figure(np.zeros((3, 28, 28)), np.zeros((2, 4, 28, 28)))


# --- writing --------------------------------------------------------------------------------------


def test_save_png_round_trips_and_is_byte_identical(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, size=(30, 20), dtype=np.uint8)

    first = save_png(tmp_path / "first.png", pixels)
    second = save_png(tmp_path / "second.png", pixels.copy())

    with Image.open(first) as written:
        assert written.mode == "L"
        np.testing.assert_array_equal(np.asarray(written), pixels)
    assert first.read_bytes() == second.read_bytes()


def test_save_png_creates_missing_directories(tmp_path):
    path = tmp_path / "runs" / "figures" / "grid.png"

    assert save_png(path, np.zeros((4, 4), dtype=np.uint8)) == path
    assert path.is_file()


def test_failed_png_write_leaves_no_temporary_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = save_png(tmp_path / "grid.png", np.zeros((4, 4), dtype=np.uint8))
    old_bytes = path.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    with pytest.raises(OutputError, match="No space left"):
        save_png(path, np.full((4, 4), 255, dtype=np.uint8))

    assert [entry.name for entry in tmp_path.iterdir()] == ["grid.png"]
    assert path.read_bytes() == old_bytes


def test_save_png_rejects_float_pixels(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        save_png(tmp_path / "grid.png", np.zeros((4, 4)))
    assert list(tmp_path.iterdir()) == []


def test_save_npz_round_trips_at_the_exact_path(tmp_path):
    path = tmp_path / "out" / "latents"
    means = np.arange(6, dtype=np.float32).reshape(2, 3)

    assert save_npz(path, means=means, labels=np.array([3, 7])) == path

    with np.load(path) as loaded:
        np.testing.assert_array_equal(loaded["means"], means)
        np.testing.assert_array_equal(loaded["labels"], [3, 7])


def test_failed_npz_write_leaves_no_temporary_file(tmp_path):
    unpicklable = np.array([(value for value in range(3))], dtype=object)

    with pytest.raises(ValueError, match="pickle"):
        save_npz(tmp_path / "latents.npz", broken=unpicklable)

    assert list(tmp_path.iterdir()) == []


# --- colour figures and PNGs ----------------------------------------------------------------------


def test_colour_grid_keeps_the_channels_and_pads_in_mid_grey():
    tiles = np.zeros((5, 6, 4, 3))
    tiles[..., 0] = 1.0  # pure red tiles

    grid = make_grid(tiles, padding=2)

    assert grid.shape == (2 * 6 + 3 * 2, 3 * 4 + 4 * 2, 3) and grid.dtype == np.uint8
    np.testing.assert_array_equal(tile_at(grid, 0, 1, tile_shape=(6, 4))[0, 0], [255, 0, 0])
    assert (grid[:2] == images.PADDING_GREY).all(), "padding is mid-grey in every channel"
    assert (tile_at(grid, 1, 2, tile_shape=(6, 4)) == images.PADDING_GREY).all(), "the empty cell too"


def test_colour_reconstruction_figure_has_rgb_gap_and_rows():
    inputs = np.full((2, 5, 5, 3), 1.0)
    reconstructions = np.full((2, 3, 5, 5, 3), 0.2)

    figure = reconstruction_figure(inputs, reconstructions, padding=1)

    assert figure.shape == (2 * 5 + 3 * 1, (5 + 2 * 1) + 1 + (3 * 5 + 4 * 1), 3)
    assert (figure[1:6, 6:9] == images.PADDING_GREY).all()
    assert (figure[1:6, 9:14] == 51).all()


def test_grid_rejects_a_channel_axis_that_is_neither_one_nor_three():
    with pytest.raises(ValueError, match="1 or 3 channels"):
        make_grid(np.zeros((2, 4, 4, 2)))


def test_save_png_round_trips_rgb(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, size=(9, 7, 3), dtype=np.uint8)

    path = save_png(tmp_path / "colour.png", pixels)

    with Image.open(path) as written:
        assert written.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(written), pixels)
    assert save_png(tmp_path / "again.png", pixels.copy()).read_bytes() == path.read_bytes()


def test_save_png_rejects_four_channels(tmp_path):
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        save_png(tmp_path / "rgba.png", np.zeros((4, 4, 4), dtype=np.uint8))


# --- reading photos: scale the shorter side, crop the centre --------------------------------------

RED, BLUE = (255, 0, 0), (0, 0, 255)


def banded_picture(width: int, height: int) -> np.ndarray:
    """Blue, with a red band over the middle third of the longer side."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[...] = BLUE
    if width >= height:
        pixels[:, width // 3 : 2 * width // 3] = RED
    else:
        pixels[height // 3 : 2 * height // 3, :] = RED
    return pixels


@pytest.mark.parametrize(("width", "height"), [(300, 100), (100, 300)])
def test_photo_input_keeps_the_centre_of_a_wide_or_tall_picture(tmp_path, width, height):
    path = tmp_path / "banded.png"
    Image.fromarray(banded_picture(width, height)).save(path)

    photo = load_photo_input(path, 16, channels=3)

    assert photo.shape == (16, 16, 3) and photo.dtype == np.uint8
    # The centre square is exactly the red band; resampling may tint only the outermost pixels.
    inner = photo[1:-1, 1:-1].astype(int)
    assert (inner[..., 0] > 240).all() and (inner[..., 2] < 15).all()


def test_photo_input_is_grey_or_rgb_as_asked_and_never_inverted(tmp_path):
    path = tmp_path / "dot.png"
    pixels = np.full((40, 40, 3), 255, dtype=np.uint8)
    pixels[12:28, 12:28] = RED
    Image.fromarray(pixels).save(path)

    grey = load_photo_input(path, 20, channels=1)
    colour = load_photo_input(path, 20, channels=3)

    assert grey.shape == (20, 20) and colour.shape == (20, 20, 3)
    assert grey[0, 0] == 255 and (colour[0, 0] == 255).all(), "white paper stays white: no inversion"
    assert abs(int(grey[10, 10]) - 76) <= 4, "red is grey 76 by ITU-R 601-2 luma"
    assert colour[10, 10, 0] > 200 and colour[10, 10, 1] < 60


def test_photo_input_is_not_cropped_to_its_content(tmp_path):
    path = tmp_path / "corner.png"
    pixels = np.zeros((32, 32), dtype=np.uint8)
    pixels[:4, :4] = 255  # a small bright square in the top-left corner
    Image.fromarray(pixels).save(path)

    photo = load_photo_input(path, 16, channels=1)

    assert photo[:2, :2].min() > 200 and photo[8:, 8:].max() == 0


@pytest.mark.parametrize(("channels", "white"), [(1, 255), (3, [255, 255, 255])])
def test_photo_transparency_is_white(tmp_path, channels, white):
    pixels = np.zeros((20, 30, 4), dtype=np.uint8)  # transparent black everywhere ...
    pixels[8:12, 13:17] = (0, 0, 255, 255)  # ... but an opaque blue square in the middle
    path = tmp_path / "transparent.png"
    Image.fromarray(pixels).save(path)

    photo = load_photo_input(path, 10, channels=channels)

    np.testing.assert_array_equal(photo[0, 0], white)
    assert photo[5, 5].min() < 100 if channels == 1 else photo[5, 5, 0] < 100


def test_tiny_picture_is_scaled_up(tmp_path):
    path = tmp_path / "tiny.png"
    Image.fromarray(np.full((7, 5, 3), (10, 200, 30), dtype=np.uint8)).save(path)

    photo = load_photo_input(path, 16, channels=3)

    assert photo.shape == (16, 16, 3)
    assert np.abs(photo.astype(int) - [10, 200, 30]).max() <= 1


def test_sixteen_bit_picture_reads_as_rgb(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 60_000, dtype=np.uint16)).save(path)

    photo = load_photo_input(path, 4, channels=3)

    np.testing.assert_array_equal(photo, np.full((4, 4, 3), round(60_000 / 257), dtype=np.uint8))


def test_photo_exif_rotation_matches_the_pre_rotated_picture(tmp_path):
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = 6
    Image.fromarray(banded_picture(60, 20)).save(tmp_path / "tagged.png", exif=exif)
    Image.fromarray(banded_picture(60, 20)).transpose(Image.Transpose.ROTATE_270).save(tmp_path / "upright.png")

    tagged = load_photo_input(tmp_path / "tagged.png", 8, channels=3)

    np.testing.assert_array_equal(tagged, load_photo_input(tmp_path / "upright.png", 8, channels=3))


def test_large_jpeg_read_at_reduced_scale_matches_full_decode(tmp_path):
    rows, columns = np.indices((600, 800))
    pixels = np.stack([columns * 255 // 800, rows * 255 // 600, np.full_like(rows, 90)], axis=-1).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "big.jpg", quality=95)
    Image.fromarray(pixels).save(tmp_path / "big.png")

    from_jpeg = load_photo_input(tmp_path / "big.jpg", 32, channels=3)

    assert np.abs(from_jpeg.astype(int) - load_photo_input(tmp_path / "big.png", 32, channels=3)).mean() < 3


def test_unreadable_photo_raises_image_error_naming_the_file(tmp_path):
    path = tmp_path / "junk.jpg"
    path.write_bytes(b"\x13\x37" * 100)

    with pytest.raises(ImageError, match="not an image Pillow can read") as raised:
        load_photo_input(path, 16, channels=3)
    assert str(path) in str(raised.value)


# --- choosing the rule ------------------------------------------------------------------------------


def test_dispatcher_picks_the_rule_and_keeps_the_shape(tmp_path):
    path = tmp_path / "banded.png"
    Image.fromarray(banded_picture(60, 40)).save(path)

    np.testing.assert_array_equal(load_input_for_model(path, MNIST_SHAPE, "digit"), load_model_input(path, MNIST_SHAPE))
    np.testing.assert_array_equal(
        load_input_for_model(path, (16, 16, 3), "resize_crop"), load_photo_input(path, 16, channels=3)
    )
    np.testing.assert_array_equal(
        load_input_for_model(path, (16, 16), "resize_crop"), load_photo_input(path, 16, channels=1)
    )
    assert load_input_for_model(path, (16, 16, 1), "resize_crop").shape == (16, 16, 1)


@pytest.mark.parametrize(
    ("image_shape", "preprocessing", "problem"),
    [
        ((16, 16), "sharpen", "unknown preprocessing"),
        ((16, 12), "resize_crop", "must be"),
        ((8, 8, 4), "resize_crop", "must be"),
    ],
)
def test_dispatcher_rejects_unknown_rules_and_shapes(tmp_path, image_shape, preprocessing, problem):
    path = save_grey(tmp_path / "digit.png", gamma_digit())

    with pytest.raises(ValueError, match=problem):
        load_input_for_model(path, image_shape, preprocessing)
