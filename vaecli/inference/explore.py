"""The pictures of the latent space: `vae latent`, `vae interpolate` and `vae traverse`.

Each save_* function encodes, decodes and writes one PNG (matplotlib through vaecli.common.plots, or a plain
image grid), and returns what the CLI needs to say what it wrote.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vaecli.common.errors import UsageError
from vaecli.common.images import INPUT_GAP_PADDINGS, PADDING_GREY, make_grid, save_png
from vaecli.common.plots import LABEL_COLOURS, figure, save_figure
from vaecli.inference.latent import (
    Plane,
    SplitCodes,
    check_interpolable,
    check_plottable,
    choose_dimensions,
    decode_means,
    dimension_usage,
    input_codes,
    interpolation_path,
    latent_plane,
    prior_quantile_grid,
    project,
    read_inputs,
    split_codes,
    traversal_latents,
)

# Pixels between tiles, as in every make_grid picture.
GRID_PADDING = 2
# Tiles on each side of the decoded manifold of a 2-D latent.
MANIFOLD_STEPS = 15
# The prior's circles drawn over the codes, in standard deviations.
PRIOR_RADII = (1, 2)
# Dimensions shown by `vae traverse` when --dims is not given: the most informative ones.
DEFAULT_TRAVERSE_DIMS = 10
# Where `vae traverse` ranks the dimensions: held-out images, as the validation ELBO does.
RANKING_SPLIT = "val"
# Inches per image tile in the traversal figure (about 66 pixels at the shared style's 120 dpi).
TILE_INCHES = 0.55

if TYPE_CHECKING:
    from vaecli.inference.open_run import InferenceRun


def require_png(out: Path) -> None:
    """Refuse an --out these commands cannot write: they draw pictures, never arrays."""
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {out} must end in .png")


# ---- vae latent ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatentFigure:
    """What `vae latent` drew: how many codes, on which plane, and whether the decoded manifold is beside them."""

    images: int
    plane: Plane
    with_manifold: bool


def save_latent_figure(run: InferenceRun, out: Path, split: str, max_images: int | None, seed: int) -> LatentFigure:
    """Posterior means of a split in 2-D with the prior's circles; for a 2-D latent, beside it the decoded manifold."""
    require_png(out)
    check_plottable(run.model.latent_dim)  # before the split is encoded
    codes = split_codes(run, split, max_images, seed)
    plane = latent_plane(codes.means)
    with_manifold = run.model.latent_dim == 2
    title = f"{run.dataset_name} {split}: posterior means of {len(codes.means)} images"
    if plane.is_pca:
        title += f" ({run.model.latent_dim}-D latent, first two principal axes)"
    columns, size = (2, (12.0, 5.5)) if with_manifold else (1, (7.5, 5.5))
    with figure(1, columns, size=size, title=title) as (fig, axes):
        draw_codes(axes[0, 0] if with_manifold else axes, project(codes.means, plane), codes, plane)
        if with_manifold:
            draw_manifold(axes[0, 1], run)
        save_figure(fig, out)
    return LatentFigure(len(codes.means), plane, with_manifold)


def draw_codes(ax, points: np.ndarray, codes: SplitCodes, plane: Plane) -> None:
    """The codes coloured by label (legend by class name when known), and the prior's 1 and 2 sigma circles."""
    import matplotlib

    marker_size = 4 if len(points) > 2000 else 10
    labelled = codes.labels >= 0
    if not labelled.any():
        ax.scatter(points[:, 0], points[:, 1], s=marker_size, color="tab:blue", alpha=0.6, linewidths=0, label="codes")
    else:
        colours = matplotlib.colormaps[LABEL_COLOURS]
        for position, label in enumerate(np.unique(codes.labels[labelled])):
            chosen = codes.labels == label
            name = codes.class_names[label] if label < len(codes.class_names) else str(label)
            ax.scatter(
                *points[chosen].T, s=marker_size, color=colours(position % colours.N), alpha=0.6, linewidths=0,
                label=name,
            )  # fmt: skip
        if not labelled.all():
            ax.scatter(*points[~labelled].T, s=marker_size, color="0.6", alpha=0.6, linewidths=0, label="no label")
    angle = np.linspace(0, 2 * np.pi, 200)
    for radius, style in zip(PRIOR_RADII, ("--", ":"), strict=True):
        ax.plot(radius * np.cos(angle), radius * np.sin(angle), style, color="black", lw=1.2, label=f"prior {radius}σ")
    ax.set_xlabel(plane.names[0])
    ax.set_ylabel(plane.names[1])
    ax.set_aspect("equal", adjustable="datalim")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), markerscale=2.5 if marker_size < 10 else 1.5)


def draw_manifold(ax, run: InferenceRun) -> None:
    """Decoded means of z on a grid of the prior's quantiles (Kingma & Welling's figure), axes in z."""
    values, latents = prior_quantile_grid(MANIFOLD_STEPS)
    grid = make_grid(decode_means(run.model, latents), columns=MANIFOLD_STEPS)
    ax.imshow(grid, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ticks = np.unique(np.linspace(0, MANIFOLD_STEPS - 1, 5).round().astype(int))
    # round(...) + 0.0 turns the middle quantile's -0.0 (or -1e-17) into 0.00, not -0.00.
    names = [f"{round(float(value), 2) + 0.0:.2f}" for value in values]
    ax.set_xticks(tile_centres(ticks, run.image_shape[1]), labels=[names[tick] for tick in ticks])
    ax.set_yticks(tile_centres(ticks, run.image_shape[0]), labels=[names[::-1][tick] for tick in ticks])
    ax.set_xlabel("z0 (prior quantiles 5 % to 95 %)")
    ax.set_ylabel("z1")
    ax.set_title("decoded manifold: mean of p(x|z)")
    ax.grid(False)


def tile_centres(indices: np.ndarray, tile_size: int, padding: int = GRID_PADDING) -> np.ndarray:
    """Pixel coordinates of the centres of tiles `indices` along one axis of a make_grid picture."""
    return padding + np.asarray(indices) * (tile_size + padding) + (tile_size - 1) / 2


# ---- vae interpolate -----------------------------------------------------------------------------


def save_interpolation(
    run: InferenceRun, out: Path, first: str, second: str, steps: int, spherical: bool, seed: int
) -> np.ndarray:
    """Decode a path from A's posterior mean to B's; one row: A as the encoder saw it, the path, B. Returns the path."""
    require_png(out)
    if steps < 2:
        raise UsageError(f"--steps must be at least 2 (the path includes both ends), got {steps}")
    views, means = input_codes(run, read_inputs(run, [first, second]), seed)
    check_interpolable(means[0], means[1], spherical)
    path = np.asarray(interpolation_path(means[0], means[1], steps, spherical))
    decoded = decode_means(run.model, path)
    save_png(out, interpolation_row(views[0], decoded, views[1]))
    return path


def interpolation_row(start_image: np.ndarray, path_images: np.ndarray, end_image: np.ndarray) -> np.ndarray:
    """uint8 picture: the start image, a wider gap, the path's images side by side, a wider gap, the end image.

    The gaps are those of reconstruction_figure between an input and its reconstructions.
    """
    ends = [make_grid(image[None], columns=1, padding=GRID_PADDING) for image in (start_image, end_image)]
    middle = make_grid(path_images, columns=len(path_images), padding=GRID_PADDING)
    # Each grid brings its own outer padding to a gap; this strip widens it to the full gap.
    gap = np.full((middle.shape[0], (INPUT_GAP_PADDINGS - 2) * GRID_PADDING, *middle.shape[2:]), PADDING_GREY, np.uint8)
    return np.concatenate([ends[0], gap, middle, gap, ends[1]], axis=1)


# ---- vae traverse --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Traversal:
    """The rows of a traversal figure, top to bottom, and what they were varied around."""

    dims: list[int]
    kl: list[float]  # nats on the validation split
    active: list[bool]
    centre: str

    def row_labels(self) -> list[str]:
        """'z7 · 0.02 nats (inactive)': each row's dimension, its KL, and whether it is unused."""
        return [
            f"z{dim} · {kl:.2f} nats" + ("" if active else " (inactive)")
            for dim, kl, active in zip(self.dims, self.kl, self.active, strict=True)
        ]


def save_traversal(
    run: InferenceRun,
    out: Path,
    input_spec: str | None,
    requested_dims: list[int] | None,
    value_range: float,
    steps: int,
    seed: int,
) -> Traversal:
    """Vary each chosen coordinate of z over [-range, range] around a centre, the others held; one row each.

    The centre is the prior mean (z = 0) or the posterior mean of `input_spec`. Rows are ordered by
    the dimension's KL on the validation split, with inactive dimensions marked.
    """
    require_png(out)
    if steps < 2:
        raise UsageError(f"--steps must be at least 2, got {steps}")
    if not (np.isfinite(value_range) and value_range > 0):
        raise UsageError(f"--range must be a positive number, got {value_range}")
    usage = dimension_usage(split_codes(run, RANKING_SPLIT, seed=seed))
    dims = choose_dimensions(usage, requested_dims, DEFAULT_TRAVERSE_DIMS)
    if input_spec is None:
        centre, centre_name = np.zeros(run.model.latent_dim, np.float32), "the prior mean z = 0"
    else:
        _, means = input_codes(run, read_inputs(run, [input_spec]), seed)
        centre, centre_name = means[0], f"the posterior mean of {input_spec}"
    traversal = Traversal(
        dims, [float(usage.kl[dim]) for dim in dims], [bool(usage.active[dim]) for dim in dims], centre_name
    )
    offsets = np.linspace(-value_range, value_range, steps)
    decoded = decode_means(run.model, traversal_latents(centre, dims, offsets).reshape(len(dims) * steps, -1))
    draw_traversal(out, make_grid(decoded, columns=steps), traversal, offsets, run.image_shape)
    return traversal


def draw_traversal(
    out: Path, grid: np.ndarray, traversal: Traversal, offsets: np.ndarray, image_shape: tuple[int, ...]
) -> None:
    """The traversal grid with a label per row (dimension, its KL, inactive marked) and the offsets below."""
    rows, steps = len(traversal.dims), len(offsets)
    size = (2.4 + TILE_INCHES * steps, 1.2 + TILE_INCHES * rows)
    title = f"latent traversal around {traversal.centre}"
    with figure(size=size, title=title) as (fig, ax):
        ax.imshow(grid, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_yticks(tile_centres(np.arange(rows), image_shape[0]), labels=traversal.row_labels())
        for tick_label, active in zip(ax.get_yticklabels(), traversal.active, strict=True):
            tick_label.set_color("black" if active else "0.55")
        ax.set_xticks(tile_centres(np.arange(steps), image_shape[1]), labels=[f"{offset:+.3g}" for offset in offsets])
        ax.set_xlabel(f"offset of the dimension from the centre; rows by KL on the {RANKING_SPLIT} split")
        ax.grid(False)
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.tick_params(length=0)
        save_figure(fig, out)
