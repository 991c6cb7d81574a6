"""Start-up: the persistent compilation cache, private and reused; large outputs in bounded memory; what each
command imports."""

import ast
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest

from vaecli.common.cache import enable_compilation_cache, private_directory
from vaecli.common.images import save_npz_streamed
from vaecli.inference.open_run import model_file_path, open_inference_run
from vaecli.runs.rundir import INFERENCE_SUBDIR


def test_the_cache_folder_is_made_private(tmp_path):
    shared = tmp_path / "cache"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    assert private_directory(shared) == shared
    assert stat.S_IMODE(shared.stat().st_mode) == 0o700
    assert private_directory(tmp_path / "new" / "folder") is not None
    assert stat.S_IMODE((tmp_path / "new" / "folder").stat().st_mode) & 0o077 == 0


def test_a_cache_folder_owned_by_someone_else_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "getuid", lambda: os.stat(tmp_path).st_uid + 1)
    assert private_directory(tmp_path) is None


def test_enabling_points_jax_at_the_user_cache(tmp_path, monkeypatch):
    import jax

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    previous = jax.config.jax_compilation_cache_dir
    try:
        directory = enable_compilation_cache()
        assert directory == tmp_path / "vaecli" / "jax-compilation"
        assert jax.config.jax_compilation_cache_dir == str(directory)
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)


def test_a_second_generate_reuses_the_compiled_programs_and_the_kept_weights(tmp_path, trained_run_dir, trained_run):
    """The first generate restores the checkpoint (Orbax, Flax) and keeps its weights; the second reads them.
    Both write the bytes the Flax model decodes."""
    from vaecli.inference.sample import save_prior_samples

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run_dir, run_dir, ignore=shutil.ignore_patterns(INFERENCE_SUBDIR))
    environment = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    command = [sys.executable, "-m", "vaecli", "generate", "--run", str(run_dir), "--n", "16"]
    cache = tmp_path / "cache" / "vaecli" / "jax-compilation"

    subprocess.run([*command, "--out", str(tmp_path / "first.png")], env=environment, check=True, timeout=120)
    entries = sorted(path.name for path in cache.iterdir())
    assert any(name.startswith("jit__decode_prior_batch") for name in entries), entries
    assert model_file_path(run_dir, trained_run.step).is_file()
    subprocess.run([*command, "--out", str(tmp_path / "second.png")], env=environment, check=True, timeout=120)
    assert sorted(path.name for path in cache.iterdir()) == entries  # every program came from the cache
    save_prior_samples(tmp_path / "flax.png", trained_run.model, 16, seed=0, temperature=1.0)
    assert (tmp_path / "first.png").read_bytes() == (tmp_path / "flax.png").read_bytes()
    assert (tmp_path / "second.png").read_bytes() == (tmp_path / "flax.png").read_bytes()


def test_a_streamed_npz_holds_exactly_the_chunks(tmp_path):
    chunks = [np.full((3, 2, 2), value, np.float32) for value in range(4)]
    save_npz_streamed(tmp_path / "a.npz", "samples", (12, 2, 2), np.float32, iter(chunks))
    np.testing.assert_array_equal(np.load(tmp_path / "a.npz")["samples"], np.concatenate(chunks))


def test_a_streamed_npz_with_missing_rows_is_not_written(tmp_path):
    with pytest.raises(ValueError, match="got 3 rows for an array of 12"):
        save_npz_streamed(tmp_path / "a.npz", "samples", (12, 2), np.float32, iter([np.zeros((3, 2))]))
    assert list(tmp_path.iterdir()) == []


def test_generate_to_npz_streams_batches_and_matches_the_in_memory_result(tmp_path, trained_run, monkeypatch):
    from vaecli.inference.sample import save_prior_samples
    from vaecli.models.sampling import generate, generate_batches

    monkeypatch.setattr("vaecli.models.sampling.DECODE_BATCH_SIZE", 7)
    assert [len(batch) for batch in generate_batches(trained_run.model, 20)] == [7, 7, 6]
    save_prior_samples(tmp_path / "s.npz", trained_run.model, 20, seed=2, temperature=1.0)
    np.testing.assert_array_equal(np.load(tmp_path / "s.npz")["samples"], generate(trained_run.model, 20, seed=2))


