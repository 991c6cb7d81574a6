"""Save and restore a run: weights, optimizer state, step and the resolved config (Orbax).

Layout: RUN_DIR/checkpoints/<step>/{params, opt_state, meta, metrics}. Orbax writes each step into a
temporary directory and renames it when complete, so a crash never leaves a half-written checkpoint
that looks finished. `meta` holds what is needed to rebuild the model with no config file.

Training saves asynchronously (CheckpointWriter): Orbax copies the arrays to the host before save()
returns, then writes them and renames the directory on a thread of its own; the rename (the commit)
comes last there too, so an asynchronous checkpoint is just as atomic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import checkpoint_managers as cm

from vaecli.common.config import Config, config_from_dict
from vaecli.common.errors import CheckpointError, OutputError
from vaecli.common.files import ensure_directory
from vaecli.data.dataset import Dataset
from vaecli.models.targets import PRNG_IMPL, root_key
from vaecli.models.vae import VAE, build_model
from vaecli.runs.rundir import CHECKPOINT_SUBDIR, RANKING_METRIC
from vaecli.training.loop import TrainState, make_optimizer, split_model

# 2: keeps the best by validation loss, records the PRNG key, the training-set size and whether the
# epoch was finished (an interrupted run saves mid-epoch). 3: the likelihood, conv and objective keys,
# the output bias, and the weights' moving average (ema_params) when train.ema is set. 4: colour logistic
# mixtures couple R, G and B (PixelCNN++), which changes the decoder's output size.
FORMAT_VERSION = 4
META_KEYS = (
    "format_version", "step", "epoch", "epoch_finished", "train_images", "image_shape", "dataset",
    "preprocessing", "class_names", "rng_key", "prng_impl", "config",
)  # fmt: skip
# Orbax stores a checkpoint's metrics beside it; RANKING_METRIC (vaecli.runs.rundir) ranks them.

# Orbax logs routine progress at INFO/WARNING through absl; the CLI reports what matters itself.
logging.getLogger("absl").setLevel(logging.ERROR)


@dataclass(frozen=True)
class LoadedRun:
    """A trained model rebuilt from a run directory."""

    run_dir: Path
    config: Config
    model: VAE
    step: int
    epoch: int
    image_shape: tuple[int, ...]
    dataset_name: str
    preprocessing: str  # how a user's picture becomes input: see Dataset.preprocessing


def _manager(run_dir: Path, create: bool, keep: int = 3, asynchronous: bool = False) -> ocp.CheckpointManager:
    """The run's Orbax manager: keeps the newest `keep` checkpoints plus the best by validation loss.

    `asynchronous`: save() returns once the arrays are on the host; wait_until_finished() waits for the rest.
    In a multi-process run each process's manager works alone (see process_local_options).
    """
    policy = cm.AnyPreservationPolicy(
        policies=[
            cm.LatestN(n=keep),
            # Mid-epoch checkpoints (Ctrl-C) carry no metric: only LatestN keeps them.
            cm.BestN(
                get_metric_fn=lambda metrics: metrics[RANKING_METRIC],
                reverse=True,
                n=1,
                keep_checkpoints_without_metrics=False,
            ),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        create=create,
        enable_async_checkpointing=asynchronous,
        best_fn=lambda metrics: metrics[RANKING_METRIC],
        best_mode="min",
        preservation_policy=policy,
        # A writer removes what a killed save left behind; a reader must not, since a training run
        # may be writing that very directory.
        cleanup_tmp_directories=create,
    )
    if jax.process_count() > 1:
        if create:  # Orbax creates the folder only with barriers across all processes
            ensure_directory(Path(run_dir) / CHECKPOINT_SUBDIR)
        options = dataclasses.replace(options, create=False, multiprocessing_options=process_local_options())
    return ocp.CheckpointManager(Path(run_dir).absolute() / CHECKPOINT_SUBDIR, options=options)


def process_local_options() -> ocp.options.MultiprocessingOptions:
    """Orbax options for a checkpoint one process reads or writes alone, with no barrier across processes.

    The training state is replicated, so process 0 saves its own copy and no other process takes part; each
    process of a resumed run reads the same files by itself. Orbax's default would wait at barriers for
    every process to call each save and read.
    """
    return ocp.options.MultiprocessingOptions(primary_host=jax.process_index(), active_processes={jax.process_index()})


def checkpoint_items(
    state: TrainState, epoch: int, config: Config, dataset: Dataset, epoch_finished: bool = True
) -> ocp.args.Composite:
    """What a checkpoint holds: the arrays of `state`, and the metadata that rebuilds the run without its config."""
    meta = {
        "format_version": FORMAT_VERSION,
        "step": int(state.step),
        "epoch": epoch,
        "epoch_finished": epoch_finished,
        "train_images": len(dataset.train_images),
        "image_shape": list(dataset.image_shape),
        "dataset": dataset.name,
        "preprocessing": dataset.preprocessing,
        "class_names": list(dataset.class_names),
        "rng_key": np.asarray(jax.random.key_data(root_key(config.seed))).tolist(),
        "prng_impl": PRNG_IMPL,
        "config": config.to_dict(),
    }
    if jax.process_count() > 1:
        # Orbax refuses to save an array held by one process alone when there are several; the same values
        # as NumPy arrays are saved alike, and restore as jax.Arrays (load_train_state, load_run).
        state = jax.tree.map(np.asarray, state)
    items = {
        "params": ocp.args.StandardSave(state.params),
        "opt_state": ocp.args.StandardSave(state.opt_state),
        "meta": ocp.args.JsonSave(meta),
    }
    if state.ema_params is not None:
        items["ema_params"] = ocp.args.StandardSave(state.ema_params)
    return ocp.args.Composite(**items)


def ranking_metrics(val_loss: float | None) -> dict[str, float] | None:
    """The metrics Orbax ranks a checkpoint by; None (a mid-epoch checkpoint) ranks it not at all."""
    if val_loss is None:
        return None
    # JSON has no NaN or infinity; a non-finite validation loss ranks last.
    return {RANKING_METRIC: val_loss if math.isfinite(val_loss) else 1e30}


class CheckpointWriter:
    """A training run's checkpoints, saved asynchronously and one at a time.

    save() returns once Orbax holds host copies of the arrays (so the caller may reuse the device
    buffers); Orbax writes them into a temporary directory and renames it into place on its own thread.
    Each save first waits for the previous one. wait() (and close()) block until the last is complete:
    whoever reads the checkpoints, or leaves the process, calls it first.
    """

    def __init__(self, run_dir: Path, keep: int):
        self.run_dir, self.keep = Path(run_dir), keep
        self._manager: ocp.CheckpointManager | None = None  # opened by the first save: no save, no folder

    def save(
        self,
        state: TrainState,
        epoch: int,
        config: Config,
        dataset: Dataset,
        val_loss: float | None = None,
        epoch_finished: bool = True,
    ) -> int:
        """Start writing `state` (reached in `epoch`) as checkpoint number state.step; returns that step.

        val_loss ranks it for `--checkpoint best`; a mid-epoch checkpoint (an interrupted run) has none.
        """
        step = int(state.step)
        items = checkpoint_items(state, epoch, config, dataset, epoch_finished)
        try:
            if self._manager is None:
                self._manager = _manager(self.run_dir, create=True, keep=self.keep, asynchronous=True)
            self._manager.save(step, args=items, metrics=ranking_metrics(val_loss), force=True)
        except OSError as error:
            raise OutputError(f"cannot write checkpoint {step} in {self.run_dir}: {error.strerror or error}") from error
        return step

    def wait(self) -> None:
        """Block until the last save is complete on disk, raising OutputError if writing it failed."""
        if self._manager is None:
            return
        try:
            self._manager.wait_until_finished()
        except OSError as error:
            raise OutputError(f"cannot write a checkpoint in {self.run_dir}: {error.strerror or error}") from error

    def close(self) -> None:
        """wait(), then release Orbax's resources; safe to call twice."""
        try:
            self.wait()
        finally:
            manager, self._manager = self._manager, None
            if manager is not None:
                # Orbax raises a failed save's error once per thread that waits: wait() has raised it already.
                with contextlib.suppress(Exception):
                    manager.close()

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def save_checkpoint(
    run_dir: Path,
    state: TrainState,
    epoch: int,
    config: Config,
    dataset: Dataset,
    val_loss: float | None = None,
    epoch_finished: bool = True,
) -> int:
    """Write `state` (reached in `epoch`) as checkpoint number state.step and wait until it is complete.

    val_loss ranks it for `--checkpoint best`; a mid-epoch checkpoint (an interrupted run) has none.
    """
    with CheckpointWriter(run_dir, config.train.keep_checkpoints) as writer:
        return writer.save(state, epoch, config, dataset, val_loss, epoch_finished)


