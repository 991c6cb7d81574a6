"""A run directory's names and records, read and written without JAX: for `vae runs`, `vae curves` and `vae evaluate`.

What each epoch writes there is described in vaecli/run.py; this module only knows where things are and how
the plain-text records (metrics.jsonl, evaluations/*.json) read back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vaecli.errors import CheckpointError
from vaecli.files import write_text_atomically

RUNS_ROOT = Path("runs")
CHECKPOINT_SUBDIR = "checkpoints"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
TENSORBOARD_SUBDIR = "tensorboard"
EVALUATIONS_SUBDIR = "evaluations"


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
