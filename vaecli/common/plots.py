"""The one look of every matplotlib figure vaecli writes (curves, the latent space, ...), headless and atomic.

matplotlib is imported here, inside the functions, and only by the commands that plot: `vae --help` and the
commands that do not draw never pay for it. The Agg backend draws without a screen.
"""

from __future__ import annotations

import io
from contextlib import contextmanager
from pathlib import Path

from vaecli.common.files import write_atomically

# Shared by every figure: readable at a glance on a laptop screen and in a README.
STYLE = {
    "figure.dpi": 100,
    "savefig.dpi": 120,
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.labelsize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.fontsize": 9,
    "legend.frameon": False,
    "image.cmap": "gray",
}

# Ten distinguishable colours for class labels (matplotlib's tab10), in label order.
LABEL_COLOURS = "tab10"


@contextmanager
def figure(rows: int = 1, columns: int = 1, size: tuple[float, float] = (6.0, 4.5), title: str | None = None):
    """Yield (figure, axes) drawn in vaecli's style; axes is one Axes for 1x1, else a 2-D array of them."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(rows, columns, figsize=size, squeeze=rows * columns == 1, layout="constrained")
        if title:
            fig.suptitle(title)
        try:
            yield fig, axes
        finally:
            plt.close(fig)


def figure_png_bytes(fig) -> bytes:
    """The figure as PNG bytes, with no timestamp or software tag: the same figure gives the same bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def save_figure(fig, path: Path) -> Path:
    """Write the figure as a PNG at `path` atomically (never a half-written file)."""
    png = figure_png_bytes(fig)
    return write_atomically(Path(path), lambda handle: handle.write(png))
