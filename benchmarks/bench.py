"""`make bench`: how fast vaecli trains, evaluates, samples and starts on this machine.

A script, not part of the library (it prints). Offline: training uses 60,000 random uint8 images of
MNIST's shape, since speed does not depend on pixel values. Every figure is printed as a table and
written to a JSON file (default bench.json).

    python -m benchmarks.bench [--out bench.json] [--rounds 3] [--epochs 2] [--user-rounds 5] [--user-epochs 4]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vaecli.common.config import Config, config_to_yaml, load_config, validate_config
from vaecli.common.devices import Placement, placement_over
from vaecli.data.dataset import Dataset
from vaecli.data.idx_family import validation_count
from vaecli.models.targets import device_split
from vaecli.models.vae import build_model, reparameterize
from vaecli.runs.rundir import read_metrics
from vaecli.training.loop import (
    EpochResult,
    epoch_batch_indices,
    epoch_chunks,
    init_train_state,
    make_evaluator,
    make_optimizer,
    make_train_chunk,
    steps_per_chunk_for,
    train,
)

TRAIN_IMAGES = 60_000
TEST_IMAGES = 10_000
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
            model = nnx.merge(graphdef, params)
            mean, log_variance = model.encode(targets)
            logits = model.decode(reparameterize(noise_key, mean, log_variance))
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


def conv_images_per_second(steps: int = 16) -> float:
    """Training images/s of the configs/folder.yaml model (conv stages, logistic mixture, batch 16) on random
    32x32x3 images, stepped as train() steps it; timed after a first call that compiles."""
    return stepped_images_per_second(load_config("folder.yaml"), (32, 32, 3), steps, placement_over(1))


def stepped_images_per_second(config: Config, image_shape: tuple[int, ...], steps: int, placement: Placement) -> float:
    """Training images/s of `config`'s model on `steps` batches of random images, stepped as train() steps it
    (chunks of steps_per_chunk_for, weights and images placed by `placement`); timed after a first chunk that
    compiles."""
    batch_size = config.train.batch_size
    images = np.random.default_rng(0).integers(0, 256, (steps * batch_size, *image_shape), dtype=np.uint8)
    graphdef, state = init_train_state(config, image_shape, images)
    state = placement.replicate(state)
    train_chunk = make_train_chunk(graphdef, config, steps, placement)
    device_images = placement.replicate(device_split(config, images, split_number=0))
    batches = placement.replicate(epoch_batch_indices(config.seed, 1, len(images), batch_size))
    chunks = epoch_chunks(0, steps, steps_per_chunk_for(config))
    state, losses = train_chunk(state, device_images, batches, *chunks[0])
    losses.block_until_ready()
    started = time.perf_counter()
    for first_step, chunk_steps in chunks[1:]:
        state, losses = train_chunk(state, device_images, batches, first_step, chunk_steps)
    losses.block_until_ready()
    return (steps - chunks[0][1]) * batch_size / (time.perf_counter() - started)


# ---- data parallelism over forced host devices, in fresh processes ----------------------------------

# XLA splits the CPU into this many devices for the second measurement (the first has one). They share the
# machine's cores, so no speed-up is expected from them: the figure shows the sharded step runs, and its cost.
FORCED_DEVICES = 4
DATA_PARALLEL_STEPS = 128  # two chunks: one that compiles, one timed


def data_parallel_images_per_second(devices: int, steps: int = DATA_PARALLEL_STEPS) -> float:
    """Training images/s of the reference MLP with each batch split over `devices` of this process's devices,
    stepped as train() steps it (replicated weights and images); timed after a first chunk that compiles."""
    config = validate_config(REFERENCE_SETTINGS, "reference MLP")
    return stepped_images_per_second(config, IMAGE_SHAPE, steps, placement_over(devices))


def forced_device_figures(device_counts: tuple[int, ...] = (1, FORCED_DEVICES)) -> dict[str, float]:
    """data_parallel_images_per_second on 1 and on FORCED_DEVICES host CPU devices, each in a process of its own:
    XLA fixes the number of devices when JAX starts."""
    figures = {}
    for count in device_counts:
        environment = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={count}")
        script = f"from benchmarks.bench import data_parallel_images_per_second as rate; print(rate({count}))"
        finished = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True)
        if finished.returncode != 0:
            raise RuntimeError(f"data-parallel training on {count} devices failed: {finished.stderr[-2000:]}")
        figures[f"data_parallel_on_{count}_images_per_second"] = float(finished.stdout.split()[-1])
    return figures


# ---- command start-up and memory, in fresh processes ------------------------------------------------


def peak_rss_bytes(pid: int) -> int:
    """VmHWM of a running process: its peak resident memory since it started its program."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:")), 0)


