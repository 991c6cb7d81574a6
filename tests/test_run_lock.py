"""One trainer per run directory: a second `vae train` aimed at a run in use is refused and changes nothing."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_one_line_error, tiny_config, vae

from vaecli.common.errors import OutputError
from vaecli.runs.rundir import RunLock
from vaecli.training.run import RunHooks, prepare_run_dir, resume_run, train_run

ONE_EPOCH = tiny_config(train={"epochs": 1})
# A process that takes the lock on argv[1], says so, and sleeps holding it.
HOLD_LOCK = """
import sys, time
from vaecli.runs.rundir import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("lock") / "run"
    train_run(ONE_EPOCH, run_dir)
    return run_dir


@pytest.fixture
def run_dir(one_epoch_run, tmp_path) -> Path:
    """A copy of the trained run, the test's own."""
    return Path(shutil.copytree(one_epoch_run, tmp_path / "run"))


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file under `run_dir`, by relative path, with its bytes."""
    return {str(path.relative_to(run_dir)): path.read_bytes() for path in sorted(run_dir.rglob("*")) if path.is_file()}


def refusal_pattern(pid: int) -> str:
    return rf"is being trained by process {pid} on host \S+ since \d\d:\d\d:\d\d; wait for it to finish"


@pytest.fixture
def lock_holder(run_dir):
    """A separate process holding `run_dir`'s lock, killed (SIGKILL) when the test ends."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run_dir)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    try:
        assert process.stdout.readline().strip() == "held"
        yield process
    finally:
        process.kill()
        process.wait(timeout=30)
        process.stdout.close()


def test_a_run_in_use_refuses_overwrite_and_resume_and_is_left_untouched(run_dir):
    before = snapshot(run_dir)
    with RunLock(run_dir):
        held = snapshot(run_dir)
        with pytest.raises(OutputError, match=refusal_pattern(os.getpid())):
            train_run(ONE_EPOCH, run_dir, overwrite=True)
        with pytest.raises(OutputError, match=refusal_pattern(os.getpid())):
            resume_run(run_dir, ["train.epochs=2"])
        assert snapshot(run_dir) == held
    assert snapshot(run_dir) == before  # the lock file is emptied again on release


def test_another_process_holding_the_run_is_named(run_dir, lock_holder):
    before = snapshot(run_dir)
    with pytest.raises(OutputError, match=refusal_pattern(lock_holder.pid)):
        train_run(ONE_EPOCH, run_dir, overwrite=True)
    assert snapshot(run_dir) == before


def test_a_refused_trainer_is_told_before_it_loads_any_data(run_dir, monkeypatch):
    """Loading may mean a download of minutes: a run it may not replace, or another trainer's, is refused first."""

    def loading(*arguments):
        raise AssertionError("the data was loaded before the refusal")

    monkeypatch.setattr("vaecli.training.run.load_run_data", loading)
    before = snapshot(run_dir)
    with pytest.raises(OutputError, match="already holds a run"):
        train_run(ONE_EPOCH, run_dir)  # without overwrite
    with RunLock(run_dir), pytest.raises(OutputError, match=refusal_pattern(os.getpid())):
        train_run(ONE_EPOCH, run_dir, overwrite=True)
    assert snapshot(run_dir) == before


def test_the_cli_refuses_in_one_line(run_dir):
    with RunLock(run_dir):
        held = snapshot(run_dir)
        result = vae("train", "--config", "mnist-sample", "--set", "train.epochs=1", "--out", run_dir, "--overwrite")
        assert_one_line_error(result, 1, f"{run_dir} is being trained by process {os.getpid()} on host")
        assert re.search(refusal_pattern(os.getpid()), result.stderr.replace("\n", " ")), result.stderr
        result = vae("train", "--resume", run_dir, "--set", "train.epochs=2")
        assert_one_line_error(result, 1, f"is being trained by process {os.getpid()}")
        assert snapshot(run_dir) == held


def test_a_lock_held_by_a_killed_process_is_free_again(run_dir, lock_holder):
    lock_holder.send_signal(signal.SIGKILL)
    lock_holder.wait(timeout=30)
    result = train_run(ONE_EPOCH, run_dir, overwrite=True)
    assert result.stopped_at_step is None and (run_dir / "checkpoints").is_dir()


def test_the_lock_is_held_while_training_and_released_when_the_run_returns(tmp_path):
    run_dir = tmp_path / "run"
    refusals = []

    def try_to_take_the_run(metrics: dict) -> None:
        with pytest.raises(OutputError) as refusal:
            RunLock(run_dir).acquire()
        refusals.append(str(refusal.value))

    train_run(ONE_EPOCH, run_dir, hooks=RunHooks(on_epoch_end=try_to_take_the_run))
    assert len(refusals) == 1 and re.search(refusal_pattern(os.getpid()), refusals[0]), refusals
    with RunLock(run_dir):  # free once train_run has returned
        pass
    assert (run_dir / ".lock").read_text() == ""  # a finished trainer is not named as the holder


def test_overwrite_clears_a_fitted_sampler_of_the_old_run(tmp_path):
    """A gmm cached by step would otherwise be taken for the new run's at the same step."""
    run_dir = tmp_path / "run"
    (run_dir / "samplers").mkdir(parents=True)
    (run_dir / "samplers" / "gmm-10-10.npz").write_bytes(b"the old run's mixture")
    (run_dir / "config.yaml").write_text("seed: 0\n")
    with RunLock(run_dir):
        prepare_run_dir(run_dir, overwrite=True)
    assert not (run_dir / "samplers").exists() and not (run_dir / "config.yaml").exists()
