"""Photo crops: a folder of 32x32 colour pictures cut offline from the photographs the dependencies ship.

scikit-learn ships two photographs (china.jpg, flower.jpg, 427x640) and matplotlib one (grace_hopper.jpg,
600x512). Each is cut into the 32x32 squares of a grid at five scales (full size, then scaled down by 1.5,
2, 3 and 4), about 1,450 pictures in all. Within one scale the squares never overlap, so no test picture
is a shifted copy of a training picture; across scales a place appears at different sizes, as it would in
a folder of photos. Used for the colour measurement in the README: natural images, whose detail a
likelihood model must code and whose smooth areas PNG's filters predict well.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

CROP_SIDE = 32
# Full size and four reductions: the smaller scales hold more of a scene's structure in one square.
SCALES = (1.0, 1 / 1.5, 1 / 2, 1 / 3, 1 / 4)


def shipped_photo_paths() -> list[Path]:
    """The photographs scikit-learn and matplotlib install with themselves (no download)."""
    import matplotlib
    import sklearn.datasets

    sklearn_images = Path(sklearn.datasets.__file__).parent / "images"
    matplotlib_images = Path(matplotlib.get_data_path()) / "sample_data"
    paths = [sklearn_images / "china.jpg", sklearn_images / "flower.jpg", matplotlib_images / "grace_hopper.jpg"]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"the shipped photographs are missing: {', '.join(missing)}")
    return paths


def grid_crops(picture_rgb: np.ndarray, side: int = CROP_SIDE) -> Iterator[tuple[int, int, np.ndarray]]:
    """(top, left, square) for each whole side x side square of a uint8 [H, W, 3] picture, row by row."""
    height, width = picture_rgb.shape[:2]
    for top in range(0, height - side + 1, side):
        for left in range(0, width - side + 1, side):
            yield top, left, picture_rgb[top : top + side, left : left + side]


def write_photo_crops(root: Path) -> int:
    """Write the crops as PNGs into root/<photo>/s<scale>_<top>_<left>.png (photo = class); return the count."""
    from PIL import Image

    count = 0
    for path in shipped_photo_paths():
        with Image.open(path) as opened:
            photo = opened.convert("RGB")
        class_dir = Path(root) / path.stem
        class_dir.mkdir(parents=True, exist_ok=True)
        for scale in SCALES:
            size = (int(photo.width * scale), int(photo.height * scale))
            scaled = photo if scale == 1.0 else photo.resize(size, Image.Resampling.LANCZOS)
            for top, left, square in grid_crops(np.asarray(scaled)):
                Image.fromarray(square).save(class_dir / f"s{scale:.3f}_{top:03d}_{left:03d}.png")
                count += 1
    return count