# Loaded only by the commands that need them: training (JAX, tensorboardX) and drawing (matplotlib).
HEAVY_MODULES = ("jax", "flax", "orbax", "matplotlib", "tensorboardX")


def modules_loaded_by(*arguments: str, then: tuple[list[str], ...] = ()) -> tuple[list[str], str]:
    """Which of HEAVY_MODULES `vae ARGUMENTS` imports (run in a fresh interpreter), and what it printed;
    `then`: the arguments of more commands run after it in the same interpreter."""
    run_commands = "".join(
        f"sys.argv = ['vae', *{list(command)!r}]\ntry:\n    app()\nexcept SystemExit:\n    pass\n"
        for command in (list(arguments), *then)
    )
    probe = (
        "import sys\n"
        "from vaecli.cli.app import app\n"
        f"{run_commands}"
        f"print(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules), file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    return ast.literal_eval(result.stderr.strip().splitlines()[-1]), result.stdout


@pytest.mark.parametrize("arguments", [["--help"], ["curves", "--help"], ["runs", "--help"]])
def test_help_loads_no_plotting_tensorboard_or_jax(arguments):
    loaded, printed = modules_loaded_by(*arguments)
    assert "Usage" in printed and loaded == []


def test_listing_runs_loads_no_plotting_tensorboard_or_jax(trained_run_dir):
    loaded, printed = modules_loaded_by("runs", str(trained_run_dir.parent))
    assert trained_run_dir.name in printed and loaded == []


@pytest.fixture(scope="module")
def run_with_kept_weights(tmp_path_factory, trained_run_dir):
    """A copy of the trained run whose weights are kept for inference, with a 2-component gmm fitted."""
    from vaecli.inference.samplers import run_mixture

    run_dir = tmp_path_factory.mktemp("kept") / "run"
    shutil.copytree(trained_run_dir, run_dir)
    run_mixture(open_inference_run(run_dir), components=2)
    return run_dir


def test_decoding_commands_read_the_kept_weights_with_neither_orbax_nor_flax(run_with_kept_weights, tmp_path):
    run = ["--run", str(run_with_kept_weights)]
    gmm = ["--sampler", "gmm", "--components", "2"]
    loaded, printed = modules_loaded_by(
        "generate", "--n", "16", *run, "--out", str(tmp_path / "prior.png"),
        then=(
            ["generate", *gmm, "--n", "16", *run, "--out", str(tmp_path / "gmm.png")],
            ["reconstruct", "--samples", "2", *run, "--out", str(tmp_path / "reconstructions.png")],
        ),
    )  # fmt: skip
    assert loaded == ["jax"], printed
    assert printed.count(f"run {run_with_kept_weights}") == 3, printed


def test_every_command_that_uses_a_model_runs_its_kept_file_with_neither_orbax_nor_flax(
    run_with_kept_weights, tmp_path
):
    """evaluate and the latent views read the kept model file too (matplotlib draws the latent views)."""
    run = ["--run", str(run_with_kept_weights)]
    loaded, printed = modules_loaded_by(
        "evaluate", "--k", "2", "--images", "8", *run,
        then=(
            ["latent", *run, "--images", "50", "--out", str(tmp_path / "latent.png")],
            ["interpolate", "test:0", "test:1", *run, "--out", str(tmp_path / "interpolation.png")],
            ["traverse", *run, "--out", str(tmp_path / "traverse.png")],
        ),
    )  # fmt: skip
    assert "flax" not in loaded and "orbax" not in loaded and "jax" in loaded, printed
    for output in ("latent.png", "interpolation.png", "traverse.png"):
        assert (tmp_path / output).is_file(), printed
