"""curves.png and TensorBoard events: drawn and written from what each epoch records, resumed without duplicates."""

from __future__ import annotations

import io
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_config, vae
from PIL import Image
from tensorboardX.crc32c import _crc32c as python_crc32c
from tensorboardX.proto.event_pb2 import Event, SessionLog

from vaecli.common.images import png_bytes
from vaecli.common.plots import figure
from vaecli.data.datasets import load_dataset
from vaecli.runs.curves import curve_panels, draw_panel, write_curves
from vaecli.runs.rundir import checkpoint_step_dirs, read_metrics
from vaecli.training.checkpoint import load_run, load_train_state, read_latest_meta
from vaecli.training.run import RunHooks, continue_training, resume_run, train_run
from vaecli.training.tensorboard_events import EpochEvents, scalar_tag

CURVES_PIXELS = (1620, 480)  # curves.FIGURE_SIZE at the shared style's 120 dpi


# --- reading event files back, as TensorBoard does -------------------------------------------------


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C, from tensorboardX's pure-Python CRC: a check independent of the writer's C one."""
    crc = python_crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_event_file(path: Path) -> list[Event]:
    """The events of one file: TFRecord framing (length, its CRC, the Event, its CRC), CRCs checked."""
    data, offset, events = path.read_bytes(), 0, []
    while offset < len(data):
        header = data[offset : offset + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[offset + 8 : offset + 12])
        body = data[offset + 12 : offset + 12 + length]
        (body_crc,) = struct.unpack("<I", data[offset + 12 + length : offset + 16 + length])
        assert (header_crc, body_crc) == (masked_crc32c(header), masked_crc32c(body)), f"torn record in {path}"
        event = Event()
        event.ParseFromString(body)
        events.append(event)
        offset += 16 + length
    return events


def events_in(log_dir: Path) -> list[Event]:
    """Every event of every file, files in name order (TensorBoard's reading order)."""
    return [event for path in sorted(log_dir.iterdir()) for event in read_event_file(path)]


def as_tensorboard_shows(events: list[Event]) -> dict[str, list[tuple[int, object]]]:
    """tag -> [(step, summary value)]: a session START at step s drops what came before at steps >= s."""
    shown: dict[str, list[tuple[int, object]]] = {}
    for event in events:
        if event.HasField("session_log") and event.session_log.status == SessionLog.START:
            shown = {
                tag: [(step, value) for step, value in entries if step < event.step] for tag, entries in shown.items()
            }
        for value in event.summary.value:
            shown.setdefault(value.tag, []).append((event.step, value))
    return shown


def numeric_metrics(row: dict) -> dict[str, float]:
    return {key: value for key, value in row.items() if key != "epoch" and isinstance(value, int | float)}


def assert_scalars_match_metrics(shown: dict, metrics: list[dict]) -> None:
    """Each metric of each epoch once, at step = epoch, with its value (stored as float32)."""
    expected_tags = {scalar_tag(key) for row in metrics for key in numeric_metrics(row)}
    assert expected_tags <= set(shown), sorted(expected_tags - set(shown))
    for key in numeric_metrics(metrics[0]):
        entries = shown[scalar_tag(key)]
        assert [step for step, _ in entries] == [row["epoch"] for row in metrics], key
        recorded = [value.simple_value for _, value in entries]
        np.testing.assert_allclose(recorded, [float(np.float32(row[key])) for row in metrics], rtol=1e-6, err_msg=key)


def png_pixels(png: bytes | Path) -> np.ndarray:
    data = png.read_bytes() if isinstance(png, Path) else png
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


# --- curves.png ------------------------------------------------------------------------------------


def test_training_ends_by_drawing_the_curves_of_every_epoch(trained_run_dir, tmp_path):
    curves = trained_run_dir / "curves.png"
    assert png_size(curves) == CURVES_PIXELS
    # The same picture as one drawn now from all six epochs' metrics: not an earlier epoch's.
    assert curves.read_bytes() == write_curves(trained_run_dir, tmp_path / "now.png").read_bytes()


def test_vae_curves_draws_the_same_bytes_twice_and_follows_the_metrics(trained_run_dir, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(trained_run_dir / "metrics.jsonl", run_dir)

    first = vae("curves", "--run", run_dir)
    assert first.exit_code == 0, first.output
    assert f"wrote {run_dir / 'curves.png'}" in first.output
    second = vae("curves", "--run", run_dir, "--out", tmp_path / "again.png")
    assert second.exit_code == 0, second.output
    assert (run_dir / "curves.png").read_bytes() == (tmp_path / "again.png").read_bytes()
    assert png_size(tmp_path / "again.png") == CURVES_PIXELS

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")
    assert vae("curves", "--run", run_dir, "--out", tmp_path / "three.png").exit_code == 0
    assert (tmp_path / "three.png").read_bytes() != (tmp_path / "again.png").read_bytes()


def epoch_row(epoch: int, train_loss: float, val_loss: float, recon: float, kl: float) -> dict:
    return {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_elbo": -(recon + kl),
            "val_recon": recon, "val_kl": kl}  # fmt: skip


def test_the_panels_draw_what_the_metrics_hold_and_use_a_log_axis_across_decades():
    elbo_run = [epoch_row(1, 200.0, 190.0, 188.0, 2.0), epoch_row(2, 150.0, 140.0, 115.0, 25.0)]
    loss, reconstruction, kl = curve_panels(elbo_run)
    assert [line.label for line in loss.series] == ["train loss (the objective trained)", "validation -ELBO"]
    assert loss.series[1].values == (190.0, 140.0) and loss.series[1].epochs == (1, 2)
    assert reconstruction.series[0].values == (188.0, 115.0)
    assert kl.series[0].values == (2.0, 25.0)
    assert (loss.log_scale, reconstruction.log_scale, kl.log_scale) == (False, False, True)  # KL spans 12.5x

    iwae_run = [epoch_row(1, 200.0, 185.0, 188.0, 2.0), {**epoch_row(2, 150.0, 139.0, 130.0, 9.0), "train_kl": 10.0}]
    loss, _, kl = curve_panels(iwae_run)
    assert [line.label for line in loss.series][-1] == "validation -IWAE bound"
    assert loss.series[-1].values == (185.0, 139.0)
    assert [(line.label, line.epochs) for line in kl.series] == [("train", (2,)), ("validation", (1, 2))]
    assert not kl.log_scale  # 2 to 10: under a decade


def drawn(panel):
    """Draw `panel` as curves.png does: its y-limits, its texts and its markers as (marker, x, y)."""
    with figure() as (_, axes):
        draw_panel(axes, panel)
        markers = [
            (line.get_marker(), float(line.get_xdata()[0]), float(line.get_ydata()[0]))
            for line in axes.get_lines()
            if line.get_linestyle() == "None"
        ]
        return axes.get_ylim(), [text.get_text() for text in axes.texts], markers


def test_a_far_out_first_epoch_is_clipped_so_the_later_epochs_fill_the_panel(tmp_path):
    # An untrained first epoch: its loss about 5x the rest, its KL near 0.
    run = [epoch_row(1, 543.0, 530.0, 529.7, 0.3)] + [
        epoch_row(epoch, loss + 2, loss, loss - kl, kl)
        for epoch, loss, kl in [(2, 110.0, 20.0), (3, 100.0, 22.0), (4, 96.0, 23.0), (5, 94.0, 23.5)]
    ]
    loss, _, kl = curve_panels(run)

    (bottom, top), texts, markers = drawn(loss)
    assert bottom <= 94.0 and 112.0 <= top < 120.0  # the later epochs' range, not epoch 1's 543
    assert ("^", 1.0, top) in markers  # epoch 1 marked at the top edge, pointing off it ...
    assert "epoch 1: 543 (clipped)" in texts and "epoch 1: 530 (clipped)" in texts  # ... with its values

    (bottom, top), texts, markers = drawn(kl)
    assert 19.0 < bottom <= 20.0 and top >= 23.5
    assert ("v", 1.0, bottom) in markers and texts == ["epoch 1: 0.3 (clipped)"]

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in run))
    assert png_size(write_curves(run_dir)) == CURVES_PIXELS  # drawn whole, with no warning


