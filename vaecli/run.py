"""A training run on disk: its directory, and what each epoch writes there.

RUN_DIR/
  config.yaml                     the resolved config (what --config and --set amounted to)
  metrics.jsonl                   one JSON object per epoch
  checkpoints/<step>/             weights, optimizer state, step and config (Orbax, atomic)
  samples/epoch_NNN.png           64 images decoded from the prior, z ~ N(0, I)
  reconstructions/epoch_NNN.png   validation images and their reconstructions through q(z|x)
  tensorboard/                    TensorBoard event files: every metric and both pictures per epoch
  curves.png                      loss, reconstruction and KL per epoch, drawn when the run ends
  evaluations/<split>-k<k>-n<images>.json   results of vae evaluate (vae runs shows the test NLL)
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vaecli.checkpoint import load_train_state, read_latest_meta, save_checkpoint
from vaecli.config import Config, apply_override, config_from_dict, config_to_yaml, validate_config
from vaecli.curves import write_curves
from vaecli.data import Dataset, load_dataset, resolved_data_dir
from vaecli.data.download import DownloadProgress
from vaecli.errors import CheckpointError, ConfigError, Interrupted, OutputError, TrainingError, VaeError
from vaecli.files import ensure_directory, write_atomically, write_text_atomically
from vaecli.images import make_grid, reconstruction_figure, save_png
from vaecli.model import VAE
from vaecli.rundir import (
    CHECKPOINT_SUBDIR,
    CURVES_FILE,
    EVALUATIONS_SUBDIR,
    RUNS_ROOT,
    TENSORBOARD_SUBDIR,
    read_metrics,
)
from vaecli.rundir import latest_run_dir as latest_run_dir  # re-exported: its home before rundir existed
from vaecli.sample import encoder_sees_binary, generate, reconstruct
from vaecli.tensorboard_events import EpochEvents
from vaecli.train import PRNG_IMPL, EpochResult, NonFiniteLoss, StepProgress, TrainState, check_trainable, train

# Fixed seeds for the per-epoch pictures, so the same z is decoded every epoch and progress shows.
PICTURE_SEED = 0
PRIOR_PICTURE_COUNT = 64
RECONSTRUCTION_PICTURE_COUNT = 8
RUN_OUTPUTS = (
    "config.yaml", "metrics.jsonl", CHECKPOINT_SUBDIR, "samples", "reconstructions", TENSORBOARD_SUBDIR, CURVES_FILE,
    EVALUATIONS_SUBDIR,
)  # fmt: skip


def default_run_dir(config_spec: str | Path) -> Path:
    """runs/<config stem>, e.g. runs/mnist for --config configs/mnist.yaml."""
    return RUNS_ROOT / Path(config_spec).stem


def prepare_run_dir(run_dir: Path, overwrite: bool) -> Path:
    """Create the run directory; an existing run is only replaced when `overwrite` is set."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputError(f"--out {run_dir} is a file; give a directory for the run")
    existing = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if existing and not overwrite:
        raise OutputError(f"{run_dir} already holds a run ({existing[0]}); pass --overwrite or choose another --out")
    for name in existing:
        target = run_dir / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return ensure_directory(run_dir)


def write_epoch_pictures(
    run_dir: Path, model: VAE, config: Config, val_images: np.ndarray, epoch: int
) -> dict[str, np.ndarray]:
    """samples/epoch_NNN.png from the prior and reconstructions/epoch_NNN.png through the posterior.

    Returns both pictures as uint8 arrays, by folder name.
    """
    prior_samples = generate(model, PRIOR_PICTURE_COUNT, seed=PICTURE_SEED)
    prior_grid = make_grid(prior_samples)
    save_png(run_dir / "samples" / f"epoch_{epoch:03d}.png", prior_grid)
    inputs = val_images[:RECONSTRUCTION_PICTURE_COUNT]
    binarized = encoder_sees_binary(config)
    model_views, reconstructions = reconstruct(model, inputs, binarized, num_samples=4, seed=PICTURE_SEED)
    figure = reconstruction_figure(model_views, reconstructions)
    save_png(run_dir / "reconstructions" / f"epoch_{epoch:03d}.png", figure)
    return {"samples": prior_grid, "reconstructions": figure}


def append_metrics(run_dir: Path, metrics: dict) -> None:
    """Append one line to metrics.jsonl, rewriting the file atomically so no line is ever torn."""
    path = run_dir / "metrics.jsonl"
    previous = path.read_bytes() if path.exists() else b""
    line = (json.dumps(metrics) + "\n").encode("utf-8")
    write_atomically(path, lambda handle: handle.write(previous + line))


