"""The model exported: its functions give the Flax model's numbers for every architecture, the model file kept
beside a run (RUN/inference/<step>.vae) is a cache never trusted when it should not be, and `vae export`'s file
runs in a Python without vaecli (examples/exported.py)."""

import errno
import io
import json
import os
import shutil
import subprocess
import sys
import types
import zipfile
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_one_line_error, vae

import vaecli.common.files
from vaecli.common.config import ModelConfig
from vaecli.inference.export import exported_functions, model_file_bytes
from vaecli.inference.exported import (
    MODEL_FORMAT_VERSION,
    ExportedModel,
    ModelFileError,
    deserialize_functions,
    read_model_file,
)
from vaecli.inference.open_run import model_file_path, open_inference_run, read_current_model_file
from vaecli.models.vae import build_model, inference_weights
from vaecli.runs.rundir import (
    CHECKPOINT_SUBDIR,
    INFERENCE_SUBDIR,
    ORBAX_COMMIT_FILE,
    ORBAX_METRICS_FILE,
    checkpoint_identity,
    checkpoint_step_dirs,
    chosen_checkpoint_step,
)
from vaecli.training.checkpoint import choose_step, load_run, open_checkpoints

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "exported.py"

# Each architecture, likelihood and model.dtype: dense and convolutional (GroupNorm, depth-to-space), Bernoulli
# and the logistic mixture, grey and colour (whose mixture couples R, G and B), the pixel window (drawn pixel by
# pixel), and bfloat16 layers.
MODELS = {
    "mlp-bernoulli-grey": (ModelConfig(hidden=(48, 24), latent_dim=4), (28, 28)),
    "mlp-logistic-grey": (ModelConfig(hidden=(40,), latent_dim=3, likelihood="logistic", mixtures=3), (12, 12)),
    "mlp-logistic-colour": (
        ModelConfig(hidden=(32,), latent_dim=3, likelihood="logistic", mixtures=2, activation="gelu"),
        (8, 8, 3),
    ),
    "conv-bernoulli-grey": (ModelConfig(arch="conv", hidden=(8, 16), latent_dim=4, activation="silu"), (28, 28)),
    "conv-logistic-colour": (
        ModelConfig(arch="conv", hidden=(8, 16), latent_dim=5, likelihood="logistic", mixtures=2),
        (16, 16, 3),
    ),
    "conv-logistic-colour-pixel-context": (
        ModelConfig(arch="conv", hidden=(8,), latent_dim=3, likelihood="logistic", mixtures=2, pixel_context=3),
        (8, 8, 3),
    ),
    "mlp-bernoulli-grey-bfloat16": (ModelConfig(hidden=(32,), latent_dim=4, dtype="bfloat16"), (28, 28)),
    "conv-logistic-grey-bfloat16": (
        ModelConfig(arch="conv", hidden=(8,), latent_dim=3, likelihood="logistic", mixtures=2, dtype="bfloat16"),
        (8, 8),
    ),
}


def model_with_random_weights(config: ModelConfig, image_shape: tuple[int, ...], seed: int = 1):
    """A VAE of `config` with random weights everywhere: zero biases and unit norm scales would hide a weight
    left out. Drawn by NumPy into an abstract model, since initialising each shape eagerly compiles a program
    per shape (minutes for a conv model on a busy CPU)."""
    graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: build_model(config, image_shape, 0)))
    rng = np.random.default_rng(seed)

    def draw(leaf):
        if len(leaf.shape) == 1:  # biases, the norms' scales and shifts, the output bias
            return 1.0 + rng.normal(0.0, 0.3, leaf.shape)
        return rng.normal(0.0, 1 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape)  # kernels, scaled by fan-in

    return nnx.merge(graphdef, jax.tree_util.tree_map(lambda leaf: draw(leaf).astype(np.float32), abstract_params))


def exported_model(model, config: ModelConfig, image_shape) -> ExportedModel:
    """`model` exported and deserialized, as a model file gives it."""
    weights, serialized = exported_functions(model, ("cpu",))
    functions = deserialize_functions(serialized, "test", jax.__version__)
    return ExportedModel(jax.device_put(weights), functions, config, tuple(image_shape))


@partial(jax.jit, static_argnames="with_grey_mean")
def every_function(model, pixels, latents, targets, images_uint8, with_grey_mean=True):
    """What each exported function computes, for the same inputs. `with_grey_mean`: also the grey, posterior-mean
    reconstruction, which runs the same layers as the binarized draw (skipped for the pixel-by-pixel draw of a
    model with model.pixel_context, which compiles a loop for each call)."""
    rows = images_uint8.shape[0]
    key_rows = jax.random.split(jax.random.key(3), latents.shape[1])
    indices = jnp.arange(rows, dtype=jnp.int32)
    seed = jnp.uint32(7)
    outputs = {
        "encode": model.encode(pixels),
        "decode": model.decode(latents, targets),
        "decode_images": model.decode_images(latents[0], key_rows),
        "generate": model.prior_images(seed, indices, jnp.float32(0.8)),
        "reconstruct": model.posterior_images(
            images_uint8, jnp.bool_(True), seed, indices, indices % 2, indices, jnp.bool_(False)
        ),
    }
    if with_grey_mean:
        outputs["reconstruct-grey-mean"] = model.posterior_images(
            images_uint8, jnp.bool_(False), seed, indices, indices % 2, indices, jnp.bool_(True)
        )
    return outputs


@pytest.mark.parametrize("name", MODELS)
def test_the_exported_functions_compute_what_the_flax_model_does_to_the_bit(name):
    config, image_shape = MODELS[name]
    model = model_with_random_weights(config, image_shape)
    exported = exported_model(model, config, image_shape)
    rng = np.random.default_rng(0)
    values = int(np.prod(image_shape))
    pixels = rng.random((3, values), dtype=np.float32)
    latents = rng.standard_normal((2, 3, config.latent_dim), dtype=np.float32)  # two samples of three images
    targets = rng.integers(0, 256, (3, values)).astype(np.float32) / 255
    images_uint8 = rng.integers(0, 256, (4, *image_shape), dtype=np.uint8)

    arrays = (pixels, latents, targets, images_uint8)
    flax_outputs = every_function(model, *arrays, with_grey_mean=not config.pixel_context)
    exported_outputs = every_function(exported, *arrays, with_grey_mean=not config.pixel_context)
    assert flax_outputs.keys() == exported_outputs.keys()
    for function, expected in flax_outputs.items():
        for flax_array, exported_array in zip(
            jax.tree.leaves(expected), jax.tree.leaves(exported_outputs[function]), strict=True
        ):
            assert exported_array.shape == flax_array.shape and exported_array.dtype == flax_array.dtype, function
            np.testing.assert_array_equal(np.asarray(exported_array), np.asarray(flax_array), err_msg=function)


def test_the_batch_dimension_is_symbolic():
    config, image_shape = MODELS["mlp-bernoulli-grey"]
    exported = exported_model(model_with_random_weights(config, image_shape), config, image_shape)
    for rows in (1, 5):
        means, log_variances = exported.encode(jnp.zeros((rows, 784)))
        assert means.shape == log_variances.shape == (rows, config.latent_dim)
        assert exported.decode(jnp.zeros((rows, config.latent_dim))).shape == (rows, 784)


def test_a_pixel_context_model_needs_the_images_it_scores():
    config, image_shape = MODELS["conv-logistic-colour-pixel-context"]
    exported = exported_model(model_with_random_weights(config, image_shape), config, image_shape)
    with pytest.raises(ValueError, match="pixel_context"):
        exported.decode(jnp.zeros((2, config.latent_dim)))


# ---- the model file kept beside a run ---------------------------------------------------------------


