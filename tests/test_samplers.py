"""vae generate --sampler: the prior unchanged, the gmm fitted to the training codes, cached and reused."""

import shutil

import numpy as np
import pytest
from helpers import assert_one_line_error, vae

from vaecli.common.errors import UsageError
from vaecli.inference import samplers
from vaecli.inference.samplers import GaussianMixture, fit_gaussian_mixture, mixture_latents, read_cached_mixture


@pytest.fixture(scope="module")
def run_copy(trained_run_dir, tmp_path_factory):
    """The session's trained run, copied: the gmm writes its cache into the run directory."""
    return shutil.copytree(trained_run_dir, tmp_path_factory.mktemp("gmm") / "run")


def checkpoint_steps(run_dir):
    return sorted(int(path.name) for path in (run_dir / "checkpoints").iterdir() if path.name.isdigit())


@pytest.fixture
def counted_fits(monkeypatch):
    """Count the mixture fits made through vaecli.inference.samplers."""
    calls = []
    real_fit = samplers.fit_gaussian_mixture

    def fit(codes, components, random_state):
        calls.append((len(codes), components, random_state))
        return real_fit(codes, components, random_state)

    monkeypatch.setattr(samplers, "fit_gaussian_mixture", fit)
    return calls


# ---- the mixture itself --------------------------------------------------------------------------

KNOWN = GaussianMixture(
    weights=np.array([0.3, 0.7]),
    means=np.array([[-10.0, 0.0], [10.0, 5.0]]),
    covariances=np.array([[[1.0, 0.0], [0.0, 4.0]], [[2.0, 1.2], [1.2, 1.0]]]),
)


def test_draws_follow_the_mixture_weights_means_and_covariances():
    latents = mixture_latents(KNOWN, 40_000, seed=0).astype(np.float64)
    first = latents[:, 0] < 0
    assert first.mean() == pytest.approx(0.3, abs=0.01)
    for component, chosen in ((0, first), (1, ~first)):
        np.testing.assert_allclose(latents[chosen].mean(axis=0), KNOWN.means[component], atol=0.05)
        np.testing.assert_allclose(np.cov(latents[chosen], rowvar=False), KNOWN.covariances[component], atol=0.1)


def test_temperature_scales_the_deviations_from_each_component_mean():
    latents = mixture_latents(KNOWN, 40_000, seed=0, temperature=0.5).astype(np.float64)
    chosen = latents[:, 0] > 0
    np.testing.assert_allclose(latents[chosen].mean(axis=0), KNOWN.means[1], atol=0.05)
    np.testing.assert_allclose(np.cov(latents[chosen], rowvar=False), 0.25 * KNOWN.covariances[1], atol=0.05)


def test_draws_depend_on_the_seed_only_and_each_on_its_own_index():
    first = mixture_latents(KNOWN, 10, seed=3)
    np.testing.assert_array_equal(first, mixture_latents(KNOWN, 10, seed=3))
    np.testing.assert_array_equal(first, mixture_latents(KNOWN, 40_000, seed=3)[:10])  # whatever n is
    assert not np.allclose(first, mixture_latents(KNOWN, 10, seed=4))


def test_a_fit_recovers_well_separated_clusters():
    rng = np.random.default_rng(0)
    codes = np.concatenate([rng.normal(-5, 1, size=(300, 3)), rng.normal(5, 0.5, size=(700, 3))])
    mixture = fit_gaussian_mixture(codes, 2, random_state=0)
    order = np.argsort(mixture.means[:, 0])
    np.testing.assert_allclose(mixture.weights[order], [0.3, 0.7], atol=0.01)
    np.testing.assert_allclose(mixture.means[order], [[-5.0] * 3, [5.0] * 3], atol=0.2)
    np.testing.assert_allclose(mixture.covariances[order[1]], 0.25 * np.eye(3), atol=0.05)


def test_too_few_codes_for_the_components_are_refused_saying_how_many_are_needed():
    with pytest.raises(UsageError, match=r"--components 3 needs at least 15 training images .* the run has 14"):
        fit_gaussian_mixture(np.zeros((14, 2)), 3, random_state=0)
    with pytest.raises(UsageError, match="--components 1 needs at least 5 training images"):
        fit_gaussian_mixture(np.zeros((4, 2)), 1, random_state=0)


def test_a_cache_of_other_shapes_or_damaged_is_not_used(tmp_path):
    from vaecli.common.images import save_npz

    save_npz(tmp_path / "m.npz", weights=KNOWN.weights, means=KNOWN.means, covariances=KNOWN.covariances)
    assert read_cached_mixture(tmp_path / "m.npz", 2, 2) is not None
    assert read_cached_mixture(tmp_path / "m.npz", 3, 2) is None
    assert read_cached_mixture(tmp_path / "m.npz", 2, 4) is None
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    assert read_cached_mixture(tmp_path / "bad.npz", 2, 2) is None
    assert read_cached_mixture(tmp_path / "missing.npz", 2, 2) is None


# ---- vae generate --------------------------------------------------------------------------------