# How often run_measured samples a child's peak memory: a short command needs a fine grain for its peak to be seen.
RSS_POLL_SECONDS = 0.005
# The training run's. Sampling it every 5 ms slowed `vae train`'s steps by 7% (median of 8 paired runs): on 2 cores
# each wake-up preempts one of XLA's two threads, and the other waits for it. VmHWM is a high-water mark, so
# sampling it rarely loses nothing but the process's last fraction of a second.
TRAINING_RSS_POLL_SECONDS = 0.25


def run_measured(
    command: list[str], environment: dict[str, str], poll_seconds: float = RSS_POLL_SECONDS
) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process; raises if it fails.

    The peak is sampled from /proc every `poll_seconds` on a thread while this one waits for the child, rather
    than taken from wait4's ru_maxrss, which on Linux also counts the memory of this (large) process at the
    moment the child was forked.
    """
    started = time.perf_counter()
    process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    finished = threading.Event()
    peaks = [0]

    def sample() -> None:
        while not finished.wait(poll_seconds):
            peaks.append(peak_rss_bytes(process.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = process.communicate()
    seconds = time.perf_counter() - started
    finished.set()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {stderr.decode()[-2000:]}")
    return seconds, max(peaks)


# The least a process can do to turn codes into a picture with the same libraries: import JAX, Flax and
# Pillow, build the run's decoder (vaecli.models.vae, the Flax model, with random weights) and decode 64 codes
# from its warm compilation cache, write the PNG. `vae generate --n 64` is held to 0.7x of it, for each
# architecture: the MLP, the conv model, and the conv model with the pixel window (drawn pixel by pixel).
MINIMAL_DECODE_SCRIPT = """
import json
import sys

import jax
import numpy as np
from flax import nnx
from PIL import Image

from vaecli.common.config import ModelConfig
from vaecli.models.vae import build_model

jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
spec = json.loads(open(sys.argv[2]).read())
config, image_shape = ModelConfig(**spec["model"]), tuple(spec["image_shape"])
graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(config, image_shape, 0)))
rng = np.random.default_rng(0)
weights = jax.tree.map(lambda leaf: (0.05 * rng.standard_normal(leaf.shape)).astype(leaf.dtype), abstract)
model = nnx.merge(graphdef, weights)
codes = rng.standard_normal((64, config.latent_dim), dtype=np.float32)
keys = jax.random.split(jax.random.key(0), 64)
pixels = np.asarray(jax.jit(lambda model, codes, keys: model.decode_images(codes, keys))(model, codes, keys))
height, width = image_shape[:2]
grid = pixels.reshape(8, 8, height, width, -1).transpose(0, 2, 1, 3, 4).reshape(8 * height, 8 * width, -1)
Image.fromarray(np.round(grid * 255).astype(np.uint8).squeeze(-1) if grid.shape[-1] == 1 else grid).save(sys.argv[3])
"""
GENERATE_TARGET_RATIO = 0.7
# The runs the start-up is measured on: one epoch of the offline MNIST sample each (what matters here is the
# decoder's architecture, not its training).
START_UP_MODELS = {
    "mlp": [],
    "conv": ["--set", "model.arch=conv", "--set", "model.hidden=[32,64]"],
    "conv_pixel_context": [
        *("--set", "model.arch=conv", "--set", "model.hidden=[32,64]", "--set", "data.binarize=none"),
        *("--set", "model.likelihood=logistic", "--set", "model.pixel_context=5"),
    ],
}


def start_up_figures(
    workdir: Path, label: str, run_dir: Path, environment: dict[str, str], rounds: int = 9
) -> dict[str, float | list[float]]:
    """A warm `vae generate --n 64` of `run_dir` against the minimal process decoding with the same model, each
    with a warm compilation cache. Run in alternation, so that both meet the same load on a shared machine: the
    medians of `rounds` each, their ratio, and the median of the rounds' own ratios (which drift in the
    machine's load moves less). Keys end in _<label>."""
    script = workdir / "minimal_decode.py"
    script.write_text(MINIMAL_DECODE_SCRIPT)
    metadata = json.loads(next((run_dir / "checkpoints").glob("*/meta/metadata")).read_text())
    spec = workdir / f"minimal-{label}.json"
    spec.write_text(json.dumps({"model": metadata["config"]["model"], "image_shape": metadata["image_shape"]}))
    minimal = [sys.executable, str(script), str(workdir / "minimal-cache"), str(spec), str(workdir / "minimal.png")]
    generate = [sys.executable, "-m", "vaecli", "generate", "--run", str(run_dir), "--n", "64"]
    generate += ["--out", str(workdir / "grid.png")]
    run_measured(minimal, environment)  # fills its compilation cache
    run_measured(generate, environment)  # and vae's, and keeps the run's model file for inference
    minimal_seconds, generate_seconds = [], []
    for _ in range(rounds):
        minimal_seconds.append(run_measured(minimal, environment)[0])
        generate_seconds.append(run_measured(generate, environment)[0])
    ratio = statistics.median(generate_seconds) / statistics.median(minimal_seconds)
    rounds_ratios = [ours / theirs for ours, theirs in zip(generate_seconds, minimal_seconds, strict=True)]
    figures = {
        "minimal_decode_seconds_median": statistics.median(minimal_seconds),
        "minimal_decode_seconds_all": minimal_seconds,
        "generate_warm_seconds_median": statistics.median(generate_seconds),
        "generate_warm_seconds_all": generate_seconds,
        "generate_over_minimal_ratio": ratio,
        "generate_over_minimal_ratio_of_rounds_median": statistics.median(rounds_ratios),
    }
    return {f"{name}_{label}": value for name, value in figures.items()}


def train_start_up_run(workdir: Path, label: str, environment: dict[str, str]) -> Path:
    """One epoch of the offline sample with START_UP_MODELS[label]'s settings, in its own compilation cache."""
    run_dir = workdir / f"run-{label}"
    command = [sys.executable, "-m", "vaecli", "train", "--config", "mnist-sample", "--out", str(run_dir)]
    command += ["--set", "train.epochs=1", *START_UP_MODELS[label]]
    run_measured(command, dict(environment, XDG_CACHE_HOME=str(workdir / "train-cache")))
    return run_dir


def command_figures(workdir: Path) -> dict[str, float]:
    vae = [sys.executable, "-m", "vaecli"]
    environment = dict(os.environ, XDG_CACHE_HOME=str(workdir / "cache"), VAECLI_DATA=str(workdir / "data"))
    figures: dict[str, float] = {}
    figures["help_seconds"] = min(run_measured([*vae, "--help"], environment)[0] for _ in range(5))

    run_dir = train_start_up_run(workdir, "mlp", environment)
    generate = [*vae, "generate", "--run", str(run_dir), "--n", "64", "--out", str(workdir / "grid.png")]
    figures["generate_cold_seconds"] = run_measured(generate, environment)[0]  # empty compilation cache
    figures["generate_warm_seconds"] = min(run_measured(generate, environment)[0] for _ in range(3))
    figures.update(start_up_figures(workdir, "mlp", run_dir, environment))
    for label in ("conv", "conv_pixel_context"):
        figures.update(start_up_figures(workdir, label, train_start_up_run(workdir, label, environment), environment))

    many = [*vae, "generate", "--run", str(run_dir), "--n", "100000", "--out", str(workdir / "many.npz")]
    seconds, rss = run_measured(many, environment)
    figures["generate_100k_npz_seconds"], figures["generate_100k_npz_peak_rss_bytes"] = seconds, rss
    (workdir / "many.npz").unlink()

    script = (
        "import numpy as np; from benchmarks.bench import random_dataset, REFERENCE_SETTINGS; "
        "from vaecli.common.config import validate_config; from vaecli.training.loop import train; "
        "raw = dict(REFERENCE_SETTINGS, train=dict(REFERENCE_SETTINGS['train'], epochs=2)); "
        "train(validate_config(raw, 'bench'), random_dataset())"
    )
    figures["train_peak_rss_bytes"] = run_measured([sys.executable, "-c", script], environment)[1]
    return figures


# ---- vae train and vae evaluate as a user runs them, in fresh processes -------------------------------

EVALUATE_K = 5000
# Test images `vae evaluate --k 5000` is timed on (about 15 s on 2 CPU cores); its rate is extrapolated to all
# TEST_IMAGES.
EVALUATED_IMAGES = 100


def write_random_mnist(folder: Path, train_count: int = TRAIN_IMAGES, test_count: int = TEST_IMAGES) -> Path:
    """MNIST's four IDX files holding random pixels (and label 0): vae train reads files found in data.dir as they
    are, so `data.name: mnist` trains on them offline."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", train_count), ("t10k", test_count)):
        images = rng.integers(0, 256, (count, *IMAGE_SHAPE), dtype=np.uint8)
        images_header = np.array((2051, count, *IMAGE_SHAPE), ">i4").tobytes()
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(images_header + images.tobytes())
        labels_header = np.array((2049, count), ">i4").tobytes()
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(labels_header + bytes(count))
    return folder


def mean_after_first_epoch(metrics: list[dict], name: str) -> float:
    """The mean of metrics.jsonl's `name` over the epochs after the first (which compiles). For wall_seconds: the
    main thread's time from one epoch's end to the next, validation and any wait for the previous epoch's outputs
    included."""
    return statistics.fmean(row[name] for row in metrics[1:])


def write_reference_config(workdir: Path) -> Path:
    """The reference MLP's config, training on MNIST's IDX files of random pixels written in workdir."""
    data = {**REFERENCE_SETTINGS["data"], "name": "mnist", "dir": str(write_random_mnist(workdir / "random-mnist"))}
    config_path = workdir / "reference.yaml"
    config_path.write_text(config_to_yaml(validate_config({**REFERENCE_SETTINGS, "data": data}, "reference MLP")))
    return config_path


def user_training_figures(workdir: Path, config_path: Path, epochs: int) -> dict[str, float]:
    """Wall seconds per epoch of `vae train --config config_path` (the reference MLP on 60,000 random MNIST-shaped
    images), with all an epoch does (validation, checkpoint, pictures, TensorBoard events): the mean wall_seconds
    of its metrics.jsonl after the first epoch, so start-up, data loading and compiling (all in the first epoch
    or before it) stay out."""
    environment = dict(os.environ, XDG_CACHE_HOME=str(workdir / "user-cache"))
    run_dir = workdir / "reference-run"
    shutil.rmtree(run_dir, ignore_errors=True)  # a previous round's metrics.jsonl would be read as this one's
    options = ["--config", str(config_path), "--out", str(run_dir), "--set", f"train.epochs={epochs}"]
    command = [sys.executable, "-m", "vaecli", "train", *options]
    _, peak_rss = run_measured(command, environment, TRAINING_RSS_POLL_SECONDS)
    metrics = read_metrics(run_dir)
    seconds = mean_after_first_epoch(metrics, "wall_seconds")
    train_images = TRAIN_IMAGES - validation_count(TRAIN_IMAGES)
    return {
        "vae_train_epoch_seconds": seconds,
        "vae_train_images_per_second": train_images / seconds,
        # Over the same epochs as the whole, so the part is never more than the whole.
        "vae_train_logged_epoch_seconds": mean_after_first_epoch(metrics, "epoch_seconds"),
        "vae_train_peak_rss_bytes": peak_rss,
    }


def whole_epoch_figures(workdir: Path, reference: Config, dataset: Dataset, rounds: int, epochs: int) -> dict:
    """`vae train`'s whole epochs against the straightforward loop's, in alternating rounds: two epochs of the
    straightforward loop (after one that compiles), then a `vae train` process of `epochs` epochs, and so on, with
    two more straightforward epochs after the last run. Each run is compared with the four straightforward epochs
    on either side of it.

    This machine's speed was seen to drift by 40% within a minute (5.1 to 7.4 ms per step of the same loop), and
    a slow spell can cover a whole `vae train` run, so figures taken minutes apart compare the machine's moods;
    each round's ratio compares what ran side by side. Reported: the ratio of the medians over all rounds, and
    the median of the rounds' own ratios. The last round's run stays in workdir/reference-run for
    evaluate_figures.
    """
    config_path = write_reference_config(workdir)
    each_round, blocks = [], [straightforward_epoch_seconds(reference, dataset, 2)]
    for _ in range(rounds):
        each_round.append(user_training_figures(workdir, config_path, epochs))
        blocks.append(straightforward_epoch_seconds(reference, dataset, 2))
    ratios = [
        whole_epoch_speedup(user["vae_train_images_per_second"], statistics.median(before + after))
        for user, before, after in zip(each_round, blocks[:-1], blocks[1:], strict=True)
    ]
    straightforward = [seconds for block in blocks for seconds in block]

    # The round of the median whole epoch (the faster of the middle two), so that the part logged and the whole
    # come from one run.
    median_round = sorted(each_round, key=lambda user: user["vae_train_epoch_seconds"])[(len(each_round) - 1) // 2]
    figures = {
        "vae_train_epoch_seconds": median_round["vae_train_epoch_seconds"],
        "vae_train_epoch_seconds_all": [user["vae_train_epoch_seconds"] for user in each_round],
        "vae_train_images_per_second": median_round["vae_train_images_per_second"],
        "vae_train_logged_epoch_seconds": median_round["vae_train_logged_epoch_seconds"],
        "vae_train_peak_rss_bytes": max(user["vae_train_peak_rss_bytes"] for user in each_round),
        "whole_epoch_straightforward_epoch_seconds_all": straightforward,
        "whole_epoch_straightforward_epoch_seconds_median": statistics.median(straightforward),
        "vae_train_speedup_of_rounds": ratios,
        "vae_train_speedup_over_straightforward_of_rounds_median": statistics.median(ratios),
        "vae_train_speedup_over_straightforward": whole_epoch_speedup(
            median_round["vae_train_images_per_second"], statistics.median(straightforward)
        ),
    }
    return figures


def evaluate_figures(run_dir: Path, workdir: Path) -> dict[str, float]:
    """`vae evaluate --k 5000` on the reference model: images/s over the first EVALUATED_IMAGES test images (the
    command's own timing, without start-up; a first run compiles into the cache), extrapolated to TEST_IMAGES."""
    environment = dict(os.environ, XDG_CACHE_HOME=str(workdir / "user-cache"))

    def evaluation_seconds(images: int) -> float:
        options = ["--run", str(run_dir), "--k", str(EVALUATE_K), "--images", str(images), "--json"]
        command = [sys.executable, "-m", "vaecli", "evaluate", *options]
        finished = subprocess.run(command, env=environment, capture_output=True, text=True)
        if finished.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {finished.stderr[-2000:]}")
        return json.loads(finished.stdout)["seconds"]

    evaluation_seconds(2)
    images_per_second = EVALUATED_IMAGES / evaluation_seconds(EVALUATED_IMAGES)
    return {
        "evaluate_k5000_images_per_second": images_per_second,
        "evaluate_k5000_test_set_seconds": TEST_IMAGES / images_per_second,
    }


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


def whole_epoch_speedup(vae_train_images_per_second: float, straightforward_epoch_seconds: float) -> float:
    """Images/s of `vae train`'s whole epochs over those of the straightforward loop's training (an epoch of
    TRAIN_IMAGES in `straightforward_epoch_seconds`)."""
    return vae_train_images_per_second / (TRAIN_IMAGES / straightforward_epoch_seconds)


def device_note(backend: str) -> str:
    """A line under the table when no accelerator took part, so CPU figures are not read as GPU ones."""
    return "" if backend == "gpu" else f"no GPU present: every figure is for this machine's {backend.upper()}"


def end_to_end_rows(figures: dict) -> list[tuple[str, str]]:
    """The table's rows for the commands as a user runs them, and for the conv model."""
    train_rate, train_epoch = figures["vae_train_images_per_second"], figures["vae_train_epoch_seconds"]
    logged_epoch = figures["vae_train_logged_epoch_seconds"]
    speedup = figures["vae_train_speedup_over_straightforward"]
    speedup_of_rounds = figures["vae_train_speedup_over_straightforward_of_rounds_median"]
    conv_rate, evaluate_rate = figures["conv_images_per_second"], figures["evaluate_k5000_images_per_second"]
    return [
        ("vae train, whole epochs (reference MLP, 55,000 images)", f"{train_rate:,.0f} images/s, {train_epoch:.2f} s"),
        ("  of which training + validation (metrics.jsonl)", f"{logged_epoch:.2f} s"),
        (
            "  per image, over the straightforward loop's training (of the medians; round by round)",
            f"{speedup:.2f}x; {speedup_of_rounds:.2f}x (target 1.5x)",
        ),
        ("  vae train peak RSS", f"{figures['vae_train_peak_rss_bytes'] / 2**20:,.0f} MiB"),
        (
            "configs/folder.yaml conv model (32x32x3, batch 16): training",
            f"{conv_rate:,.1f} images/s",
        ),
        (
            f"vae evaluate --k {EVALUATE_K} (reference MLP)",
            f"{evaluate_rate:,.1f} images/s",
        ),
        (
            f"  all {TEST_IMAGES:,} test images, extrapolated from the first {EVALUATED_IMAGES}",
            f"{figures['evaluate_k5000_test_set_seconds']:,.0f} s",
        ),
    ]


def data_parallel_rows(figures: dict) -> list[tuple[str, str]]:
    """The table's rows for training with each batch split over forced host CPU devices."""
    return [
        (
            f"reference MLP training, batch split over {count} host CPU device{'s' if count > 1 else ''}",
            f"{figures[f'data_parallel_on_{count}_images_per_second']:,.0f} images/s",
        )
        for count in (1, FORCED_DEVICES)
    ]


def print_table(figures: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"vaecli bench: {figures['machine']}", caption=device_note(figures["backend"]) or None)
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
        *start_up_rows(figures),
        ("vae generate --n 100000 --out x.npz", f"{figures['generate_100k_npz_seconds']:.1f} s, peak RSS "
         f"{figures['generate_100k_npz_peak_rss_bytes'] / 2**20:,.0f} MiB"),
        ("training peak RSS (60,000 images, reference MLP)", f"{figures['train_peak_rss_bytes'] / 2**20:,.0f} MiB"),
    ]  # fmt: skip
    rows += end_to_end_rows(figures)
    rows += data_parallel_rows(figures)
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)


def start_up_rows(figures: dict) -> list[tuple[str, str]]:
    """A warm `vae generate --n 64` against the minimal process, for each architecture in START_UP_MODELS."""
    rows = []
    for label in START_UP_MODELS:
        rows += [
            (f"  {label}: vae generate, median alternating with the minimal process",
             f"{figures[f'generate_warm_seconds_median_{label}']:.3f} s"),
            ("    minimal process (JAX, Flax, Pillow; the same decoder; 64 decoded; PNG)",
             f"{figures[f'minimal_decode_seconds_median_{label}']:.3f} s"),
            ("    vae generate / minimal process (of the medians; round by round)",
             f"{figures[f'generate_over_minimal_ratio_{label}']:.2f}x; "
             f"{figures[f'generate_over_minimal_ratio_of_rounds_median_{label}']:.2f}x "
             f"(target {GENERATE_TARGET_RATIO}x)"),
        ]  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench.json"), help="where to write the figures as JSON")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds of vaecli's and the straightforward loop"
    )
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per loop and round (after one warm-up)")
    parser.add_argument("--user-epochs", type=int, default=4, help="epochs of the timed `vae train` run (at least 2)")
    parser.add_argument("--user-rounds", type=int, default=5, help="`vae train` runs, between straightforward epochs")
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
    with tempfile.TemporaryDirectory(prefix="vaecli-bench-") as workdir:
        whole = whole_epoch_figures(Path(workdir), reference, dataset, arguments.user_rounds, arguments.user_epochs)
        figures.update(whole)
        figures.update(evaluate_figures(Path(workdir) / "reference-run", Path(workdir)))
    mnist_yaml = load_config("mnist.yaml")
    mnist_seconds = vaecli_epoch_seconds(mnist_yaml, dataset, arguments.epochs)
    figures.update(speed_figures("mnist_yaml", mnist_yaml, mnist_seconds, peak))
    figures["evaluation_images_per_second"] = evaluation_images_per_second(reference, dataset)
    figures["conv_images_per_second"] = conv_images_per_second()
    figures.update(forced_device_figures())
    with tempfile.TemporaryDirectory(prefix="vaecli-bench-") as workdir:
        figures.update(command_figures(Path(workdir)))

    print_table(figures)
    arguments.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"figures written to {arguments.out}")


if __name__ == "__main__":
    main()
