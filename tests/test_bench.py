"""`make bench`'s pure parts: its offline MNIST files and how its table states the figures (never a timing)."""

import os
import sys

import numpy as np
import pytest

from benchmarks import bench
from benchmarks.bench import (
    EVALUATED_IMAGES,
    TRAINING_RSS_POLL_SECONDS,
    data_parallel_rows,
    device_note,
    end_to_end_rows,
    mean_after_first_epoch,
    run_measured,
    whole_epoch_figures,
    whole_epoch_speedup,
    write_random_mnist,
)
from vaecli.data.idx_family import load_idx_dataset


def test_the_random_mnist_files_load_as_mnist_with_its_validation_split(tmp_path):
    folder = write_random_mnist(tmp_path / "random-mnist", train_count=600, test_count=100)
    dataset = load_idx_dataset("mnist", folder)  # files already there: nothing is downloaded
    assert (len(dataset.train_images), len(dataset.val_images), len(dataset.test_images)) == (500, 100, 100)
    assert dataset.image_shape == (28, 28) and dataset.train_images.dtype == np.uint8
    assert dataset.train_images.std() > 50  # random pixels, not a constant picture


def test_the_whole_epoch_speedup_compares_images_per_second_not_epochs():
    """vae train's epochs hold 55,000 images, the straightforward loop's 60,000."""
    assert whole_epoch_speedup(9000.0, 10.0) == pytest.approx(1.5)


def test_an_epoch_is_timed_from_the_logged_wall_seconds_leaving_out_the_compiling_first():
    metrics = [{"wall_seconds": 9.0}, {"wall_seconds": 2.0}, {"wall_seconds": 3.0}, {"wall_seconds": 4.0}]
    assert mean_after_first_epoch(metrics, "wall_seconds") == pytest.approx(3.0)


def test_the_training_run_s_peak_memory_is_sampled_while_it_runs_and_its_failure_raised():
    """A child that holds 300 MiB for a second, then frees it: the high-water mark still counts it."""
    holds = "import time; block = bytearray(300 * 2**20); time.sleep(1.0); del block; time.sleep(0.5)"
    seconds, peak = run_measured([sys.executable, "-c", holds], dict(os.environ), TRAINING_RSS_POLL_SECONDS)
    assert peak >= 300 * 2**20 and seconds >= 1.5
    with pytest.raises(RuntimeError, match="no such run"):
        run_measured([sys.executable, "-c", "import sys; sys.exit('no such run')"], dict(os.environ))


def test_each_vae_train_run_is_compared_with_the_straightforward_epochs_on_either_side_of_it(tmp_path, monkeypatch):
    """Blocks of straightforward epochs of 6, 2 and 4 s around two runs at 30,000 images/s: the first run is
    compared with a median of 4 s (15,000 images/s), the second with 3 s (20,000 images/s)."""
    blocks = iter([[6.0, 6.0], [2.0, 2.0], [4.0, 4.0]])
    monkeypatch.setattr(bench, "straightforward_epoch_seconds", lambda config, dataset, epochs: next(blocks))
    monkeypatch.setattr(bench, "write_reference_config", lambda workdir: workdir / "reference.yaml")
    runs = iter([1.8, 1.9])
    monkeypatch.setattr(
        bench,
        "user_training_figures",
        lambda workdir, config_path, epochs: {
            "vae_train_epoch_seconds": (seconds := next(runs)),
            "vae_train_images_per_second": 30_000.0,
            "vae_train_logged_epoch_seconds": seconds - 0.1,
            "vae_train_peak_rss_bytes": 1,
        },
    )
    figures = whole_epoch_figures(tmp_path, None, None, rounds=2, epochs=4)
    assert figures["vae_train_speedup_of_rounds"] == pytest.approx([2.0, 1.5])
    assert figures["whole_epoch_straightforward_epoch_seconds_all"] == [6.0, 6.0, 2.0, 2.0, 4.0, 4.0]
    assert figures["vae_train_epoch_seconds"] == 1.8  # the faster of the middle two
    assert figures["vae_train_logged_epoch_seconds"] == pytest.approx(1.7)  # from the same run


def test_the_table_says_when_no_gpu_took_part_and_what_was_extrapolated():
    assert "no GPU present" in device_note("cpu")
    assert device_note("gpu") == ""
    figures = {
        "vae_train_images_per_second": 12_345.6,
        "vae_train_epoch_seconds": 4.455,
        "vae_train_logged_epoch_seconds": 4.1,
        "vae_train_speedup_over_straightforward": 1.62,
        "vae_train_speedup_over_straightforward_of_rounds_median": 1.581,
        "vae_train_peak_rss_bytes": 700 * 2**20,
        "conv_images_per_second": 40.04,
        "evaluate_k5000_images_per_second": 12.5,
        "evaluate_k5000_test_set_seconds": 800.0,
    }
    rows = dict(end_to_end_rows(figures))
    assert rows["vae train, whole epochs (reference MLP, 55,000 images)"] == "12,346 images/s, 4.46 s"
    row = "  per image, over the straightforward loop's training (of the medians; round by round)"
    assert rows[row] == "1.62x; 1.58x (target 1.5x)"
    assert rows[f"  all 10,000 test images, extrapolated from the first {EVALUATED_IMAGES}"] == "800 s"
    assert rows["  vae train peak RSS"] == "700 MiB"


def test_the_table_names_the_forced_device_counts_of_the_data_parallel_figures():
    figures = {"data_parallel_on_1_images_per_second": 9_000.4, "data_parallel_on_4_images_per_second": 5_000.0}
    rows = dict(data_parallel_rows(figures))
    assert rows["reference MLP training, batch split over 1 host CPU device"] == "9,000 images/s"
    assert rows["reference MLP training, batch split over 4 host CPU devices"] == "5,000 images/s"
