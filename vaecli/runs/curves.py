"""curves.png: a run's loss, reconstruction and KL per epoch, drawn from its metrics.jsonl.

Written when a training run ends (finished, stopped by Ctrl-C, or diverged) and by `vae curves` at any
time, also while a run trains: metrics.jsonl is replaced atomically each epoch, so it is always whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vaecli.common.errors import CheckpointError
from vaecli.common.plots import figure, save_figure
from vaecli.runs.rundir import CURVES_FILE, METRICS_FILE, read_metrics

# Three panels side by side: 1620 x 480 pixels at the shared style's 120 dpi.
FIGURE_SIZE = (13.5, 4.0)
# Markers show single epochs on short runs (a one-epoch line would be invisible); long runs read better without.
MARKER_EPOCHS = 30
# A panel whose values span this ratio (a decade) or more is drawn on a log axis: on a linear one the
# early epochs (a KL rising from nearly 0, a loss falling from its first, untrained value) flatten
# everything after them into a line along the bottom. Narrower ranges read more precisely linear.
LOG_SCALE_RATIO = 10.0
# Epoch 1 (an untrained model) can have a loss several times the rest, or a KL near 0: a y-range that holds it
# flattens every later epoch into a line. When holding epoch 1 would stretch the later epochs' range more than
# this many times, the range is theirs alone and epoch 1 is drawn clipped: a marker at the edge with its value.
FIRST_EPOCH_SQUEEZE = 2.0
# A range is set from the later epochs alone only when there are at least this many: fewer are no trend.
MIN_LATER_EPOCHS = 2
# Room above and below the later epochs' lines, as a share of their range (matplotlib's own default margin).
Y_MARGIN = 0.05
# The same colour for the same split in every panel (matplotlib's default cycle).
TRAIN_COLOUR, VALIDATION_COLOUR, BOUND_COLOUR = "C0", "C1", "C2"


@dataclass(frozen=True)
class Series:
    """One line of a panel: its legend label and its value at each epoch that recorded it."""

    label: str
    colour: str
    epochs: tuple[int, ...]
    values: tuple[float, ...]


@dataclass(frozen=True)
class Panel:
    title: str
    series: tuple[Series, ...]

    @property
    def first_epoch(self) -> int | None:
        return min((line.epochs[0] for line in self.series), default=None)

    def finite_values(self, *, first_epoch: bool) -> list[float]:
        """The finite values at the first epoch (`first_epoch` True) or at every later one."""
        return [
            value
            for line in self.series
            for epoch, value in zip(line.epochs, line.values, strict=True)
            if (epoch == self.first_epoch) == first_epoch and math.isfinite(value)
        ]

    @property
    def clips_first_epoch(self) -> bool:
        """Whether the y-range is the later epochs' alone, because holding epoch 1 would flatten them."""
        later, first = self.finite_values(first_epoch=False), self.finite_values(first_epoch=True)
        later_epochs = {epoch for line in self.series for epoch in line.epochs if epoch != self.first_epoch}
        if len(later_epochs) < MIN_LATER_EPOCHS or not later or not first:
            return False
        every = later + first
        return max(every) - min(every) > FIRST_EPOCH_SQUEEZE * (max(later) - min(later))

    @property
    def range_values(self) -> list[float]:
        """The values the y-range must hold: every epoch's, or the later epochs' when epoch 1 is clipped."""
        if self.clips_first_epoch:
            return self.finite_values(first_epoch=False)
        return [value for line in self.series for value in line.values]

    @property
    def log_scale(self) -> bool:
        return wants_log_scale(self.range_values)

    @property
    def y_limits(self) -> tuple[float, float] | None:
        """(bottom, top) when epoch 1 is clipped; None leaves the range to matplotlib (which holds every point)."""
        if not self.clips_first_epoch:
            return None
        return padded_range(self.range_values, self.log_scale)


def column(metrics: list[dict[str, Any]], key: str, label: str, colour: str, sign: float = 1.0) -> Series | None:
    """The values of `key` per epoch (times `sign`), or None when no epoch recorded it."""
    rows = [(row["epoch"], sign * float(row[key])) for row in metrics if isinstance(row.get(key), int | float)]
    if not rows:
        return None
    epochs, values = zip(*rows, strict=True)
    return Series(label, colour, epochs, values)


def trains_iwae_bound(metrics: list[dict[str, Any]]) -> bool:
    """Whether the validation loss is an IWAE bound (it then differs from -ELBO); with k = 1 they are one number."""
    return any("val_elbo" in row and "val_loss" in row and row["val_loss"] != -row["val_elbo"] for row in metrics)


