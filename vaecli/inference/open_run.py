"""Open a run for inference (generate, reconstruct, evaluate, the latent views) without Orbax or Flax.

The first command that uses a checkpoint for inference restores it (Orbax, then Flax), exports the model's
functions (vaecli.inference.export) and keeps the model file as RUN_DIR/inference/<step>.vae; later commands
read that one file and run its functions with JAX alone: after JAX's own import, importing Flax and Orbax and
opening the checkpoint were the largest part of a warm `vae generate` (see docs/speed.md).

The file is a cache. It is written atomically; each use checks it against the checkpoint (its step, commit
record, metadata and weight files: rundir.checkpoint_identity, kept in its model.json), and a file that is
missing, damaged, of another format version, or left by another checkpoint of the same step (a run trained
again into the same folder) is written anew. One that this JAX cannot read (exported by another JAX version), or
whose functions were not lowered for this machine's backend, is written anew too, with a one-line notice.
`vae export` writes the same kind of file, lowered for the CPU and NVIDIA GPUs both (export.portable_platforms).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vaecli.common.config import Config
from vaecli.common.errors import OutputError
from vaecli.common.files import write_atomically
from vaecli.inference.exported import (
    MODEL_FORMAT_VERSION,
    ExportedModel,
    ModelFile,
    ModelFileError,
    UnreadableFunctionsError,
    read_model_file,
)
from vaecli.runs.rundir import INFERENCE_SUBDIR, checkpoint_identity, checkpoint_step_dirs, chosen_checkpoint_step

if TYPE_CHECKING:
    from vaecli.training.checkpoint import LoadedRun

MODEL_FILE_SUFFIX = ".vae"


@dataclass(frozen=True)
class InferenceRun:
    """A trained model as its model file, with what the inference commands need of its run.

    The fields of checkpoint.LoadedRun (the model an ExportedModel instead of a Flax VAE), and `notices`:
    one-line remarks for the user (e.g. a cache written anew for this JAX), never errors.
    """

    run_dir: Path
    config: Config
    model: ExportedModel
    step: int
    epoch: int
    image_shape: tuple[int, ...]
    dataset_name: str
    preprocessing: str  # how a user's picture becomes input: see Dataset.preprocessing
    model_file: Path | None = None
    notices: tuple[str, ...] = ()


def model_file_path(run_dir: Path, step: int) -> Path:
    """RUN_DIR/inference/<step>.vae."""
    return Path(run_dir) / INFERENCE_SUBDIR / f"{step}{MODEL_FILE_SUFFIX}"


def open_inference_run(run_dir: Path, which: str | int = "best") -> InferenceRun:
    """Checkpoint `which` of the run (best, latest or a step) ready to use: from its model file when that is
    current, else restored from the checkpoint (raising CheckpointError as load_run does), exported and kept."""
    run_dir = Path(run_dir)
    step = chosen_checkpoint_step(run_dir, which)
    identity = checkpoint_identity(run_dir, step) if step is not None else None
    notices: tuple[str, ...] = ()
    if identity is not None:
        try:
            kept = read_current_model_file(run_dir, step, identity)
        except ModelFileError as error:
            kept, notices = None, (f"{error}: written anew from checkpoint {step}",)
        if kept is not None:
            return run_from_model_file(run_dir, kept, model_file_path(run_dir, step))
    return restore_and_keep(run_dir, which, notices)


def read_current_model_file(run_dir: Path, step: int, identity: str) -> ModelFile | None:
    """The kept model file of checkpoint `step` if it is current and whole; None when it is missing, damaged, of
    another format version or of another checkpoint. Raises ModelFileError only when this JAX cannot read its
    functions (the one case worth telling the user: every later command would otherwise rewrite it silently)."""
    path = model_file_path(run_dir, step)
    if not path.is_file():
        return None
    try:
        kept = read_model_file(path)
    except UnreadableFunctionsError:
        raise
    except ModelFileError:
        return None
    record = kept.record
    current = (
        record.get("format_version") == MODEL_FORMAT_VERSION
        and record.get("checkpoint") == identity
        and record.get("step") == step
    )
    return kept if current else None


def restore_and_keep(run_dir: Path, which: str | int, notices: tuple[str, ...] = ()) -> InferenceRun:
    """Restore checkpoint `which` through Orbax and Flax, export it and keep its model file; a run folder that
    cannot be written to only goes without it."""
    from vaecli.inference.export import model_file_bytes, this_platform
    from vaecli.training.checkpoint import load_run

    loaded = load_run(run_dir, which)
    identity = checkpoint_identity(run_dir, loaded.step)
    packed = model_file_bytes(loaded, this_platform(), checkpoint=identity)
    path = model_file_path(run_dir, loaded.step)
    kept_path = None
    if identity is not None:
        with contextlib.suppress(OutputError):
            kept_path = write_atomically(path, lambda handle: handle.write(packed))
            remove_stale_model_files(run_dir)
    model_file = read_model_file(packed, name=str(path))
    return run_from_model_file(run_dir, model_file, kept_path, notices)


def run_from_model_file(
    run_dir: Path, model_file: ModelFile, path: Path | None, notices: tuple[str, ...] = ()
) -> InferenceRun:
    """The InferenceRun a model file describes."""
    record = model_file.record
    return InferenceRun(
        Path(run_dir),
        model_file.config,
        model_file.model,
        record["step"],
        record["epoch"],
        model_file.image_shape,
        record["dataset"],
        record["preprocessing"],
        path,
        notices,
    )


def remove_stale_model_files(run_dir: Path) -> None:
    """Delete kept files of checkpoints no longer in the run (Orbax keeps only a few), and those of the
    earlier layout (<step>.npz and <step>.json)."""
    kept_steps = {path.name for path in checkpoint_step_dirs(run_dir)}
    for path in (Path(run_dir) / INFERENCE_SUBDIR).glob("*"):
        stale_layout = path.suffix in (".npz", ".json")
        if stale_layout or (path.suffix == MODEL_FILE_SUFFIX and path.stem not in kept_steps):
            with contextlib.suppress(OSError):  # left for the next command to remove
                path.unlink(missing_ok=True)


def export_run(run_dir: Path, which: str | int, out: Path) -> LoadedRun:
    """`vae export`: checkpoint `which` restored and exported for every platform it may be used on
    (export.portable_platforms), written to `out` atomically. Returns the restored run."""
    from vaecli.inference.export import model_file_bytes, portable_platforms
    from vaecli.training.checkpoint import load_run

    loaded = load_run(run_dir, which)
    packed = model_file_bytes(loaded, portable_platforms())
    write_atomically(out, lambda handle: handle.write(packed))
    return loaded