def test_a_first_epoch_near_the_rest_is_not_clipped():
    run = [epoch_row(epoch, loss, loss, loss - 20, 20.0) for epoch, loss in [(1, 120.0), (2, 110.0), (3, 100.0)]]
    loss, _, _ = curve_panels(run)

    (bottom, top), texts, markers = drawn(loss)
    assert bottom < 100.0 and top > 120.0 and texts == [] and markers == []


@pytest.mark.parametrize(
    ("metrics", "out", "code", "fragment"),
    [
        ("", None, 1, "has no finished epoch in metrics.jsonl yet"),
        ("{not json\n", None, 1, "metrics.jsonl line 1 is not JSON"),
        (None, None, 1, "does not exist"),
        ("", "curves.jpg", 2, "must end in .png"),
    ],
)
def test_vae_curves_refuses_in_one_line(tmp_path, metrics, out, code, fragment):
    run_dir = tmp_path / "run"
    if metrics is not None:
        run_dir.mkdir()
        (run_dir / "metrics.jsonl").write_text(metrics)
    result = vae("curves", "--run", run_dir, *(["--out", tmp_path / out] if out else []))
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert not (run_dir / "curves.png").exists()


# --- TensorBoard events ----------------------------------------------------------------------------


def test_tensorboard_holds_every_metric_of_every_epoch_and_both_pictures(trained_run_dir):
    metrics = read_metrics(trained_run_dir)
    shown = as_tensorboard_shows(events_in(trained_run_dir / "tensorboard"))
    assert_scalars_match_metrics(shown, metrics)
    assert {"train/loss", "val/elbo", "val/recon", "val/kl", "run/learning_rate", "run/epoch_seconds"} <= set(shown)
    assert [value.simple_value for _, value in shown["run/learning_rate"]] == pytest.approx([0.002] * 6)
    for tag in ("samples", "reconstructions"):
        assert [step for step, _ in shown[tag]] == list(range(1, 7))
        for epoch, value in shown[tag]:
            png = trained_run_dir / tag / f"epoch_{epoch:03d}.png"
            expected = png_pixels(png)
            assert (value.image.height, value.image.width) == expected.shape[:2]
            assert value.image.encoded_image_string == png.read_bytes()  # the epoch's picture, not a re-encoding