def curve_panels(metrics: list[dict[str, Any]]) -> list[Panel]:
    """What curves.png draws: loss, reconstruction and KL panels, from the keys the lines hold.

    The training loss is the objective trained (with its KL weight when beta or KL warm-up is set); the
    validation figures are the ELBO's terms at KL weight 1. A train_recon or train_kl key, where present,
    is drawn beside its validation twin.
    """
    loss = [
        column(metrics, "train_loss", "train loss (the objective trained)", TRAIN_COLOUR),
        column(metrics, "val_elbo", "validation -ELBO", VALIDATION_COLOUR, sign=-1.0),
    ]
    if trains_iwae_bound(metrics):
        loss.append(column(metrics, "val_loss", "validation -IWAE bound", BOUND_COLOUR))
    reconstruction = [
        column(metrics, "train_recon", "train", TRAIN_COLOUR),
        column(metrics, "val_recon", "validation", VALIDATION_COLOUR),
    ]
    kl = [
        column(metrics, "train_kl", "train", TRAIN_COLOUR),
        column(metrics, "val_kl", "validation", VALIDATION_COLOUR),
    ]
    return [
        Panel("Loss", tuple(line for line in loss if line)),
        Panel("Reconstruction  -E_q[log p(x|z)]", tuple(line for line in reconstruction if line)),
        Panel("KL(q(z|x) || p(z))", tuple(line for line in kl if line)),
    ]


def wants_log_scale(values: list[float]) -> bool:
    """True when the finite values are all positive and span LOG_SCALE_RATIO or more."""
    finite = [value for value in values if math.isfinite(value)]
    return bool(finite) and min(finite) > 0 and max(finite) / min(finite) >= LOG_SCALE_RATIO


def padded_range(values: list[float], log_scale: bool) -> tuple[float, float]:
    """(bottom, top) holding finite `values` with Y_MARGIN of room, measured in log space on a log axis."""
    finite = [value for value in values if math.isfinite(value)]
    scaled = [math.log10(value) for value in finite] if log_scale else finite
    low, high = min(scaled), max(scaled)
    # A flat line still needs a range of some height (matplotlib warns at equal limits).
    margin = Y_MARGIN * (high - low) or Y_MARGIN * abs(low) or 1.0
    low, high = low - margin, high + margin
    return (10**low, 10**high) if log_scale else (low, high)


def mark_clipped_first_epoch(axes, panel: Panel, y_limits: tuple[float, float]) -> None:
    """At each line's epoch-1 value beyond `y_limits`: a triangle at the edge pointing off it, and the value."""
    bottom, top = y_limits
    clipped = 0
    for line in panel.series:
        epoch, value = line.epochs[0], line.values[0]
        if epoch != panel.first_epoch or not math.isfinite(value) or bottom <= value <= top:
            continue
        above = value > top
        edge = top if above else bottom
        axes.plot([epoch], [edge], linestyle="none", marker="^" if above else "v", color=line.colour, clip_on=False)
        # Stacked away from the edge, so two lines clipped at the same epoch keep readable labels.
        offset = (clipped + 1) * 11 * (-1 if above else 1)
        axes.annotate(
            f"epoch {epoch}: {value:.4g} (clipped)",
            (epoch, edge),
            xytext=(6, offset),
            textcoords="offset points",
            color=line.colour,
            fontsize=8,
            va="center",
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1},  # readable over the line
        )
        clipped += 1


def draw_panel(axes, panel: Panel) -> None:
    """One panel on `axes`: its lines, title, axis labels and legend; epoch 1 clipped if it would flatten the rest."""
    from matplotlib.ticker import MaxNLocator

    for line in panel.series:
        marker = "o" if len(line.epochs) <= MARKER_EPOCHS else None
        axes.plot(line.epochs, line.values, label=line.label, color=line.colour, marker=marker, markersize=3)
    if panel.log_scale:
        axes.set_yscale("log")
    y_limits = panel.y_limits
    if y_limits is not None:
        axes.set_ylim(*y_limits)
        mark_clipped_first_epoch(axes, panel, y_limits)
    axes.set_title(panel.title + (" (log scale)" if panel.log_scale else ""))
    axes.set_xlabel("epoch")
    axes.set_ylabel("nats per image")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if panel.series:
        axes.legend()


def write_curves(run_dir: Path, out: Path | None = None) -> Path:
    """Draw the run's curves into `out` (default RUN_DIR/curves.png), atomically; returns the path written."""
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    if not metrics:
        raise CheckpointError(
            f"{run_dir} has no finished epoch in {METRICS_FILE} yet: nothing to plot; "
            "curves appear after the first epoch of vae train"
        )
    epochs = max(row["epoch"] for row in metrics)
    title = f"{run_dir.absolute().name}: {epochs} epoch{'s' if epochs != 1 else ''}"
    with figure(1, 3, size=FIGURE_SIZE, title=title) as (fig, axes):
        for panel_axes, panel in zip(axes[0], curve_panels(metrics), strict=True):
            draw_panel(panel_axes, panel)
        return save_figure(fig, out if out is not None else run_dir / CURVES_FILE)
