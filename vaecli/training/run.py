"""A training run on disk: its directory, and what each epoch writes there.

RUN_DIR/
  config.yaml                     the resolved config (what --config and --set amounted to)
  metrics.jsonl                   one JSON object per epoch (wall_seconds: the epoch as the user waited for it)
  checkpoints/<step>/             weights, optimizer state, step and config (Orbax, atomic)
  samples/epoch_NNN.png           64 images decoded from the prior, z ~ N(0, I)
  reconstructions/epoch_NNN.png   validation images and their reconstructions through q(z|x)
  tensorboard/                    TensorBoard event files: every metric and both pictures per epoch
  curves.png                      loss, reconstruction and KL per epoch, drawn when the run ends
  evaluations/<split>-k<k>-n<images>.json   results of vae evaluate (vae runs shows the test NLL)

An epoch's metrics line, pictures, events and checkpoint are written, in that order, on a worker thread
while the next epoch trains (EpochOutputs); the checkpoint is saved asynchronously and becomes visible
(renamed into place) last. Training waits for all of it before it returns or raises.

A trainer holds the run's lock (RUN_DIR/.lock, rundir.RunLock) from before it changes anything there until
all of that is on disk: a second `vae train` aimed at the run (--overwrite or --resume) is refused, naming
the first. Commands that only read a run take no lock.

A run of several processes (vaecli.common.devices.join_processes) is one run: process 0 takes the lock and writes
everything above; the others read what a resumed run starts from, train their share and write nothing. All
of them stop at the same step when any one is asked to (a collective per chunk), and none returns before
process 0's outputs are on disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from vaecli.common.config import Config, apply_override, config_from_dict, config_to_yaml, validate_config
from vaecli.common.devices import agreed_by_all_processes, is_primary, started_together, wait_for_all_processes
from vaecli.common.errors import CheckpointError, ConfigError, Interrupted, OutputError, TrainingError, VaeError
from vaecli.common.files import ensure_directory, write_atomically, write_text_atomically
from vaecli.common.images import make_grid, reconstruction_figure, save_png
from vaecli.data.dataset import Dataset
from vaecli.data.datasets import load_dataset, resolved_data_dir
from vaecli.data.download import DownloadProgress
from vaecli.models.sampling import encoder_sees_binary, generate, reconstruct
from vaecli.models.targets import PRNG_IMPL
from vaecli.models.vae import VAE, build_model
from vaecli.runs.curves import write_curves
from vaecli.runs.rundir import (
    CHECKPOINT_SUBDIR,
    CURVES_FILE,
    EVALUATIONS_SUBDIR,
    INFERENCE_SUBDIR,
    RUNS_ROOT,
    SAMPLER_SUBDIR,
    TENSORBOARD_SUBDIR,
    RunLock,
    read_metrics,
)
from vaecli.runs.rundir import latest_run_dir as latest_run_dir  # re-exported: its home before rundir existed
from vaecli.training.background import OrderedWorker
from vaecli.training.checkpoint import CheckpointWriter, load_train_state, read_latest_meta
from vaecli.training.loop import EpochResult, NonFiniteLoss, StepProgress, TrainState, check_trainable, train
from vaecli.training.tensorboard_events import EpochEvents

# Fixed seeds for the per-epoch pictures, so the same z is decoded every epoch and progress shows.
PICTURE_SEED = 0
PRIOR_PICTURE_COUNT = 64
RECONSTRUCTION_PICTURE_COUNT = 8
RUN_OUTPUTS = (
    "config.yaml", "metrics.jsonl", CHECKPOINT_SUBDIR, "samples", "reconstructions", TENSORBOARD_SUBDIR, CURVES_FILE,
    EVALUATIONS_SUBDIR, INFERENCE_SUBDIR, SAMPLER_SUBDIR,
)  # fmt: skip


def default_run_dir(config_spec: str | Path) -> Path:
    """runs/<config stem>, e.g. runs/mnist for --config configs/mnist.yaml."""
    return RUNS_ROOT / Path(config_spec).stem


def create_run_dir(run_dir: Path) -> Path:
    """The run directory, created if it is not there yet; a file in its place is refused."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputError(f"--out {run_dir} is a file; give a directory for the run")
    return ensure_directory(run_dir)


def refuse_replacing(run_dir: Path, overwrite: bool) -> list[str]:
    """The previous run's outputs in `run_dir`; OutputError when there are some and `overwrite` is not set."""
    existing = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if existing and not overwrite:
        raise OutputError(f"{run_dir} already holds a run ({existing[0]}); pass --overwrite or choose another --out")
    return existing


