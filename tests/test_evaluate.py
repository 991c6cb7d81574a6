"""`vae evaluate` and vaecli.inference.evaluate on the session's trained run: the importance-sampled NLL and the
figures beside it, how they relate, their determinism, and the protocol they are stated under.

Small k and few images keep this fast; the estimator's own accuracy is tested in test_estimators.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import vae

import vaecli.inference.evaluate
from vaecli.common.errors import DataError, UsageError
from vaecli.inference.evaluate import evaluate_split
from vaecli.training.checkpoint import CHECKPOINT_SUBDIR

MNIST_VALUES = 28 * 28
IMAGES = 40
EVERY_FIGURE = {
    "split", "k", "images", "nll_nats", "neg_elbo_nats", "recon_nats", "kl_nats", "bits_per_dim", "active_units",
    "latent_dim", "kl_per_dim", "aggregate_posterior", "protocol", "seconds",
}  # fmt: skip


def refuse_non_finite(constant: str):
    raise AssertionError(f"{constant} is not JSON: other tools (jq, browsers) refuse it")


def evaluate_json(run_dir: Path, *args) -> dict:
    """`vae evaluate --json` on run_dir: stdout must be exactly one strict JSON object, nothing else."""
    result = vae("evaluate", "--run", run_dir, "--json", *args)
    assert result.exit_code == 0, (result.output, result.exception)
    assert len(result.stdout.strip().splitlines()) == 1, result.stdout
    figures = json.loads(result.stdout, parse_constant=refuse_non_finite)
    assert isinstance(figures, dict)
    return figures


def numbers_of(figures: dict) -> dict:
    """Every figure but the time it took."""
    return {name: value for name, value in figures.items() if name != "seconds"}


@pytest.fixture(scope="module")
def figures(trained_run_dir) -> dict:
    return evaluate_json(trained_run_dir, "--k", 50, "--images", IMAGES)


@pytest.fixture(scope="module")
def nll_by_k(trained_run) -> dict[int, object]:
    """The same 40 test images and seed, with 1, 10 and 100 importance samples each."""
    return {k: evaluate_split(trained_run, "test", k, IMAGES, seed=0) for k in (1, 10, 100)}


# --- one JSON object holding every figure ---------------------------------------------------------


def test_json_is_one_object_holding_every_figure(figures, trained_run_dir):
    assert EVERY_FIGURE - set(figures) == set()
    assert (figures["split"], figures["k"], figures["images"], figures["seed"]) == ("test", 50, IMAGES, 0)
    assert figures["latent_dim"] == 8  # conftest's small model
    assert figures["run"] == str(trained_run_dir) and figures["dataset"] == "mnist_sample"
    assert figures["seconds"] > 0


def test_the_negative_elbo_is_reconstruction_plus_kl(figures):
    assert figures["neg_elbo_nats"] == pytest.approx(figures["recon_nats"] + figures["kl_nats"], rel=1e-9)
    assert figures["recon_nats"] > 0 and figures["kl_nats"] > 0


def test_importance_sampling_tightens_the_bound(figures):
    assert figures["nll_nats"] < figures["neg_elbo_nats"]


def test_bits_per_dim_is_the_nll_per_pixel_in_bits(figures):
    assert figures["bits_per_dim"] == pytest.approx(figures["nll_nats"] / (MNIST_VALUES * math.log(2)), rel=1e-9)


def test_kl_per_dimension_is_sorted_and_adds_up_to_the_kl(figures):
    kl_values = [entry["kl"] for entry in figures["kl_per_dim"]]
    assert kl_values == sorted(kl_values, reverse=True)
    assert sorted(entry["dim"] for entry in figures["kl_per_dim"]) == list(range(figures["latent_dim"]))
    assert sum(kl_values) == pytest.approx(figures["kl_nats"], rel=1e-9)
    assert min(kl_values) >= 0


def test_active_units_and_aggregate_posterior_describe_the_latent(figures):
    assert 0 <= figures["active_units"] <= figures["latent_dim"]
    aggregate = figures["aggregate_posterior"]
    assert len(aggregate["mean"]) == len(aggregate["variance_of_means"]) == figures["latent_dim"]
    assert aggregate["kl_moment_matched_to_prior"] >= 0
    assert aggregate["mean_norm"] == pytest.approx(np.linalg.norm(aggregate["mean"]), rel=1e-9)
    # Active: the posterior mean varies over the images by more than 0.01 (Burda et al.).
    assert figures["active_units"] == sum(variance > 0.01 for variance in aggregate["variance_of_means"])


def test_the_protocol_names_dynamic_binarization_and_the_seed(figures):
    assert "dynamic binarization" in figures["protocol"]
    assert "--seed 0" in figures["protocol"]
    assert figures["is_likelihood"] is True


# --- the estimator: tighter with k, the ELBO at k = 1 ---------------------------------------------


def test_the_nll_decreases_with_k_on_the_same_images(nll_by_k):
    nll = [nll_by_k[k].nll_nats for k in (1, 10, 100)]
    assert nll[0] >= nll[1] >= nll[2], nll
    assert all(nll_by_k[k].images == IMAGES for k in (1, 10, 100))
    assert nll_by_k[10].nll_nats < nll_by_k[10].neg_elbo_nats and nll_by_k[100].nll_nats < nll_by_k[100].neg_elbo_nats


def test_one_sample_gives_the_elbo(nll_by_k):
    # k = 1 is the ELBO with the KL estimated from the one sample instead of analytically: the two differ
    # by that sample's noise, about sqrt(latent_dim / 2) nats an image, so 0.3 nats over 40 images.
    single = nll_by_k[1]
    assert single.nll_nats == pytest.approx(single.neg_elbo_nats, rel=0.01)


# --- determinism and batch invariance -------------------------------------------------------------


def test_the_same_seed_gives_the_same_numbers_and_another_seed_others(figures, trained_run_dir):
    again = evaluate_json(trained_run_dir, "--k", 50, "--images", IMAGES)
    assert numbers_of(again) == numbers_of(figures)

    other = evaluate_json(trained_run_dir, "--k", 50, "--images", IMAGES, "--seed", 1)
    assert other["nll_nats"] != figures["nll_nats"]
    # Another binary draw of the same 40 images and other samples: the same figure to within a few percent.
    assert other["nll_nats"] == pytest.approx(figures["nll_nats"], rel=0.03)
    assert "--seed 1" in other["protocol"]


def test_the_nll_does_not_depend_on_the_decoder_outputs_per_step(trained_run, figures, monkeypatch):
    # Small enough that 50 samples no longer fit in one step: 8 samples an image per step, one image a call.
    monkeypatch.setattr(vaecli.inference.evaluate, "DECODER_OUTPUTS_PER_STEP", MNIST_VALUES * 8)
    assert vaecli.inference.evaluate.call_shape(50, MNIST_VALUES) == (1, 8, 7)
    smaller_steps = evaluate_split(trained_run, "test", 50, IMAGES, seed=0)
    assert smaller_steps.nll_nats == pytest.approx(figures["nll_nats"], rel=1e-4)
    assert smaller_steps.neg_elbo_nats == pytest.approx(figures["neg_elbo_nats"], rel=1e-4)


def test_an_images_estimate_does_not_depend_on_how_many_are_evaluated_with_it(trained_run, monkeypatch):
    """--images N evaluates the first N images exactly as a longer run does, in calls of any size."""
    # The per-image log p(x) is not part of the result: read it where the running sums take it in.
    per_image = []
    add = vaecli.inference.evaluate._Totals.add

    def recording_add(totals, log_px, *rest):
        per_image.append(np.asarray(log_px))
        add(totals, log_px, *rest)

    monkeypatch.setattr(vaecli.inference.evaluate._Totals, "add", recording_add)
    few = evaluate_split(trained_run, "test", 10, IMAGES, seed=0)
    first = np.concatenate(per_image)
    per_image.clear()
    monkeypatch.setattr(vaecli.inference.evaluate, "MAX_IMAGES_PER_CALL", 16)  # 80 images in 5 calls, not 1
    more = evaluate_split(trained_run, "test", 10, 2 * IMAGES, seed=0)

    assert (few.images, more.images) == (IMAGES, 2 * IMAGES)
    assert [len(log_px) for log_px in per_image] == [16] * 5
    np.testing.assert_allclose(np.concatenate(per_image)[:IMAGES], first, rtol=1e-6)
    assert few.nll_nats == pytest.approx(-first.mean(), rel=1e-6)


# --- what the figures are a likelihood of ---------------------------------------------------------


@pytest.fixture(scope="module")
def grey_run_dir(trained_run_dir, tmp_path_factory) -> Path:
    """A copy of the trained run whose saved config says data.binarize: none (the weights are the same:
    only the protocol is under test)."""
    copy = Path(shutil.copytree(trained_run_dir, tmp_path_factory.mktemp("grey") / "run"))
    for metadata_path in (copy / CHECKPOINT_SUBDIR).glob("*/meta/metadata"):
        metadata = json.loads(metadata_path.read_text())
        metadata["config"]["data"]["binarize"] = "none"
        metadata_path.write_text(json.dumps(metadata))
    return copy


def test_a_bernoulli_model_of_grey_levels_says_its_figure_is_not_a_likelihood(grey_run_dir):
    figures = evaluate_json(grey_run_dir, "--k", 10, "--images", IMAGES)
    assert figures["is_likelihood"] is False
    assert figures["protocol"].startswith("NOT a likelihood")
    assert "data.binarize: none" in figures["protocol"]

    table = vae("evaluate", "--run", grey_run_dir, "--k", 10, "--images", IMAGES)
    assert table.exit_code == 0, table.output
    notes = [line for line in table.stdout.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "NOT a likelihood" in notes[0], table.stdout


def test_the_table_names_every_figure(trained_run_dir):
    result = vae("evaluate", "--run", trained_run_dir, "--k", 10, "--images", IMAGES)
    assert result.exit_code == 0, result.output
    for figure in (
        "test NLL (k=10)", "-ELBO", "reconstruction", "KL", "bits/dim", "active units", "KL per dimension",
        "aggregate posterior", "protocol", "seconds",
    ):  # fmt: skip
        assert figure in result.stdout, figure
    assert f"{IMAGES} images" in result.stdout and "mnist_sample test split" in result.stdout
    assert "note:" not in result.stdout  # binary images: a likelihood, nothing to warn about


# --- bad input through the library (the CLI's cases are in test_bad_input.py) ---------------------


@pytest.mark.parametrize(
    ("arguments", "error", "fragment"),
    [
        ({"k": 0}, UsageError, "--k must be at least 1, got 0"),
        ({"max_images": 0}, UsageError, "--images must be at least 1, got 0"),
        ({"split": "nope"}, DataError, "unknown split 'nope'"),
    ],
)
def test_the_library_refuses_bad_arguments_in_one_line(trained_run, arguments, error, fragment):
    with pytest.raises(error) as raised:
        evaluate_split(trained_run, **{"split": "test", "k": 5, "max_images": 4, **arguments})
    assert fragment in str(raised.value) and "\n" not in str(raised.value)


def test_an_empty_split_is_refused(trained_run, monkeypatch):
    real = vaecli.inference.evaluate.load_dataset

    def without_test_images(data):
        dataset = real(data)
        return dataclasses.replace(dataset, test_images=dataset.test_images[:0])

    monkeypatch.setattr(vaecli.inference.evaluate, "load_dataset", without_test_images)
    with pytest.raises(UsageError, match="the test split of mnist_sample is empty; choose another --split"):
        evaluate_split(trained_run, "test", 5, None)
