"""Pillow/NumPy only: read a user's image into model input, tile images into grids, write PNG and NPZ.

Two rules turn a picture into model input (a dataset names its rule in `Dataset.preprocessing`):
- "digit": MNIST's — grey, light ink on black, the ink cropped, fitted in a box and centred by mass; a
  photographed page first has its paper (level and lighting) taken to black and its ink stretched to 255.
- "resize_crop": for photos — grey or RGB, the shorter side scaled to the model's size, then the
  centre cropped square; colours are kept as they are and nothing is cropped to content.

Nothing here imports JAX, so reading and writing pictures stays fast and testable on its own.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vaecli.common.errors import ImageError
from vaecli.common.files import write_atomically

# MNIST digits were scaled to fit a 20x20 box, then centred by mass in a 28x28 field.
MNIST_DIGIT_BOX_FRACTION = 20 / 28

# Ink is anything brighter than this fraction of the way from background to the brightest pixel,
# so faint noise or JPEG ringing far from the digit does not widen its bounding box.
INK_FRACTION = 0.2

# Mid-grey separates tiles whose own background is black.
PADDING_GREY = 128

# Gap between a reconstruction figure's input column and its reconstructions, in paddings.
INPUT_GAP_PADDINGS = 3

# Greyscale modes with more than 8 bits; Pillow's own convert("L") clips them instead of scaling.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa")

# Pillow's format plugins report a malformed file with any of these.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)

_GIVE_AN_IMAGE = "give a PNG or JPEG"

PREPROCESSING_RULES = ("digit", "resize_crop")

# Pillow first shrinks a big picture by a whole factor (box averaging) while it stays at least this many
# times the target size, then resamples the rest with LANCZOS: far faster, and per Pillow's docs
# indistinguishable from a full LANCZOS pass at 3.
REDUCING_GAP = 3.0


# --- reading a user's image ---------------------------------------------------------------------


def load_input_for_model(path: Path, image_shape: tuple[int, ...], preprocessing: str) -> np.ndarray:
    """Read `path` into uint8 model input of `image_shape` by the dataset's rule, "digit" or "resize_crop"."""
    if preprocessing == "digit":
        return load_model_input(path, image_shape)
    if preprocessing == "resize_crop":
        image_size, channels = _square_size_and_channels(image_shape)
        return load_photo_input(path, image_size, channels).reshape(image_shape)
    raise ValueError(f"unknown preprocessing {preprocessing!r}; expected one of {', '.join(PREPROCESSING_RULES)}")


def load_model_input(path: Path, image_shape: tuple[int, ...]) -> np.ndarray:
    """Read any image Pillow can open into a uint8 array of `image_shape`: light ink on black, like MNIST.

    A picture with no ink (a blank or photographed empty sheet) is refused: an all-black input would be
    read by the model as some digit, and the user would not know why.
    """
    path = Path(path)
    model_input = prepare_grey_image(_flatten(_read_upright_picture(path), path, "L"), image_shape)
    if not model_input.any():
        raise ImageError(
            f"no ink found in {path} (it looks like blank paper); give a picture with a digit on it, "
            "written darker if it is faint"
        )
    return model_input


def load_photo_input(path: Path, image_size: int, channels: int) -> np.ndarray:
    """Read any image into uint8 [S, S] (channels 1) or [S, S, 3] (channels 3): the shorter side scaled
    to S = `image_size`, then the centre cropped; transparency shows as white."""
    if image_size < 1 or channels not in (1, 3):
        raise ValueError(f"need image_size >= 1 and channels 1 or 3, got {image_size} and {channels}")
    path = Path(path)
    picture = _read_upright_picture(path, draft_size=image_size)
    flat = _flatten(picture, path, "L" if channels == 1 else "RGB")
    return resize_and_centre_crop(flat, image_size)


def resize_and_centre_crop(pixels: np.ndarray, image_size: int) -> np.ndarray:
    """Scale uint8 [h, w] or [h, w, 3] `pixels` so the shorter side is `image_size`, keep the centre square."""
    height, width = pixels.shape[:2]
    side = min(height, width)
    # Resampling only the centre square straight to S x S is the same as scaling then cropping,
    # without rounding the intermediate size; the box may sit on half pixels.
    centre_square = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
    resized = Image.fromarray(pixels).resize(
        (image_size, image_size), Image.Resampling.LANCZOS, box=centre_square, reducing_gap=REDUCING_GAP
    )
    return np.asarray(resized, dtype=np.uint8)


def _square_size_and_channels(image_shape: tuple[int, ...]) -> tuple[int, int]:
    """(S, channels) of a square model input shape given as (S, S), (S, S, 1) or (S, S, 3)."""
    is_square = len(image_shape) in (2, 3) and image_shape[0] == image_shape[1]
    if not is_square or (len(image_shape) == 3 and image_shape[2] not in (1, 3)):
        raise ValueError(f"image_shape must be (S, S), (S, S, 1) or (S, S, 3) for resize_crop, got {image_shape}")
    return int(image_shape[0]), 3 if len(image_shape) == 3 and image_shape[2] == 3 else 1


def _read_upright_picture(path: Path, draft_size: int | None = None) -> Image.Image:
    """Open `path` (first frame only), decode it fully and turn it upright per its EXIF orientation.

    With `draft_size`, a JPEG may be decoded at a reduced scale that keeps both sides >= draft_size.
    """
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit; refuse those files too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Pillow warns about damage it reads past (e.g. "Corrupt EXIF data"): the file is then either
            # decoded or refused below with one ImageError, so its warning would only be stray stderr lines.
            warnings.simplefilter("ignore", UserWarning)
            with Image.open(path) as opened:
                if draft_size is not None:
                    # JPEG only (others ignore it): decoding a big photo at 1/2..1/8 scale is far faster.
                    opened.draft(None, (draft_size, draft_size))
                # exif_transpose always returns a decoded, independent copy, so closing is safe.
                return ImageOps.exif_transpose(opened)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(f"{path} is too large to read safely ({error}); give a smaller image") from error
    except (FileNotFoundError, NotADirectoryError) as error:
        raise ImageError(f"{path} does not exist; check the path") from error
    except IsADirectoryError as error:
        raise ImageError(f"{path} is a directory, not an image; {_GIVE_AN_IMAGE}") from error
    except PermissionError as error:
        raise ImageError(f"cannot read {path}: permission denied") from error
    except UnidentifiedImageError as error:
        if path.is_file() and path.stat().st_size == 0:
            raise ImageError(f"{path} is empty (0 bytes); {_GIVE_AN_IMAGE}") from error
        message = f"{path} is not an image Pillow can read (cannot identify image file); {_GIVE_AN_IMAGE}"
        raise ImageError(message) from error
    except _DECODE_ERRORS as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ImageError(f"{path} could not be decoded ({reason}); save or export it again") from error


def _flatten(picture: Image.Image, path: Path, mode: str) -> np.ndarray:
    """`picture` as 8-bit grey [h, w] (mode "L") or RGB [h, w, 3] (mode "RGB"), transparent parts as white paper."""
    if picture.mode in _SIXTEEN_BIT_MODES:
        grey = _sixteen_bit_to_grey(picture)
        return grey if mode == "L" else np.repeat(grey[..., None], 3, axis=2)
    if picture.mode in _ALPHA_MODES or "transparency" in picture.info:
        picture = _composite_on_white(picture)
    try:
        return np.asarray(picture.convert(mode), dtype=np.uint8)
    except ValueError as error:
        target = "grey" if mode == "L" else "RGB"
        raise ImageError(f"{path} uses colour mode {picture.mode}, which cannot be made {target}") from error


def _sixteen_bit_to_grey(picture: Image.Image) -> np.ndarray:
    """Scale a 16-bit greyscale picture to 0..255 (65535 -> 255), with its transparent value as white."""
    levels = np.asarray(picture).astype(np.float64)
    grey = np.rint(np.clip(levels / 257.0, 0, 255)).astype(np.uint8)
    transparent_level = picture.info.get("transparency")
    if isinstance(transparent_level, int):
        grey[levels == transparent_level] = 255
    return grey


def _composite_on_white(picture: Image.Image) -> Image.Image:
    """Lay `picture` over white: a transparent background means paper, not black ink."""
    white = Image.new("RGBA", picture.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, picture.convert("RGBA"))


# --- MNIST-style preprocessing ------------------------------------------------------------------


def prepare_grey_image(grey: np.ndarray, image_shape: tuple[int, ...]) -> np.ndarray:
    """Turn a uint8 grey picture into MNIST-style model input of `image_shape`: light ink on black.

    A picture already at that size is only inverted when its border is light. Any other picture has its
    paper taken out (level and lighting gradient to black, ink stretched to full range), then the ink is
    cropped, fitted in the digit box and centred by its mass.
    """
    height, width = _target_height_width(image_shape)
    grey = _checked_grey(grey)
    if grey.shape == (height, width):
        return _light_ink_on_dark(grey).reshape(image_shape)
    ink = ink_on_black(grey)
    ink_box = _ink_bounding_box(ink)
    if ink_box is None:
        return np.zeros(image_shape, dtype=np.uint8)
    top, bottom, left, right = ink_box
    digit = _fit_inside(ink[top:bottom, left:right], _digit_box_size(height, width))
    return _paste_centred_by_mass(digit, height, width).reshape(image_shape)


def _target_height_width(image_shape: tuple[int, ...]) -> tuple[int, int]:
    """(H, W) of a model input shape given as (H, W) or (H, W, 1)."""
    if len(image_shape) == 2 or (len(image_shape) == 3 and image_shape[2] == 1):
        return int(image_shape[0]), int(image_shape[1])
    raise ValueError(f"image_shape must be (height, width) or (height, width, 1), got {image_shape}")


def _checked_grey(grey: np.ndarray) -> np.ndarray:
    """`grey` as an array, refused unless it is a non-empty uint8 [h, w] picture."""
    grey = np.asarray(grey)
    if grey.dtype != np.uint8 or grey.ndim != 2 or grey.size == 0:
        raise ValueError(f"expected a non-empty uint8 [h, w] grey image, got {grey.dtype} {grey.shape}")
    return grey


def _light_ink_on_dark(grey: np.ndarray) -> np.ndarray:
    """Invert a picture whose border (its background) is mostly light, such as ink on paper."""
    if np.median(_border_pixels(grey)) > 127:
        return 255 - grey
    return grey.copy()  # so the result never aliases the caller's array


def _border_pixels(grey: np.ndarray) -> np.ndarray:
    """The outermost ring of pixels, where the background shows in a picture of one digit."""
    return np.concatenate([grey[0, :], grey[-1, :], grey[:, 0], grey[:, -1]])


# --- taking the paper out of a photographed digit ----------------------------------------------

# The paper's lighting is modelled as a 2-D polynomial of this degree: 1 fits a tilted light (a plane),
# 2 also fits the fall-off towards a photo's corners; higher degrees would start to bend round the digit.
PAPER_SURFACE_DEGREE = 2

# The paper is fitted to at most about this many pixels (a regular subsample): a smooth surface with
# six coefficients needs far fewer, and a 12-megapixel phone photo stays quick.
PAPER_FIT_PIXELS = 16_384

# Rounds of fitting the surface and re-choosing which pixels are paper; the ink drops out of the fit in
# the first round or two, so later rounds change nothing visible.
PAPER_FIT_ROUNDS = 4

# A pixel further than this many robust sigmas from the fitted surface is not paper (ink, a speck, a
# shadow's edge); 3 keeps 99.7% of the paper's own noise in the fit.
PAPER_SIGMAS = 3.0

# Ink must rise this many robust sigmas above the paper's noise; below that it is grain or JPEG noise.
# Gaussian noise passes it once in ~30,000 pixels, and those few are faint and far below INK_FRACTION.
NOISE_SIGMAS = 4.0

# Strokes whose level is under this many sigmas are no digit but a noise peak on blank paper: the grain
# of blank photographed pages (grain 0.5-8 levels, JPEG quality 40-95) peaks below 7, while pencil on a
# grainy photo stands out by ~25 and even ink only 15 levels darker than the paper by ~10.
CLEAR_INK_SIGMAS = 8.0

# This percentile of the ink becomes 255: in MNIST itself over a third of the ink pixels are 250 or
# more, so the strong part of a stroke is saturated, and a clean black-on-white digit keeps its levels
# (its soft edges to within the noise floor, two levels).
STROKE_PERCENTILE = 90.0

# The least noise a paper is taken to have, in grey levels. Whole-number levels carry rounding noise of
# about 0.3 by themselves; paper that measures less (drawn on a computer, or lit to a clipped 255) would
# otherwise make every level of JPEG ringing or lighting misfit count as ink, and a blank page a digit.
MIN_PAPER_SIGMA = 0.5

# MAD times this is the standard deviation for Gaussian noise; the MAD ignores the ink a mean would see.
MAD_TO_SIGMA = 1.4826


def ink_on_black(grey: np.ndarray) -> np.ndarray:
    """Uint8 light ink on black from uint8 [h, w] `grey`, ink on paper of either polarity, however lit:
    the paper (level and smooth lighting) maps to 0, its noise is suppressed, strong strokes reach 255.

    All zeros when no ink stands out from the paper's noise (a blank sheet).
    """
    # Single precision: grey levels need no more, and a phone photo has 12 million of them.
    levels = _checked_grey(grey).astype(np.float32)
    paper, paper_sigma = _fit_paper(levels)
    # Whole grey levels: the picture has no finer ones, and flat paper then leaves a residual of exactly 0.
    residual = np.rint(levels - paper)
    noise_floor = NOISE_SIGMAS * paper_sigma
    if _ink_is_darker_than_paper(residual, noise_floor):
        residual = -residual
    above_noise = np.maximum(residual - noise_floor, 0.0)
    return _stretch_strokes(above_noise, noise_floor, paper_sigma)


def _fit_paper(levels: np.ndarray) -> tuple[np.ndarray, float]:
    """The paper's smooth surface under float32 [h, w] `levels`, and the paper's noise around it (a robust
    sigma, at least MIN_PAPER_SIGMA)."""
    stride = max(1, math.ceil(math.sqrt(levels.size / PAPER_FIT_PIXELS)))
    sampled = levels[::stride, ::stride].astype(np.float64)
    row_terms = _polynomial_axis(levels.shape[0])[::stride]
    column_terms = _polynomial_axis(levels.shape[1])[::stride]
    # The border is where the paper shows in a picture of one digit: the first guess of its level and spread.
    border = _border_pixels(levels)
    coefficients = _flat_surface(float(np.median(border)))
    sigma = max(_robust_sigma(border), MIN_PAPER_SIGMA)
    for _ in range(PAPER_FIT_ROUNDS):
        residual = sampled - _evaluate_surface(coefficients, row_terms, column_terms)
        is_paper = np.abs(residual) <= PAPER_SIGMAS * sigma
        coefficients = _fit_surface(sampled, is_paper, row_terms, column_terms)
        paper_residual = (sampled - _evaluate_surface(coefficients, row_terms, column_terms))[is_paper]
        sigma = max(_robust_sigma(paper_residual), MIN_PAPER_SIGMA)
    row_terms, column_terms = (_polynomial_axis(length).astype(np.float32) for length in levels.shape)
    return _evaluate_surface(coefficients.astype(np.float32), row_terms, column_terms), sigma


def _polynomial_axis(length: int) -> np.ndarray:
    """Powers 0..PAPER_SURFACE_DEGREE of a coordinate running -1..1 along an axis of `length`: [length, degree + 1]."""
    half_span = max((length - 1) / 2, 1.0)  # a one-pixel axis is all 0, not a division by zero
    coordinate = (np.arange(length) - (length - 1) / 2) / half_span
    return coordinate[:, None] ** np.arange(PAPER_SURFACE_DEGREE + 1)


def _surface_powers() -> list[tuple[int, int]]:
    """(row power, column power) of each term of a 2-D polynomial of total degree PAPER_SURFACE_DEGREE."""
    return [
        (row_power, total - row_power) for total in range(PAPER_SURFACE_DEGREE + 1) for row_power in range(total + 1)
    ]


def _fit_surface(
    levels: np.ndarray, is_paper: np.ndarray, row_terms: np.ndarray, column_terms: np.ndarray
) -> np.ndarray:
    """Least-squares coefficients of the 2-D polynomial through the paper pixels of `levels`.

    Too few paper pixels to pin the surface down give a flat one at their median (or the picture's): with
    under two pixels per coefficient a tiny picture's surface would pass through its ink.
    """
    powers = _surface_powers()
    rows, columns = np.nonzero(is_paper)
    if rows.size < 2 * len(powers):
        return _flat_surface(float(np.median(levels[is_paper] if rows.size else levels)))
    design = np.stack([row_terms[rows, row] * column_terms[columns, column] for row, column in powers], axis=1)
    coefficients, *_ = np.linalg.lstsq(design, levels[rows, columns], rcond=None)
    return coefficients


def _flat_surface(level: float) -> np.ndarray:
    """Coefficients of the surface that is `level` everywhere."""
    coefficients = np.zeros(len(_surface_powers()))
    coefficients[0] = level  # the first term is row**0 * column**0
    return coefficients


def _evaluate_surface(coefficients: np.ndarray, row_terms: np.ndarray, column_terms: np.ndarray) -> np.ndarray:
    """The 2-D polynomial on the grid of `row_terms` x `column_terms`, as one matrix product."""
    coefficient_matrix = np.zeros((PAPER_SURFACE_DEGREE + 1, PAPER_SURFACE_DEGREE + 1), dtype=coefficients.dtype)
    for coefficient, (row, column) in zip(coefficients, _surface_powers(), strict=True):
        coefficient_matrix[row, column] = coefficient
    return row_terms @ coefficient_matrix @ column_terms.T


def _robust_sigma(values: np.ndarray) -> float:
    """The noise's standard deviation estimated from the median absolute deviation; 0 for no values."""
    if values.size == 0:
        return 0.0
    return float(MAD_TO_SIGMA * np.median(np.abs(values - np.median(values))))


def _ink_is_darker_than_paper(residual: np.ndarray, noise_floor: float) -> bool:
    """Whether more ink lies below the paper than above it, summed past the noise floor.

    The paper's noise is symmetric and cancels out; the digit tips the balance, and a whole stroke
    outweighs a speck of glare or dust.
    """
    beyond_noise = residual[np.abs(residual) > noise_floor].astype(np.float64)
    darker = np.maximum(-beyond_noise - noise_floor, 0.0).sum()
    lighter = np.maximum(beyond_noise - noise_floor, 0.0).sum()
    return bool(darker > lighter)


def _stretch_strokes(above_noise: np.ndarray, noise_floor: float, paper_sigma: float) -> np.ndarray:
    """Uint8 ink with its STROKE_PERCENTILE mapped to 255; all zeros unless the strokes stand out clearly."""
    ink_levels = above_noise[above_noise > 0]
    if ink_levels.size == 0:
        return np.zeros(above_noise.shape, dtype=np.uint8)
    stroke_level = float(np.percentile(ink_levels, STROKE_PERCENTILE))
    stroke_contrast = stroke_level + noise_floor  # how far the strokes lie from the paper
    if stroke_contrast < CLEAR_INK_SIGMAS * paper_sigma:
        return np.zeros(above_noise.shape, dtype=np.uint8)
    return np.rint(np.minimum(above_noise * (255.0 / stroke_level), 255.0)).astype(np.uint8)


# --- cropping, scaling and centring the ink ----------------------------------------------------


