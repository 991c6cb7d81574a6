"""`make bench`: how fast vaecli trains, evaluates, samples and starts on this machine.

A script, not part of the library (it prints). Offline: training uses 60,000 random uint8 images of
MNIST's shape, since speed does not depend on pixel values. Every figure is printed as a table and
written to a JSON file (default bench.json).

    python -m vaecli.bench [--out bench.json] [--rounds 3] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vaecli.config import Config, load_config, validate_config
from vaecli.data import Dataset
from vaecli.model import build_model
from vaecli.train import (
    EpochResult,
    device_split,
    init_train_state,
    make_evaluator,
    make_optimizer,
    train,
)

TRAIN_IMAGES = 60_000
IMAGE_SHAPE = (28, 28)
# The reference model of the VAE paper's MNIST experiments and of the PyTorch/Flax examples.
REFERENCE_SETTINGS = {
    "data": {"binarize": "dynamic"},
    "model": {"hidden": [400], "latent_dim": 20},
    "train": {"batch_size": 128, "learning_rate": 1e-3},
}


# ---- machine peak ---------------------------------------------------------------------------------


def matmul_peak_gflops(sizes=(1024, 2048, 3072), repeats=5) -> float:
    """The best fp32 matmul rate jax reaches here, over a few square sizes (GFLOP/s)."""
    best = 0.0
    for size in sizes:
        left = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
        right = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
        multiply = jax.jit(jnp.matmul)
        multiply(left, right).block_until_ready()
        calls = max(1, int(4e10 / (2 * size**3)))  # about 40 GFLOP per timing
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(calls):
                product = multiply(left, right)
            product.block_until_ready()
            best = max(best, calls * 2 * size**3 / (time.perf_counter() - started) / 1e9)
    return best


def training_flops_per_image(config: Config) -> float:
    """3 x the forward pass's matmul FLOPs (forward + backward), per image."""
    model = nnx.eval_shape(lambda: build_model(config.model, IMAGE_SHAPE, 0))
    kernels = [leaf for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param)) if path[-1] == "kernel"]
    forward = sum(2 * kernel.shape[0] * kernel.shape[1] for kernel in kernels)
    return 3.0 * forward


# ---- training speed -------------------------------------------------------------------------------


def random_dataset(seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (TRAIN_IMAGES + 10_000, *IMAGE_SHAPE), dtype=np.uint8)
    labels = np.zeros(len(images), np.uint8)
    return Dataset(
        "random",
        images[:TRAIN_IMAGES],
        labels[:TRAIN_IMAGES],
        images[TRAIN_IMAGES:],
        labels[TRAIN_IMAGES:],
        images[:0],
        labels[:0],
    )


def vaecli_epoch_seconds(config: Config, dataset: Dataset, epochs: int) -> list[float]:
    """Training seconds per epoch of vaecli's own loop (its steps, not the validation after them, which
    the straightforward loop does not do either); the first (compiling) epoch is dropped."""
    config = config.model_copy(update={"train": config.train.model_copy(update={"epochs": epochs + 1})})
    seconds: list[float] = []

    def record(result: EpochResult) -> None:
        seconds.append(result.metrics["train_seconds"])  # the training steps; validation is timed apart

    train(config, dataset, on_epoch_end=record)
    return seconds[1:]


def straightforward_epoch_seconds(config: Config, dataset: Dataset, epochs: int) -> list[float]:
    """The loop users write first: one jitted step per batch, batches sliced from host NumPy.

    Same model, loss, optimizer and dynamic binarization (jax.random.bernoulli with the default
    PRNG), as the Flax examples do with their jit restored.
    """
    graphdef, state = init_train_state(config, IMAGE_SHAPE)
    optimizer = make_optimizer(config)
    params, opt_state = state.params, state.opt_state

    @jax.jit
    def train_step(params, opt_state, batch, key):
        def loss_fn(params):
            binarize_key, noise_key = jax.random.split(key)
            targets = jax.random.bernoulli(binarize_key, batch).astype(jnp.float32)
            logits, mean, log_variance = nnx.merge(graphdef, params)(targets, noise_key)
            reconstruction = -jnp.sum(targets * logits - jax.nn.softplus(logits), axis=-1)
            kl = 0.5 * jnp.sum(jnp.exp(log_variance) + mean**2 - 1.0 - log_variance, axis=-1)
            return jnp.mean(reconstruction + kl)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    images = dataset.train_images
    batch_size = config.train.batch_size
    key = jax.random.key(config.seed)
    seconds = []
    for epoch in range(epochs + 1):
        order = np.random.default_rng(epoch).permutation(len(images))
        started = time.perf_counter()
        for first in range(0, len(images) - batch_size + 1, batch_size):
            batch = images[order[first : first + batch_size]].reshape(batch_size, -1).astype(np.float32) / 255.0
            key, step_key = jax.random.split(key)
            params, opt_state, loss = train_step(params, opt_state, batch, step_key)
        loss.block_until_ready()
        seconds.append(time.perf_counter() - started)
    return seconds[1:]


