"""Training in several processes (vae train --coordinator ... --num-processes N --process-id I): the same losses as
one process with as many devices, a checkpoint that resumes in one process, a stop request that stops all of them
at the same step, and one-line errors for flags that cannot work.

Each process is a child on the CPU with one device, joined over 127.0.0.1; every child has a timeout, so a
deadlock fails the test instead of hanging the suite, and children still running when a test fails are killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import TEST_XLA_FLAGS
from helpers import assert_one_line_error, vae
from idx_files import write_mnist_dir

from vaecli.runs.rundir import RunLock, read_metrics

PROCESSES = 2
CHILD_TIMEOUT_SECONDS = 180
# The tiny model of tests/helpers.py on 384 MNIST-format blob images (320 to train: 10 steps an epoch).
TINY_RUN = {
    "data": {"name": "mnist", "binarize": "dynamic"},
    "model": {"hidden": [32], "latent_dim": 4},
    "train": {"epochs": 2, "batch_size": 32, "tensorboard": False},
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def child_environment(devices: int) -> dict[str, str]:
    """This process's environment (its private caches among it), on the CPU, with `devices` devices."""
    environment = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    environment["JAX_PLATFORMS"] = "cpu"
    environment["XLA_FLAGS"] = f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}"
    return environment


def start_vae(arguments: list[str], cwd: Path, devices: int = 1) -> subprocess.Popen:
    command = [sys.executable, "-m", "vaecli", *arguments]
    return subprocess.Popen(
        command, env=child_environment(devices), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@contextlib.contextmanager
def killed_on_exit(children: list[subprocess.Popen]):
    """Kill whichever of `children` is still running when the block ends (a failed assertion, a timeout)."""
    try:
        yield children
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.communicate()


def finish(child: subprocess.Popen) -> tuple[int, str, str]:
    """(exit code, stdout, stderr), waiting at most CHILD_TIMEOUT_SECONDS."""
    stdout, stderr = child.communicate(timeout=CHILD_TIMEOUT_SECONDS)
    return child.returncode, stdout, stderr


def process_flags(port: int, process_id: int) -> list[str]:
    return ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(PROCESSES), "--process-id", str(process_id)]


def train_in_processes(arguments: list[str], cwd: Path) -> list[tuple[int, str, str]]:
    """`vae train ARGUMENTS` in PROCESSES joined children of one device each; their (exit code, stdout, stderr)."""
    port = free_port()
    children = [start_vae(["train", *arguments, *process_flags(port, index)], cwd) for index in range(PROCESSES)]
    with killed_on_exit(children):
        return [finish(child) for child in children]


@pytest.fixture(scope="module")
def tiny_config_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("multiprocess")
    settings = {**TINY_RUN, "data": {**TINY_RUN["data"], "dir": str(write_mnist_dir(folder / "data", 384, 64))}}
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def test_two_processes_train_as_one_process_with_two_devices_and_resume_in_one(tiny_config_file, tmp_path):
    outcomes = train_in_processes(["--config", tiny_config_file, "--out", "run"], tmp_path)
    for code, _, stderr in outcomes:
        assert code == 0, stderr[-3000:]
    (_, first_stdout, _), (_, second_stdout, _) = outcomes
    assert "on 2 cpu devices, 2 processes" in first_stdout and "done:" in first_stdout
    assert "epoch" not in second_stdout  # only process 0 reports

    alone = start_vae(["train", "--config", tiny_config_file, "--out", "alone"], tmp_path, devices=PROCESSES)
    with killed_on_exit([alone]):
        code, _, stderr = finish(alone)
    assert code == 0, stderr[-3000:]

    together, single = read_metrics(tmp_path / "run"), read_metrics(tmp_path / "alone")
    assert [row["epoch"] for row in together] == [row["epoch"] for row in single] == [1, 2]  # one line an epoch
    assert all((row["devices"], row["processes"]) == (PROCESSES, PROCESSES) for row in together)
    assert all((row["devices"], row["processes"]) == (PROCESSES, 1) for row in single)
    for key in ("train_loss", "val_loss"):
        np.testing.assert_allclose([row[key] for row in together], [row[key] for row in single], rtol=1e-4)
    assert (tmp_path / "run" / "samples" / "epoch_002.png").is_file()
    assert (tmp_path / "run" / "curves.png").is_file()

    resumed = start_vae(["train", "--resume", "run", "--set", "train.epochs=3"], tmp_path)
    with killed_on_exit([resumed]):
        code, _, stderr = finish(resumed)
    assert code == 0, stderr[-3000:]
    metrics = read_metrics(tmp_path / "run")
    assert [(row["epoch"], row["processes"]) for row in metrics] == [(1, 2), (2, 2), (3, 1)]
    assert np.isfinite(metrics[-1]["val_loss"]) and metrics[-1]["val_loss"] < metrics[0]["val_loss"]


