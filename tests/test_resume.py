"""Runs that survive: SIGKILL then --resume is bit-identical, Ctrl-C saves and says how to resume, NaN stops cleanly."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import small_config
from helpers import assert_trees_equal, tiny_config, tiny_dataset, trees_differ
from slow_saves import pending_commits
from typer.testing import CliRunner

from vaecli.cli.app import app
from vaecli.common.config import load_config
from vaecli.runs.rundir import read_metrics
from vaecli.training.checkpoint import load_run, load_train_state, read_latest_meta, save_checkpoint
from vaecli.training.loop import train

# ~190 steps an epoch with a tiny model: each epoch takes a fraction of a second, so a kill lands
# anywhere (mid-epoch, during a checkpoint, between epochs).
RUN_SETTINGS = [
    "--set", "model.hidden=[32]", "--set", "model.latent_dim=4", "--set", "train.batch_size=21",
    "--set", "train.epochs=6", "--set", "train.keep_checkpoints=2",
]  # fmt: skip


NEW_RUN = ["train", "--config", "mnist-sample", *RUN_SETTINGS, "--out", "run"]


def vae_process(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vaecli", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def slow_saving_vae_process(markers: Path, hold_seconds: float, *args: str, cwd: Path) -> subprocess.Popen:
    """`vae` whose every checkpoint commit marks MARKERS/<step>, then waits hold_seconds (tests/slow_saves.py)."""
    command = [sys.executable, str(Path(__file__).parent / "slow_saves.py"), str(markers), str(hold_seconds), *args]
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_pending_save(
    markers: Path, run_dir: Path, number: int, process: subprocess.Popen, timeout: float = 120
) -> int:
    """The step of the run's `number`-th checkpoint, once its commit has begun and is held back."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        marked = sorted(int(path.name) for path in markers.iterdir()) if markers.is_dir() else []
        if len(marked) >= number and marked[number - 1] in pending_commits(markers, run_dir):
            return marked[number - 1]
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    raise AssertionError(f"no pending save number {number} within {timeout} s")


def temporary_checkpoints(run_dir: Path) -> list[str]:
    return [path.name for path in (run_dir / "checkpoints").iterdir() if not path.name.isdigit()]


def finish(process: subprocess.Popen, timeout: float = 180) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def wait_for_epochs(run_dir: Path, epochs: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= epochs:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    raise AssertionError(f"no {epochs} epochs within {timeout} s")


def final_state(run_dir: Path):
    meta = read_latest_meta(run_dir)
    config = load_run(run_dir, "latest").config
    return meta, load_train_state(run_dir, meta["step"], config, tuple(meta["image_shape"]))


def assert_bit_identical(first, second) -> None:
    for left, right in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(second), strict=True):
        np.testing.assert_array_equal(np.asarray(left), np.asarray(right))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("uninterrupted")
    code, _, err = finish(vae_process("train", "--config", "mnist-sample", *RUN_SETTINGS, "--out", "run", cwd=workdir))
    assert code == 0, err
    return workdir / "run"


def test_sigkill_during_a_save_then_resume_gives_bit_identical_weights(tmp_path, uninterrupted):
    """Killed while epoch 2's checkpoint is written in the background, epoch 3 trained and handed over meanwhile."""
    markers, run_dir = tmp_path / "markers", tmp_path / "run"
    process = slow_saving_vae_process(markers, 3, *NEW_RUN, cwd=tmp_path)
    pending_step = wait_for_pending_save(markers, run_dir, 2, process)
    time.sleep(1)  # of the 3 s that the commit is held: epoch 3 (a fraction of a second) ends meanwhile
    process.send_signal(signal.SIGKILL)
    process.communicate()

    assert f"{pending_step}.orbax-checkpoint-tmp" in temporary_checkpoints(run_dir)  # killed mid-save ...
    previous = read_latest_meta(run_dir)  # ... which leaves epoch 1's checkpoint, complete and readable
    assert previous["epoch"] == 1 and previous["step"] < pending_step
    assert load_run(run_dir, "latest").step == previous["step"]
    # Epoch 3's metrics wait for epoch 2's checkpoint: never more than one epoch beyond the newest checkpoint.
    assert [row["epoch"] for row in read_metrics(run_dir)] == [1, 2]

    code, out, err = finish(vae_process("train", "--resume", "run", cwd=tmp_path))
    assert code == 0, err
    assert "resuming run" in out

    resumed_meta, resumed = final_state(tmp_path / "run")
    reference_meta, reference = final_state(uninterrupted)
    assert resumed_meta["step"] == reference_meta["step"] and resumed_meta["epoch"] == 6
    assert_bit_identical(resumed.params, reference.params)
    assert_bit_identical(resumed.opt_state, reference.opt_state)
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4, 5, 6]  # no duplicate or missing epoch after the kill


