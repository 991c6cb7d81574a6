"""A training run on disk: its directory, and what each epoch writes there.

RUN_DIR/
  config.yaml                     the resolved config (what --config and --set amounted to)
  metrics.jsonl                   one JSON object per epoch
  checkpoints/<step>/             weights, optimizer state, step and config (Orbax, atomic)
  samples/epoch_NNN.png           64 images decoded from the prior, z ~ N(0, I)
  reconstructions/epoch_NNN.png   validation images and their reconstructions through q(z|x)
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from vaecli.checkpoint import CHECKPOINT_SUBDIR, save_checkpoint
from vaecli.config import Config, config_to_yaml
from vaecli.data import load_dataset, resolved_data_dir
from vaecli.data.download import DownloadProgress
from vaecli.errors import CheckpointError, OutputError
from vaecli.files import ensure_directory, write_atomically, write_text_atomically
from vaecli.images import make_grid, reconstruction_figure, save_png
from vaecli.model import VAE
from vaecli.sample import generate, reconstruct
from vaecli.train import EpochResult, StepProgress, check_trainable, train

RUNS_ROOT = Path("runs")
# Fixed seeds for the per-epoch pictures, so the same z is decoded every epoch and progress shows.
PICTURE_SEED = 0
PRIOR_PICTURE_COUNT = 64
RECONSTRUCTION_PICTURE_COUNT = 8
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", CHECKPOINT_SUBDIR, "samples", "reconstructions")


def default_run_dir(config_spec: str | Path) -> Path:
    """runs/<config stem>, e.g. runs/mnist for --config configs/mnist.yaml."""
    return RUNS_ROOT / Path(config_spec).stem


def latest_run_dir(runs_root: Path = RUNS_ROOT) -> Path:
    """The run under `runs_root` whose newest checkpoint was written last."""
    candidates = [path.parent.parent for path in Path(runs_root).glob(f"*/{CHECKPOINT_SUBDIR}/*") if path.is_dir()]
    if not candidates:
        raise CheckpointError(f"no trained run under {runs_root}/; train one with vae train, or pass --run DIR")
    return max(candidates, key=lambda run: (run / CHECKPOINT_SUBDIR).stat().st_mtime)


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


def write_epoch_pictures(run_dir: Path, model: VAE, val_images: np.ndarray, epoch: int) -> None:
    """samples/epoch_NNN.png from the prior and reconstructions/epoch_NNN.png through the posterior."""
    prior_samples = generate(model, PRIOR_PICTURE_COUNT, seed=PICTURE_SEED)
    save_png(run_dir / "samples" / f"epoch_{epoch:03d}.png", make_grid(prior_samples))
    inputs = val_images[:RECONSTRUCTION_PICTURE_COUNT]
    reconstructions = reconstruct(model, inputs, num_samples=4, seed=PICTURE_SEED)
    figure = reconstruction_figure(inputs.astype(np.float32) / 255.0, reconstructions)
    save_png(run_dir / "reconstructions" / f"epoch_{epoch:03d}.png", figure)


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


def train_run(
    config: Config,
    run_dir: Path,
    overwrite: bool = False,
    on_progress: Callable[[StepProgress], None] | None = None,
    on_epoch_end: Callable[[dict], None] | None = None,
    on_download: Callable[[DownloadProgress], None] | None = None,
    on_decode: Callable[[int, int], None] | None = None,
    on_notice: Callable[[str], None] | None = None,
) -> Path:
    """Load the data, train, and after each epoch write checkpoint, metrics and pictures to run_dir."""
    dataset = load_dataset(config.data, on_download=on_download, on_decode=on_decode)
    for notice in dataset.notices:
        if on_notice:
            on_notice(notice)
    check_trainable(config, dataset)  # before the run directory is touched
    config = with_data_dir_recorded(config)
    run_dir = prepare_run_dir(run_dir, overwrite)
    write_text_atomically(run_dir / "config.yaml", config_to_yaml(config))

    def record_epoch(result: EpochResult) -> None:
        save_checkpoint(run_dir, result.state, result.epoch, config, dataset)
        append_metrics(run_dir, result.metrics)
        write_epoch_pictures(run_dir, result.model(), dataset.val_images, result.epoch)
        if on_epoch_end:
            on_epoch_end(result.metrics)

    train(config, dataset, on_progress=on_progress, on_epoch_end=record_epoch)
    return run_dir