def with_data_dir_recorded(config: Config) -> Config:
    """The config with data.dir set to the folder actually read, so the saved config says where the data was."""
    directory = resolved_data_dir(config.data)
    if directory is None or config.data.dir is not None:
        return config
    return config.model_copy(update={"data": config.data.model_copy(update={"dir": str(directory)})})


@dataclass(frozen=True)
class RunHooks:
    """How a training run talks to its caller (the CLI): progress, results, notices, stop requests."""

    on_progress: Callable[[StepProgress], None] | None = None
    on_epoch_end: Callable[[dict], None] | None = None
    on_download: Callable[[DownloadProgress], None] | None = None
    on_decode: Callable[[int, int], None] | None = None
    on_notice: Callable[[str], None] | None = None
    should_stop: Callable[[], bool] | None = None


@dataclass(frozen=True)
class RunResult:
    """Where a run is, and the step it was stopped at by a stop request (None when it finished)."""

    run_dir: Path
    stopped_at_step: int | None = None


def load_run_data(config: Config, hooks: RunHooks) -> Dataset:
    """The run's dataset, passing download and decoding progress and notices to the hooks.

    A stop request that arrives meanwhile ends the command here, before the run directory changes.
    """
    dataset = load_dataset(config.data, on_download=hooks.on_download, on_decode=hooks.on_decode)
    for notice in dataset.notices:
        if hooks.on_notice:
            hooks.on_notice(notice)
    check_trainable(config, dataset)
    if hooks.should_stop is not None and hooks.should_stop():
        raise Interrupted("stopped before training started; the run directory was not changed")
    return dataset


def train_run(config: Config, run_dir: Path, overwrite: bool = False, hooks: RunHooks = RunHooks()) -> RunResult:
    """Start a run: load the data, then train, writing metrics, pictures and a checkpoint every epoch."""
    dataset = load_run_data(config, hooks)  # before the run directory is touched
    config = with_data_dir_recorded(config)
    run_dir = prepare_run_dir(run_dir, overwrite)
    write_text_atomically(run_dir / "config.yaml", config_to_yaml(config))
    return continue_training(config, dataset, Path(run_dir), None, hooks)


# Settings a resumed run may change: none alters the trajectory of the weights.
RESUMABLE_CHANGES = ("train.epochs", "train.keep_checkpoints", "train.tensorboard")


def resumed_config(saved: Config, overrides: list[str], run_dir: Path) -> Config:
    """The saved config with `overrides` applied, refusing any change that would alter the training."""
    raw = saved.to_dict()
    for override in overrides:
        apply_override(raw, override)
    config = validate_config(raw, source=f"--resume {run_dir}")
    if config.train.lr_schedule == "cosine" and config.train.epochs != saved.train.epochs:
        raise ConfigError(
            f"--resume {run_dir}: its cosine learning-rate schedule ends at epoch {saved.train.epochs}, so "
            "train.epochs cannot change; start a new run with --out (or train with lr_schedule: constant)"
        )
    before, after = flatten(saved.to_dict()), flatten(config.to_dict())
    for key in sorted(before):
        if before[key] != after[key] and key not in RESUMABLE_CHANGES:
            raise ConfigError(
                f"--resume continues {run_dir} as it was trained: {key} cannot change (saved {before[key]!r}, "
                f"asked {after[key]!r}); only {', '.join(RESUMABLE_CHANGES)} may; start a new run with --out"
            )
    return config


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resume_run(run_dir: Path, overrides: list[str] | None = None, hooks: RunHooks = RunHooks()) -> RunResult:
    """Continue a run from its newest checkpoint, with its saved config: the weights come out as if never stopped."""
    run_dir = Path(run_dir)
    meta = read_latest_meta(run_dir)
    if meta["prng_impl"] != PRNG_IMPL:
        raise CheckpointError(
            f"{run_dir} drew its random numbers with {meta['prng_impl']}, this vaecli uses {PRNG_IMPL}: "
            "a resumed run would not continue the same way; start a new run with --out"
        )
    config = resumed_config(config_from_dict(meta["config"], f"{run_dir} checkpoint"), overrides or [], run_dir)
    completed_epochs = meta["epoch"] if meta["epoch_finished"] else meta["epoch"] - 1
    if completed_epochs >= config.train.epochs:
        raise ConfigError(
            f"{run_dir} has already trained {completed_epochs} epochs (train.epochs is {config.train.epochs}); "
            f"to go on, raise it: vae train --resume {run_dir} --set train.epochs={completed_epochs + 10}"
        )
    dataset = load_run_data(config, hooks)
    check_same_data(run_dir, meta, dataset)
    state = load_train_state(run_dir, meta["step"], config, dataset.image_shape)
    keep_metrics_up_to(run_dir, completed_epochs)
    write_text_atomically(run_dir / "config.yaml", config_to_yaml(config))
    return continue_training(config, dataset, run_dir, state, hooks)


