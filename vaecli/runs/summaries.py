"""What `vae runs` lists: one summary per run directory found under a folder, read without JAX.

A run directory is a folder holding config.yaml or checkpoints/. One that cannot be read whole (a config
that no longer validates, no checkpoint, a damaged metrics.jsonl) is still listed, with what went wrong.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from vaecli.common.config import Config, load_config
from vaecli.common.errors import CheckpointError, VaeError
from vaecli.runs.rundir import (
    CHECKPOINT_SUBDIR,
    CONFIG_FILE,
    checkpoint_step_dirs,
    latest_evaluation,
    read_metrics,
)


@dataclass(frozen=True)
class RunSummary:
    """One row of `vae runs`; None where the run does not say (not evaluated, or not readable)."""

    name: str  # the run directory relative to the folder listed
    run_dir: Path
    config: Config | None
    epochs_done: int  # epochs finished, from metrics.jsonl
    best_val_elbo: float | None  # nats per image, the highest of any epoch
    test_nll: float | None  # nats per image, from the newest `vae evaluate` of the test split
    test_k: int | None
    test_images: int | None
    size_bytes: int
    last_checkpoint_time: float | None  # seconds since the epoch, of the newest checkpoint
    problem: str | None = None  # why the run is broken; None when it reads whole

    @property
    def epochs_planned(self) -> int | None:
        return None if self.config is None else self.config.train.epochs

    @property
    def broken(self) -> bool:
        return self.problem is not None


def find_run_dirs(folder: Path) -> list[Path]:
    """Run directories at or below `folder` (a run's own subfolders are not searched), in path order."""
    found = []
    for directory, subdirectories, files in os.walk(folder):
        if CONFIG_FILE in files or CHECKPOINT_SUBDIR in subdirectories:
            found.append(Path(directory))
            subdirectories.clear()
        else:  # hidden folders (.git, editor state) hold no runs
            subdirectories[:] = [name for name in subdirectories if not name.startswith(".")]
    return sorted(found)


def directory_size(directory: Path) -> int:
    """Bytes of the files under `directory`; files that vanish meanwhile (a run still training) count as 0."""
    total = 0
    for parent, _, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(parent, name)).st_size
    return total


def read_run_config(run_dir: Path) -> Config:
    """The resolved config a run saved; CheckpointError or ConfigError when it is missing or no longer valid."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"no {CONFIG_FILE}")
    return load_config(path)


def summarize_run(run_dir: Path, name: str) -> RunSummary:
    """The summary of one run directory; a part that cannot be read leaves its fields None and names the problem."""
    problems: list[str] = []

    def attempt(read, *arguments):
        try:
            return read(*arguments)
        except (VaeError, OSError) as error:
            problems.append(str(error))
            return None

    config = attempt(read_run_config, run_dir)
    metrics = attempt(read_metrics, run_dir) or []
    evaluation = attempt(latest_evaluation, run_dir, "test")
    checkpoints = checkpoint_step_dirs(run_dir)
    if not checkpoints:
        problems.append(f"no checkpoint in {CHECKPOINT_SUBDIR}/")
    elbos = [row["val_elbo"] for row in metrics if isinstance(row.get("val_elbo"), int | float)]
    finite_elbos = [value for value in elbos if math.isfinite(value)]
    return RunSummary(
        name=name,
        run_dir=run_dir,
        config=config,
        epochs_done=max((row["epoch"] for row in metrics), default=0),
        best_val_elbo=max(finite_elbos) if finite_elbos else None,
        test_nll=None if evaluation is None else float(evaluation["nll_nats"]),
        test_k=None if evaluation is None else evaluation.get("k"),
        test_images=None if evaluation is None else evaluation.get("images"),
        size_bytes=directory_size(run_dir),
        last_checkpoint_time=max((path.stat().st_mtime for path in checkpoints), default=None),
        problem="; ".join(problems) or None,
    )


def summarize_runs(folder: Path) -> list[RunSummary]:
    """A summary of every run directory at or below `folder`; [] when it holds none."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise CheckpointError(f"{folder} {what}; give the folder your runs are in (vae train writes them to runs/)")
    return [
        summarize_run(run_dir, run_dir.name if run_dir == folder else str(run_dir.relative_to(folder)))
        for run_dir in find_run_dirs(folder)
    ]


def describe_size(size_bytes: int) -> str:
    """1536 -> '1.5 kB': decimal units, as the download progress shows them."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size_bytes >= scale:
            return f"{size_bytes / scale:.1f} {unit}"
    return f"{size_bytes} B"


def describe_age(seconds: float) -> str:
    """How long ago, roughly: 'just now', '5 min ago', '3 h ago', '12 days ago'."""
    if seconds < 60:
        return "just now"
    if seconds < 3600:
        return f"{int(seconds // 60)} min ago"
    if seconds < 86400:
        return f"{int(seconds // 3600)} h ago"
    days = int(seconds // 86400)
    return f"{days} day{'s' if days != 1 else ''} ago"


def age_of(summary: RunSummary, now: float | None = None) -> str:
    """describe_age of the run's newest checkpoint, or '-' when it has none."""
    if summary.last_checkpoint_time is None:
        return "-"
    return describe_age(max(0.0, (time.time() if now is None else now) - summary.last_checkpoint_time))