def prepare_run_dir(run_dir: Path, overwrite: bool) -> Path:
    """Empty the (locked) run directory of a previous run's outputs, only when `overwrite` is set.

    Only RUN_OUTPUTS go: the lock file, held by the caller, stays.
    """
    run_dir = create_run_dir(run_dir)
    existing = refuse_replacing(run_dir, overwrite)
    for name in existing:
        target = run_dir / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return run_dir


def epoch_pictures(model: VAE, config: Config, val_images: np.ndarray) -> dict[str, np.ndarray]:
    """The prior sample grid and the reconstruction figure of `model`, as uint8 arrays by folder name."""
    prior_grid = make_grid(generate(model, PRIOR_PICTURE_COUNT, seed=PICTURE_SEED))
    inputs = val_images[:RECONSTRUCTION_PICTURE_COUNT]
    model_views, reconstructions = reconstruct(
        model, inputs, encoder_sees_binary(config), num_samples=4, seed=PICTURE_SEED
    )
    return {"samples": prior_grid, "reconstructions": reconstruction_figure(model_views, reconstructions)}


def write_epoch_pictures(
    run_dir: Path, model: VAE, config: Config, val_images: np.ndarray, epoch: int
) -> dict[str, np.ndarray]:
    """samples/epoch_NNN.png from the prior and reconstructions/epoch_NNN.png through the posterior.

    Returns both pictures as uint8 arrays, by folder name.
    """
    pictures = epoch_pictures(model, config, val_images)
    for folder, picture in pictures.items():
        save_png(run_dir / folder / f"epoch_{epoch:03d}.png", picture)
    return pictures


def compile_epoch_pictures(config: Config, dataset: Dataset) -> None:
    """Compile what epoch_pictures runs, on a new model of the run's shapes (its weights do not matter).

    Done on the worker while the main thread compiles the training step, one compilation per core:
    otherwise the first pictures compile (seconds) while epoch 2 trains, and slow it down as much.
    """
    graphdef, weights = nnx.split(build_model(config.model, dataset.image_shape, config.seed))
    # Committed to the device each epoch's state is copied to (devices.Placement.copy_to_one_device): jit keys
    # its compilations by where the arguments live, and a fresh model's uncommitted arrays would leave the real
    # pictures to compile again while epoch 2 trains (measured: 0.5 s more per epoch over 4 epochs).
    model = nnx.merge(graphdef, jax.device_put(weights, jax.local_devices()[0]))
    epoch_pictures(model, config, dataset.val_images)


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


def agreed_hooks(hooks: RunHooks) -> RunHooks:
    """`hooks` with its stop requests agreed by all processes (any one's stops them all), in a multi-process run."""
    if hooks.should_stop is None:
        return hooks
    return dataclasses.replace(hooks, should_stop=agreed_by_all_processes(hooks.should_stop))


def train_run(config: Config, run_dir: Path, overwrite: bool = False, hooks: RunHooks = RunHooks()) -> RunResult:
    """Start a run: load the data, then train, writing metrics, pictures and a checkpoint every epoch."""
    with contextlib.ExitStack() as held:

        def prepare() -> tuple[Config, Dataset, Path]:
            locked = is_primary() and Path(run_dir).is_dir()
            if locked:  # a run there that this one may not replace, or its trainer, is refused before any download
                held.enter_context(RunLock(run_dir))
                refuse_replacing(Path(run_dir), overwrite)
            dataset = load_run_data(config, hooks)  # before the run directory is changed
            recorded = with_data_dir_recorded(config)
            if not is_primary():
                return recorded, dataset, Path(run_dir)
            if not locked:
                # Locked before an old run in it is replaced, and held until every output is on disk.
                held.enter_context(RunLock(create_run_dir(run_dir)))
            prepared_dir = prepare_run_dir(run_dir, overwrite)
            write_text_atomically(prepared_dir / "config.yaml", config_to_yaml(recorded))
            return recorded, dataset, prepared_dir

        recorded, dataset, prepared_dir = started_together(prepare)
        return continue_training(recorded, dataset, prepared_dir, None, agreed_hooks(hooks))


