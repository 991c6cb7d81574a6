"""`vae runs`: one row per run directory in a folder, read from its files; a broken run is a row, not a crash."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from helpers import vae
from rich.console import Console

from vaecli.cli.app import runs_table
from vaecli.runs.rundir import latest_evaluation, record_evaluation
from vaecli.runs.summaries import age_of, describe_age, describe_size, summarize_runs


def rendered(folder: Path, summaries, width: int = 250) -> str:
    """The table as `vae runs` prints it, by default wide enough that no cell wraps."""
    console = Console(file=io.StringIO(), width=width)
    console.print(runs_table(folder, summaries))
    return console.file.getvalue()


@pytest.fixture
def runs_folder(tmp_path, trained_run_dir) -> Path:
    """A folder holding a copy of the session's run as `sample`, its epoch 3 made the best by validation ELBO."""
    folder = tmp_path / "runs"
    run_dir = folder / "sample"
    shutil.copytree(trained_run_dir, run_dir, ignore=shutil.ignore_patterns("evaluations"))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows[2]["val_elbo"] = -12.5  # not the last epoch's: the table must take the best, not the newest
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_the_trained_run_is_listed_with_its_epochs_best_validation_elbo_size_and_age(runs_folder):
    (summary,) = summarize_runs(runs_folder)
    run_dir = runs_folder / "sample"
    assert (summary.name, summary.run_dir, summary.problem) == ("sample", run_dir, None)
    assert (summary.epochs_done, summary.epochs_planned, summary.best_val_elbo) == (6, 6, -12.5)
    assert (summary.config.data.name, summary.config.model.latent_dim) == ("mnist_sample", 8)
    assert summary.test_nll is None
    assert summary.size_bytes == sum(path.stat().st_size for path in run_dir.rglob("*") if path.is_file())
    newest = max(path.stat().st_mtime for path in (run_dir / "checkpoints").iterdir() if path.name.isdigit())
    assert summary.last_checkpoint_time == newest
    assert age_of(summary, now=newest + 3 * 3600 + 5) == "3 h ago"

    table = rendered(runs_folder, [summary])
    size = describe_size(summary.size_bytes)
    for cell in ("sample", "mnist_sample", "mlp 128 z8 bernoulli", "6/6", "-12.50", size):
        assert cell in table, cell
    # In an 80-column terminal every number and the dataset stay whole; only the model wraps, at spaces.
    narrow = rendered(runs_folder, [summary], width=80)
    for cell in ("mnist_sample", "mlp 128 z8", "6/6", "-12.50", size):
        assert cell in narrow, cell
    result = vae("runs", runs_folder)
    assert result.exit_code == 0, result.output
    assert "sample" in result.stdout and "-12.50" in result.stdout


def test_vae_evaluate_records_its_result_and_vae_runs_shows_the_newest_test_nll(runs_folder):
    run_dir = runs_folder / "sample"
    result = vae("evaluate", "--run", run_dir, "--k", 2, "--images", 8, "--json")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert json.loads((run_dir / "evaluations" / "test-k2-n8.json").read_text()) == printed

    (summary,) = summarize_runs(runs_folder)
    assert (summary.test_nll, summary.test_k, summary.test_images) == (printed["nll_nats"], 2, 8)
    table = rendered(runs_folder, [summary])
    assert f"{printed['nll_nats']:.2f}" in table and "k 2" in table

    # A validation result is not a test NLL; a newer test result replaces the shown one.
    record_evaluation(run_dir, {**printed, "split": "val", "nll_nats": 1.0})
    assert summarize_runs(runs_folder)[0].test_nll == printed["nll_nats"]
    record_evaluation(run_dir, {**printed, "k": 5000, "images": 10, "nll_nats": 77.0})
    assert latest_evaluation(run_dir)["k"] == 5000
    assert (summarize_runs(runs_folder)[0].test_nll, summarize_runs(runs_folder)[0].test_k) == (77.0, 5000)


def test_broken_runs_are_listed_with_what_is_wrong(runs_folder):
    good_config = (runs_folder / "sample" / "config.yaml").read_text()
    no_config = runs_folder / "no-config"
    (no_config / "checkpoints" / "12").mkdir(parents=True)
    bad_metrics = runs_folder / "group" / "bad-metrics"  # runs may sit in subfolders
    (bad_metrics / "checkpoints" / "12").mkdir(parents=True)
    (bad_metrics / "config.yaml").write_text(good_config)
    (bad_metrics / "metrics.jsonl").write_text('{"epoch": 1, "val_elbo": -90.0}\n{not json\n')
    invalid_config = runs_folder / "invalid-config"
    invalid_config.mkdir()
    (invalid_config / "config.yaml").write_text("model: {latent_dim: -1}\n")

    summaries = {summary.name: summary for summary in summarize_runs(runs_folder)}

    assert sorted(summaries) == ["group/bad-metrics", "invalid-config", "no-config", "sample"]
    assert not summaries["sample"].broken
    assert "no config.yaml" in summaries["no-config"].problem
    assert "metrics.jsonl line 2 is not JSON" in summaries["group/bad-metrics"].problem
    assert summaries["group/bad-metrics"].config.model.latent_dim == 8  # what can be read still is
    assert "model.latent_dim" in summaries["invalid-config"].problem
    assert "no checkpoint" in summaries["invalid-config"].problem
    assert summaries["invalid-config"].config is None and summaries["invalid-config"].last_checkpoint_time is None
    result = vae("runs", runs_folder)
    assert result.exit_code == 0, result.output
    assert result.stdout.count("broken:") == 3


def test_an_empty_folder_says_how_to_start_and_a_missing_one_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a run")
    empty = vae("runs", tmp_path / "empty")
    assert empty.exit_code == 0, empty.output
    assert f"no runs in {tmp_path / 'empty'}/" in empty.stdout and "vae train --config" in empty.stdout

    for path, fragment in (
        (tmp_path / "missing", "does not exist"),
        (tmp_path / "empty" / "notes.txt", "not a folder"),
    ):
        result = vae("runs", path)
        assert result.exit_code == 1, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0], result.stderr


@pytest.mark.parametrize(
    ("size_bytes", "text"), [(0, "0 B"), (999, "999 B"), (1536, "1.5 kB"), (2_200_000, "2.2 MB"), (3e9, "3.0 GB")]
)
def test_sizes_read_in_decimal_units(size_bytes, text):
    assert describe_size(size_bytes) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(5, "just now"), (60, "1 min ago"), (3599, "59 min ago"), (3 * 3600, "3 h ago"), (86400, "1 day ago"),
     (12.5 * 86400, "12 days ago")],
)  # fmt: skip
def test_ages_read_roughly(seconds, text):
    assert describe_age(seconds) == text