def _ink_bounding_box(grey: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right), ends exclusive, of the ink in light-on-dark `grey`; None if blank."""
    background = float(np.median(_border_pixels(grey)))
    brightest = float(grey.max())
    if brightest <= background:
        return None
    is_ink = grey > background + INK_FRACTION * (brightest - background)
    ink_rows = np.flatnonzero(is_ink.any(axis=1))
    ink_columns = np.flatnonzero(is_ink.any(axis=0))
    return int(ink_rows[0]), int(ink_rows[-1]) + 1, int(ink_columns[0]), int(ink_columns[-1]) + 1


def _digit_box_size(height: int, width: int) -> tuple[int, int]:
    """The box a digit is scaled to fit, e.g. 20x20 inside 28x28."""
    return max(1, round(MNIST_DIGIT_BOX_FRACTION * height)), max(1, round(MNIST_DIGIT_BOX_FRACTION * width))


def _fit_inside(digit: np.ndarray, box: tuple[int, int]) -> np.ndarray:
    """Resize `digit` (up or down) to fill `box` on its longer side, keeping its aspect ratio."""
    box_height, box_width = box
    scale = min(box_height / digit.shape[0], box_width / digit.shape[1])
    new_height = min(box_height, max(1, round(digit.shape[0] * scale)))
    new_width = min(box_width, max(1, round(digit.shape[1] * scale)))
    resized = Image.fromarray(digit).resize((new_width, new_height), Image.Resampling.LANCZOS)
    return np.asarray(resized, dtype=np.uint8)


def _paste_centred_by_mass(digit: np.ndarray, height: int, width: int) -> np.ndarray:
    """Place `digit` on a black canvas so its centre of mass is at the canvas centre, fully inside."""
    mass_row, mass_column = _centre_of_mass(digit)
    # Pixel centres sit at integer indices, so the canvas centre is ((H - 1) / 2, (W - 1) / 2).
    top = int(np.clip(round((height - 1) / 2 - mass_row), 0, height - digit.shape[0]))
    left = int(np.clip(round((width - 1) / 2 - mass_column), 0, width - digit.shape[1]))
    canvas = np.zeros((height, width), dtype=np.uint8)
    canvas[top : top + digit.shape[0], left : left + digit.shape[1]] = digit
    return canvas


def _centre_of_mass(pixels: np.ndarray) -> tuple[float, float]:
    """Brightness-weighted mean (row, column); the geometric centre if `pixels` are all black."""
    weights = pixels.astype(np.float64)
    total = weights.sum()
    if total == 0:
        return (pixels.shape[0] - 1) / 2, (pixels.shape[1] - 1) / 2
    rows, columns = np.indices(pixels.shape)
    return float((rows * weights).sum() / total), float((columns * weights).sum() / total)


# --- figures ------------------------------------------------------------------------------------


def make_grid(images: np.ndarray, columns: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile float images in [0, 1], grey [N, H, W] or colour [N, H, W, 3], row by row into one uint8
    picture ([GH, GW] or [GH, GW, 3]) with mid-grey between."""
    tiles = _to_uint8(_grey_or_colour(images, tile_axes=3))
    count, tile_height, tile_width = tiles.shape[:3]
    if count == 0:
        raise ValueError("make_grid needs at least one image")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    columns = math.ceil(math.sqrt(count)) if columns is None else columns
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    rows = math.ceil(count / columns)
    grid = np.full(
        (rows * tile_height + (rows + 1) * padding, columns * tile_width + (columns + 1) * padding, *tiles.shape[3:]),
        PADDING_GREY,
        dtype=np.uint8,
    )
    for index, tile in enumerate(tiles):
        top = padding + (index // columns) * (tile_height + padding)
        left = padding + (index % columns) * (tile_width + padding)
        grid[top : top + tile_height, left : left + tile_width] = tile
    return grid


def reconstruction_figure(inputs: np.ndarray, reconstructions: np.ndarray, padding: int = 2) -> np.ndarray:
    """One row per input [N, H, W(, 3)]: the input, a wider gap, then its K reconstructions [N, K, H, W(, 3)]."""
    inputs = _grey_or_colour(inputs, tile_axes=3)
    reconstructions = _grey_or_colour(reconstructions, tile_axes=4)
    count, per_input = reconstructions.shape[:2]
    if inputs.shape[0] != count or inputs.shape[1:] != reconstructions.shape[2:]:
        raise ValueError(
            f"reconstructions {reconstructions.shape} do not match inputs {inputs.shape}; "
            "expected [N, K, H, W(, 3)] for inputs [N, H, W(, 3)]"
        )
    input_column = make_grid(inputs, columns=1, padding=padding)
    reconstruction_columns = make_grid(
        reconstructions.reshape(count * per_input, *inputs.shape[1:]), columns=per_input, padding=padding
    )
    # Each grid brings its own outer padding to the gap; this strip widens it to the full gap.
    extra_gap = np.full(
        (input_column.shape[0], (INPUT_GAP_PADDINGS - 2) * padding, *input_column.shape[2:]),
        PADDING_GREY,
        dtype=np.uint8,
    )
    return np.concatenate([input_column, extra_gap, reconstruction_columns], axis=1)


def _grey_or_colour(images: np.ndarray, tile_axes: int) -> np.ndarray:
    """Images with `tile_axes` axes ending in height and width (grey), or one more axis of 3 (RGB);
    a trailing channel axis of 1 is dropped."""
    images = np.asarray(images)
    if images.ndim == tile_axes + 1 and images.shape[-1] == 1:
        images = images[..., 0]
    is_colour = images.ndim == tile_axes + 1 and images.shape[-1] == 3
    if images.ndim != tile_axes and not is_colour:
        raise ValueError(
            f"expected {tile_axes} axes ending in height and width, optionally then 1 or 3 channels, "
            f"got shape {images.shape}"
        )
    return images


def _to_uint8(images: np.ndarray) -> np.ndarray:
    """Map floats in [0, 1] to 0..255, clipping anything outside."""
    return np.rint(np.clip(images.astype(np.float64), 0.0, 1.0) * 255).astype(np.uint8)


# --- writing ------------------------------------------------------------------------------------


def save_png(path: Path, pixels: np.ndarray) -> Path:
    """Write uint8 [H, W] (greyscale) or [H, W, 3] (RGB) `pixels` as a PNG, atomically; same pixels, same bytes."""
    picture = _png_picture(pixels)

    def write_png(handle: BinaryIO) -> None:
        picture.save(handle, format="PNG")

    return write_atomically(Path(path), write_png)


def png_bytes(pixels: np.ndarray) -> bytes:
    """uint8 [H, W] (greyscale) or [H, W, 3] (RGB) `pixels` encoded as PNG: the bytes save_png writes."""
    buffer = io.BytesIO()
    _png_picture(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_picture(pixels: np.ndarray) -> Image.Image:
    """`pixels` as a Pillow picture of mode "L" ([H, W]) or "RGB" ([H, W, 3]); refused unless uint8."""
    pixels = np.asarray(pixels)
    is_grey_or_rgb = pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3)
    if pixels.dtype != np.uint8 or not is_grey_or_rgb:
        raise ValueError(f"a PNG needs a uint8 [H, W] or [H, W, 3] array, got {pixels.dtype} {pixels.shape}")
    return Image.fromarray(pixels)


# A fixed member timestamp: np.savez stamps the current time, which would make outputs differ.
_NPZ_MEMBER_DATE = (1980, 1, 1, 0, 0, 0)


def save_npz_streamed(
    path: Path, name: str, shape: tuple[int, ...], dtype: np.dtype, chunks: Iterable[np.ndarray]
) -> Path:
    """Write one array `name` of `shape` to an .npz from `chunks` along its first axis, atomically.

    Only one chunk is in memory at a time, so the array may be larger than memory allows.
    """
    dtype = np.dtype(dtype)

    def write_npz(handle: BinaryIO) -> None:
        with (
            zipfile.ZipFile(handle, mode="w", compression=zipfile.ZIP_STORED) as archive,
            archive.open(
                zipfile.ZipInfo(f"{name}.npy", date_time=_NPZ_MEMBER_DATE), mode="w", force_zip64=True
            ) as member,
        ):
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
            np.lib.format.write_array_header_2_0(member, header)
            rows = 0
            for chunk in chunks:
                member.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())
                rows += len(chunk)
            if rows != shape[0]:
                raise ValueError(f"save_npz_streamed: got {rows} rows for an array of {shape[0]}")

    return write_atomically(Path(path), write_npz)


def save_npz(path: Path, /, **arrays: np.ndarray) -> Path:
    """Write `arrays` by name to an uncompressed .npz at exactly `path`, atomically; same arrays, same bytes."""

    def write_npz(handle: BinaryIO) -> None:
        # np.savez stamps each member with the current time; a fixed stamp keeps the output reproducible.
        with zipfile.ZipFile(handle, mode="w", compression=zipfile.ZIP_STORED) as archive:
            for name, array in arrays.items():
                member = zipfile.ZipInfo(f"{name}.npy", date_time=_NPZ_MEMBER_DATE)
                with archive.open(member, mode="w", force_zip64=True) as member_file:
                    np.lib.format.write_array(member_file, np.asarray(array), allow_pickle=False)

    return write_atomically(Path(path), write_npz)