# Settings a resumed run may change: none alters the trajectory of the weights (train.devices only in float
# rounding, as the batch's sums are added in another order: a resumed run is bit for bit the uninterrupted one
# on the same number of devices), and train.devices lets a run go on where fewer devices are.
RESUMABLE_CHANGES = ("train.epochs", "train.keep_checkpoints", "train.tensorboard", "train.devices")


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
    with contextlib.ExitStack() as held:

        def prepare() -> tuple[Config, Dataset, TrainState]:
            if not (run_dir / CHECKPOINT_SUBDIR).is_dir():
                read_latest_meta(run_dir)  # says what is missing, leaving no lock file in a folder that holds no run
            if is_primary():  # process 0 holds the lock for the whole run
                # Locked before its newest checkpoint is read (a trainer still writing it would make that a moving
                # target) and held until every output is on disk.
                held.enter_context(RunLock(run_dir))
            return resume_locked_run(run_dir, overrides or [], hooks)

        config, dataset, state = started_together(prepare)
        return continue_training(config, dataset, run_dir, state, agreed_hooks(hooks))


def resume_locked_run(run_dir: Path, overrides: list[str], hooks: RunHooks) -> tuple[Config, Dataset, TrainState]:
    """resume_run's preparation, once the run's lock is held: the config to go on with, the data, the saved state."""
    meta = read_latest_meta(run_dir)
    if meta["prng_impl"] != PRNG_IMPL:
        raise CheckpointError(
            f"{run_dir} drew its random numbers with {meta['prng_impl']}, this vaecli uses {PRNG_IMPL}: "
            "a resumed run would not continue the same way; start a new run with --out"
        )
    config = resumed_config(config_from_dict(meta["config"], f"{run_dir} checkpoint"), overrides, run_dir)
    completed_epochs = meta["epoch"] if meta["epoch_finished"] else meta["epoch"] - 1
    if completed_epochs >= config.train.epochs:
        raise ConfigError(
            f"{run_dir} has already trained {completed_epochs} epochs (train.epochs is {config.train.epochs}); "
            f"to go on, raise it: vae train --resume {run_dir} --set train.epochs={completed_epochs + 10}"
        )
    dataset = load_run_data(config, hooks)
    check_same_data(run_dir, meta, dataset)
    state = load_train_state(run_dir, meta["step"], config, dataset.image_shape)
    if is_primary():
        keep_metrics_up_to(run_dir, completed_epochs)
        write_text_atomically(run_dir / "config.yaml", config_to_yaml(config))
    return config, dataset, state


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


class EpochOutputs:
    """What each epoch leaves in the run directory, written on a worker thread while the next epoch trains.

    Per epoch, in this order: wait for the previous checkpoint, the metrics line, the pictures, the
    TensorBoard events, then the checkpoint (asynchronous; renamed into place when complete). A run killed
    at any moment therefore has the metrics and pictures of every checkpointed epoch, and at most one
    epoch's beyond its newest checkpoint, which resuming drops (purges, for TensorBoard). At most one
    epoch waits behind the one being written.
    The worker holds the epoch's copy of the state (EpochResult), which no later step donates.
    """

    def __init__(self, run_dir: Path, config: Config, dataset: Dataset, first_epoch: int):
        self.run_dir, self.config, self.dataset = run_dir, config, dataset
        self.checkpoints = CheckpointWriter(run_dir, config.train.keep_checkpoints)
        self.events = EpochEvents(run_dir / TENSORBOARD_SUBDIR, first_epoch) if config.train.tensorboard else None
        self.worker = OrderedWorker("epoch outputs", drain=self._flush)
        self.worker.submit(functools.partial(compile_epoch_pictures, config, dataset))
        self.saved_steps: list[int] = []  # handed to the worker to checkpoint
        self._previous: threading.Event | None = None  # set when the last epoch handed over is written

    def wait_for_previous(self) -> None:
        """Block until the epoch handed over last is written (or started saving); raise what went wrong."""
        if self._previous is not None:
            self.worker.wait_for(self._previous)
        self.worker.check()

    def record(self, result: EpochResult, metrics: dict) -> None:
        """Hand an epoch over to be written; `metrics` is its metrics.jsonl line."""
        self.wait_for_previous()
        self.saved_steps.append(metrics["step"])
        self._previous = self.worker.submit(functools.partial(self._write_epoch, result, metrics))

    def save_mid_epoch(self, state: TrainState, epoch: int) -> None:
        """Checkpoint a run stopped inside `epoch`, after everything handed over before."""
        save = functools.partial(self.checkpoints.save, state, epoch, self.config, self.dataset, epoch_finished=False)
        self.worker.wait_for(self.worker.submit(save))
        self.worker.check()

    def close(self, check: bool = True) -> None:
        """Wait until everything handed over is on disk, then stop; raise what went wrong unless `check` is off
        (when another error is already on its way, which this must not replace)."""
        self.worker.close()
        try:
            self.checkpoints.close()  # the worker's drain has waited for the last save already
        except Exception:
            if check:
                raise
        finally:
            if self.events is not None:
                self.events.close()
        if check:
            self.worker.check()

    def _write_epoch(self, result: EpochResult, metrics: dict) -> None:
        # The previous checkpoint complete first: a metrics line then always has every earlier epoch's
        # checkpoint behind it, so a run killed after epoch N's line resumes from epoch N - 1 at the worst.
        self.checkpoints.wait()
        append_metrics(self.run_dir, metrics)
        model = result.model()
        pictures = write_epoch_pictures(self.run_dir, model, self.config, self.dataset.val_images, result.epoch)
        if self.events is not None:
            self.events.add_epoch(metrics, pictures)
        self.checkpoints.save(result.state, result.epoch, self.config, self.dataset, metrics["val_loss"])

    def _flush(self) -> None:
        """On the worker: the last checkpoint complete, the events on disk."""
        self.checkpoints.wait()
        if self.events is not None:
            self.events.flush()


class Laps:
    """Seconds between successive lap() calls, the first counted from when the Laps was made."""

    def __init__(self):
        self.last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return seconds


def continue_training(
    config: Config, dataset: Dataset, run_dir: Path, start: TrainState | None, hooks: RunHooks
) -> RunResult:
    """Train from `start` (None: from scratch), recording each epoch; save a checkpoint where a stop request lands.

    Every output handed over is complete on disk when this returns or raises. curves.png is drawn once,
    when the run ends (finished, stopped or diverged), not every epoch: matplotlib would put about a
    second on each epoch, while TensorBoard and `vae curves` already show a run in progress.
    In a multi-process run only process 0 records; every process returns once the outputs are on disk.
    """
    if not is_primary():
        return follow_training(config, dataset, run_dir, start, hooks)
    outputs = EpochOutputs(run_dir, config, dataset, first_epoch_to_train(config, dataset, start))
    epoch_clock = Laps()  # the first epoch's wall time includes compiling the training step

    def record_epoch(result: EpochResult) -> None:
        # Waiting for the previous epoch's outputs (rarely needed) belongs to this epoch's wall time.
        outputs.wait_for_previous()
        metrics = {**result.metrics, "wall_seconds": epoch_clock.lap()}
        outputs.record(result, metrics)
        if hooks.on_epoch_end:
            hooks.on_epoch_end(metrics)

    try:
        outcome = train(config, dataset, hooks.on_progress, record_epoch, start, hooks.should_stop)
        step = int(outcome.state.step)
        if outcome.stopped_in_epoch is not None and step not in outputs.saved_steps:
            outputs.save_mid_epoch(outcome.state, outcome.stopped_in_epoch)
    except NonFiniteLoss as error:
        outputs.close(check=False)  # the last good checkpoint is complete before the message names it
        with contextlib.suppress(VaeError):  # the curves show where it diverged, but must not hide why it stopped
            draw_curves_so_far(run_dir)
        raise TrainingError(diverged_message(error, run_dir)) from error
    except BaseException:
        outputs.close(check=False)  # what was handed over is still written before the error goes on
        raise
    outputs.close()
    draw_curves_so_far(run_dir)
    wait_for_all_processes("vaecli: the run's outputs are on disk")
    return RunResult(run_dir, None if outcome.stopped_in_epoch is None else step)


def follow_training(
    config: Config, dataset: Dataset, run_dir: Path, start: TrainState | None, hooks: RunHooks
) -> RunResult:
    """continue_training in a process other than 0: train this process's share, record nothing.

    Waits for process 0's outputs at the end, so that no process leaves (and no launcher starts a resumed
    run) before the last checkpoint is complete.
    """
    try:
        outcome = train(config, dataset, None, None, start, hooks.should_stop)
    except NonFiniteLoss as error:  # every process meets it at the same step: the losses are replicated
        raise TrainingError(f"training stopped: {error}; process 0 says which checkpoint is good") from error
    wait_for_all_processes("vaecli: the run's outputs are on disk")
    step = int(outcome.state.step)
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