def evaluation_images_per_second(config: Config, dataset: Dataset, repeats: int = 5) -> float:
    """Validation throughput of vaecli's evaluator (padded, masked, one compiled call)."""
    graphdef, state = init_train_state(config, IMAGE_SHAPE)
    images = device_split(config, dataset.val_images, split_number=1)
    evaluate = make_evaluator(graphdef, config, len(images))
    evaluate(state.params, images)
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        evaluate(state.params, images)
        best = min(best, time.perf_counter() - started)
    return len(images) / best


# ---- command start-up and memory, in fresh processes ------------------------------------------------


def peak_rss_bytes(pid: int) -> int:
    """VmHWM of a running process: its peak resident memory since it started its program."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:")), 0)


def run_measured(command: list[str], environment: dict[str, str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process; raises if it fails.

    The peak is polled from /proc rather than taken from wait4's ru_maxrss, which on Linux also
    counts the memory of this (large) process at the moment the child was forked.
    """
    started = time.perf_counter()
    process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while process.poll() is None:
        peak = max(peak, peak_rss_bytes(process.pid))
        time.sleep(0.005)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {process.stderr.read().decode()[-2000:]}")
    return seconds, peak


def command_figures(workdir: Path) -> dict[str, float]:
    vae = [sys.executable, "-m", "vaecli"]
    environment = dict(os.environ, XDG_CACHE_HOME=str(workdir / "cache"), VAECLI_DATA=str(workdir / "data"))
    figures: dict[str, float] = {}
    figures["help_seconds"] = min(run_measured([*vae, "--help"], environment)[0] for _ in range(5))

    run_dir = workdir / "run"
    train_command = [*vae, "train", "--config", "mnist-sample", "--out", str(run_dir), "--set", "train.epochs=1"]
    run_measured(train_command, dict(environment, XDG_CACHE_HOME=str(workdir / "train-cache")))
    generate = [*vae, "generate", "--run", str(run_dir), "--n", "64", "--out", str(workdir / "grid.png")]
    figures["generate_cold_seconds"] = run_measured(generate, environment)[0]  # empty compilation cache
    figures["generate_warm_seconds"] = min(run_measured(generate, environment)[0] for _ in range(3))

    many = [*vae, "generate", "--run", str(run_dir), "--n", "100000", "--out", str(workdir / "many.npz")]
    seconds, rss = run_measured(many, environment)
    figures["generate_100k_npz_seconds"], figures["generate_100k_npz_peak_rss_bytes"] = seconds, rss
    (workdir / "many.npz").unlink()

    script = (
        "import numpy as np; from vaecli.bench import random_dataset, REFERENCE_SETTINGS; "
        "from vaecli.config import validate_config; from vaecli.train import train; "
        "raw = dict(REFERENCE_SETTINGS, train=dict(REFERENCE_SETTINGS['train'], epochs=2)); "
        "train(validate_config(raw, 'bench'), random_dataset())"
    )
    figures["train_peak_rss_bytes"] = run_measured([sys.executable, "-c", script], environment)[1]
    return figures


# ---- report -----------------------------------------------------------------------------------------


def speed_figures(name: str, config: Config, seconds: list[float], peak: float) -> dict[str, float]:
    flops = training_flops_per_image(config)
    floor_seconds = TRAIN_IMAGES * flops / (peak * 1e9)
    best, median = min(seconds), statistics.median(seconds)
    return {
        f"{name}_epoch_seconds_best": best,
        f"{name}_epoch_seconds_median": median,
        f"{name}_images_per_second": TRAIN_IMAGES / best,
        f"{name}_gflop_per_epoch": TRAIN_IMAGES * flops / 1e9,
        f"{name}_floor_seconds": floor_seconds,
        f"{name}_fraction_of_floor": floor_seconds / best,
        f"{name}_fraction_of_floor_median": floor_seconds / median,
    }


