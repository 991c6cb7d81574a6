"""The `vae` command: parsing, messages and exit codes only; the work is done by library functions.

Heavy modules (JAX, Flax, Orbax) are imported inside the commands, so `vae --help` stays instant.
"""

from __future__ import annotations

import contextlib
import functools
import io
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from vaecli.common.cache import enable_compilation_cache
from vaecli.common.errors import UsageError, VaeError

app = typer.Typer(
    name="vae",
    help="Train a variational autoencoder on images, then sample from its prior or reconstruct through its posterior.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(soft_wrap=True)
error_console = Console(stderr=True, soft_wrap=True)

OUTPUT_SUFFIXES = (".png", ".npz")


def reports_errors(command):
    """Turn a library error into one red line on stderr and its exit code, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except VaeError as error:
            error_console.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            error_console.print("[red]interrupted[/red]")
            raise typer.Exit(130) from None

    return wrapper


RunOption = Annotated[Path | None, typer.Option("--run", help="Run directory [default: newest run under ./runs].")]


def check_outputs(out: Path, count_option: str, count: int, seed: int) -> None:
    """Refuse an output format, a count or a seed we cannot honour before any model is loaded."""
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise UsageError(f"--out {out} must end in .png (a picture) or .npz (the arrays)")
    if count < 1:
        raise UsageError(f"{count_option} must be at least 1, got {count}")
    if not 0 <= seed < 2**32:
        raise UsageError(f"--seed must be between 0 and {2**32 - 1}, got {seed}")


CheckpointOption = Annotated[
    str, typer.Option("--checkpoint", help="Which checkpoint: best (lowest validation loss), latest, or a step.")
]


def open_run(run: Path | None, checkpoint: str = "best"):
    """The run named by --run (or the newest one under ./runs), at the chosen checkpoint, ready for inference:
    its model file, read without Orbax or Flax once it is kept beside the run (vaecli.inference.open_run).

    The option is checked before JAX is imported and its compilation cache turned on; the run's notices (a
    model file written anew) are printed on stderr.
    """
    check_checkpoint_option(checkpoint)
    enable_compilation_cache()
    from vaecli.inference.open_run import open_inference_run
    from vaecli.runs.rundir import latest_run_dir

    opened = open_inference_run(run or latest_run_dir(), checkpoint)
    for notice in opened.notices:
        error_console.print(f"[yellow]note:[/yellow] {notice}", highlight=False)
    return opened


def check_checkpoint_option(checkpoint: str) -> None:
    """Refuse a --checkpoint that is none of best, latest or a step number."""
    if checkpoint not in ("best", "latest") and not (checkpoint.isascii() and checkpoint.isdigit()):
        raise UsageError(f"--checkpoint {checkpoint!r}: give best, latest or a step number")


class StopRequests:
    """First Ctrl-C (or SIGTERM): finish the current steps, save a checkpoint, stop. Second: leave at once.

    Leaving at once corrupts nothing: every file and checkpoint is written aside and renamed into place,
    and what was being written in the background (the last epoch's outputs) is finished first.
    """

    def __init__(self):
        self.signal_number: int | None = None
        # Where notices go; the training display replaces it so they do not break its live bar.
        self.say = error_console.print

    def requested(self) -> bool:
        return self.signal_number is not None

    def handle(self, signal_number: int, frame) -> None:
        if self.signal_number is not None:
            self.say("[red]stopping at once[/red], once the outputs being written are complete")
            exit_now(128 + signal_number)
        self.signal_number = signal_number
        self.say(
            "[yellow]stopping after the current steps and saving a checkpoint[/yellow] (press Ctrl-C again to quit now)"
        )

    @contextlib.contextmanager
    def installed(self):
        previous = {number: signal.signal(number, self.handle) for number in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)


@app.command()
@reports_errors
def train(
    config: Annotated[
        str | None,
        typer.Option("--config", "-c", help="YAML config: a path, or a shipped name (mnist, mnist-sample, ...)."),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config value, e.g. --set train.epochs=5 (repeatable; values are YAML)."),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run directory [default: runs/<config name>].")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a run already in --out.")] = False,
    resume: Annotated[
        Path | None,
        typer.Option("--resume", help="Continue RUN_DIR from its newest checkpoint with its saved config."),
    ] = None,
    coordinator: Annotated[
        str | None,
        typer.Option(
            "--coordinator",
            help="Join a multi-process run: HOST:PORT of process 0 (with --num-processes and --process-id; "
            "under Slurm or Open MPI all three are read from the environment).",
        ),
    ] = None,
    num_processes: Annotated[
        int | None, typer.Option("--num-processes", help="Processes in the multi-process run.")
    ] = None,
    process_id: Annotated[
        int | None, typer.Option("--process-id", help="This process's number, 0 to N-1 (0 writes the run).")
    ] = None,
    join_timeout: Annotated[
        int, typer.Option("--join-timeout", help="Seconds to wait for the coordinator and the other processes.")
    ] = 300,
) -> None:
    """Fit a VAE: z ~ q(z|x) by reparameterization, loss = -ELBO; writes checkpoints, metrics and pictures.

    Ctrl-C stops after the current steps and saves a checkpoint; vae train --resume RUN_DIR goes on
    from it (--set train.epochs=N to train longer). With several processes (--coordinator, or Slurm /
    Open MPI), each global batch is split over all their devices and process 0 writes the run.
    """
    if resume is not None and (config is not None or out is not None or overwrite):
        raise UsageError(
            "--resume continues a run in place with its saved config; drop --config, --out and --overwrite"
        )
    if resume is None and config is None:
        raise UsageError("give --config CONFIG to start a run, or --resume RUN_DIR to continue one")
    from vaecli.common.devices import check_process_flags, join_processes

    check_process_flags(coordinator, num_processes, process_id)
    from vaecli.common.config import load_config

    resolved = load_config(config, overrides or []) if config is not None else None
    # Before any other use of JAX: every process's devices make up one backend.
    join_processes(coordinator, num_processes, process_id, join_timeout)
    enable_compilation_cache()
    from vaecli.common.devices import describe_devices, device_count_for, is_primary
    from vaecli.training.run import RunHooks, default_run_dir, resume_run, train_run

    # In a multi-process run only process 0 reports; the others print only their errors.
    output = console if is_primary() else Console(file=io.StringIO())
    stops = StopRequests()
    with stops.installed(), TrainingDisplay(output) as display:
        stops.say = display.progress.console.print
        hooks = RunHooks(
            on_progress=display.on_progress,
            on_epoch_end=display.on_epoch_end,
            on_download=display.on_download,
            on_decode=display.on_decode,
            on_notice=display.on_notice,
            should_stop=stops.requested,
        )
        if resolved is None:
            output.print(f"resuming {resume}")
            result = resume_run(resume, overrides or [], hooks)
        else:
            run_dir = out or default_run_dir(config)
            output.print(
                f"training on [bold]{resolved.data.name}[/bold] for {resolved.train.epochs} epochs: "
                f"{describe_model(resolved)}; on {describe_devices(device_count_for(resolved))}; into {run_dir}"
            )
            result = train_run(resolved, run_dir, overwrite, hooks)
    if result.stopped_at_step is not None:
        if is_primary():
            error_console.print(
                f"stopped at step {result.stopped_at_step}; checkpoint saved in {result.run_dir}; "
                f"resume with: vae train --resume {result.run_dir}",
                highlight=False,
            )
        raise typer.Exit(128 + (stops.signal_number or signal.SIGINT))
    run_dir = result.run_dir
    output.print(f"done: {run_dir} (try: vae generate --run {run_dir}  or  vae reconstruct --run {run_dir})")


def describe_model(config) -> str:
    """'mlp [512, 256] -> z32, bernoulli, IWAE k=5' : the model and objective in a few words."""
    model, training = config.model, config.train
    likelihood = f"logistic mixture of {model.mixtures}" if model.likelihood == "logistic" else model.likelihood
    if training.iw_samples > 1:
        objective = f"IWAE bound k={training.iw_samples}"
    else:
        objective = "ELBO" if training.beta == 1 else f"beta-VAE beta={training.beta:g}"
    return f"{model.arch} {list(model.hidden)} -> z{model.latent_dim}, {likelihood}, {objective}"


@app.command()
@reports_errors
def generate(
    run: RunOption = None,
    checkpoint: CheckpointOption = "best",
    n: Annotated[int, typer.Option("--n", help="Number of images.")] = 64,
    out: Annotated[Path, typer.Option("--out", help="Output: a .png grid, or .npz with array 'samples'.")] = Path(
        "grid.png"
    ),
    seed: Annotated[int, typer.Option("--seed", help="Seed for z; the same seed gives the same output.")] = 0,
    temperature: Annotated[
        float, typer.Option("--temperature", help="Scale of z ~ N(0, T^2 I), or of the gmm's deviations from a mean.")
    ] = 1.0,
    sampler: Annotated[
        str,
        typer.Option(
            "--sampler",
            help="Where z comes from: prior (N(0, T^2 I)), or gmm (a Gaussian mixture fitted to the training "
            "images' posterior means, cached as RUN/samplers/gmm-<step>-<components>.npz).",
        ),
    ] = "prior",
    components: Annotated[int, typer.Option("--components", help="Components of the gmm sampler.")] = 10,
) -> None:
    """New images: z from the prior N(0, T^2 I) or (--sampler gmm) a mixture fitted to the training codes, decoded.

    Each z is decoded to the mean of p(x|z). gmm draws z where the decoder was trained: the training
    codes do not fill N(0, I), and z from the prior's empty regions decode to blurred or non-images.
    """
    check_outputs(out, "--n", n, seed)
    from vaecli.inference.samplers import check_sampler, save_samples

    check_sampler(sampler, components)
    loaded = open_run(run, checkpoint)
    source = save_samples(out, loaded, sampler, n, seed, temperature, components)
    console.print(f"wrote {out}: {n} samples from {source}, run {loaded.run_dir} step {loaded.step}")


@app.command()
@reports_errors
def reconstruct(
    inputs: Annotated[
        list[Path] | None, typer.Argument(help="Image files (any format Pillow reads) [default: 16 test images].")
    ] = None,
    run: RunOption = None,
    checkpoint: CheckpointOption = "best",
    out: Annotated[
        Path, typer.Option("--out", help="Output: a .png figure, or .npz with 'inputs' and 'reconstructions'.")
    ] = Path("recon.png"),
    samples: Annotated[
        int, typer.Option("--samples", "-k", help="Reconstructions per input, each from its own z ~ q(z|x).")
    ] = 4,
    mean: Annotated[bool, typer.Option("--mean", help="Decode the posterior mean instead of sampling z.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed for eps in z = mu + sigma * eps.")] = 0,
) -> None:
    """Re-draw images through the posterior: z ~ q(z|x) via z = mu + sigma * eps, decoded."""
    check_outputs(out, "--samples", samples, seed)
    from vaecli.inference.sample import save_reconstructions

    loaded = open_run(run, checkpoint)
    source = save_reconstructions(out, loaded, inputs or [], samples, seed, mean)
    how = "the posterior mean" if mean else f"{samples} draws of z ~ q(z|x)"
    console.print(f"wrote {out}: {source}, each decoded from {how}, run {loaded.run_dir} step {loaded.step}")


PngOut = Annotated[Path, typer.Option("--out", help="Output picture (.png).")]
SeedOption = Annotated[
    int, typer.Option("--seed", help="Seed of the one Bernoulli draw a binarized model's encoder sees of each image.")
]


@app.command()
@reports_errors
def latent(
    run: RunOption = None,
    checkpoint: CheckpointOption = "best",
    split: Annotated[str, typer.Option("--split", help="Which split to encode: test, val or train.")] = "test",
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="Output .png. For a 2-D latent a second panel beside the codes shows the decoded manifold "
            "(z on a grid of the prior's quantiles).",
        ),
    ] = Path("latent.png"),
    images: Annotated[int | None, typer.Option("--images", help="Encode only the first N images.")] = None,
    seed: SeedOption = 0,
) -> None:
    """The posterior means mu(x) of a split in 2-D, coloured by label, with the prior's 1 and 2 sigma circles.

    A latent of more than 2 dimensions is shown on its first two principal axes (not centred, so the prior
    N(0, I) is still N(0, I) there and its circles are exact).
    """
    if split not in ("test", "val", "train"):
        raise UsageError(f"--split {split!r}: choose test, val or train")
    from vaecli.inference.explore import save_latent_figure

    loaded = open_run(run, checkpoint)
    drawn = save_latent_figure(loaded, out, split, images, seed)
    plane = "z0, z1" if not drawn.plane.is_pca else f"PC1, PC2 ({drawn.plane.explained.sum():.0%} of the variance)"
    beside = " and the decoded manifold" if drawn.with_manifold else ""
    console.print(f"wrote {out}: {drawn.images} {split} codes on {plane}{beside}, run {loaded.run_dir}")


@app.command()
@reports_errors
def interpolate(
    first: Annotated[str, typer.Argument(metavar="A", help="Start: an image file, or SPLIT:INDEX (e.g. test:12).")],
    second: Annotated[str, typer.Argument(metavar="B", help="End: an image file, or SPLIT:INDEX (e.g. val:0).")],
    run: RunOption = None,
    checkpoint: CheckpointOption = "best",
    steps: Annotated[int, typer.Option("--steps", help="Points on the path, both ends included.")] = 10,
    spherical: Annotated[
        bool, typer.Option("--spherical", help="Turn along the great circle (slerp), the length changing linearly.")
    ] = False,
    out: PngOut = Path("interp.png"),
    seed: SeedOption = 0,
) -> None:
    """Decode a path from A's posterior mean to B's: one row, A as the encoder saw it, the path, then B.

    A and B are image files (read as vae reconstruct reads them) or images of the run's dataset named
    SPLIT:INDEX, e.g. test:12 (the 13th test image). Each point is decoded to the mean of p(x|z).
    """
    from vaecli.inference.explore import save_interpolation

    loaded = open_run(run, checkpoint)
    save_interpolation(loaded, out, first, second, steps, spherical, seed)
    path = "spherical" if spherical else "straight"
    console.print(f"wrote {out}: {first}, {steps} points on a {path} path, {second}; run {loaded.run_dir}")


@app.command()
@reports_errors
def traverse(
    run: RunOption = None,
    checkpoint: CheckpointOption = "best",
    input_image: Annotated[
        str | None,
        typer.Option("--input", help="Vary around the posterior mean of a file or SPLIT:INDEX (default: z = 0)."),
    ] = None,
    dims: Annotated[
        str | None,
        typer.Option("--dims", help="Dimensions to vary, e.g. 0,3,5 (default: the 10 with the most KL)."),
    ] = None,
    value_range: Annotated[float, typer.Option("--range", help="Vary each from -RANGE to +RANGE.")] = 3.0,
    steps: Annotated[int, typer.Option("--steps", help="Values per dimension.")] = 9,
    out: PngOut = Path("traverse.png"),
    seed: SeedOption = 0,
) -> None:
    """Vary one latent coordinate at a time, the others held; a row per dimension, decoded to the mean of p(x|z).

    Rows are ordered by the dimension's KL on the validation split (the informative ones first); inactive
    dimensions (variance of mu(x) over the images <= 0.01, as vae evaluate counts them) are marked.
    """
    from vaecli.inference.explore import save_traversal
    from vaecli.inference.latent import parse_dimensions

    requested = parse_dimensions(dims) if dims is not None else None
    loaded = open_run(run, checkpoint)
    drawn = save_traversal(loaded, out, input_image, requested, value_range, steps, seed)
    inactive = sum(not active for active in drawn.active)
    console.print(
        f"wrote {out}: z{', z'.join(map(str, drawn.dims))} around {drawn.centre} ({inactive} inactive), "
        f"run {loaded.run_dir} step {loaded.step}"
    )


@app.command()
@reports_errors
def evaluate(
    run: RunOption = None,
    checkpoint: CheckpointOption = "best",
    split: Annotated[
        str, typer.Option("--split", help="Which split of the run's dataset: test, val or train.")
    ] = "test",
    k: Annotated[int, typer.Option("--k", help="Importance samples per image (papers use 5000).")] = 5000,
    images: Annotated[
        int | None, typer.Option("--images", help="Evaluate only the first N images (a quick estimate).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the samples and of the test split's binary draw.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
) -> None:
    """Test log-likelihood by importance sampling (k samples of q(z|x) per image), -ELBO, bits/dim, latent usage.

    -log p(x) <= -log (1/k) sum p(x, z_k) / q(z_k|x): the NLL that papers report, with the negative ELBO
    (its k = 1 form), bits per dimension, active units and the aggregate posterior beside it.
    """
    if split not in ("test", "val", "train"):
        raise UsageError(f"--split {split!r}: choose test, val or train")
    if k < 1:
        raise UsageError(f"--k must be at least 1, got {k}")
    if images is not None and images < 1:
        raise UsageError(f"--images must be at least 1, got {images}")
    if not 0 <= seed < 2**32:
        raise UsageError(f"--seed must be between 0 and {2**32 - 1}, got {seed}")
    from vaecli.common.errors import OutputError
    from vaecli.inference.evaluate import evaluate_split, evaluation_record
    from vaecli.runs.rundir import record_evaluation

    loaded = open_run(run, checkpoint)
    with progress_bar(console if not as_json else error_console, f"evaluate {split}, k={k}") as on_progress:
        result = evaluate_split(loaded, split, k, images, seed, on_progress)
    record = evaluation_record(loaded, result)
    if as_json:
        import json

        print(json.dumps(record))
    else:
        console.print(evaluation_table(loaded, result))
    if not result.is_likelihood and not as_json:
        from rich.markup import escape

        console.print(f"[yellow]note:[/yellow] {escape(result.protocol)}", highlight=False)
    try:  # kept for vae runs; the figures are shown already, so an unwritable run folder is only a note
        record_evaluation(loaded.run_dir, record)
    except OutputError as error:
        error_console.print(f"[yellow]note:[/yellow] result not kept in the run: {error}", highlight=False)


@app.command(name="export")
@reports_errors
def export_model(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    checkpoint: CheckpointOption = "best",
    out: Annotated[Path, typer.Option("--out", help="The model file to write (.vae).")] = Path("model.vae"),
) -> None:
    """One self-contained model file: weights, the functions exported by jax.export, the config and image shape.

    Any Python program with jax and numpy loads it and generates or reconstructs without vaecli
    (see examples/exported.py).
    """
    check_checkpoint_option(checkpoint)
    if out.suffix.lower() != ".vae":
        raise UsageError(f"--out {out} must end in .vae (a model file)")
    enable_compilation_cache()
    from vaecli.inference.open_run import export_run

    exported = export_run(run, checkpoint, out)
    size_mib = out.stat().st_size / 2**20
    console.print(f"wrote {out}: run {exported.run_dir} step {exported.step} ({size_mib:.1f} MiB)")


@contextlib.contextmanager
def progress_bar(output: Console, label: str):
    """A transient bar; yields on_progress(done, total)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=output, transient=True,
    )  # fmt: skip
    task = progress.add_task(label, total=None)
    with progress:
        yield lambda done, total: progress.update(task, completed=done, total=total)


