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
    def log_scale(self) -> bool:
        return wants_log_scale([value for line in self.series for value in line.values])


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


def draw_panel(axes, panel: Panel) -> None:
    """One panel on `axes`: its lines, title, axis labels and legend."""
    from matplotlib.ticker import MaxNLocator

    for line in panel.series:
        marker = "o" if len(line.epochs) <= MARKER_EPOCHS else None
        axes.plot(line.epochs, line.values, label=line.label, color=line.colour, marker=marker, markersize=3)
    if panel.log_scale:
        axes.set_yscale("log")
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
