"""Write small folders of colourful pictures, in the layout `vaecli.data.folder` reads, for tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASS_NAMES = ("cats", "dogs")
# Each class leans to one colour, so a model (or a test) can tell them apart.
CLASS_TINTS = {"cats": (230, 120, 40), "dogs": (40, 110, 230)}
CORRUPT_FILE_NAME = "broken.png"


def colourful_picture(rng: np.random.Generator, width: int, height: int, tint: tuple[int, int, int]) -> np.ndarray:
    """uint8 [height, width, 3]: a tinted gradient with a random rectangle of a random colour on it."""
    rows, columns = np.indices((height, width))
    shade = 0.5 + 0.5 * (rows / max(1, height - 1) + columns / max(1, width - 1)) / 2
    pixels = (np.array(tint)[None, None, :] * shade[..., None]).astype(np.uint8)
    top, left = rng.integers(0, height // 2 + 1), rng.integers(0, width // 2 + 1)
    pixels[top : top + height // 2, left : left + width // 2] = rng.integers(0, 256, size=3)
    return pixels


def write_image_folder(root: Path, count_per_class: int = 6, size_range=(12, 40), seed: int = 0) -> Path:
    """Write `count_per_class` pictures of varied sizes into root/cats and root/dogs (PNG and JPEG
    alternating), plus one corrupt file root/broken.png; return `root`."""
    rng = np.random.default_rng(seed)
    low, high = size_range
    for class_name in CLASS_NAMES:
        class_dir = Path(root) / class_name
        class_dir.mkdir(parents=True, exist_ok=True)
        for index in range(count_per_class):
            width, height = (int(side) for side in rng.integers(low, high + 1, size=2))
            picture = Image.fromarray(colourful_picture(rng, width, height, CLASS_TINTS[class_name]))
            suffix = ".png" if index % 2 == 0 else ".jpg"
            picture.save(class_dir / f"{class_name}_{index:02d}{suffix}")
    (Path(root) / CORRUPT_FILE_NAME).write_bytes(b"\x89PNG\r\n\x1a\n this is not really a PNG")
    return Path(root)