def reference_figures(reference: Config, dataset: Dataset, peak: float, rounds: int, epochs: int) -> dict[str, float]:
    """vaecli's loop against the straightforward one on the reference MLP, in alternating rounds.

    A shared machine's speed drifts by several percent over a minute; alternating the two loops
    exposes both to the same drift, so their ratio means what it says.
    """
    ours: list[float] = []
    straightforward: list[float] = []
    for _ in range(rounds):
        ours += vaecli_epoch_seconds(reference, dataset, epochs)
        straightforward += straightforward_epoch_seconds(reference, dataset, epochs)
    figures = speed_figures("reference", reference, ours, peak)
    figures["reference_epoch_seconds_all"] = ours
    figures["straightforward_epoch_seconds_all"] = straightforward
    figures["straightforward_epoch_seconds_best"] = min(straightforward)
    figures["straightforward_epoch_seconds_median"] = statistics.median(straightforward)
    figures["speedup_over_straightforward"] = min(straightforward) / min(ours)
    figures["speedup_over_straightforward_median"] = statistics.median(straightforward) / statistics.median(ours)
    return figures


def print_table(figures: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"vaecli bench: {figures['machine']}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [
        ("fp32 matmul peak", f"{figures['matmul_peak_gflops']:.0f} GFLOP/s"),
        ("reference MLP 784-400-20, batch 128: training", f"{figures['reference_images_per_second']:,.0f} images/s"),
        ("  epoch of 60,000 (best / median)", f"{figures['reference_epoch_seconds_best']:.3f} / "
         f"{figures['reference_epoch_seconds_median']:.3f} s"),
        ("  matmul floor at peak", f"{figures['reference_floor_seconds']:.3f} s/epoch"),
        ("  fraction of the floor (best / median)", f"{figures['reference_fraction_of_floor']:.0%} / "
         f"{figures['reference_fraction_of_floor_median']:.0%}"),
        ("  straightforward per-step loop (best / median)", f"{figures['straightforward_epoch_seconds_best']:.3f} / "
         f"{figures['straightforward_epoch_seconds_median']:.3f} s"),
        ("  speed-up over it (best / median)", f"{figures['speedup_over_straightforward']:.2f}x / "
         f"{figures['speedup_over_straightforward_median']:.2f}x"),
        ("configs/mnist.yaml model: training", f"{figures['mnist_yaml_images_per_second']:,.0f} images/s"),
        ("  fraction of the floor (best)", f"{figures['mnist_yaml_fraction_of_floor']:.0%}"),
        ("evaluation (reference MLP)", f"{figures['evaluation_images_per_second']:,.0f} images/s"),
        ("vae --help", f"{figures['help_seconds']:.3f} s"),
        ("vae generate --n 64, cold compilation cache", f"{figures['generate_cold_seconds']:.3f} s"),
        ("vae generate --n 64, warm compilation cache", f"{figures['generate_warm_seconds']:.3f} s"),
        ("vae generate --n 100000 --out x.npz", f"{figures['generate_100k_npz_seconds']:.1f} s, peak RSS "
         f"{figures['generate_100k_npz_peak_rss_bytes'] / 2**20:,.0f} MiB"),
        ("training peak RSS (60,000 images, reference MLP)", f"{figures['train_peak_rss_bytes'] / 2**20:,.0f} MiB"),
    ]  # fmt: skip
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench.json"), help="where to write the figures as JSON")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds of vaecli's and the straightforward loop"
    )
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per loop and round (after one warm-up)")
    arguments = parser.parse_args()

    figures: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].device_kind}",
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
    }
    figures["matmul_peak_gflops"] = peak = matmul_peak_gflops()
    dataset = random_dataset()
    reference = validate_config(REFERENCE_SETTINGS, "reference MLP")
    figures.update(reference_figures(reference, dataset, peak, arguments.rounds, arguments.epochs))
    mnist_yaml = load_config("mnist.yaml")
    mnist_seconds = vaecli_epoch_seconds(mnist_yaml, dataset, arguments.rounds * arguments.epochs)
    figures.update(speed_figures("mnist_yaml", mnist_yaml, mnist_seconds, peak))
    figures["evaluation_images_per_second"] = evaluation_images_per_second(reference, dataset)
    with tempfile.TemporaryDirectory(prefix="vaecli-bench-") as workdir:
        figures.update(command_figures(Path(workdir)))

    print_table(figures)
    arguments.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"figures written to {arguments.out}")


if __name__ == "__main__":
    main()