def test_the_prior_stays_the_default_with_the_same_bytes(tmp_path, trained_run, trained_run_dir):
    from vaecli.inference.sample import save_prior_samples

    save_prior_samples(tmp_path / "library.png", trained_run.model, 16, 2, 0.8)
    default = vae(
        "generate",
        "--run",
        trained_run_dir,
        "--n",
        16,
        "--seed",
        2,
        "--temperature",
        0.8,
        "--out",
        tmp_path / "default.png",
    )
    assert default.exit_code == 0, default.output
    assert "16 samples from the prior z ~ N(0, 0.8^2 I)" in default.stdout
    named = vae(
        "generate",
        "--run",
        trained_run_dir,
        "--n",
        16,
        "--seed",
        2,
        "--temperature",
        0.8,
        "--sampler",
        "prior",
        "--out",
        tmp_path / "named.png",
    )
    assert named.exit_code == 0, named.output
    expected = (tmp_path / "library.png").read_bytes()
    assert (tmp_path / "default.png").read_bytes() == expected == (tmp_path / "named.png").read_bytes()
    assert not (trained_run_dir / "samplers").exists()


def test_gmm_fits_once_and_reuses_the_cached_fit(tmp_path, run_copy, counted_fits, monkeypatch):
    first = vae("generate", "--run", run_copy, "--sampler", "gmm", "--n", 16, "--out", tmp_path / "gmm.png")
    assert first.exit_code == 0, first.output
    (cached,) = (run_copy / "samplers").iterdir()
    step = int(first.stdout.split(" step ")[-1])
    assert cached.name == f"gmm-{step}-10.npz" and "fitted now" in first.stdout
    assert counted_fits == [(4000, 10, 0)]  # every training image's code; random_state from config.seed
    with np.load(cached) as saved:
        assert saved["weights"].shape == (10,) and saved["weights"].sum() == pytest.approx(1.0)
        assert saved["means"].shape == (10, 8) and saved["covariances"].shape == (10, 8, 8)

    def no_refit(*args):
        raise AssertionError("the cached mixture should have been reused")

    monkeypatch.setattr(samplers, "fit_gaussian_mixture", no_refit)
    again = vae("generate", "--run", run_copy, "--sampler", "gmm", "--n", 16, "--out", tmp_path / "again.png")
    assert again.exit_code == 0, again.output
    assert "cached in" in again.stdout and "fitted now" not in again.stdout
    assert (tmp_path / "gmm.png").read_bytes() == (tmp_path / "again.png").read_bytes()


def test_each_checkpoint_and_component_count_gets_its_own_fit(tmp_path, trained_run_dir, monkeypatch):
    from vaecli.training.checkpoint import load_run

    run_dir = shutil.copytree(trained_run_dir, tmp_path / "run")
    fits = []

    def fit(codes, components, random_state):  # a stand-in: only which fits are made matters here
        fits.append(components)
        return GaussianMixture(
            np.full(components, 1 / components), np.zeros((components, 8)), np.tile(np.eye(8), (components, 1, 1))
        )

    monkeypatch.setattr(samplers, "fit_gaussian_mixture", fit)
    best = load_run(run_dir, "best")
    older = load_run(run_dir, next(step for step in checkpoint_steps(run_dir) if step != best.step))
    for run, components in ((best, 10), (older, 10), (best, 3), (older, 10), (best, 3)):
        samplers.run_mixture(run, components)
    assert fits == [10, 10, 3]  # the last two were cached
    assert sorted(path.name for path in (run_dir / "samplers").iterdir()) == sorted(
        [f"gmm-{best.step}-10.npz", f"gmm-{older.step}-10.npz", f"gmm-{best.step}-3.npz"]
    )


def test_gmm_samples_depend_on_the_seed_and_differ_from_the_prior(tmp_path, run_copy):
    for name, options in {
        "gmm0.png": ["--sampler", "gmm"],
        "gmm1.png": ["--sampler", "gmm", "--seed", 1],
        "prior0.png": [],
    }.items():
        result = vae("generate", "--run", run_copy, "--n", 16, *options, "--out", tmp_path / name)
        assert result.exit_code == 0, result.output
    pictures = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    assert len(set(pictures.values())) == 3


def test_gmm_writes_npz_samples_too(tmp_path, run_copy):
    result = vae("generate", "--run", run_copy, "--sampler", "gmm", "--n", 16, "--out", tmp_path / "s.npz")
    assert result.exit_code == 0, result.output
    samples = np.load(tmp_path / "s.npz")["samples"]
    assert samples.shape == (16, 28, 28) and samples.dtype == np.float32
    assert samples.min() >= 0 and samples.max() <= 1 and samples.std() > 0.05


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (["--sampler", "flow"], "--sampler 'flow': choose prior or gmm"),
        (["--sampler", "gmm", "--components", "0"], "--components must be at least 1, got 0"),
        (["--sampler", "gmm", "--components", "1000"], "--components 1000 needs at least 5000 training images"),
        (["--sampler", "gmm", "--temperature", "0"], "--temperature must be a positive number"),
    ],
)
def test_generate_refuses_a_bad_sampler_in_one_line(tmp_path, run_copy, monkeypatch, options, fragment):
    monkeypatch.chdir(tmp_path)
    before = sorted(path.name for path in (run_copy / "samplers").iterdir()) if (run_copy / "samplers").exists() else []
    assert_one_line_error(vae("generate", "--run", run_copy, *options), 2, fragment)
    assert list(tmp_path.iterdir()) == []
    after = sorted(path.name for path in (run_copy / "samplers").iterdir()) if (run_copy / "samplers").exists() else []
    assert after == before  # nothing fitted or cached