def test_ctrl_c_during_a_save_saves_a_checkpoint_says_how_to_resume_and_resumes_exactly(tmp_path, uninterrupted):
    markers, run_dir = tmp_path / "markers", tmp_path / "run"
    process = slow_saving_vae_process(markers, 1, *NEW_RUN, cwd=tmp_path)
    pending_step = wait_for_pending_save(markers, run_dir, 1, process)  # epoch 1's checkpoint
    process.send_signal(signal.SIGINT)
    code, out, err = finish(process)

    assert code == 128 + signal.SIGINT
    assert "stopping after the current steps and saving a checkpoint" in out  # beside the progress bar
    assert "resume with: vae train --resume run" in err
    assert "Traceback" not in err
    assert not temporary_checkpoints(run_dir)  # the save under way was completed (and any after it)
    meta = read_latest_meta(tmp_path / "run")
    assert meta["step"] >= pending_step and meta["epoch"] < 6

    code, _, err = finish(vae_process("train", "--resume", "run", cwd=tmp_path))
    assert code == 0, err
    _, resumed = final_state(tmp_path / "run")
    _, reference = final_state(uninterrupted)
    assert_bit_identical(resumed.params, reference.params)


def test_a_second_ctrl_c_leaves_at_once_but_only_after_the_save_under_way(tmp_path):
    markers, run_dir = tmp_path / "markers", tmp_path / "run"
    process = slow_saving_vae_process(markers, 3, *NEW_RUN, cwd=tmp_path)
    pending_step = wait_for_pending_save(markers, run_dir, 1, process)
    process.send_signal(signal.SIGINT)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)  # within the 3 s that the commit is held
    code, out, err = finish(process)

    assert code == 128 + signal.SIGINT and "stopping at once" in out, (code, out, err)
    # exit_now left through os._exit only after the save under way (and any queued behind it) was complete:
    # without waiting, that save's temporary directory would be left and its checkpoint missing.
    assert not temporary_checkpoints(run_dir)
    assert load_run(run_dir, "latest").step >= pending_step


def test_sigterm_stops_the_same_way(tmp_path):
    process = vae_process("train", "--config", "mnist-sample", *RUN_SETTINGS, "--out", "run", cwd=tmp_path)
    wait_for_epochs(tmp_path / "run", 1, process)
    process.send_signal(signal.SIGTERM)
    code, _, err = finish(process)
    assert code == 128 + signal.SIGTERM
    assert "resume with: vae train --resume run" in err
    assert load_run(tmp_path / "run", "latest").step == read_latest_meta(tmp_path / "run")["step"]