def open_checkpoints(run_dir: Path) -> ocp.CheckpointManager:
    """The run's checkpoint manager, or CheckpointError when the run or its checkpoints are missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist; train one with: vae train --out {run_dir}")
    if not (run_dir / CHECKPOINT_SUBDIR).is_dir():
        raise no_checkpoint_error(run_dir)
    return _manager(run_dir, create=False)


def no_checkpoint_error(run_dir: Path) -> CheckpointError:
    return CheckpointError(
        f"{run_dir} holds no checkpoint (no {CHECKPOINT_SUBDIR}/<step>); train into it with vae train --out {run_dir}"
    )


def choose_step(manager: ocp.CheckpointManager, run_dir: Path, which: str | int = "best") -> int:
    """The step of checkpoint `which`: "best" (lowest validation loss), "latest", or a step number."""
    steps = manager.all_steps()
    if not steps:
        raise no_checkpoint_error(run_dir)
    if which == "latest":
        return max(steps)
    if which == "best":
        best = manager.best_step()
        return best if best is not None else max(steps)
    step = int(which) if str(which).isascii() and str(which).isdigit() else None
    if step not in steps:
        listed = ", ".join(str(kept) for kept in sorted(steps))
        raise CheckpointError(f"--checkpoint {which}: {run_dir} has checkpoints {listed}; give one, latest or best")
    return step


def readable_format(meta: dict[str, Any]) -> bool:
    """Whether this version reads a checkpoint with `meta`: its own format, or format 3 for every model but a
    colour logistic one (format 4 changed only that model's decoder output)."""
    version = meta.get("format_version")
    if version == FORMAT_VERSION:
        return True
    if version != 3:
        return False
    image_shape, model = meta.get("image_shape"), (meta.get("config") or {}).get("model") or {}
    is_colour = isinstance(image_shape, list) and len(image_shape) == 3 and image_shape[2] == 3
    return not (is_colour and model.get("likelihood") == "logistic")


def read_meta(manager: ocp.CheckpointManager, run_dir: Path, step: int) -> dict[str, Any]:
    """The JSON metadata of checkpoint `step`, checked for a format this version understands."""
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as error:  # Orbax raises many types for a damaged directory
        raise CheckpointError(f"checkpoint {step} in {run_dir} cannot be read ({error}); train again") from error
    if not isinstance(meta, dict) or not readable_format(meta):
        found = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(
            f"checkpoint {step} in {run_dir} has format version {found}, this vaecli reads {FORMAT_VERSION}; "
            "train again with this version"
        )
    missing = [key for key in META_KEYS if key not in meta]
    if missing:
        raise CheckpointError(f"checkpoint {step} in {run_dir} lacks {', '.join(missing)} in its metadata; train again")
    return meta


def load_run(run_dir: Path, which: str | int = "best") -> LoadedRun:
    """Rebuild checkpoint `which`'s model (best, latest or a step) from its saved config and weights."""
    run_dir = Path(run_dir)
    with open_checkpoints(run_dir) as manager:
        step = choose_step(manager, run_dir, which)
        meta = read_meta(manager, run_dir, step)
        config = config_from_dict(meta["config"], source=f"{run_dir} checkpoint {step}")
        image_shape = tuple(meta["image_shape"])
        # eval_shape builds the model abstractly: shapes and dtypes to restore into, no random init.
        abstract_model = nnx.eval_shape(lambda: build_model(config.model, image_shape, config.seed))
        graphdef, abstract_params = split_model(abstract_model)
        # With train.ema the moving average is what evaluate, generate and reconstruct use.
        item = "params" if config.train.ema is None else "ema_params"
        check_weights_fit(run_dir, step, abstract_params, item)
        try:
            restore_args = ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract_params)})
            restored = manager.restore(step, args=restore_args)
        except Exception as error:
            raise CheckpointError(
                f"checkpoint {step} in {run_dir} does not match its saved config ({type(error).__name__}); train again"
            ) from error
    model = nnx.merge(graphdef, restored[item])
    return LoadedRun(run_dir, config, model, step, meta["epoch"], image_shape, meta["dataset"], meta["preprocessing"])


def shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
    """{"encoder/trunk/layers/0/kernel": (784, 256), ...} for a parameter tree, stored or abstract."""

    def name(entry) -> str:
        return str(getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry))))

    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda leaf: hasattr(leaf, "shape"))
    return {
        "/".join(name(entry) for entry in path if name(entry) != "value"): tuple(leaf.shape)
        for path, leaf in leaves
        if hasattr(leaf, "shape")
    }


def check_weights_fit(run_dir: Path, step: int, abstract_params: Any, item: str = "params") -> None:
    """Refuse, before restoring, weights whose shapes differ from what the saved config builds.

    (A failed Orbax restore would say the same, but less clearly and leaving asyncio work behind.)
    """
    params_dir = Path(run_dir).absolute() / CHECKPOINT_SUBDIR / str(step) / item
    try:
        stored_shapes = shapes_by_path(ocp.StandardCheckpointer().metadata(params_dir).item_metadata.tree)
    except Exception as error:  # missing or damaged files: Orbax raises many types, or returns None
        raise CheckpointError(
            f"checkpoint {step} in {run_dir} cannot be read (its weights are missing or damaged); "
            "use another with --checkpoint, or train again"
        ) from error
    expected_shapes = shapes_by_path(abstract_params)
    if stored_shapes != expected_shapes:
        differing = sorted(set(stored_shapes.items()) ^ set(expected_shapes.items()))[0][0]
        raise CheckpointError(
            f"checkpoint {step} in {run_dir} does not match its saved config (weights {differing} differ); "
            "train again or start a new run with --out"
        )


def read_latest_meta(run_dir: Path) -> dict[str, Any]:
    """The metadata of the run's newest checkpoint (where a resumed run continues from)."""
    with open_checkpoints(run_dir) as manager:
        return read_meta(manager, run_dir, choose_step(manager, run_dir, "latest"))


def load_train_state(run_dir: Path, step: int, config: Config, image_shape: tuple[int, ...]) -> TrainState:
    """Restore weights, optimizer state and step of checkpoint `step` (for continuing training)."""
    abstract_model = nnx.eval_shape(lambda: build_model(config.model, image_shape, config.seed))
    _, abstract_params = split_model(abstract_model)
    abstract_opt_state = jax.eval_shape(make_optimizer(config).init, abstract_params)
    check_weights_fit(run_dir, step, abstract_params)
    if jax.process_count() > 1:
        # Onto this process's first device: the one recorded at saving may be another process's.
        local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract_params, abstract_opt_state = jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=local),
            (abstract_params, abstract_opt_state),
        )
    items = {
        "params": ocp.args.StandardRestore(abstract_params),
        "opt_state": ocp.args.StandardRestore(abstract_opt_state),
    }
    if config.train.ema is not None:
        check_weights_fit(run_dir, step, abstract_params, "ema_params")
        items["ema_params"] = ocp.args.StandardRestore(abstract_params)
    try:
        with _manager(run_dir, create=False) as manager:
            restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as error:  # Orbax raises many types for a damaged or mismatched checkpoint
        raise CheckpointError(
            f"checkpoint {step} in {run_dir} does not match its saved config ({type(error).__name__}); "
            "start a new run with --out"
        ) from error
    ema_params = restored["ema_params"] if config.train.ema is not None else None
    return TrainState(restored.params, restored.opt_state, jax.numpy.asarray(step, jax.numpy.int32), ema_params)
