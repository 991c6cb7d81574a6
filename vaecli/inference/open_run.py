"""Open a run for inference (generate, reconstruct, evaluate) without Orbax or Flax: its weights kept as arrays.

The first command that uses a checkpoint for inference restores it as the other commands do (Orbax, then
Flax) and keeps what inference needs in RUN_DIR/inference/: <step>.npz, the weights it uses (the moving
average when train.ema is set) named by their path in the model, and <step>.json, the run's config and
image shape, the identity of the checkpoint they came from and the digest of the .npz. Later commands read
those two files with NumPy and compute with vaecli.models.layers: after JAX's own import, importing Flax and
Orbax and opening the checkpoint were the largest part of a warm `vae generate` (see the README).

The files are a cache. Both are written atomically; each use checks them against the checkpoint (its step,
commit record, metadata and weight files: rundir.checkpoint_identity) and against each other (the digest of
the .npz), and a pair that is missing, damaged, or left by another checkpoint of the same step (a run trained
again into the same folder) is ignored and written anew. A model InferenceModel does not compute (bfloat16
layers) is restored through Flax every time.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from vaecli.common.config import Config, config_from_dict
from vaecli.common.errors import OutputError, VaeError
from vaecli.common.files import write_atomically, write_text_atomically
from vaecli.models.layers import InferenceModel, computes
from vaecli.runs.rundir import INFERENCE_SUBDIR, checkpoint_identity, checkpoint_step_dirs, chosen_checkpoint_step

if TYPE_CHECKING:
    from vaecli.training.checkpoint import LoadedRun

# Changes whenever the files' content or the names of the weights change: older files are then rewritten.
INFERENCE_FILE_VERSION = 1


@dataclass(frozen=True)
class InferenceRun:
    """A trained model as its inference weights, with what generate and reconstruct need of its run.

    The fields of checkpoint.LoadedRun, so that the sampling functions take either.
    """

    run_dir: Path
    config: Config
    model: InferenceModel
    step: int
    epoch: int
    image_shape: tuple[int, ...]
    dataset_name: str
    preprocessing: str  # how a user's picture becomes input: see Dataset.preprocessing


def inference_paths(run_dir: Path, step: int) -> tuple[Path, Path]:
    """(RUN_DIR/inference/<step>.npz, RUN_DIR/inference/<step>.json)."""
    folder = Path(run_dir) / INFERENCE_SUBDIR
    return folder / f"{step}.npz", folder / f"{step}.json"


def open_inference_run(run_dir: Path, which: str | int = "best") -> InferenceRun | LoadedRun:
    """Checkpoint `which` of the run (best, latest or a step) ready to decode: from its inference files when
    they are current, else restored from the checkpoint (raising CheckpointError as load_run does) and kept.

    A model InferenceModel does not compute (see vaecli.models.layers.computes) comes back as load_run gives it.
    """
    run_dir = Path(run_dir)
    step = chosen_checkpoint_step(run_dir, which)
    identity = checkpoint_identity(run_dir, step) if step is not None else None
    if identity is not None:
        kept = read_inference_files(run_dir, step, identity)
        if kept is not None:
            return kept
    return restore_and_keep(run_dir, which)


def restore_and_keep(run_dir: Path, which: str | int) -> InferenceRun | LoadedRun:
    """Restore checkpoint `which` through Orbax and Flax and write its inference files; a run folder that
    cannot be written to only goes without them."""
    from vaecli.models.vae import inference_weights
    from vaecli.training.checkpoint import load_run

    loaded = load_run(run_dir, which)
    if not computes(loaded.config.model):
        return loaded
    weights = inference_weights(loaded.model)
    record = {
        "version": INFERENCE_FILE_VERSION,
        "step": loaded.step,
        "epoch": loaded.epoch,
        "weights": "ema_params" if loaded.config.train.ema is not None else "params",
        "image_shape": list(loaded.image_shape),
        "dataset": loaded.dataset_name,
        "preprocessing": loaded.preprocessing,
        "config": loaded.config.to_dict(),
    }
    identity = checkpoint_identity(run_dir, loaded.step)
    if identity is not None:
        with contextlib.suppress(OutputError):
            write_inference_files(run_dir, loaded.step, weights, {**record, "checkpoint": identity})
    return run_from_record(run_dir, record, weights)


def run_from_record(run_dir: Path, record: dict[str, Any], weights: dict[str, np.ndarray]) -> InferenceRun:
    """The InferenceRun an inference record (the .json) and its weights describe."""
    step = record["step"]
    config = config_from_dict(record["config"], source=f"{run_dir} inference weights of step {step}")
    if not computes(config.model):
        raise ValueError(f"InferenceModel does not compute a model of dtype {config.model.dtype}")
    image_shape = tuple(int(side) for side in record["image_shape"])
    # device_put copies; jnp.asarray would compile (or read from the cache) a program per array shape.
    model = InferenceModel(jax.device_put(dict(weights)), config.model, image_shape)
    return InferenceRun(
        Path(run_dir), config, model, step, record["epoch"], image_shape, record["dataset"], record["preprocessing"]
    )


def write_inference_files(run_dir: Path, step: int, weights: dict[str, np.ndarray], record: dict[str, Any]) -> None:
    """Write <step>.npz, then <step>.json naming its digest (each atomically), and drop the files of
    checkpoints that are gone."""
    npz_path, json_path = inference_paths(run_dir, step)
    buffer = io.BytesIO()
    np.savez(buffer, **weights)
    packed = buffer.getvalue()
    write_atomically(npz_path, lambda handle: handle.write(packed))
    write_text_atomically(json_path, json.dumps({**record, "npz_sha256": hashlib.sha256(packed).hexdigest()}) + "\n")
    remove_stale_inference_files(run_dir)


def read_inference_files(run_dir: Path, step: int, identity: str) -> InferenceRun | None:
    """The InferenceRun kept for checkpoint `step`, whose rundir.checkpoint_identity is `identity`; None when
    the files are missing, unreadable, of another version or checkpoint, or do not match each other."""
    npz_path, json_path = inference_paths(run_dir, step)
    try:
        record = json.loads(json_path.read_text(encoding="utf-8"))
        current = (
            isinstance(record, dict)
            and record.get("version") == INFERENCE_FILE_VERSION
            and record.get("checkpoint") == identity
            and record.get("step") == step
        )
        if not current:
            return None
        packed = npz_path.read_bytes()
        if hashlib.sha256(packed).hexdigest() != record.get("npz_sha256"):
            return None
        with np.load(io.BytesIO(packed), allow_pickle=False) as arrays:
            weights = {name: arrays[name] for name in arrays.files}
        return run_from_record(run_dir, record, weights)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, zipfile.BadZipFile, VaeError):
        return None


def remove_stale_inference_files(run_dir: Path) -> None:
    """Delete the inference files of checkpoints no longer in the run (Orbax keeps only a few)."""
    kept_steps = {path.name for path in checkpoint_step_dirs(run_dir)}
    for path in (Path(run_dir) / INFERENCE_SUBDIR).glob("*"):
        if path.suffix in (".npz", ".json") and path.stem not in kept_steps:
            with contextlib.suppress(OSError):  # left for the next command to remove
                path.unlink(missing_ok=True)