def test_resume_refuses_changes_that_would_alter_the_run(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    runner = CliRunner()
    changed = runner.invoke(app, ["train", "--resume", str(run_dir), "--set", "model.latent_dim=8"])
    assert changed.exit_code == 2
    assert "model.latent_dim cannot change (saved 4, asked 8); only train.epochs, train.keep_checkpoints" in (
        changed.stderr
    )
    done = runner.invoke(app, ["train", "--resume", str(run_dir)])
    assert done.exit_code == 2
    assert "has already trained 6 epochs" in done.stderr and "--set train.epochs=16" in done.stderr

    longer = runner.invoke(app, ["train", "--resume", str(run_dir), "--set", "train.epochs=7"])
    assert longer.exit_code == 0, longer.output
    assert read_latest_meta(run_dir)["epoch"] == 7
    assert "epochs: 7" in (run_dir / "config.yaml").read_text()


def test_resume_refuses_data_of_another_shape_or_size(tmp_path, monkeypatch):
    from image_folders import write_image_folder

    pictures = write_image_folder(tmp_path / "pictures", count_per_class=6)
    monkeypatch.chdir(tmp_path)
    settings = [
        "--set", f"data.dir={pictures}", "--set", "data.image_size=12", "--set", "train.batch_size=4",
        # A small dense model trains in a moment; a constant rate lets the resumed run change train.epochs.
        "--set", "model.arch=mlp", "--set", "model.hidden=[16]", "--set", "model.latent_dim=2",
        "--set", "train.lr_schedule=constant",
    ]  # fmt: skip
    runner = CliRunner()
    first = runner.invoke(app, ["train", "--config", "folder.yaml", *settings, "--set", "train.epochs=1"])
    assert first.exit_code == 0, first.output

    for extra in range(3):  # three more images: the training split grows
        (pictures / "cats" / f"more_{extra}.png").write_bytes((pictures / "cats" / "cats_00.png").read_bytes())
    grown = runner.invoke(app, ["train", "--resume", "runs/folder", "--set", "train.epochs=2"])
    assert grown.exit_code == 1
    assert "training images, but folder now has" in grown.stderr


def nan_after(step: int):
    """The configured optimizer, fed gradients that turn NaN from update number `step` on.

    With ReLUs and Adam even a learning rate of 10 only kills the units (the loss stays finite), so
    the divergence is injected with optax's own schedule transform, deterministically, at a known step.
    """
    import jax.numpy as jnp
    import optax

    import vaecli.training.loop as training

    configured = training.make_optimizer

    def make_optimizer(config, steps_per_epoch=1):
        poison = optax.scale_by_schedule(lambda count: jnp.where(count >= step, jnp.nan, 1.0))
        return optax.chain(poison, configured(config, steps_per_epoch))

    return make_optimizer


TINY_RUN = ["--set", "model.hidden=[32]", "--set", "model.latent_dim=4", "--set", "train.epochs=3"]


def test_a_diverging_run_stops_naming_the_step_and_the_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("vaecli.training.loop.make_optimizer", nan_after(70))  # epoch 1 is steps 1-62
    result = CliRunner().invoke(app, ["train", "--config", "mnist-sample", *TINY_RUN, "--out", "run"])

    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    # Update 71 turns the weights NaN, so the loss of step 72 is the first non-finite one.
    assert "training stopped: the loss became NaN or infinite at epoch 2, step 72" in lines[0]
    assert "the last good checkpoint is step 62 (epoch 1) in run" in lines[0]
    assert "lower train.learning_rate, set train.clip_norm, or set train.skip_nonfinite: true" in lines[0]
    # Nothing after the last good checkpoint was saved, and it still loads and generates.
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert read_latest_meta(tmp_path / "run")["step"] == 62
    generated = CliRunner().invoke(app, ["generate", "--run", "run", "--out", "after.png"])
    assert generated.exit_code == 0, generated.output
    assert (tmp_path / "after.png").is_file()


def test_skip_nonfinite_skips_and_counts_the_bad_steps(tmp_path, monkeypatch):
    from flax import nnx

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("vaecli.training.loop.make_optimizer", nan_after(70))
    settings = [*TINY_RUN, "--set", "train.skip_nonfinite=true"]
    result = CliRunner().invoke(app, ["train", "--config", "mnist-sample", *settings, "--out", "run"])

    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["skipped_steps"] for row in metrics] == [0, 124 - 70, 62]  # every step from step 71 on
    run = load_run(tmp_path / "run", "latest")
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree_util.tree_leaves(nnx.state(run.model)))


def test_clip_norm_clips_the_gradient_before_adam():
    """Adam's first step is about -lr per weight whatever the gradient's scale, unless clipping makes it
    smaller than Adam's epsilon: a clip norm of 1e-12 must then shrink the step to almost nothing."""
    import jax.numpy as jnp

    from vaecli.training.loop import make_optimizer

    params = {"w": jnp.zeros(100)}
    grads = {"w": jnp.full(100, 10.0)}
    steps = {}
    for clip_norm in (None, 1e-12):
        optimizer = make_optimizer(small_config(train={"learning_rate": 0.1, "clip_norm": clip_norm}))
        updates, _ = optimizer.update(grads, optimizer.init(params), params)
        steps[clip_norm] = float(jnp.abs(updates["w"]).max())
    assert steps[None] == pytest.approx(0.1, rel=1e-3)
    assert steps[1e-12] < 0.01


