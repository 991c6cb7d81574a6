"""The `vae` command end to end, and every user error as one line on stderr with no output file."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_one_line_error, vae
from idx_files import write_mnist_dir
from PIL import Image

TINY_MODEL = ["--set", "model.hidden=[64]", "--set", "model.latent_dim=4"]


def png_shape(path):
    with Image.open(path) as picture:
        return picture.size[::-1]


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    """`vae train --config mnist.yaml --set data.dir=DIR` on small IDX files, from a fresh folder."""
    workdir = tmp_path_factory.mktemp("work")
    data_dir = write_mnist_dir(workdir / "idx", n_train=600, n_test=40)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        result = vae(
            "train", "--config", "mnist.yaml", "--set", f"data.dir={data_dir}", "--set", "train.epochs=1",
            "--set", "train.batch_size=50", *TINY_MODEL,
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    return workdir, result


def test_train_writes_a_complete_run_directory(mnist_run):
    workdir, result = mnist_run
    run_dir = workdir / "runs" / "mnist"  # default: runs/<config stem>
    assert "epoch   1/1" in result.output and "val ELBO" in result.output
    saved = (run_dir / "config.yaml").read_text()
    assert "latent_dim: 4" in saved and str(workdir / "idx") in saved
    (metrics,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    expected_keys = {
        "epoch",
        "step",
        "train_loss",
        "val_loss",
        "val_recon",
        "val_kl",
        "train_seconds",
        "val_seconds",
        "epoch_seconds",
        "images_per_second",
    }
    assert expected_keys <= set(metrics)
    assert metrics["step"] == (600 - 100) // 50  # 100 of the 600 are held out for validation
    assert [path.name for path in (run_dir / "checkpoints").iterdir()] == ["10"]
    assert png_shape(run_dir / "samples" / "epoch_001.png") == (8 * 28 + 9 * 2, 8 * 28 + 9 * 2)
    assert (run_dir / "reconstructions" / "epoch_001.png").is_file()


def test_generate_from_the_newest_run_is_deterministic(mnist_run, monkeypatch):
    workdir, _ = mnist_run
    monkeypatch.chdir(workdir)
    first = vae("generate", "--n", 10, "--out", "out/grid.png")  # out/ does not exist yet: created
    assert first.exit_code == 0, first.output
    assert "10 samples from the prior" in first.stdout
    grid = (workdir / "out" / "grid.png").read_bytes()
    assert png_shape(workdir / "out" / "grid.png") == (3 * 28 + 4 * 2, 4 * 28 + 5 * 2)  # ceil(sqrt(10)) per row

    assert vae("generate", "--n", 10, "--out", "again.png").exit_code == 0
    assert (workdir / "again.png").read_bytes() == grid
    assert vae("generate", "--n", 10, "--seed", 1, "--out", "other.png").exit_code == 0
    assert (workdir / "other.png").read_bytes() != grid

    assert vae("generate", "--n", 5, "--out", "samples.npz", "--temperature", 0.5).exit_code == 0
    samples = np.load(workdir / "samples.npz")["samples"]
    assert samples.shape == (5, 28, 28) and samples.dtype == np.float32
    assert samples.min() >= 0 and samples.max() <= 1


def test_reconstruct_test_images_and_user_files(mnist_run, monkeypatch):
    workdir, _ = mnist_run
    monkeypatch.chdir(workdir)
    default = vae("reconstruct", "--run", "runs/mnist")
    assert default.exit_code == 0, default.output
    assert "the first 16 mnist test images" in default.stdout
    # 16 rows; input, a gap, then 4 reconstructions per row.
    assert png_shape(workdir / "recon.png") == (16 * 28 + 17 * 2, 5 * 28 + 8 * 2)

    digit = np.full((60, 40), 255, np.uint8)
    digit[10:50, 15:25] = 0  # a dark stroke on white paper, not at the model's size
    Image.fromarray(digit).save(workdir / "one.png")
    light_ink = np.zeros((28, 28), np.uint8)
    light_ink[6:22, 12:16] = 255  # already as MNIST draws it: light ink on dark, at the model's size
    Image.fromarray(light_ink).save(workdir / "two.jpg")
    arguments = ("reconstruct", "one.png", "two.jpg", "--samples", 3, "--out", "recon.npz")
    assert vae(*arguments).exit_code == 0
    arrays = np.load(workdir / "recon.npz")
    assert arrays["inputs"].shape == (2, 28, 28) and arrays["reconstructions"].shape == (2, 3, 28, 28)
    assert arrays["inputs"][0].max() == 1.0 and arrays["inputs"][0][0, 0] == 0.0  # inverted: light ink on dark
    first = (workdir / "recon.npz").read_bytes()
    assert vae(*arguments).exit_code == 0
    assert (workdir / "recon.npz").read_bytes() == first

    assert vae("reconstruct", "one.png", "--mean", "--samples", 2, "--out", "mean.npz").exit_code == 0
    means = np.load(workdir / "mean.npz")["reconstructions"]
    np.testing.assert_array_equal(means[0, 0], means[0, 1])


@pytest.fixture
def empty_workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("arguments", "code", "fragment"),
    [
        (["train", "--config", "missing.yaml"], 2, "config file missing.yaml not found"),
        (["train", "--config", "."], 2, "is a directory"),
        (["train", "--config", "mnist-sample", "--set", "train.epoch=1"], 2, "did you mean train.epochs?"),
        (["train", "--config", "mnist-sample", "--set", "model.latent_dim=0"], 2, "model.latent_dim"),
        (["train", "--config", "mnist-sample", "--set", "train.batch_size=5000"], 2, "larger than the 4000"),
        (
            ["train", "--config", "mnist", "--set", "data.dir=nowhere", "--set", "data.mirrors=http://127.0.0.1:9/"],
            1,
            "mnist: could not download train-images-idx3-ubyte.gz: tried http://127.0.0.1:9/",
        ),
        (["train"], 2, "give --config CONFIG to start a run, or --resume RUN_DIR"),
        (["train", "--resume", "runs/x", "--config", "mnist"], 2, "--resume continues a run in place"),
        (["generate"], 1, "no trained run under runs/"),
        (["generate", "--checkpoint", "newest"], 2, "--checkpoint 'newest': give best, latest or a step"),
        (["generate", "--run", "nowhere"], 1, "run directory nowhere does not exist"),
        (["generate", "--run", "."], 1, "holds no checkpoint"),
        (["generate", "--n", "0", "--out", "zero.png"], 2, "--n must be at least 1"),
        (["generate", "--out", "grid.jpg"], 2, "must end in .png"),
        (["reconstruct", "--samples", "0"], 2, "--samples must be at least 1"),
        (["generate", "--seed", "-1"], 2, "--seed must be between 0 and 4294967295, got -1"),
        (["reconstruct", "--seed", str(2**64)], 2, "--seed must be between 0 and 4294967295"),
        (["generate", "--checkpoint", "\u00b2"], 2, "give best, latest or a step number"),
    ],
)
def test_user_errors_are_one_line_without_traceback(empty_workdir, arguments, code, fragment):
    result = vae(*arguments)
    assert_one_line_error(result, code, fragment)
    assert not list(empty_workdir.glob("*.png")) and not (empty_workdir / "runs").exists()


def test_bad_yaml_file_is_a_config_error(empty_workdir):
    (empty_workdir / "bad.yaml").write_text("train:\n  epochs: 2\n   batch_size: 3\n")
    assert_one_line_error(vae("train", "--config", "bad.yaml"), 2, "bad.yaml line 3, column 14: YAML syntax error")


def test_training_into_an_existing_run_needs_overwrite(empty_workdir, trained_run_dir):
    result = vae("train", "--config", "mnist-sample", "--out", trained_run_dir)
    assert_one_line_error(result, 1, "already holds a run")
    assert (trained_run_dir / "checkpoints").is_dir()


@pytest.mark.parametrize(
    ("content", "fragment"),
    [(None, "does not exist"), (b"", "is empty"), (b"just some text", "is not an image Pillow can read")],
)
def test_reconstruct_bad_inputs_write_nothing(empty_workdir, trained_run_dir, content, fragment):
    if content is not None:
        (empty_workdir / "input.png").write_bytes(content)
    result = vae("reconstruct", "input.png", "--run", trained_run_dir, "--out", "recon.png")
    assert_one_line_error(result, 1, fragment)
    assert not (empty_workdir / "recon.png").exists()


def test_an_unwritable_output_is_a_clear_error(empty_workdir, trained_run_dir):
    (empty_workdir / "blocker").write_text("a file where a folder should be")
    result = vae("generate", "--run", trained_run_dir, "--out", "blocker/grid.png")
    assert_one_line_error(result, 1, "cannot create directory blocker")


def test_output_is_replaced_whole_and_leaves_no_temporary_files(empty_workdir, trained_run_dir):
    (empty_workdir / "grid.png").write_bytes(b"old")
    assert vae("generate", "--run", trained_run_dir, "--n", 4).exit_code == 0
    assert (empty_workdir / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(path.name for path in empty_workdir.iterdir()) == ["grid.png"]


@pytest.mark.parametrize("arguments", [["--help"], ["train", "--help"], ["generate", "--help"]])
def test_help_imports_no_jax(arguments):
    """`vae --help` stays instant: showing help must not import JAX, Flax or Orbax."""
    probe = (
        "import sys\n"
        f"sys.argv = ['vae', *{arguments!r}]\n"
        "from vaecli.cli.app import app\n"
        "try:\n    app()\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('jax', 'flax', 'orbax') if m in sys.modules), file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert "Usage" in result.stdout
    assert result.stderr.strip().splitlines()[-1] == "[]"


def test_python_m_vaecli_works():
    result = subprocess.run([sys.executable, "-m", "vaecli", "--help"], capture_output=True, text=True, check=True)
    for command in ("train", "generate", "reconstruct", "evaluate"):
        assert command in result.stdout


def test_configs_folder_paths_work_from_the_repository_root(monkeypatch):
    root = Path(__file__).parent.parent
    monkeypatch.chdir(root)
    from vaecli.common.config import load_config, resolve_config_path

    for name in ("mnist", "mnist-sample", "fashion_mnist", "kmnist", "folder"):
        path = Path("configs") / f"{name}.yaml"
        assert resolve_config_path(str(path)) == path  # an existing path is used as given
        assert load_config(str(path)) == load_config(name)  # and is the same as the shipped name


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        (["generate", "--n", "abc"], "Invalid value for '--n'"),
        (["train", "--config"], "requires an argument"),
        (["bogus"], "No such command 'bogus'"),
        (["generate", "--bogus"], "No such option: --bogus"),
    ],
)
def test_command_line_mistakes_are_one_line_too(tmp_path, arguments, fragment):
    """Typer's own usage errors go through the real entry point, not CliRunner, so test them there."""
    result = subprocess.run(
        [sys.executable, "-m", "vaecli", *arguments], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "--help" in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []
