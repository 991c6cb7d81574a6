"""Every bad input a user can give `vae`, run through the command as they would: one line on stderr
naming the problem, exit code 2 (config or option) or 1 (anything else), no traceback, nothing
written. Then odd but valid pictures, which must simply work, and an output replaced whole."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from helpers import vae
from PIL import Image

from vaecli.common.images import load_model_input
from vaecli.training.checkpoint import CHECKPOINT_SUBDIR, FORMAT_VERSION

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A home-directory reference (~user) for a user that does not exist on any machine we run on.
UNKNOWN_USER_HOME = "~no-such-user-vaecli"


def everything_under(folder: Path) -> set[Path]:
    # A run's inference/ folder is a cache of its weights, written whole (atomically) the first time a
    # command opens the run, before it reads its other inputs: not an output of the command.
    return {path for path in folder.rglob("*") if "inference" not in path.relative_to(folder).parts}


# --- making bad (and good) inputs ---------------------------------------------------------------


def digit_picture(height: int = 32, width: int = 40) -> np.ndarray:
    """A black vertical stroke on white paper, not at the model's 28x28."""
    grey = np.full((height, width), 255, dtype=np.uint8)
    grey[6 : height - 6, width // 2 - 3 : width // 2 + 3] = 0
    return grey


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def half_a_png() -> bytes:
    """The first half of a noisy PNG: its pixel data (IDAT) is most of the file, so the cut is in the pixels."""
    whole = png_bytes(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))
    return whole[: len(whole) // 2]


def huge_png_bytes(side: int = 20_000) -> bytes:
    """A tiny valid PNG whose header claims side x side pixels: Pillow refuses it at open, so no
    memory is ever allocated for it."""
    png = bytearray(png_bytes(np.zeros((1, 1), dtype=np.uint8)))
    # Signature (8), then the IHDR chunk: length (4), type (4), width and height (4 + 4), ...
    assert png[12:16] == b"IHDR"
    png[16:24] = struct.pack(">II", side, side)
    ihdr_length = struct.unpack(">I", png[8:12])[0]
    crc_at = 16 + ihdr_length
    png[crc_at : crc_at + 4] = struct.pack(">I", zlib.crc32(png[12:crc_at]))  # CRC covers type and data
    return bytes(png)


def write(name: str, content: bytes | str) -> Callable[[Path, Path], None]:
    def prepare(workdir: Path, run_dir: Path) -> None:
        path = workdir / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)

    return prepare


def make_directory(name: str) -> Callable[[Path, Path], None]:
    def prepare(workdir: Path, run_dir: Path) -> None:
        (workdir / name).mkdir()

    return prepare


