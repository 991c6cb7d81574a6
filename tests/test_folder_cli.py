"""A model trained on a folder of the user's own images, colour or not 28x28, end to end through the CLI."""

import json
import math

import numpy as np
import pytest
from image_folders import write_image_folder
from PIL import Image
from typer.testing import CliRunner

from vaecli.cli.app import app

runner = CliRunner()


def vae(*args):
    result = runner.invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 0, result.output
    return result


# Colour with folder.yaml's local autoregressive decoder (pictures drawn pixel by pixel); grey without it
# (pictures are means), so both decoders go through every command.
@pytest.mark.parametrize(("image_size", "channels", "pixel_context"), [(16, 3, 5), (20, 1, 0)])
def test_train_generate_reconstruct_on_an_image_folder(tmp_path, monkeypatch, image_size, channels, pixel_context):
    monkeypatch.chdir(tmp_path)
    pictures = write_image_folder(tmp_path / "pictures", count_per_class=6)
    settings = [
        "--set", f"data.dir={pictures}", "--set", f"data.image_size={image_size}", "--set", f"data.channels={channels}",
        "--set", "model.hidden=[32]", "--set", "model.latent_dim=4", "--set", "train.epochs=2",
        "--set", "train.batch_size=5", "--set", f"model.pixel_context={pixel_context}",
    ]  # fmt: skip
    trained = vae("train", "--config", "folder.yaml", *settings)
    assert "note: skipped 1 of" in trained.output  # the corrupt file, counted in one line
    assert "epoch   2/2" in trained.output
    tile = (image_size, image_size, 3) if channels == 3 else (image_size, image_size)

    vae("generate", "--n", 6, "--out", "samples.npz")
    samples = np.load(tmp_path / "samples.npz")["samples"]
    assert samples.shape == (6, *tile) and samples.dtype == np.float32
    vae("generate", "--n", 4, "--out", "grid.png")
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.mode == ("RGB" if channels == 3 else "L")
        assert grid.size == (2 * image_size + 3 * 2, 2 * image_size + 3 * 2)

    Image.new("RGBA", (50, 30), (200, 40, 40, 255)).save(tmp_path / "mine.png")
    vae("reconstruct", "mine.png", "--samples", 2, "--out", "recon.npz")
    arrays = np.load(tmp_path / "recon.npz")
    assert arrays["inputs"].shape == (1, *tile) and arrays["reconstructions"].shape == (1, 2, *tile)
    if channels == 3:  # the photo rule keeps colour and does not invert: a red picture stays red
        assert arrays["inputs"][0, ..., 0].mean() > 0.7 and arrays["inputs"][0, ..., 2].mean() < 0.3
    vae("reconstruct", "--out", "test-images.png")  # no input: the run's own test images

    # folder.yaml's logistic likelihood makes the figure a code length of the 8-bit pictures.
    evaluation = json.loads(vae("evaluate", "--k", 4, "--split", "test", "--json").stdout)
    assert evaluation["is_likelihood"] and "discretized logistic" in evaluation["protocol"]
    values = image_size * image_size * channels
    assert evaluation["bits_per_dim"] == pytest.approx(evaluation["nll_nats"] / (values * math.log(2)))
    assert 0 < evaluation["bits_per_dim"] < 8  # under the 8 bits a raw byte per value costs

    # The second run reads the decoded cache: decoding any image now would fail the test.
    def no_decoding(*args):
        raise AssertionError("the folder was decoded again instead of read from the cache")

    monkeypatch.setattr("vaecli.data.folder.load_photo_input", no_decoding)
    again = vae("train", "--config", "folder.yaml", *settings, "--set", "train.epochs=1", "--out", "runs/again")
    assert "note: skipped 1 of" in again.output
