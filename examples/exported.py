"""Generate pictures from a model file that `vae export` wrote, with jax and numpy alone (no vaecli).

    python examples/exported.py model.vae --n 64 --seed 0 --out samples.npz   # 'samples' [n, H, W(, C)]
    python examples/exported.py model.vae --n 64 --out samples.png            # a grid (needs Pillow)

The same seed gives the same samples as `vae generate --n N --seed S --out OUT.npz` on that run.
"""

import argparse
import io
import json
import sys
import zipfile

import jax
import numpy as np

READABLE_FORMAT_VERSION = 1
BATCH = 1024  # rows per call, as vae generate decodes them


def load(path):
    """(model.json as a dict, the weights, the exported functions by name) of a model file."""
    try:
        with zipfile.ZipFile(path) as archive:
            record = json.loads(archive.read("model.json"))
            if record.get("format") != "vaecli-model":
                sys.exit(f"error: {path} is not a vaecli model file")
            if record.get("format_version", 0) > READABLE_FORMAT_VERSION:
                sys.exit(f"error: {path} is of a newer model format ({record['format_version']}); update this program")
            with np.load(io.BytesIO(archive.read("weights.npz"))) as arrays:
                weights = {name: arrays[name] for name in arrays.files}
            functions = {
                name[: -len(".stablehlo")]: jax.export.deserialize(archive.read(name))
                for name in archive.namelist()
                if name.endswith(".stablehlo")
            }
    except Exception as error:  # a missing or damaged file, or functions this JAX cannot deserialize
        sys.exit(f"error: cannot read {path} as a vaecli model file ({type(error).__name__}: {error})")
    return record, weights, functions


def generate(record, weights, functions, n, seed, temperature=1.0):
    """n pictures from the prior, float32 [n, H, W(, C)] in [0, 1]: row i is drawn from (seed, i) alone."""
    batches = []
    for first in range(0, n, BATCH):
        indices = np.arange(first, first + min(n, BATCH), dtype=np.int32)
        pictures = functions["generate"].call(weights, np.uint32(seed), indices, np.float32(temperature))
        batches.append(np.asarray(pictures))
    return np.concatenate(batches)[:n].reshape(n, *record["image_shape"])


def save_grid(samples, out):
    """The samples side by side in a square-ish grid, as a PNG."""
    from PIL import Image

    count, height, width = samples.shape[:3]
    columns = int(np.ceil(np.sqrt(count)))
    rows = -(-count // columns)
    grid = np.zeros((rows * height, columns * width, *samples.shape[3:]), np.float32)
    for index, picture in enumerate(samples):
        row, column = divmod(index, columns)
        grid[row * height : (row + 1) * height, column * width : (column + 1) * width] = picture
    Image.fromarray(np.round(grid * 255).astype(np.uint8)).save(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a model file written by `vae export`")
    parser.add_argument("--n", type=int, default=64, help="how many pictures")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=1.0, help="z ~ N(0, T^2 I)")
    parser.add_argument("--out", default="samples.npz", help=".npz (the array 'samples') or .png (a grid)")
    arguments = parser.parse_args()
    record, weights, functions = load(arguments.model)
    samples = generate(record, weights, functions, arguments.n, arguments.seed, arguments.temperature)
    if arguments.out.endswith(".png"):
        save_grid(samples, arguments.out)
    else:
        np.savez(arguments.out, samples=samples)
    print(f"wrote {arguments.out}: {arguments.n} samples from {arguments.model} (step {record['step']})")


if __name__ == "__main__":
    main()