def digit_and(*more: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
    """A good digit.png, plus whatever else the case needs."""

    def prepare(workdir: Path, run_dir: Path) -> None:
        (workdir / "digit.png").write_bytes(png_bytes(digit_picture()))
        for step in more:
            step(workdir, run_dir)

    return prepare


def copy_of_run_with_format_version(version: int) -> Callable[[Path, Path], None]:
    """A copy of the trained run whose checkpoints all claim another metadata format version."""

    def prepare(workdir: Path, run_dir: Path) -> None:
        copy = Path(shutil.copytree(run_dir, workdir / "old-run"))
        # Every checkpoint, whichever one the command picks (newest or best).
        for metadata_path in (copy / CHECKPOINT_SUBDIR).glob("*/meta/metadata"):
            metadata = json.loads(metadata_path.read_text())
            metadata["format_version"] = version
            metadata_path.write_text(json.dumps(metadata))

    return prepare


def nothing(workdir: Path, run_dir: Path) -> None:
    pass


# --- every bad input: one line, the right code, nothing written ----------------------------------


@dataclass(frozen=True)
class BadInput:
    args: tuple[str, ...]  # "RUN" stands for the trained run directory
    exit_code: int
    fragment: str
    prepare: Callable[[Path, Path], None] = nothing


def reconstruct(image: str, run: str = "RUN", out: str = "out.png") -> tuple[str, ...]:
    return ("reconstruct", image, "--run", run, "--out", out)


def train_with(*overrides: str, config: str = "mnist-sample") -> tuple[str, ...]:
    return ("train", "--config", config, *(part for override in overrides for part in ("--set", override)))


def evaluate_with(*options: str) -> tuple[str, ...]:
    return ("evaluate", "--run", "RUN", "--json", *options)


BAD_INPUTS = [
    # --- config files and --set ---
    pytest.param(
        BadInput(
            ("train", "--config", "typo.yaml"),
            2,
            "typo.yaml: unknown key model.latnt_dim; did you mean model.latent_dim?",
            write("typo.yaml", "model:\n  latnt_dim: 8\n"),
        ),
        id="config-unknown-key-in-file",
    ),
    pytest.param(
        BadInput(train_with("train.epoch=1"), 2, "unknown key train.epoch; did you mean train.epochs?"),
        id="config-unknown-key-via-set",
    ),
    pytest.param(
        BadInput(train_with("optimizer.lr=1"), 2, "unknown key optimizer; allowed: seed, data, model, train"),
        id="config-unknown-section-via-set",
    ),
    pytest.param(
        BadInput(
            ("train", "--config", "words.yaml"),
            2,
            "words.yaml: train.epochs: Input should be a valid integer",
            write("words.yaml", "train:\n  epochs: five\n"),
        ),
        id="config-wrong-type-in-file",
    ),
    pytest.param(
        BadInput(train_with("model.latent_dim=abc"), 2, "model.latent_dim: Input should be a valid integer"),
        id="config-wrong-type-via-set",
    ),
    pytest.param(
        BadInput(
            ("train", "--config", "flat.yaml"),
            2,
            "flat.yaml: model must be a section with keys arch, hidden, latent_dim, activation, likelihood, mixtures",
            write("flat.yaml", "model: [64, 32]\n"),
        ),
        id="config-section-is-a-list",
    ),
    pytest.param(
        # Before the config was strict, `true` trained a model with a latent of 1.
        BadInput(
            train_with("model.latent_dim=true"), 2, "model.latent_dim: Input should be a valid integer (got True)"
        ),
        id="config-bool-for-an-integer-via-set",
    ),
    pytest.param(
        BadInput(
            train_with('train.learning_rate="3"'), 2, "train.learning_rate: Input should be a valid number (got '3')"
        ),
        id="config-quoted-number-via-set",
    ),
    pytest.param(
        BadInput(
            train_with("model.likelihood=logistic"),
            2,
            "model.likelihood logistic models the 256 grey levels, not binary pixels; set data.binarize: none",
        ),
        id="config-logistic-of-binary-pixels",
    ),
    pytest.param(
        BadInput(train_with("train.beta=2", "train.iw_samples=5"), 2, "train.beta applies to the ELBO"),
        id="config-beta-with-the-iwae-bound",
    ),
    pytest.param(
        BadInput(train_with("train.batch_size=-1"), 2, "train.batch_size: Input should be greater than 0 (got -1)"),
        id="config-negative-batch-size",
    ),
    pytest.param(
        BadInput(
            ("train", "--config", "negative.yaml"),
            2,
            "train.learning_rate: Input should be greater than 0 (got -0.001)",
            write("negative.yaml", "train:\n  learning_rate: -0.001\n"),
        ),
        id="config-negative-learning-rate-in-file",
    ),
    pytest.param(
        BadInput(train_with("model.latent_dim=0"), 2, "model.latent_dim: Input should be greater than 0 (got 0)"),
        id="config-zero-latent-dim",
    ),
    pytest.param(
        BadInput(train_with("model.hidden=[64,0]"), 2, "model.hidden.1: Input should be greater than 0 (got 0)"),
        id="config-zero-hidden-width",
    ),
    pytest.param(
        BadInput(
            ("train", "--config", "broken.yaml"),
            2,
            "broken.yaml line 3, column 1: YAML syntax error (expected ',' or ']'",
            write("broken.yaml", "train:\n  epochs: [1\n"),
        ),
        id="config-yaml-syntax-error",
    ),
    pytest.param(
        BadInput(train_with("model.hidden=[64"), 2, "--set 'model.hidden=[64': the value is not valid YAML"),
        id="config-set-value-not-yaml",
    ),
    pytest.param(
        BadInput(train_with("train.epochs"), 2, "--set 'train.epochs' is not of the form section.key=value"),
        id="config-set-without-equals",
    ),
    pytest.param(
        BadInput(
            ("train", "--config", "empty.yaml"),
            2,
            "empty.yaml is empty; it needs sections such as data:, model:, train:",
            write("empty.yaml", ""),
        ),
        id="config-empty-file",
    ),
    pytest.param(
        BadInput(
            ("train", "--config", "configs"),
            2,
            "config configs is a directory; give a YAML file",
            make_directory("configs"),
        ),
        id="config-is-a-directory",
    ),
    pytest.param(
        BadInput(("train", "--config", "missing.yaml"), 2, "config file missing.yaml not found"),
        id="config-missing-file",
    ),
    pytest.param(
        BadInput(train_with(f"data.dir={UNKNOWN_USER_HOME}/digits"), 2, "data.dir"),
        id="config-data-dir-in-unknown-users-home",
    ),
    pytest.param(
        BadInput(("train", "--config", f"{UNKNOWN_USER_HOME}/mnist.yaml"), 2, UNKNOWN_USER_HOME),
        id="config-path-in-unknown-users-home",
    ),
    pytest.param(
        BadInput(train_with("model.latent\ndim=8"), 2, "unknown key model.latent"),
        id="config-set-key-with-a-newline",
    ),
    # --- pictures given to reconstruct ---
    pytest.param(
        BadInput(reconstruct("empty.png"), 1, "empty.png is empty (0 bytes)", write("empty.png", b"")),
        id="image-empty-file",
    ),
    pytest.param(
        BadInput(
            reconstruct("half.png"),
            1,
            "half.png could not be decoded (image file is truncated)",
            write("half.png", half_a_png()),
        ),
        id="image-truncated-png",
    ),
    pytest.param(
        BadInput(
            reconstruct("notes.png"),
            1,
            "notes.png is not an image Pillow can read",
            write("notes.png", b"these are my notes, not a picture\n" * 20),
        ),
        id="image-not-an-image",
    ),
    pytest.param(
        BadInput(
            reconstruct("damaged.tif"),
            1,
            "damaged.tif is not an image Pillow can read",
            # A big-endian TIFF header pointing at a garbage directory: Pillow warns "Corrupt EXIF
            # data" before giving up, and that warning must not reach the user as extra lines.
            write("damaged.tif", b"MM\x00*\x14.dT\xa7\xc2\x8b\xba4\x84\x98\x0c\xf1"),
        ),
        id="image-tiff-with-corrupt-directory",
    ),
    pytest.param(
        BadInput(
            reconstruct("huge.png"),
            1,
            "huge.png is too large to read safely (Image size (400000000 pixels) exceeds limit",
            write("huge.png", huge_png_bytes()),
        ),
        id="image-20000x20000",
    ),
    pytest.param(
        BadInput(
            reconstruct("blank.png"),
            1,
            "no ink found in blank.png (it looks like blank paper)",
            write("blank.png", png_bytes(np.full_like(digit_picture(), 255))),
        ),
        id="image-blank-paper",
    ),
    pytest.param(
        BadInput(
            reconstruct("animated.gif"),
            1,
            "no ink found in animated.gif",  # the model sees the first frame only: blank paper
            lambda workdir, run_dir: blank_then_ink_gif(workdir / "animated.gif"),
        ),
        id="image-gif-blank-first-frame",
    ),
    pytest.param(BadInput(reconstruct("missing.png"), 1, "missing.png does not exist"), id="image-missing-file"),
    pytest.param(
        BadInput(reconstruct("photos"), 1, "photos is a directory, not an image", make_directory("photos")),
        id="image-is-a-directory",
    ),
    # --- run directories ---
    pytest.param(
        BadInput(reconstruct("digit.png", run="nowhere"), 1, "run directory nowhere does not exist", digit_and()),
        id="run-missing",
    ),
    pytest.param(
        BadInput(
            reconstruct("digit.png", run="empty-run"),
            1,
            "empty-run holds no checkpoint",
            digit_and(make_directory("empty-run")),
        ),
        id="run-without-checkpoint",
    ),
    pytest.param(
        BadInput(
            reconstruct("digit.png", run="old-run"),
            1,
            f"in old-run has format version {FORMAT_VERSION + 1}, this vaecli reads {FORMAT_VERSION}",
            digit_and(copy_of_run_with_format_version(FORMAT_VERSION + 1)),
        ),
        id="run-other-format-version",
    ),
    # --- outputs ---
    pytest.param(
        BadInput(
            reconstruct("digit.png", out="blocker/out.png"),
            1,
            "cannot create directory blocker: a file is in the way",
            digit_and(write("blocker", "a file where a folder should be")),
        ),
        id="out-parent-is-a-file",
    ),
    pytest.param(
        BadInput(
            reconstruct("digit.png", out="taken.png"),
            1,
            "cannot write taken.png: it is a directory",
            digit_and(make_directory("taken.png")),
        ),
        id="out-is-a-directory",
    ),
    pytest.param(
        BadInput(reconstruct("digit.png", out="out.jpg"), 2, "--out out.jpg must end in .png", digit_and()),
        id="out-jpg-unsupported",
    ),
    pytest.param(
        BadInput(("generate", "--run", "RUN", "--n", "0", "--out", "out.png"), 2, "--n must be at least 1, got 0"),
        id="generate-n-zero",
    ),
    # --- evaluate's options, refused before any model is loaded ---
    pytest.param(BadInput(evaluate_with("--k", "0"), 2, "--k must be at least 1, got 0"), id="evaluate-k-zero"),
    pytest.param(
        BadInput(evaluate_with("--images", "0"), 2, "--images must be at least 1, got 0"), id="evaluate-images-zero"
    ),
    pytest.param(
        BadInput(evaluate_with("--split", "nope"), 2, "--split 'nope': choose test, val or train"),
        id="evaluate-unknown-split",
    ),
    pytest.param(
        BadInput(evaluate_with("--seed", "-1"), 2, "--seed must be between 0 and 4294967295, got -1"),
        id="evaluate-negative-seed",
    ),
    pytest.param(
        BadInput(evaluate_with("--seed", str(2**32)), 2, "--seed must be between 0 and 4294967295"),
        id="evaluate-seed-too-large",
    ),
    pytest.param(
        BadInput(evaluate_with("--checkpoint", "newest"), 2, "--checkpoint 'newest': give best, latest or a step"),
        id="evaluate-unknown-checkpoint",
    ),
    pytest.param(
        BadInput(("evaluate", "--run", "nowhere", "--json"), 1, "run directory nowhere does not exist"),
        id="evaluate-json-run-missing",
    ),
]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_writes_nothing(case: BadInput, trained_run_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    case.prepare(tmp_path, trained_run_dir)
    before, run_before = everything_under(tmp_path), everything_under(trained_run_dir)

    result = vae(*(str(trained_run_dir) if arg == "RUN" else arg for arg in case.args))

    assert result.exit_code == case.exit_code, (result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert case.fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert everything_under(tmp_path) == before  # no output, run directory, checkpoint or temporary file
    assert everything_under(trained_run_dir) == run_before


# --- odd but valid pictures: they simply work ----------------------------------------------------


def sixteen_bit_png(path: Path) -> None:
    # Mid levels, so clipping to 8 bits (instead of scaling) would make paper and ink both white.
    levels = np.where(digit_picture() == 0, 10_000, 50_000).astype(np.uint16)
    Image.fromarray(levels).save(path)


def palette_png_with_transparency(path: Path) -> None:
    # Paper is transparent *black*: read without its transparency, the picture would be all black.
    picture = Image.fromarray(np.where(digit_picture() == 0, 1, 0).astype(np.uint8), mode="P")
    picture.putpalette([0, 0, 0, 0, 0, 0])
    picture.save(path, transparency=0)


def rgba_png(path: Path) -> None:
    rgba = np.zeros((*digit_picture().shape, 4), dtype=np.uint8)  # transparent black paper
    rgba[..., 3] = np.where(digit_picture() == 0, 255, 0)  # opaque black ink
    Image.fromarray(rgba).save(path)


def cmyk_jpeg(path: Path) -> None:
    cmyk = np.zeros((*digit_picture().shape, 4), dtype=np.uint8)  # no ink at all: white
    cmyk[..., 3] = 255 - digit_picture()  # the key (black) plate where the stroke is
    Image.fromarray(cmyk, mode="CMYK").save(path, quality=95)


def gif_frames(path: Path, frames: list[np.ndarray]) -> None:
    first, *rest = (Image.fromarray(frame) for frame in frames)
    first.save(path, save_all=True, append_images=rest, duration=100, loop=0)


def blank_then_ink_gif(path: Path) -> None:
    gif_frames(path, [np.full_like(digit_picture(), 255), digit_picture()])


def ink_then_blank_gif(path: Path) -> None:
    gif_frames(path, [digit_picture(), np.full_like(digit_picture(), 255)])


@pytest.mark.parametrize(
    ("file_name", "make", "stored_as"),
    [
        pytest.param("deep.png", sixteen_bit_png, ("I;16", 1), id="png-16-bit"),
        pytest.param("palette.png", palette_png_with_transparency, ("P", 1), id="png-palette-transparent"),
        pytest.param("rgba.png", rgba_png, ("RGBA", 1), id="png-rgba"),
        pytest.param("print.jpg", cmyk_jpeg, ("CMYK", 1), id="jpeg-cmyk"),
    ],
)
def test_odd_but_valid_pictures_are_reconstructed(file_name, make, stored_as, trained_run_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make(tmp_path / file_name)
    with Image.open(tmp_path / file_name) as stored:  # the file really is the odd kind the test claims
        assert (stored.mode, getattr(stored, "n_frames", 1)) == stored_as

    result = vae("reconstruct", file_name, "--run", trained_run_dir, "--samples", 2, "--out", "x.npz")

    assert result.exit_code == 0, result.output
    inputs = np.load(tmp_path / "x.npz")["inputs"]
    assert inputs.shape == (1, 28, 28)
    assert inputs.max() > 0.5 and inputs[0, 0, 0] == 0  # light ink on black, paper seen as paper


def test_the_gif_frames_in_the_other_order_give_ink(tmp_path):
    """The same two frames in the other order give ink: the blank GIF refused above really means frame one."""
    ink_then_blank_gif(tmp_path / "reversed.gif")
    assert load_model_input(tmp_path / "reversed.gif", (28, 28)).max() > 128


# --- replacing an output -----------------------------------------------------------------------


def test_an_existing_output_is_replaced_whole(trained_run_dir, tmp_path, monkeypatch):
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    (workdir / "digit.png").write_bytes(png_bytes(digit_picture()))
    (workdir / "out.png").write_bytes(b"the old output")
    # A second name for the old file: an in-place rewrite would change it too, a rename leaves it.
    os.link(workdir / "out.png", tmp_path / "old-out.png")

    result = vae("reconstruct", "digit.png", "--run", trained_run_dir, "--out", "out.png")

    assert result.exit_code == 0, result.output
    assert (workdir / "out.png").read_bytes().startswith(PNG_SIGNATURE)
    assert (tmp_path / "old-out.png").read_bytes() == b"the old output"
    assert sorted(path.name for path in workdir.iterdir()) == ["digit.png", "out.png"]  # no temporary files


def test_a_format_3_checkpoint_still_loads_unless_it_is_a_colour_logistic_model(trained_run_dir, tmp_path):
    from vaecli.training.checkpoint import load_run, readable_format

    copy_of_run_with_format_version(3)(tmp_path, trained_run_dir)
    loaded = load_run(tmp_path / "old-run")  # a grey Bernoulli model: format 4 changed nothing it holds
    assert loaded.model.latent_dim > 0

    colour_logistic = {"format_version": 3, "image_shape": [32, 32, 3], "config": {"model": {"likelihood": "logistic"}}}
    assert not readable_format(colour_logistic)
    assert readable_format({**colour_logistic, "image_shape": [28, 28]})
    assert readable_format({**colour_logistic, "config": {"model": {"likelihood": "bernoulli"}}})
    assert readable_format({**colour_logistic, "format_version": FORMAT_VERSION})
    assert not readable_format({**colour_logistic, "format_version": 2, "image_shape": [28, 28]})