def test_event_records_are_checksummed_by_the_crc32c_packages_c_code():
    import crc32c
    from tensorboardX import record_writer

    assert record_writer.crc32c is crc32c.crc32c  # not tensorboardX's pure-Python fallback
    record = bytes(range(256)) * 64
    assert crc32c.crc32c(record) == python_crc32c(record)
    assert crc32c.crc32c(b"123456789") == 0xE3069283  # CRC-32C's check value (RFC 3720)


def test_pictures_reach_tensorboard_as_given_encoded_once_without_a_resize(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    pictures = {"samples": rng.integers(0, 256, (30, 20), dtype=np.uint8)}
    pictures["reconstructions"] = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)

    def no_resize(*args, **kwargs):
        raise AssertionError("a picture was resized on its way to TensorBoard")

    monkeypatch.setattr(Image.Image, "resize", no_resize)
    events = EpochEvents(tmp_path)
    events.add_epoch({"epoch": 1, "train_loss": 1.5}, pictures)
    events.close()

    shown = as_tensorboard_shows(events_in(tmp_path))
    for tag, pixels in pictures.items():
        [(step, value)] = shown[tag]
        channels = 1 if pixels.ndim == 2 else 3
        assert (step, value.image.height, value.image.width, value.image.colorspace) == (1, *pixels.shape[:2], channels)
        assert value.image.encoded_image_string == png_bytes(pixels)
        with Image.open(io.BytesIO(value.image.encoded_image_string)) as decoded:
            assert decoded.mode == ("L" if channels == 1 else "RGB")  # grey stays grey
            np.testing.assert_array_equal(np.asarray(decoded), pixels)


def test_a_stopped_run_draws_its_curves_and_on_resuming_tensorboard_drops_the_epochs_it_trains_again(tmp_path):
    run_dir = tmp_path / "run"
    finished_epochs = []
    hooks = RunHooks(on_epoch_end=finished_epochs.append, should_stop=lambda: len(finished_epochs) == 2)
    stopped = train_run(tiny_config(train={"epochs": 3, "keep_checkpoints": 3}), run_dir, hooks=hooks)
    assert stopped.stopped_at_step is not None and len(finished_epochs) == 2
    two_epochs = write_curves(run_dir, tmp_path / "two-epochs.png").read_bytes()
    assert (run_dir / "curves.png").read_bytes() == two_epochs  # drawn when the run stopped
    # As if killed after writing epoch 2's metrics and events but before its checkpoint.
    shutil.rmtree(checkpoint_step_dirs(run_dir)[-1])

    resume_run(run_dir)  # trains epochs 2 and 3

    files = sorted((run_dir / "tensorboard").iterdir())
    assert [file.name.rsplit(".", 1)[-1] for file in files] == ["from-epoch-000001", "from-epoch-000002"]
    raw_steps = [event.step for event in events_in(run_dir / "tensorboard") if event.summary.value[:1]]
    assert raw_steps.count(2) == 2 * raw_steps.count(1)  # epoch 2 is in both files ...
    shown = as_tensorboard_shows(events_in(run_dir / "tensorboard"))
    metrics = read_metrics(run_dir)
    assert [row["epoch"] for row in metrics] == [1, 2, 3]
    assert_scalars_match_metrics(shown, metrics)  # ... and shown once, from the resumed run
    assert [step for step, _ in shown["samples"]] == [1, 2, 3]
    assert (run_dir / "curves.png").read_bytes() == write_curves(run_dir, tmp_path / "redrawn.png").read_bytes()
    assert (run_dir / "curves.png").read_bytes() != two_epochs


@pytest.mark.parametrize("tensorboard", [True, False])
def test_train_tensorboard_switches_the_event_files(tmp_path, trained_run_dir, tensorboard):
    """Continuing the finished session run trains no epoch: what opens or not is the switch's doing alone."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run_dir, run_dir, ignore=shutil.ignore_patterns("tensorboard", "curves.png"))
    meta = read_latest_meta(run_dir)
    saved = load_run(run_dir, "latest").config
    config = saved.model_copy(update={"train": saved.train.model_copy(update={"tensorboard": tensorboard})})
    state = load_train_state(run_dir, meta["step"], config, tuple(meta["image_shape"]))

    continue_training(config, load_dataset(config.data), run_dir, state, RunHooks())

    events = sorted(path.name for path in (run_dir / "tensorboard").glob("*")) if tensorboard else []
    assert (run_dir / "tensorboard").exists() == tensorboard
    assert [name.rsplit(".", 1)[-1] for name in events] == (["from-epoch-000007"] if tensorboard else [])
    assert (run_dir / "curves.png").read_bytes() == write_curves(run_dir, tmp_path / "redrawn.png").read_bytes()