def evaluation_table(loaded, result):
    """The rich table of `vae evaluate`: each figure, its value and what it means."""
    from rich.markup import escape
    from rich.table import Table

    nll_name = "test NLL" if result.split == "test" else f"{result.split} NLL"
    top = ", ".join(f"z{entry['dim']} {entry['kl']:.2f}" for entry in result.kl_per_dim[:6])
    aggregate = result.aggregate_posterior
    devices = f"{result.devices} device{'s' if result.devices > 1 else ''}"
    rows = [
        (f"{nll_name} (k={result.k})", f"{result.nll_nats:.2f} nats", "-log p(x) by importance sampling (upper bound)"),
        ("-ELBO", f"{result.neg_elbo_nats:.2f} nats", "reconstruction + KL: the k = 1 bound"),
        ("  reconstruction", f"{result.recon_nats:.2f} nats", "-E_q[log p(x|z)]"),
        ("  KL", f"{result.kl_nats:.2f} nats", "KL(q(z|x) || p(z)), the code's cost"),
        ("bits/dim", f"{result.bits_per_dim:.4f}", f"NLL / ({result.num_values} values x ln 2)"),
        ("active units", f"{result.active_units} of {result.latent_dim}", "Var_x[E q(z|x)] > 0.01"),
        ("KL per dimension", top + (", ..." if result.latent_dim > 6 else ""), "largest first, nats"),
        (
            "aggregate posterior",
            "n/a"
            if aggregate["kl_moment_matched_to_prior"] is None
            else f"KL {aggregate['kl_moment_matched_to_prior']:.2f} nats",
            f"moment-matched Gaussian of all q(z|x) vs N(0, I); |mean| {aggregate['mean_norm']:.2f}",
        ),
        ("protocol", "", result.protocol),
        ("weights", "", result.extra.get("weights", "")),
        ("seconds", f"{result.seconds:.1f}", f"--seed {result.seed}; on {devices}"),
    ]
    title = f"{loaded.dataset_name} {result.split} split: {result.images} images, {loaded.run_dir} step {loaded.step}"
    table = Table(title=escape(title), title_justify="left")
    for column, justify in (("figure", "left"), ("value", "right"), ("what it is", "left")):
        table.add_column(column, justify=justify)
    for row in rows:  # "[log p(x|z)]" is text here, not a Rich style tag
        table.add_row(*(escape(cell) for cell in row))
    return table


@app.command()
@reports_errors
def curves(
    run: RunOption = None,
    out: Annotated[Path | None, typer.Option("--out", help="The PNG to write [default: RUN/curves.png].")] = None,
) -> None:
    """Draw a run's loss, reconstruction and KL per epoch, from its metrics.jsonl, as a PNG.

    Training draws RUN/curves.png when it ends; this draws it at any time, also while the run trains.
    """
    if out is not None and out.suffix.lower() != ".png":
        raise UsageError(f"--out {out} must end in .png")
    from vaecli.runs.curves import write_curves
    from vaecli.runs.rundir import latest_run_dir

    run_dir = run or latest_run_dir()
    written = write_curves(run_dir, out)
    console.print(f"wrote {written}: loss, reconstruction and KL per epoch of {run_dir}", highlight=False)


@app.command(name="runs")
@reports_errors
def list_runs(
    folder: Annotated[Path, typer.Argument(help="Folder holding run directories.", show_default=True)] = Path("runs"),
) -> None:
    """List the runs in a folder: data, model, epochs, best validation ELBO, test NLL, size and age."""
    from vaecli.runs.summaries import summarize_runs

    summaries = summarize_runs(folder)
    if not summaries:
        console.print(f"no runs in {folder}/; start one with: vae train --config mnist-sample --out {folder}/NAME")
        return
    console.print(runs_table(folder, summaries))


def short_model_name(config) -> str:
    """'mlp 512-256 z32 bernoulli iwae5': describe_model in a table column's width."""
    model, training = config.model, config.train
    likelihood = f"logistic{model.mixtures}" if model.likelihood == "logistic" else model.likelihood
    objective = f" iwae{training.iw_samples}" if training.iw_samples > 1 else ""
    beta = f" beta{training.beta:g}" if training.beta != 1 else ""
    widths = "-".join(str(width) for width in model.hidden)
    return f"{model.arch} {widths} z{model.latent_dim} {likelihood}{objective}{beta}"


def runs_table(folder: Path, summaries):
    """The rich table of `vae runs`: a row per run; a broken one says in red what is wrong."""
    from rich.markup import escape
    from rich.table import Table

    from vaecli.runs.summaries import age_of, describe_size

    caption = "val ELBO: the best epoch's; test NLL: the newest vae evaluate, with its k; nats per image"
    table = Table(
        title=escape(f"runs in {folder}"),
        title_justify="left",
        caption=caption,
        caption_justify="left",
        box=None,
        pad_edge=False,
        header_style="bold underline",
    )
    # Numbers never wrap; the names wrap at spaces, and only the model (the longest) in the middle of one.
    for column, justify, overflow in (
        ("run", "left", "fold"),
        ("data", "left", "ellipsis"),
        ("model", "left", "fold"),
        ("epochs", "right", "ellipsis"),
        ("val ELBO", "right", "ellipsis"),
        ("test NLL", "right", "ellipsis"),
        ("size", "right", "ellipsis"),
        ("age", "right", "ellipsis"),
    ):
        table.add_column(
            column,
            justify=justify,
            overflow=overflow,
            no_wrap=overflow == "ellipsis",
            min_width=13 * (column == "model"),
        )
    for summary in summaries:
        config = summary.config
        model = escape(short_model_name(config)) if config else "-"
        if summary.broken:
            model += f"\n[red]broken:[/red] {escape(summary.problem)}"
        planned = summary.epochs_planned if summary.epochs_planned is not None else "?"
        elbo = f"{summary.best_val_elbo:.2f}" if summary.best_val_elbo is not None else "-"
        nll = "-"
        if summary.test_nll is not None:
            nll = f"{summary.test_nll:.2f}\n[dim]k {summary.test_k}[/dim]"
        table.add_row(
            f"[red]{escape(summary.name)}[/red]" if summary.broken else escape(summary.name),
            escape(config.data.name) if config else "-",
            model,
            f"{summary.epochs_done}/{planned}",
            elbo,
            nll,
            describe_size(summary.size_bytes),
            age_of(summary).removesuffix(" ago"),  # the column says it is an age
        )
    return table


class TrainingDisplay:
    """Rich rendering of the library's callbacks: downloads, decoding, a bar per epoch, a line per epoch."""

    def __init__(self, output: Console):
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.epochs = 0  # the run's total, learnt from the first progress report
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[detail]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=output,
            transient=True,
        )
        self.tasks: dict[str, int] = {}  # one bar per label; finished bars are removed

    def __enter__(self) -> TrainingDisplay:
        self.progress.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.progress.stop()

    def _show(self, label: str, completed: float, total: float, detail: str) -> None:
        if label not in self.tasks:
            for finished in self.tasks.values():
                self.progress.remove_task(finished)
            self.tasks = {label: self.progress.add_task(label, total=total, detail=detail)}
        self.progress.update(self.tasks[label], completed=completed, total=total, detail=detail)

    def on_download(self, report) -> None:
        task_id = self.tasks.get(f"download {report.file_name}")
        speed = next((task.speed for task in self.progress.tasks if task.id == task_id), None)
        rate = f"  {speed / 1e6:.1f} MB/s" if speed else ""
        detail = f"{report.bytes_done / 1e6:.1f}/{report.bytes_total / 1e6:.1f} MB{rate}"
        self._show(f"download {report.file_name}", report.bytes_done, report.bytes_total or 1, detail)

    def on_decode(self, done: int, total: int) -> None:
        self._show("decode images", done, total, f"{done}/{total} files")

    def on_notice(self, notice: str) -> None:
        self.progress.console.print(f"[yellow]note:[/yellow] {notice}", highlight=False)

    def on_progress(self, report) -> None:
        self.epochs = report.epochs
        detail = (
            f"{report.steps_done}/{report.steps_per_epoch}  loss {report.train_loss:.2f}  "
            f"{report.images_per_second:,.0f} img/s"
        )
        self._show(f"epoch {report.epoch}/{self.epochs}", report.steps_done, report.steps_per_epoch, detail)

    def on_epoch_end(self, metrics: dict) -> None:
        # An IWAE run validates its own bound too: the ELBO alone would understate it.
        bound = f", IWAE bound {-metrics['val_loss']:.2f}" if metrics["val_loss"] != -metrics["val_elbo"] else ""
        self.progress.console.print(
            f"epoch {metrics['epoch']:>3}/{self.epochs}  train loss {metrics['train_loss']:8.2f}  "
            f"val ELBO {metrics['val_elbo']:8.2f} nats "
            f"(recon {metrics['val_recon']:.2f} + KL {metrics['val_kl']:.2f}){bound}  "
            f"{metrics['epoch_seconds']:.1f} s, {metrics['images_per_second']:,.0f} img/s",
            highlight=False,
        )


def main() -> None:
    """Entry point: run the app, reporting a command-line mistake as one line like any other error."""
    # Typer vendors Click; its usage errors (missing option, value of the wrong type) would
    # otherwise be drawn as a multi-line box.
    from typer._click.exceptions import ClickException

    try:
        exit_code = typer.main.get_command(app).main(prog_name="vae", standalone_mode=False)
    except ClickException as error:
        context = getattr(error, "ctx", None)
        command = "vae --help" if context is None or context.parent is None else f"vae {context.info_name} --help"
        if error.format_message():  # empty when `vae` alone has just printed the help
            error_console.print(f"[red]error:[/red] {error.format_message()} (see {command})", highlight=False)
        exit_code = error.exit_code
    except typer.Abort:
        exit_code = 1
    exit_now(exit_code if isinstance(exit_code, int) else 0)


def exit_now(exit_code: int) -> None:
    """Exit without the interpreter's teardown, once every output of the command is on disk.

    With JAX, Flax and Orbax loaded, teardown takes about 0.2 s (measured; a sixth of a warm
    `vae generate`) and does nothing a finished command needs: every output was written through a
    closed, fsynced file and renamed. os._exit would kill the threads that write in the background
    (an epoch's pictures, an asynchronous checkpoint), so they are waited for first, also when a
    second Ctrl-C calls this in the middle of training.
    """
    import os

    from vaecli.training.background import wait_for_pending_outputs

    wait_for_pending_outputs()
    for stream in (sys.stdout, sys.stderr):
        # From a signal handler that interrupted a write to the same stream, flushing is a reentrant call.
        with contextlib.suppress(RuntimeError):
            stream.flush()
    if "jax" not in sys.modules:
        sys.exit(exit_code)
    os._exit(exit_code)