def test_best_and_latest_checkpoints_and_evaluate(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    settings = ["--set", "model.hidden=[32]", "--set", "model.latent_dim=4", "--set", "train.epochs=4"]
    assert runner.invoke(app, ["train", "--config", "mnist-sample", *settings, "--set", "train.keep_checkpoints=1",
                               "--out", "run"]).exit_code == 0  # fmt: skip
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    best_step = min(metrics, key=lambda row: row["val_loss"])["step"]
    kept = sorted(int(path.name) for path in (tmp_path / "run" / "checkpoints").iterdir() if path.name.isdigit())
    assert kept == sorted({best_step, metrics[-1]["step"]})  # newest 1 + the best
    assert load_run(tmp_path / "run").step == best_step  # best is the default
    assert load_run(tmp_path / "run", "latest").step == metrics[-1]["step"]
    assert load_run(tmp_path / "run", str(kept[0])).step == kept[0]
    missing = runner.invoke(app, ["generate", "--run", "run", "--checkpoint", "3"])
    assert missing.exit_code == 1 and f"has checkpoints {', '.join(map(str, kept))}" in missing.stderr

    evaluated = runner.invoke(
        app, ["evaluate", "--run", "run", "--split", "val", "--checkpoint", "latest", "--k", "1", "--json"]
    )
    assert evaluated.exit_code == 0, evaluated.output
    # The validation split again, through another binary draw and other noise: about the same -ELBO.
    assert json.loads(evaluated.stdout)["neg_elbo_nats"] == pytest.approx(metrics[-1]["val_loss"], abs=3)
    test_split = runner.invoke(app, ["evaluate", "--run", "run", "--k", "2"])
    assert test_split.exit_code == 0, test_split.output
    assert "mnist_sample test split: 500 images" in test_split.stdout


def test_config_loads_with_the_new_training_keys():
    config = load_config("mnist-sample", ["train.clip_norm=5", "train.skip_nonfinite=true", "train.keep_checkpoints=4"])
    assert (config.train.clip_norm, config.train.skip_nonfinite, config.train.keep_checkpoints) == (5.0, True, 4)


def test_a_checkpoint_that_does_not_match_its_config_is_a_clear_error(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    for meta_file in run_dir.glob("checkpoints/*/meta/metadata"):
        meta = json.loads(meta_file.read_text())
        meta["config"]["model"]["latent_dim"] = 9  # weights for z4 described as z9
        meta_file.write_text(json.dumps(meta))
    runner = CliRunner()
    generated = runner.invoke(app, ["generate", "--run", str(run_dir), "--out", str(tmp_path / "x.png")])
    resumed = runner.invoke(app, ["train", "--resume", str(run_dir), "--set", "train.epochs=9"])
    for result in (generated, resumed):
        assert result.exit_code == 1, result.output
        assert "does not match its saved config" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_a_nan_made_by_the_last_update_of_an_epoch_is_never_saved(tmp_path, monkeypatch):
    """Update 62 ends epoch 1: no later loss reveals it, so the weights are checked before saving."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("vaecli.training.loop.make_optimizer", nan_after(61))
    result = CliRunner().invoke(app, ["train", "--config", "mnist-sample", *TINY_RUN, "--out", "run"])
    assert result.exit_code == 1, result.output
    assert "the weights became NaN or infinite at epoch 1, step 62; no checkpoint had been written yet" in (
        result.stderr
    )
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_reading_a_run_leaves_a_save_in_progress_alone(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    in_progress = run_dir / "checkpoints" / "999.orbax-checkpoint-tmp-1234"
    in_progress.mkdir()
    result = CliRunner().invoke(app, ["generate", "--run", str(run_dir), "--out", str(tmp_path / "g.png")])
    assert result.exit_code == 0, result.output
    assert in_progress.is_dir()  # a training run may be writing it


def test_damaged_weights_and_metrics_are_one_line_errors(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    runner = CliRunner()
    (run_dir / "metrics.jsonl").write_text("{not json\n")
    resumed = runner.invoke(app, ["train", "--resume", str(run_dir), "--set", "train.epochs=8"])
    assert resumed.exit_code == 1 and "has a line that is not an epoch's metrics" in resumed.stderr
    assert len(resumed.stderr.strip().splitlines()) == 1

    latest = max(int(path.name) for path in (run_dir / "checkpoints").iterdir() if path.name.isdigit())
    shutil.rmtree(run_dir / "checkpoints" / str(latest) / "params")
    generated = runner.invoke(
        app, ["generate", "--run", str(run_dir), "--checkpoint", "latest", "--out", str(tmp_path / "g.png")]
    )
    assert generated.exit_code == 1, generated.output
    assert f"checkpoint {latest} in {run_dir} cannot be read (its weights are missing or damaged)" in generated.stderr
    assert len(generated.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "g.png").exists()


def test_best_is_kept_beside_the_newest_even_when_it_is_old(tmp_path):
    """Validation losses 5, 3, 4, 6, 7 with keep_checkpoints=2: steps 2 (best), 4 and 5 remain."""
    from vaecli.training.checkpoint import save_checkpoint
    from vaecli.training.loop import init_train_state

    config = small_config(model={"hidden": [8], "latent_dim": 2}, train={"keep_checkpoints": 2})
    _, state = init_train_state(config, (28, 28))
    for step, val_loss in zip([1, 2, 3, 4, 5], [5.0, 3.0, 4.0, 6.0, 7.0], strict=True):
        save_checkpoint(tmp_path, state._replace(step=jax.numpy.asarray(step)), step, config, tiny_dataset(), val_loss)
    save_checkpoint(tmp_path, state._replace(step=jax.numpy.asarray(6)), 6, config, tiny_dataset(), None, False)
    kept = sorted(int(path.name) for path in (tmp_path / "checkpoints").iterdir() if path.name.isdigit())
    assert kept == [2, 5, 6]  # the newest two (one of them mid-epoch, without a metric) and the best
    assert load_run(tmp_path).step == 2 and load_run(tmp_path, "latest").step == 6


def test_a_stop_requested_while_the_data_loads_changes_nothing(tmp_path):
    from vaecli.common.errors import Interrupted
    from vaecli.training.run import RunHooks, train_run

    with pytest.raises(Interrupted, match="stopped before training started"):
        train_run(load_config("mnist-sample"), tmp_path / "run", hooks=RunHooks(should_stop=lambda: True))
    assert not (tmp_path / "run").exists()


def test_resume_refuses_a_run_drawn_with_another_random_generator(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    for meta_file in run_dir.glob("checkpoints/*/meta/metadata"):
        meta = json.loads(meta_file.read_text())
        meta["prng_impl"] = "threefry2x32"
        meta_file.write_text(json.dumps(meta))
    result = CliRunner().invoke(app, ["train", "--resume", str(run_dir), "--set", "train.epochs=8"])
    assert result.exit_code == 1
    assert "drew its random numbers with threefry2x32, this vaecli uses philox2x32" in result.stderr


def stop_at_call(number: int):
    """A should_stop that asks to stop the `number`-th time it is asked."""
    calls = []

    def should_stop() -> bool:
        calls.append(None)
        return len(calls) == number

    return should_stop


def test_resuming_mid_epoch_with_every_training_aid_on_is_bit_identical(tmp_path, monkeypatch):
    """The schedules and the moving average follow the step, so a checkpoint mid-warm-up resumes exactly."""
    monkeypatch.setattr("vaecli.training.loop.STEPS_PER_CHUNK", 3)  # 8 steps an epoch: chunks of 3, 3 and 2
    aids = {
        "epochs": 2, "ema": 0.9, "lr_schedule": "cosine", "lr_warmup_epochs": 0.5, "kl_warmup_epochs": 1.5,
        "iw_samples": 3,
    }  # fmt: skip
    config, dataset = tiny_config(train=aids), tiny_dataset()
    reference = train(config, dataset).state

    # Asked after each chunk and each epoch: the 5th time is after the first chunk of epoch 2.
    stopped = train(config, dataset, should_stop=stop_at_call(5))
    assert stopped.stopped_in_epoch == 2 and int(stopped.state.step) == 11  # inside the 12-step KL warm-up
    assert trees_differ(stopped.state.ema_params, stopped.state.params)
    save_checkpoint(tmp_path, stopped.state, 2, config, dataset, epoch_finished=False)
    restored = load_train_state(tmp_path, 11, config, dataset.image_shape)
    resumed = train(config, dataset, start=restored).state

    assert int(resumed.step) == int(reference.step) == 16
    assert_trees_equal(resumed.params, reference.params)
    assert_trees_equal(resumed.opt_state, reference.opt_state)
    assert_trees_equal(resumed.ema_params, reference.ema_params)
