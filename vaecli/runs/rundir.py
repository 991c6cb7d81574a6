"""A run directory's names and records, read and written without JAX: for `vae runs`, `vae curves` and `vae evaluate`.

What each epoch writes there is described in vaecli/training/run.py; this module only knows where things are and how
the plain-text records (metrics.jsonl, evaluations/*.json) read back, and how a trainer claims a run
(RunLock) so that no second one writes into it at the same time.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import math
import os
import socket
from pathlib import Path
from typing import Any

from vaecli.common.errors import CheckpointError, OutputError
from vaecli.common.files import write_text_atomically

RUNS_ROOT = Path("runs")
CHECKPOINT_SUBDIR = "checkpoints"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
TENSORBOARD_SUBDIR = "tensorboard"
EVALUATIONS_SUBDIR = "evaluations"
INFERENCE_SUBDIR = "inference"
SAMPLER_SUBDIR = "samplers"  # fitted samplers, e.g. the gmm of `vae generate --sampler gmm`, by step
# The validation figure `--checkpoint best` ranks checkpoints by (lowest first). What Orbax writes in
# checkpoints/<step>/: the metrics in metrics/metrics, the run's metadata in meta/metadata, the weights in
# params/ (and ema_params/), and _CHECKPOINT_METADATA, with the commit time, when the step is complete.
RANKING_METRIC = "val_loss"
ORBAX_METRICS_FILE = Path("metrics") / "metrics"
ORBAX_META_FILE = Path("meta") / "metadata"
ORBAX_COMMIT_FILE = "_CHECKPOINT_METADATA"
WEIGHT_ITEMS = ("params", "ema_params")
# Held (flock) by the process training the run. It lives inside the run, not beside it: it moves and goes with
# the run, needs no write access to the parent folder, and --overwrite never deletes it (it is none of the
# outputs vae train replaces). It is never deleted on release either: a process that opened the old file and
# one that created a new one could then both hold "the" lock.
LOCK_FILE = ".lock"


def latest_run_dir(runs_root: Path = RUNS_ROOT) -> Path:
    """The run under `runs_root` whose newest checkpoint was written last."""
    candidates = [path.parent.parent for path in Path(runs_root).glob(f"*/{CHECKPOINT_SUBDIR}/*") if path.is_dir()]
    if not candidates:
        raise CheckpointError(f"no trained run under {runs_root}/; train one with vae train, or pass --run DIR")
    return max(candidates, key=lambda run: (run / CHECKPOINT_SUBDIR).stat().st_mtime)


def checkpoint_step_dirs(run_dir: Path) -> list[Path]:
    """The run's finished checkpoints, checkpoints/<step>/ (Orbax's half-written temporary folders are not)."""
    folder = Path(run_dir) / CHECKPOINT_SUBDIR
    if not folder.is_dir():
        return []
    steps = [path for path in folder.iterdir() if path.name.isdigit() and path.is_dir()]
    return sorted(steps, key=lambda path: int(path.name))


def chosen_checkpoint_step(run_dir: Path, which: str | int = "best") -> int | None:
    """The step `--checkpoint which` names (best, latest or a step), read from the files Orbax leaves, as
    checkpoint.choose_step asks Orbax; None whenever the files do not say for certain: then ask Orbax.

    best is the lowest ranking metric, the newest step among equals (Orbax's stable sort), or the newest
    step when none has a metric.
    """
    # Orbax names a committed step plainly (no sign, no leading zero) and a step being written otherwise.
    steps = {
        int(path.name): path
        for path in checkpoint_step_dirs(run_dir)
        if path.name.isascii() and str(int(path.name)) == path.name
    }
    if not steps:
        return None
    if which == "latest":
        return max(steps)
    if which != "best":
        step = int(which) if str(which).isascii() and str(which).isdigit() else None
        return step if step in steps else None
    ranked = {}
    for step, path in steps.items():
        try:
            metrics = json.loads((path / ORBAX_METRICS_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            continue  # a mid-epoch checkpoint has no metrics and takes no part in the ranking
        except (OSError, UnicodeDecodeError, ValueError):
            return None
        value = metrics.get(RANKING_METRIC) if isinstance(metrics, dict) else None
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            return None  # training writes a finite number; anything else is Orbax's to judge
        ranked[step] = value
    if not ranked:
        return max(steps)
    return min(ranked, key=lambda step: (ranked[step], -step))


def checkpoint_identity(run_dir: Path, step: int) -> str | None:
    """A digest that changes whenever checkpoint `step` does: of its commit record (the commit time, to the
    nanosecond, tells apart two checkpoints of one step, e.g. of a run trained again into the same folder),
    its metadata, and the names, sizes and modification times of its weight files (reading the weights
    themselves would cost as much as loading them). None when the checkpoint has no such records.
    """
    step_dir = Path(run_dir) / CHECKPOINT_SUBDIR / str(step)
    digest = hashlib.sha256()
    try:
        digest.update((step_dir / ORBAX_COMMIT_FILE).read_bytes())
        digest.update((step_dir / ORBAX_META_FILE).read_bytes())
        weight_files = sorted(path for item in WEIGHT_ITEMS for path in (step_dir / item).rglob("*") if path.is_file())
        for path in weight_files:
            info = path.stat()
            digest.update(f"{path.relative_to(step_dir)}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    except OSError:
        return None
    return digest.hexdigest()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The lines of RUN_DIR/metrics.jsonl, one dict per finished epoch; [] when none was written yet."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist; train one with: vae train --out {run_dir}")
    path = run_dir / METRICS_FILE
    try:
        text = path.read_text(encoding="utf-8") if path.exists() else ""
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from error
    metrics = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            epoch_metrics = json.loads(line)  # NaN is accepted: a diverged epoch is written as NaN
        except ValueError as error:
            raise CheckpointError(f"{path} line {number} is not JSON ({error}); fix or remove that line") from None
        if not isinstance(epoch_metrics, dict) or not isinstance(epoch_metrics.get("epoch"), int):
            raise CheckpointError(f"{path} line {number} is not an epoch's metrics (no epoch number)")
        metrics.append(epoch_metrics)
    return metrics


def evaluation_path(run_dir: Path, split: str, k: int, images: int) -> Path:
    """RUN_DIR/evaluations/<split>-k<k>-n<images>.json: one file per protocol, a new result replaces its own."""
    return Path(run_dir) / EVALUATIONS_SUBDIR / f"{split}-k{k}-n{images}.json"


def record_evaluation(run_dir: Path, record: dict[str, Any]) -> Path:
    """Keep a `vae evaluate` result (the object --json prints) in the run directory, atomically."""
    path = evaluation_path(run_dir, record["split"], record["k"], record["images"])
    return write_text_atomically(path, json.dumps(record, indent=2) + "\n")


def latest_evaluation(run_dir: Path, split: str = "test") -> dict[str, Any] | None:
    """The result of the last `vae evaluate` of `split` recorded in the run directory, or None."""
    candidates = [path for path in (Path(run_dir) / EVALUATIONS_SUBDIR).glob(f"{split}-k*.json") if path.is_file()]
    if not candidates:
        return None
    newest = max(candidates, key=lambda path: (path.stat().st_mtime_ns, path.name))
    try:
        record = json.loads(newest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"{newest} cannot be read ({type(error).__name__}); run vae evaluate again") from error
    if not isinstance(record, dict) or not isinstance(record.get("nll_nats"), int | float):
        raise CheckpointError(f"{newest} holds no nll_nats; run vae evaluate again")
    return record


class RunLock:
    """An exclusive claim on a run directory for one trainer, from acquire() (or `with`) until release().

    An flock, so the kernel drops it when its holder exits in any way, SIGKILL included: a dead trainer
    never holds a run. The file names the holder (pid, host, start time) for the refusal the next one gets.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._descriptor: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock, or raise OutputError naming the process that holds it. The directory must exist."""
        try:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except FileNotFoundError:
            raise CheckpointError(
                f"run directory {self.run_dir} does not exist; train one with: vae train --out {self.run_dir}"
            ) from None
        except OSError as error:
            raise OutputError(f"cannot lock {self.run_dir} for training ({self.path}: {error.strerror})") from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_lock_holder(descriptor)
            os.close(descriptor)
            raise OutputError(
                f"{self.run_dir} is being trained by {holder}; wait for it to finish, stop it, or choose another --out"
            ) from None
        except OSError as error:
            os.close(descriptor)
            raise OutputError(f"cannot lock {self.run_dir} for training ({self.path}: {error.strerror})") from None
        # Written in place, not atomically: the holder's record must stay in the locked file (inode).
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        with contextlib.suppress(OSError):  # the record is a courtesy; the lock is what counts
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, (json.dumps(holder) + "\n").encode("utf-8"), 0)
        self._descriptor = descriptor
        return self

    def release(self) -> None:
        """Give the run up (empty the record, then unlock); safe to call twice."""
        descriptor, self._descriptor = self._descriptor, None
        if descriptor is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(descriptor, 0)  # so that no one ever reads a finished trainer as the holder
        os.close(descriptor)  # closing the only descriptor of the open file unlocks it

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def read_lock_holder(descriptor: int) -> str:
    """'process 1234 on host X since 21:40:05', from the record in a held lock file; a plain phrase when the
    holder has not written it yet (or wrote something else)."""
    try:
        holder = json.loads(os.pread(descriptor, 4096, 0).decode("utf-8"))
        pid, host = int(holder["pid"]), str(holder["host"])
        started = datetime.datetime.fromisoformat(holder["started"])
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError):
        return "another process"
    now = datetime.datetime.now(started.tzinfo)
    since = started.strftime("%H:%M:%S" if started.date() == now.date() else "%Y-%m-%d %H:%M:%S")
    return f"process {pid} on host {host} since {since}"