def check_same_data(run_dir: Path, meta: dict, dataset: Dataset) -> None:
    """Refuse to resume on data of another shape or size: the run could not continue exactly."""
    if tuple(meta["image_shape"]) != dataset.image_shape:
        raise CheckpointError(
            f"{run_dir} was trained on images of shape {tuple(meta['image_shape'])}, but {dataset.name} now gives "
            f"{dataset.image_shape}; start a new run with --out"
        )
    if meta["train_images"] != len(dataset.train_images):
        raise CheckpointError(
            f"{run_dir} was trained on {meta['train_images']} training images, but {dataset.name} now has "
            f"{len(dataset.train_images)}; resuming would not continue the same run; start a new run with --out"
        )


def keep_metrics_up_to(run_dir: Path, completed_epochs: int) -> None:
    """Drop metrics.jsonl lines of epochs after the checkpoint (a run killed after writing them)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    try:
        kept = [line for line in lines if json.loads(line)["epoch"] <= completed_epochs]
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"{path} has a line that is not an epoch's metrics ({type(error).__name__}); fix or remove that line"
        ) from error
    if len(kept) != len(lines):
        write_text_atomically(path, "".join(line + "\n" for line in kept))


def continue_training(
    config: Config, dataset: Dataset, run_dir: Path, start: TrainState | None, hooks: RunHooks
) -> RunResult:
    """Train from `start` (None: from scratch), recording each epoch; save a checkpoint where a stop request lands.

    curves.png is drawn once, when the run ends (finished, stopped or diverged), not every epoch: matplotlib
    would put about a second on each epoch's critical path, while TensorBoard and `vae curves` already show
    a run in progress.
    """
    saved_steps: list[int] = []
    first_epoch = first_epoch_to_train(config, dataset, start)
    events = EpochEvents(run_dir / TENSORBOARD_SUBDIR, first_epoch) if config.train.tensorboard else None

    def record_epoch(result: EpochResult) -> None:
        # Metrics, pictures and events first: a run killed in between has them for every checkpointed
        # epoch, and resuming drops (purges, for TensorBoard) what belongs to epochs after its checkpoint.
        append_metrics(run_dir, result.metrics)
        pictures = write_epoch_pictures(run_dir, result.model(), config, dataset.val_images, result.epoch)
        if events is not None:
            events.add_epoch(result.metrics, pictures)
        saved_steps.append(
            save_checkpoint(run_dir, result.state, result.epoch, config, dataset, result.metrics["val_loss"])
        )
        if hooks.on_epoch_end:
            hooks.on_epoch_end(result.metrics)

    try:
        outcome = train(config, dataset, hooks.on_progress, record_epoch, start, hooks.should_stop)
    except NonFiniteLoss as error:
        with contextlib.suppress(VaeError):  # the curves show where it diverged, but must not hide why it stopped
            draw_curves_so_far(run_dir)
        raise TrainingError(diverged_message(error, run_dir)) from error
    finally:
        if events is not None:
            events.close()
    step = int(outcome.state.step)
    if outcome.stopped_in_epoch is not None and step not in saved_steps:
        save_checkpoint(run_dir, outcome.state, outcome.stopped_in_epoch, config, dataset, epoch_finished=False)
    draw_curves_so_far(run_dir)
    return RunResult(run_dir, None if outcome.stopped_in_epoch is None else step)


def first_epoch_to_train(config: Config, dataset: Dataset, start: TrainState | None) -> int:
    """The epoch that training from `start` begins (or finishes, when `start` was saved mid-epoch)."""
    if start is None:
        return 1
    return int(start.step) // (len(dataset.train_images) // config.train.batch_size) + 1


def draw_curves_so_far(run_dir: Path) -> None:
    """curves.png of the epochs finished so far; none yet (stopped during the first), none drawn."""
    if read_metrics(run_dir):
        write_curves(run_dir)


def diverged_message(error: NonFiniteLoss, run_dir: Path) -> str:
    """What went wrong, which checkpoint is still good, and what to change."""
    try:
        meta = read_latest_meta(run_dir)
        good = f"the last good checkpoint is step {meta['step']} (epoch {meta['epoch']}) in {run_dir}"
    except CheckpointError:
        good = "no checkpoint had been written yet"
    return (
        f"training stopped: {error}; {good}; lower train.learning_rate, set train.clip_norm, "
        "or set train.skip_nonfinite: true to skip such steps"
    )
