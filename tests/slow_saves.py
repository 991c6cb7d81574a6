"""Checkpoint commits held back, so that a test can stop a run while a save is pending.

Orbax writes a checkpoint into checkpoints/<step>.orbax-checkpoint-tmp-*/ and, as its last act, renames
it to checkpoints/<step>/ (the commit). `hold_commits` makes every commit first write a marker file
MARKERS/<step> and then wait; in a test process through monkeypatch, or in a `vae` process run as

    python tests/slow_saves.py MARKERS SECONDS train --config ...
"""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path

from orbax.checkpoint._src.path import atomicity

COMMITTING_CLASS = atomicity.AtomicRenameTemporaryPath  # what Orbax uses on a local file system


def held_finalize(markers: Path, seconds: float, gate: threading.Event | None = None):
    """A finalize (commit) that marks MARKERS/<step>, waits for `gate` (when given), then `seconds`, then commits."""
    original = COMMITTING_CLASS.finalize

    async def finalize(self) -> None:
        final = self.get_final()
        if final.parent.name == "checkpoints":  # the step's commit; its items are committed inside it before
            Path(markers, final.name).touch()
            if gate is not None:
                await asyncio.to_thread(gate.wait, 60)
            await asyncio.sleep(seconds)
        await original(self)

    return finalize


def pending_commits(markers: Path, run_dir: Path) -> list[int]:
    """Steps whose commit has begun (marked) but whose checkpoints/<step>/ is not there yet."""
    marked = sorted(int(path.name) for path in Path(markers).iterdir()) if Path(markers).is_dir() else []
    return [step for step in marked if not (Path(run_dir) / "checkpoints" / str(step)).is_dir()]


if __name__ == "__main__":
    markers, seconds = Path(sys.argv[1]), float(sys.argv[2])
    markers.mkdir(parents=True, exist_ok=True)
    COMMITTING_CLASS.finalize = held_finalize(markers, seconds)
    sys.argv = ["vae", *sys.argv[3:]]
    from vaecli.cli.app import main

    main()
