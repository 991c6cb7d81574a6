"""Epoch outputs written in the background: training goes on meanwhile, all are complete when training
returns, an error among them still stops the run, exit_now waits for them, and each epoch's wall time is kept."""

from __future__ import annotations

import os
import threading
import time

import pytest
from helpers import tiny_config, tiny_dataset
from slow_saves import COMMITTING_CLASS, held_finalize

from vaecli.cli.app import exit_now
from vaecli.common.errors import OutputError
from vaecli.runs.rundir import checkpoint_step_dirs, read_metrics
from vaecli.training.background import OrderedWorker
from vaecli.training.checkpoint import CheckpointWriter, load_run
from vaecli.training.loop import init_train_state
from vaecli.training.run import RunHooks, continue_training

# Every checkpoint's commit (the rename into place) waits this long, so that a save is pending for a while.
HOLD_SECONDS = 1.0
STEPS_PER_EPOCH = 256 // 32  # tiny_dataset() in batches of tiny_config()'s 32


@pytest.fixture(scope="module")
def held_run(tmp_path_factory):
    """A 3-epoch run whose first checkpoint is committed only once epoch 3 trains (and each commit is slow).

    Returns the run directory, what was seen when epoch 3's progress arrived, and how long training took.
    """
    run_dir = tmp_path_factory.mktemp("held") / "run"
    markers = tmp_path_factory.mktemp("markers")
    epoch_3_trains = threading.Event()
    seen: dict = {}
    handed_over: list[dict] = []

    def on_progress(report) -> None:
        if report.epoch == 3 and not epoch_3_trains.is_set():
            seen["epochs_handed_over"] = len(handed_over)
            seen["first_checkpoint_visible"] = (run_dir / "checkpoints" / str(STEPS_PER_EPOCH)).is_dir()
            epoch_3_trains.set()

    hooks = RunHooks(on_progress=on_progress, on_epoch_end=handed_over.append)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(COMMITTING_CLASS, "finalize", held_finalize(markers, HOLD_SECONDS, epoch_3_trains))
        started = time.perf_counter()
        continue_training(tiny_config(train={"epochs": 3}), tiny_dataset(), run_dir, None, hooks)
        seconds = time.perf_counter() - started
    return run_dir, seen, seconds


def test_training_goes_on_while_a_checkpoint_is_being_written(held_run):
    _, seen, _ = held_run
    # Epoch 1's checkpoint was still being committed, yet epochs 1 and 2 were handed over and epoch 3 trained:
    # neither the checkpoint nor the outputs before it held up the loop.
    assert seen == {"epochs_handed_over": 2, "first_checkpoint_visible": False}


def test_every_output_is_complete_when_training_returns(held_run):
    run_dir, _, _ = held_run
    steps = [STEPS_PER_EPOCH * epoch for epoch in (1, 2, 3)]
    assert [int(path.name) for path in checkpoint_step_dirs(run_dir)] == steps  # the last one's commit too
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == sorted(map(str, steps))  # no tmp
    assert load_run(run_dir, "latest").step == steps[-1]
    assert [row["epoch"] for row in read_metrics(run_dir)] == [1, 2, 3]
    for folder in ("samples", "reconstructions"):
        assert sorted(path.name for path in (run_dir / folder).iterdir()) == [f"epoch_00{e}.png" for e in (1, 2, 3)]


def test_wall_seconds_counts_what_training_waited_for(held_run):
    _, _, seconds = held_run
    metrics = read_metrics(held_run[0])
    walls = [row["wall_seconds"] for row in metrics]
    assert all(wall > 0 for wall in walls) and sum(walls) <= seconds
    # Handing over epoch 3 waited for epoch 2's outputs, which waited for epoch 1's held commit: the user
    # waited for that too, so it is in epoch 3's wall time, though not in its training or validation.
    assert walls[2] >= metrics[2]["epoch_seconds"] + HOLD_SECONDS / 2


def test_a_checkpoint_save_returns_before_the_checkpoint_is_committed(tmp_path, monkeypatch):
    config, dataset = tiny_config(), tiny_dataset()
    _, state = init_train_state(config, dataset.image_shape)
    commit = threading.Event()
    monkeypatch.setattr(COMMITTING_CLASS, "finalize", held_finalize(tmp_path / "markers", 0, commit))
    (tmp_path / "markers").mkdir()
    with CheckpointWriter(tmp_path / "run", keep=3) as writer:
        step = writer.save(state._replace(step=state.step + 5), 1, config, dataset, val_loss=100.0)
        # save() has returned (a synchronous one would still wait for `commit`); Orbax goes on writing.
        deadline = time.monotonic() + 30
        while not (tmp_path / "markers" / "5").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (tmp_path / "markers" / "5").exists()  # the commit has begun ...
        assert not (tmp_path / "run" / "checkpoints" / "5").exists()  # ... and waits
        commit.set()
        writer.wait()
        assert (tmp_path / "run" / "checkpoints" / "5").is_dir()
    assert step == 5 and load_run(tmp_path / "run").step == 5


def test_an_error_writing_an_epoch_stops_the_run_and_keeps_the_checkpoints_before_it(tmp_path, monkeypatch):
    import vaecli.training.run

    write_pictures = vaecli.training.run.write_epoch_pictures

    def fail_at_epoch_2(run_dir, model, config, val_images, epoch):
        if epoch == 2:
            raise OutputError("cannot write samples/epoch_002.png: No space left on device")
        return write_pictures(run_dir, model, config, val_images, epoch)

    monkeypatch.setattr(vaecli.training.run, "write_epoch_pictures", fail_at_epoch_2)
    with pytest.raises(OutputError, match=r"epoch_002\.png: No space left"):
        continue_training(tiny_config(train={"epochs": 3}), tiny_dataset(), tmp_path / "run", None, RunHooks())
    assert [int(path.name) for path in checkpoint_step_dirs(tmp_path / "run")] == [STEPS_PER_EPOCH]
    assert load_run(tmp_path / "run", "latest").step == STEPS_PER_EPOCH


def test_exit_now_waits_for_the_outputs_still_being_written(tmp_path, monkeypatch):
    import jax  # noqa: F401  (exit_now leaves through os._exit only once JAX is loaded)

    late_file = tmp_path / "late.txt"
    drained = threading.Event()
    exits = []
    monkeypatch.setattr(os, "_exit", lambda code: exits.append((code, late_file.exists(), drained.is_set())))
    worker = OrderedWorker("slow outputs", drain=drained.set)
    worker.submit(lambda: (time.sleep(0.3), late_file.write_text("written")))
    try:
        exit_now(3)
    finally:
        worker.close()
    assert exits == [(3, True, True)]  # the task queued and the drain (an asynchronous save's wait) both ran first


def test_the_epoch_pictures_compile_once_before_training_not_again_during_it(tmp_path):
    """The pictures are compiled ahead, on a fresh model placed where each epoch's state is copied to: a model
    placed elsewhere keys another compilation, which then runs beside epoch 2's steps and slows them."""
    from vaecli.models import sampling as sample

    config = tiny_config(model={"latent_dim": 7}, train={"epochs": 2})  # shapes no other test compiles
    dataset = tiny_dataset(train_count=64, val_count=16)
    before = sample._decode_prior_batch._cache_size(), sample._reconstruct_batch._cache_size()
    continue_training(config, dataset, tmp_path / "run", None, RunHooks())
    after = sample._decode_prior_batch._cache_size(), sample._reconstruct_batch._cache_size()
    assert (after[0] - before[0], after[1] - before[1]) == (1, 1)
