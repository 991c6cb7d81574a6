"""TensorBoard event files in RUN_DIR/tensorboard/, so that `tensorboard --logdir runs` shows one run per run directory.

tensorboardX writes them with protobuf alone (no TensorFlow); it is imported here, when a training run
opens its events, so `vae --help` and the commands that do not train never load it. Each record carries
two CRC-32C checksums, computed by the `crc32c` package's C code where installed (a dependency): without
it tensorboardX falls back to a byte-at-a-time Python loop. Event files are append-only logs that
TensorBoard reads while they grow (skipping a torn last record), so they are the one output not written
aside and renamed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vaecli.common.images import png_bytes

# Events reach the file within this many seconds (tensorboardX writes them from its own thread).
FLUSH_SECONDS = 5
# Scalars grouped the way TensorBoard lays out its panels: by the name before the first "/".
SCALAR_GROUPS = ("train", "val")


def scalar_tag(metric: str) -> str:
    """The TensorBoard tag of a metrics.jsonl key: train_loss -> train/loss, val_kl -> val/kl, step -> run/step."""
    group, _, name = metric.partition("_")
    return f"{group}/{name}" if group in SCALAR_GROUPS and name else f"run/{metric}"


def event_file_suffix(first_epoch: int) -> str:
    """Names the file of a run that starts at `first_epoch`.

    TensorBoard reads a folder's files in name order; names begin with the second they were opened, and
    this suffix orders two opened within the same second (a run and its quick resume) the same way.
    """
    return f".from-epoch-{first_epoch:06d}"


def image_summary(tag: str, pixels: np.ndarray) -> Any:
    """A TensorBoard Summary holding uint8 [H, W] (grey) or [H, W, 3] (RGB) `pixels` as one PNG, under `tag`."""
    from tensorboardX.proto.summary_pb2 import Summary

    height, width = pixels.shape[:2]
    picture = Summary.Image(
        height=height, width=width, colorspace=1 if pixels.ndim == 2 else 3, encoded_image_string=png_bytes(pixels)
    )
    return Summary(value=[Summary.Value(tag=tag, image=picture)])


class EpochEvents:
    """Scalars and pictures of each epoch, at step = epoch number (the x-axis of metrics.jsonl and the pictures)."""

    def __init__(self, log_dir: Path, first_epoch: int = 1):
        from tensorboardX import SummaryWriter

        # A resumed run adds a file beside the earlier ones. purge_step tells TensorBoard to drop their
        # events from first_epoch on: epochs written after the checkpoint the run resumed from, which
        # this run trains again.
        self.writer = SummaryWriter(
            str(log_dir),
            purge_step=first_epoch if first_epoch > 1 else None,
            flush_secs=FLUSH_SECONDS,
            filename_suffix=event_file_suffix(first_epoch),
        )

    def add_epoch(self, metrics: dict[str, Any], pictures: dict[str, np.ndarray]) -> None:
        """Every number of the epoch's metrics (but the epoch itself), and each uint8 picture [H, W] or [H, W, 3]."""
        epoch = metrics["epoch"]
        for key, value in metrics.items():
            if key != "epoch" and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(scalar_tag(key), value, epoch)
        for tag, pixels in pictures.items():
            # Not add_image: it turns a grey picture into RGB and passes it through a resize (at scale 1)
            # before encoding. The PNG here is the picture itself, encoded once as the epoch's file is.
            self.writer.file_writer.add_summary(image_summary(tag, pixels), epoch)

    def flush(self) -> None:
        """Write what is queued now, rather than within FLUSH_SECONDS."""
        self.writer.flush()

    def close(self) -> None:
        """Write what is queued and close the file."""
        self.writer.close()
