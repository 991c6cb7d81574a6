"""Save and restore a run: weights, optimizer state, step and the resolved config (Orbax).

Layout: RUN_DIR/checkpoints/<step>/{params, opt_state, meta}. Orbax writes each step into a
temporary directory and renames it when complete, so a crash never leaves a half-written checkpoint
that looks finished. `meta` holds what is needed to rebuild the model with no config file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from vaecli.config import Config, config_from_dict
from vaecli.data import Dataset
from vaecli.errors import CheckpointError
from vaecli.model import VAE, build_model
from vaecli.train import TrainState, make_optimizer

CHECKPOINT_SUBDIR = "checkpoints"
FORMAT_VERSION = 1
META_KEYS = ("format_version", "step", "epoch", "image_shape", "dataset", "preprocessing", "class_names", "config")
# Checkpoints kept per run (the newest ones).
KEEP_CHECKPOINTS = 3

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


def _manager(run_dir: Path, create: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=KEEP_CHECKPOINTS, create=create, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(Path(run_dir).absolute() / CHECKPOINT_SUBDIR, options=options)


def save_checkpoint(run_dir: Path, state: TrainState, epoch: int, config: Config, dataset: Dataset) -> int:
    """Write the state of `epoch` as checkpoint number state.step; returns that step."""
    step = int(state.step)
    meta = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "epoch": epoch,
        "image_shape": list(dataset.image_shape),
        "dataset": dataset.name,
        "preprocessing": dataset.preprocessing,
        "class_names": list(dataset.class_names),
        "config": config.to_dict(),
    }
    with _manager(run_dir, create=True) as manager:
        manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                opt_state=ocp.args.StandardSave(state.opt_state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )
        manager.wait_until_finished()
    return step


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


def latest_step(manager: ocp.CheckpointManager, run_dir: Path) -> int:
    """The newest complete checkpoint's step."""
    step = manager.latest_step()
    if step is None:
        raise no_checkpoint_error(run_dir)
    return step


def read_meta(manager: ocp.CheckpointManager, run_dir: Path, step: int) -> dict[str, Any]:
    """The JSON metadata of checkpoint `step`, checked for a format this version understands."""
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as error:  # Orbax raises many types for a damaged directory
        raise CheckpointError(f"checkpoint {step} in {run_dir} cannot be read ({error}); train again") from error
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        found = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(
            f"checkpoint {step} in {run_dir} has format version {found}, this vaecli reads {FORMAT_VERSION}; "
            "train again with this version"
        )
    missing = [key for key in META_KEYS if key not in meta]
    if missing:
        raise CheckpointError(f"checkpoint {step} in {run_dir} lacks {', '.join(missing)} in its metadata; train again")
    return meta


def load_run(run_dir: Path) -> LoadedRun:
    """Rebuild the newest checkpoint's model from its saved config and weights (no config file needed)."""
    run_dir = Path(run_dir)
    with open_checkpoints(run_dir) as manager:
        step = latest_step(manager, run_dir)
        meta = read_meta(manager, run_dir, step)
        config = config_from_dict(meta["config"], source=f"{run_dir} checkpoint {step}")
        image_shape = tuple(meta["image_shape"])
        # eval_shape builds the model abstractly: shapes and dtypes to restore into, no random init.
        abstract_model = nnx.eval_shape(lambda: build_model(config.model, image_shape, config.seed))
        graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
        except Exception as error:
            raise CheckpointError(
                f"checkpoint {step} in {run_dir} does not match its saved config ({type(error).__name__}); train again"
            ) from error
    model = nnx.merge(graphdef, restored.params)
    return LoadedRun(run_dir, config, model, step, meta["epoch"], image_shape, meta["dataset"], meta["preprocessing"])


def load_train_state(run_dir: Path, step: int, config: Config, image_shape: tuple[int, ...]) -> TrainState:
    """Restore weights, optimizer state and step of checkpoint `step` (for continuing training)."""
    abstract_model = nnx.eval_shape(lambda: build_model(config.model, image_shape, config.seed))
    _, abstract_params = nnx.split(abstract_model, nnx.Param)
    abstract_opt_state = jax.eval_shape(make_optimizer(config).init, abstract_params)
    with _manager(run_dir, create=False) as manager:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_params),
                opt_state=ocp.args.StandardRestore(abstract_opt_state),
            ),
        )
    return TrainState(restored.params, restored.opt_state, jax.numpy.asarray(step, jax.numpy.int32))