@pytest.fixture
def run_copy(tmp_path, trained_run_dir):
    """The session's trained run, copied without any kept model file: these tests damage what they write."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run_dir, run_dir, ignore=shutil.ignore_patterns(INFERENCE_SUBDIR))
    return run_dir


@pytest.fixture
def flax_weights(trained_run):
    """The weights the Flax model of the trained run decodes with (its best checkpoint)."""
    return trained_run.step, inference_weights(trained_run.model)


def assert_weights_equal(model: ExportedModel, expected: dict[str, np.ndarray]) -> None:
    assert sorted(model.weights) == sorted(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(np.asarray(model.weights[name]), array)


def restoring_forbidden(monkeypatch):
    """Make any restore through Orbax fail the test: what is read must be the kept file."""

    def refuse(*args, **kwargs):
        raise AssertionError("the checkpoint was restored although a current model file was kept")

    monkeypatch.setattr("vaecli.training.checkpoint.load_run", refuse)


def test_the_first_use_keeps_the_model_file_and_the_next_reads_it(run_copy, flax_weights, monkeypatch):
    step, expected = flax_weights
    opened = open_inference_run(run_copy)
    assert opened.step == step and opened.model_file == model_file_path(run_copy, step) and not opened.notices
    assert_weights_equal(opened.model, expected)
    record = read_model_file(model_file_path(run_copy, step)).record
    assert record["checkpoint"] == checkpoint_identity(run_copy, step) and record["weights"] == "params"
    assert record["format_version"] == MODEL_FORMAT_VERSION and record["jax_version"] == jax.__version__

    restoring_forbidden(monkeypatch)
    kept = open_inference_run(run_copy)
    assert kept.config == opened.config and kept.image_shape == opened.image_shape and kept.step == step
    assert_weights_equal(kept.model, expected)


def rewrite_member(path: Path, member: str, content: bytes | None) -> None:
    """Replace (or with None, drop) one member of the zip archive at `path`."""
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    if content is None:
        del members[member]
    else:
        members[member] = content
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def damage_truncated(path: Path, weights):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def damage_not_a_zip(path: Path, weights):
    path.write_bytes(b"not a model file")


def damage_other_weights(path: Path, weights):
    buffer = io.BytesIO()
    np.savez(buffer, **{name: array[..., :1] for name, array in weights.items()})  # valid, of other shapes
    rewrite_member(path, "weights.npz", buffer.getvalue())


def damage_record_of_another_version(path: Path, weights):
    with zipfile.ZipFile(path) as archive:
        record = json.loads(archive.read("model.json"))
    rewrite_member(path, "model.json", json.dumps({**record, "format_version": 0}).encode())


def damage_record_missing(path: Path, weights):
    rewrite_member(path, "model.json", None)


def damage_file_missing(path: Path, weights):
    path.unlink()


@pytest.mark.parametrize(
    "damage",
    [
        damage_truncated,
        damage_not_a_zip,
        damage_other_weights,
        damage_record_of_another_version,
        damage_record_missing,
        damage_file_missing,
    ],
)
def test_a_damaged_model_file_is_not_used_and_is_written_anew(run_copy, flax_weights, damage):
    step, expected = flax_weights
    open_inference_run(run_copy)
    path = model_file_path(run_copy, step)
    damage(path, expected)
    identity = checkpoint_identity(run_copy, step)
    if damage is not damage_other_weights:  # whole, but it no longer runs: the next use finds out
        assert read_current_model_file(run_copy, step, identity) is None

    reopened = open_inference_run(run_copy)
    assert not reopened.notices
    assert_weights_equal(reopened.model, expected)
    rewritten = read_current_model_file(run_copy, step, identity)
    assert rewritten is not None
    assert_weights_equal(rewritten.model, expected)


def test_functions_this_jax_cannot_read_are_written_anew_with_a_notice(run_copy, flax_weights):
    step, expected = flax_weights
    open_inference_run(run_copy)
    path = model_file_path(run_copy, step)
    rewrite_member(path, "generate.stablehlo", b"\x00 exported by some other JAX")
    reopened = open_inference_run(run_copy)
    (notice,) = reopened.notices
    assert "cannot read them" in notice and "written anew" in notice and "\n" not in notice
    assert_weights_equal(reopened.model, expected)
    assert read_current_model_file(run_copy, step, checkpoint_identity(run_copy, step)) is not None


def test_functions_not_lowered_for_this_backend_are_written_anew_with_a_notice(run_copy, trained_run):
    """A run trained on a GPU whose file was exported there only (an earlier vaecli), then used on this CPU."""
    step = trained_run.step
    open_inference_run(run_copy)
    path = model_file_path(run_copy, step)
    path.write_bytes(model_file_bytes(trained_run, ("cuda",), checkpoint=checkpoint_identity(run_copy, step)))
    with pytest.raises(ModelFileError, match="exported for cuda, not for this machine's cpu"):
        read_model_file(path)
    reopened = open_inference_run(run_copy)
    (notice,) = reopened.notices
    assert "exported for cuda" in notice and "written anew" in notice
    assert read_model_file(path).model.functions.generate.platforms == ("cpu",)


def test_the_file_of_another_checkpoint_of_the_same_step_is_not_used(run_copy, trained_run):
    """A run trained again into the same folder reaches the same step with other weights."""
    step = trained_run.step
    other = model_with_random_weights(trained_run.config.model, trained_run.image_shape)
    open_inference_run(run_copy)
    identity = checkpoint_identity(run_copy, step)
    other_run = types.SimpleNamespace(**{**vars(trained_run), "model": other})
    model_file_path(run_copy, step).write_bytes(model_file_bytes(other_run, ("cpu",), checkpoint=identity))
    assert_weights_equal(open_inference_run(run_copy).model, inference_weights(other))  # the kept file is read

    commit_record = run_copy / CHECKPOINT_SUBDIR / str(step) / ORBAX_COMMIT_FILE
    commit_record.write_text(commit_record.read_text().replace("commit_timestamp_nsecs", "commit_timestamp_nsecs "))
    assert_weights_equal(open_inference_run(run_copy).model, inference_weights(trained_run.model))


def test_a_failed_write_leaves_the_kept_file_whole_and_nothing_half_written(run_copy, flax_weights, monkeypatch):
    step, expected = flax_weights
    open_inference_run(run_copy)
    path = model_file_path(run_copy, step)
    kept = path.read_bytes()
    commit_record = run_copy / CHECKPOINT_SUBDIR / str(step) / ORBAX_COMMIT_FILE
    commit_record.write_bytes(commit_record.read_bytes() + b" ")  # the next use writes the file again

    def disk_full(file_descriptor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(vaecli.common.files, "os", types.SimpleNamespace(**{**vars(os), "fsync": disk_full}))
    assert_weights_equal(open_inference_run(run_copy).model, expected)  # decoding goes on without it
    assert path.read_bytes() == kept
    assert [child.name for child in path.parent.iterdir()] == [path.name]


def test_files_of_checkpoints_that_are_gone_and_of_the_earlier_layout_are_removed(run_copy, flax_weights):
    step, _ = flax_weights
    folder = run_copy / INFERENCE_SUBDIR
    folder.mkdir()
    stale = [model_file_path(run_copy, 1), folder / f"{step}.npz", folder / f"{step}.json"]
    for path in stale:
        path.write_bytes(b"left by a checkpoint Orbax has since deleted, or by an earlier vaecli")
    open_inference_run(run_copy)
    assert not any(path.exists() for path in stale)
    assert model_file_path(run_copy, step).exists()


def test_the_inference_run_matches_the_loaded_run(run_copy):
    loaded, opened = load_run(run_copy, "latest"), open_inference_run(run_copy, "latest")
    for field in ("config", "step", "epoch", "image_shape", "dataset_name", "preprocessing"):
        assert getattr(opened, field) == getattr(loaded, field), field
    assert opened.model.latent_dim == loaded.model.latent_dim and opened.model.image_shape == loaded.model.image_shape


# ---- model files that cannot be read ------------------------------------------------------------------


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_a_bad_model_file_is_one_line_naming_it(tmp_path, trained_run_dir):
    good = tmp_path / "good.vae"
    assert vae("export", trained_run_dir, "--out", good).exit_code == 0
    with zipfile.ZipFile(good) as archive:
        record = json.loads(archive.read("model.json"))
        members = {name: archive.read(name) for name in archive.namelist()}
    newer = json.dumps({**record, "format_version": 99}).encode()
    cases = {
        "missing.vae": (None, "no such file"),
        "truncated.vae": (good.read_bytes()[:1000], "not a vaecli model file"),
        "text.vae": (b"hello", "not a vaecli model file"),
        "other.vae": (make_zip(tmp_path / "o.zip", {"readme.txt": b"x"}).read_bytes(), "no model.json"),
        "format.vae": (
            make_zip(tmp_path / "f.zip", {**members, "model.json": json.dumps({**record, "format": "x"}).encode()}),
            "names another format",
        ),
        "newer.vae": (
            make_zip(tmp_path / "n.zip", {**members, "model.json": newer}),
            "newer than this vaecli reads",
        ),
        "no-weights.vae": (make_zip(tmp_path / "w.zip", {"model.json": members["model.json"]}), "is damaged"),
    }
    for name, (content, expected) in cases.items():
        path = tmp_path / name
        if isinstance(content, Path):
            content = content.read_bytes()
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(ModelFileError) as raised:
            read_model_file(path)
        message = str(raised.value)
        assert str(path) in message and expected in message and "\n" not in message, name


# ---- vae export and the example that runs its file -----------------------------------------------------


def test_export_refuses_an_output_that_is_not_a_model_file_and_writes_nothing(tmp_path, trained_run_dir):
    assert_one_line_error(vae("export", trained_run_dir, "--out", tmp_path / "model.npz"), 2, "must end in .vae")
    assert_one_line_error(vae("export", tmp_path / "no-run", "--out", tmp_path / "model.vae"), 1, "no-run")
    assert not list(tmp_path.glob("*.vae"))


def run_example(*arguments, cwd: Path) -> subprocess.CompletedProcess:
    """examples/exported.py in a Python where `import vaecli` fails: the program needs jax and numpy alone."""
    blocked = (
        "import runpy, sys\n"
        "sys.modules['vaecli'] = None  # any import of vaecli now raises ImportError\n"
        f"sys.argv = {[str(EXAMPLE), *map(str, arguments)]!r}\n"
        f"runpy.run_path({str(EXAMPLE)!r}, run_name='__main__')\n"
        "assert not [name for name in sys.modules if name.startswith(('vaecli.', 'flax', 'orbax'))]\n"
    )
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-I", "-c", blocked], cwd=cwd, capture_output=True, text=True, env=environment, timeout=300
    )


def test_the_exported_file_generates_what_vae_generate_does_without_vaecli(tmp_path, trained_run_dir):
    model_file = tmp_path / "model.vae"
    result = vae("export", trained_run_dir, "--checkpoint", "best", "--out", model_file)
    assert result.exit_code == 0 and "wrote" in result.stdout and model_file.is_file(), result.output
    assert read_model_file(model_file).model.functions.generate.platforms == ("cpu", "cuda")  # runs on either
    result = vae("generate", "--run", trained_run_dir, "--n", 1030, "--seed", 11, "--out", tmp_path / "vae.npz")
    assert result.exit_code == 0, result.output

    ran = run_example(model_file, "--n", 1030, "--seed", 11, "--out", "example.npz", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    with np.load(tmp_path / "vae.npz") as by_vae, np.load(tmp_path / "example.npz") as by_example:
        assert by_example["samples"].shape == (1030, 28, 28) and by_example["samples"].dtype == np.float32
        np.testing.assert_array_equal(by_example["samples"], by_vae["samples"])

    ran = run_example(model_file, "--n", 9, "--out", "grid.png", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_example_refuses_a_bad_file_with_one_line(tmp_path):
    (tmp_path / "bad.vae").write_bytes(b"not a zip")
    weights = io.BytesIO()
    np.savez(weights)
    record = json.dumps({"format": "vaecli-model", "format_version": MODEL_FORMAT_VERSION}).encode()
    members = {"model.json": record, "weights.npz": weights.getvalue(), "generate.stablehlo": b"not StableHLO"}
    make_zip(tmp_path / "junk-functions.vae", members)
    for name in ("bad.vae", "junk-functions.vae"):
        ran = run_example(tmp_path / name, cwd=tmp_path)
        assert ran.returncode == 1 and ran.stderr.count("\n") == 1 and name in ran.stderr, ran.stderr
        assert "Traceback" not in ran.stderr


# ---- which checkpoint, without Orbax -------------------------------------------------------------------------


def assert_same_choice_as_orbax(run_dir, choices):
    with open_checkpoints(run_dir) as manager:
        for which in choices:
            assert chosen_checkpoint_step(run_dir, which) == choose_step(manager, run_dir, which), which


def test_the_files_name_the_checkpoint_orbax_chooses(run_copy):
    steps = [int(path.name) for path in checkpoint_step_dirs(run_copy)]
    assert len(steps) >= 3
    assert_same_choice_as_orbax(run_copy, ["best", "latest", *map(str, steps)])
    assert chosen_checkpoint_step(run_copy, str(max(steps) + 1)) is None  # Orbax's own error is then raised

    # Ties go to the newest step; a checkpoint without metrics (saved mid-epoch) takes no part.
    for step in steps:
        (run_copy / CHECKPOINT_SUBDIR / str(step) / ORBAX_METRICS_FILE).write_text(json.dumps({"val_loss": 7.5}))
    (run_copy / CHECKPOINT_SUBDIR / str(max(steps)) / ORBAX_METRICS_FILE).unlink()
    assert_same_choice_as_orbax(run_copy, ["best"])
    assert chosen_checkpoint_step(run_copy, "best") == sorted(steps)[-2]

    for step in steps:  # none ranked: the newest
        (run_copy / CHECKPOINT_SUBDIR / str(step) / ORBAX_METRICS_FILE).unlink(missing_ok=True)
    assert_same_choice_as_orbax(run_copy, ["best"])


def test_unreadable_metrics_leave_the_choice_to_orbax(run_copy):
    newest = checkpoint_step_dirs(run_copy)[-1]
    (newest / ORBAX_METRICS_FILE).write_text("{not json")
    assert chosen_checkpoint_step(run_copy, "best") is None
    assert chosen_checkpoint_step(run_copy, "latest") == int(newest.name)