def test_a_stop_request_to_one_process_stops_all_at_the_same_step(tiny_config_file, tmp_path):
    """Ctrl-C reaches process 1 alone: both agree at the next chunk boundary, and process 0 saves there."""
    port = free_port()
    arguments = ["train", "--config", tiny_config_file, "--out", "run", "--set", "train.epochs=200"]
    children = [start_vae([*arguments, *process_flags(port, index)], tmp_path) for index in range(PROCESSES)]
    with killed_on_exit(children):
        deadline = time.monotonic() + CHILD_TIMEOUT_SECONDS
        while not (tmp_path / "run" / "metrics.jsonl").exists():  # the first epoch is done: both are training
            assert time.monotonic() < deadline and all(child.poll() is None for child in children)
            time.sleep(0.1)
        children[1].send_signal(signal.SIGINT)
        (first_code, _, first_stderr), (second_code, _, second_stderr) = (finish(child) for child in children)
    assert (first_code, second_code) == (130, 130), first_stderr[-3000:] + second_stderr[-3000:]
    assert "stopped at step" in first_stderr and "stopped at step" not in second_stderr
    step = int(first_stderr.split("stopped at step ")[1].split(";")[0])
    metrics = read_metrics(tmp_path / "run")
    assert 1 <= len(metrics) < 200
    assert (tmp_path / "run" / "checkpoints" / str(step)).is_dir()


def test_process_flags_that_cannot_work_are_one_line_errors(tmp_path):
    run = ["train", "--config", "mnist-sample", "--out", tmp_path / "run"]
    result = vae(*run, "--process-id", 1)
    assert_one_line_error(result, 2, "--coordinator HOST:PORT, --num-processes N and --process-id I go together")
    result = vae(*run, "--coordinator", "127.0.0.1:1234", "--num-processes", 2, "--process-id", 2)
    assert_one_line_error(result, 2, "--process-id 2 is out of range: give 0 to 1")
    result = vae(*run, "--coordinator", "127.0.0.1", "--num-processes", 2, "--process-id", 1)
    assert_one_line_error(result, 2, "give HOST:PORT")
    assert not (tmp_path / "run").exists()


def test_an_unreachable_coordinator_is_one_line_after_the_timeout(tmp_path):
    flags = ["--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", 2, "--process-id", 1]
    started = time.monotonic()
    result = vae("train", "--config", "mnist-sample", "--out", tmp_path / "run", *flags, "--join-timeout", 1)
    assert_one_line_error(result, 1, f"cannot reach the coordinator {flags[1]} within 1 s")
    assert time.monotonic() - started < 30
    assert not (tmp_path / "run").exists()


def test_a_process_that_cannot_start_stops_the_others_with_one_line(tiny_config_file, tmp_path):
    """Process 0 alone refuses to start (--out already holds a run): process 1 is told so in one line, instead of
    waiting in the first step's collectives for a process that has left, and the old run is untouched."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    outcomes = train_in_processes(["--config", tiny_config_file, "--out", "run"], tmp_path)
    (first_code, _, first_stderr), (second_code, _, second_stderr) = outcomes
    first_lines = [line for line in first_stderr.splitlines() if line.strip()]
    second_lines = [line for line in second_stderr.splitlines() if line.strip()]
    assert first_code == 1 and len(first_lines) == 1 and "already holds a run" in first_lines[0], first_stderr
    assert second_code == 1 and len(second_lines) == 1, second_stderr
    assert "process 0 could not start the run (its own error says why); this process stops too" in second_lines[0]
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == "{}\n"


def test_a_run_locked_by_another_trainer_stops_every_process_with_one_line(tiny_config_file, tmp_path):
    """Process 0 alone takes the run's lock, and another trainer holds it: process 0 names that trainer and
    process 1 is told in one line that process 0 could not start, with no transport error; the run is untouched."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    with RunLock(tmp_path / "run"):  # this test process is the other trainer
        outcomes = train_in_processes(["--config", tiny_config_file, "--out", "run", "--overwrite"], tmp_path)
    (first_code, _, first_stderr), (second_code, _, second_stderr) = outcomes
    first_lines = [line for line in first_stderr.splitlines() if line.strip()]
    second_lines = [line for line in second_stderr.splitlines() if line.strip()]
    assert (
        first_code == 1 and len(first_lines) == 1 and f"is being trained by process {os.getpid()}" in first_lines[0]
    ), first_stderr
    assert second_code == 1 and len(second_lines) == 1, second_stderr
    assert "process 0 could not start the run (its own error says why); this process stops too" in second_lines[0]
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == "{}\n"
