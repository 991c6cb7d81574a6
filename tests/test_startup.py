"""Start-up: the persistent compilation cache, private and reused; large outputs in bounded memory."""

import ast
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from vaecli.cache import enable_compilation_cache, private_directory
from vaecli.images import save_npz_streamed


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


def test_a_second_generate_reuses_the_compiled_programs(tmp_path, trained_run_dir):
    environment = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    command = [sys.executable, "-m", "vaecli", "generate", "--run", str(trained_run_dir), "--n", "16"]
    cache = tmp_path / "cache" / "vaecli" / "jax-compilation"

    subprocess.run([*command, "--out", str(tmp_path / "first.png")], env=environment, check=True, timeout=120)
    entries = sorted(path.name for path in cache.iterdir())
    assert any(name.startswith("jit__decode_prior_batch") for name in entries), entries
    subprocess.run([*command, "--out", str(tmp_path / "second.png")], env=environment, check=True, timeout=120)
    assert sorted(path.name for path in cache.iterdir()) == entries  # every program came from the cache
    assert (tmp_path / "first.png").read_bytes() == (tmp_path / "second.png").read_bytes()


def test_a_streamed_npz_holds_exactly_the_chunks(tmp_path):
    chunks = [np.full((3, 2, 2), value, np.float32) for value in range(4)]
    save_npz_streamed(tmp_path / "a.npz", "samples", (12, 2, 2), np.float32, iter(chunks))
    np.testing.assert_array_equal(np.load(tmp_path / "a.npz")["samples"], np.concatenate(chunks))


def test_a_streamed_npz_with_missing_rows_is_not_written(tmp_path):
    with pytest.raises(ValueError, match="got 3 rows for an array of 12"):
        save_npz_streamed(tmp_path / "a.npz", "samples", (12, 2), np.float32, iter([np.zeros((3, 2))]))
    assert list(tmp_path.iterdir()) == []


def test_generate_to_npz_streams_batches_and_matches_the_in_memory_result(tmp_path, trained_run, monkeypatch):
    from vaecli.sample import generate, generate_batches, save_prior_samples

    monkeypatch.setattr("vaecli.sample.DECODE_BATCH_SIZE", 7)
    assert [len(batch) for batch in generate_batches(trained_run.model, 20)] == [7, 7, 6]
    save_prior_samples(tmp_path / "s.npz", trained_run.model, 20, seed=2, temperature=1.0)
    np.testing.assert_array_equal(np.load(tmp_path / "s.npz")["samples"], generate(trained_run.model, 20, seed=2))


# Loaded only by the commands that need them: training (JAX, tensorboardX) and drawing (matplotlib).
HEAVY_MODULES = ("jax", "flax", "orbax", "matplotlib", "tensorboardX")


def modules_loaded_by(*arguments: str) -> tuple[list[str], str]:
    """Which of HEAVY_MODULES `vae ARGUMENTS` imports (run in a fresh interpreter), and what it printed."""
    probe = (
        "import sys\n"
        f"sys.argv = ['vae', *{list(arguments)!r}]\n"
        "from vaecli.cli import app\n"
        "try:\n    app()\nexcept SystemExit:\n    pass\n"
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
