"""Config loading: shipped names, overrides, and one-line errors for every kind of bad input."""

from pathlib import Path

import pydantic
import pytest

from vaecli.common.config import (
    Config,
    config_from_dict,
    config_to_yaml,
    load_config,
    parse_yaml_mapping,
    resolve_config_path,
    shipped_config_names,
)
from vaecli.common.errors import ConfigError

REPO_CONFIGS = Path(__file__).parent.parent / "configs"


def write_config(directory: Path, text: str, name: str = "run.yaml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


def test_shipped_configs_are_packaged_and_valid():
    assert {"mnist", "mnist-sample"} <= set(shipped_config_names())
    for name in shipped_config_names():
        assert isinstance(load_config(name), Config)


def test_repository_configs_folder_is_the_packaged_one():
    assert sorted(path.name for path in REPO_CONFIGS.glob("*.yaml")) == sorted(
        f"{name}.yaml" for name in shipped_config_names()
    )


@pytest.mark.parametrize("spec", ["mnist.yaml", "mnist"])
def test_a_bare_name_resolves_to_the_shipped_config_from_any_folder(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    config = load_config(spec)
    assert config.data.name == "mnist"
    assert resolve_config_path(spec).parent.name == "configs"


def test_an_existing_path_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path, "model: {latent_dim: 3}\n", name="mnist.yaml")
    assert load_config("mnist.yaml").model.latent_dim == 3


def test_missing_keys_take_the_documented_defaults(tmp_path):
    config = load_config(write_config(tmp_path, "seed: 7\n"))
    assert config.seed == 7
    assert config.data.binarize == "dynamic"
    assert config.model.hidden == (512, 256)


def test_overrides_are_parsed_as_yaml_values(tmp_path):
    path = write_config(tmp_path, "train: {epochs: 3}\n")
    config = load_config(
        path, ["model.hidden=[64, 32]", "train.learning_rate=1e-4", "train.epochs=9", "data.binarize=none"]
    )
    assert config.model.hidden == (64, 32)
    assert config.train.learning_rate == pytest.approx(1e-4)
    assert config.train.epochs == 9
    assert config.data.binarize == "none"


def test_data_dir_is_stored_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(write_config(tmp_path, "data: {name: mnist, dir: some/where}\n"))
    assert config.data.dir == str(tmp_path / "some" / "where")


def test_config_is_frozen():
    with pytest.raises(pydantic.ValidationError):
        Config().train.epochs = 5  # type: ignore[misc]


def test_saved_yaml_round_trips(tmp_path):
    config = load_config(write_config(tmp_path, "model: {hidden: [32, 16], latent_dim: 4}\nseed: 3\n"))
    reloaded = config_from_dict(parse_yaml_mapping(config_to_yaml(config), "saved"), "saved")
    assert reloaded == config


@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        ("model: {hiden: [4]}\n", [], "unknown key model.hiden; did you mean model.hidden?"),
        ("trian: {epochs: 2}\n", [], "unknown key trian; did you mean train?"),
        ("seed: 1\n", ["train.epoch=2"], "did you mean train.epochs?"),
        ("train: {epochs: many}\n", [], "train.epochs: Input should be a valid integer"),
        ("train: {epochs: 0}\n", [], "train.epochs: Input should be greater than 0 (got 0)"),
        ("train: {batch_size: -8}\n", [], "train.batch_size: Input should be greater than 0"),
        ("model: {hidden: [64, 0]}\n", [], "model.hidden.1: Input should be greater than 0"),
        ("model: {hidden: []}\n", [], "model.hidden: "),
        ("train: {learning_rate: 0}\n", [], "train.learning_rate: Input should be greater than 0"),
        (
            "data: {name: cifar}\n",
            [],
            "data.name: Input should be 'mnist', 'fashion_mnist', 'kmnist', 'cifar10', 'mnist_sample' or",
        ),
        ("data: {binarize: yes}\n", [], "data.binarize: Input should be 'none', 'dynamic' or 'static'"),
        ("data: {name: folder}\n", [], "data.dir is required for data.name: folder"),
        ("data: {name: mnist, image_size: 32}\n", [], "apply to data.name: folder; mnist images are 28x28"),
        ("data: {name: folder, dir: x, channels: 2}\n", [], "data.channels must be 1 (grey) or 3 (colour), got 2"),
        ("data: {name: mnist, mirrors: [ftp://x]}\n", [], "'ftp://x' is not an http:// or https:// URL"),
        ("data: {mirrors: [http://x/]}\n", [], "data.mirrors applies to mnist, fashion_mnist, kmnist"),
        (
            "model: 3\n",
            [],
            "model must be a section with keys arch, hidden, latent_dim, activation, likelihood, mixtures",
        ),
        ("seed: -1\n", [], "seed: Input should be greater than or equal to 0"),
        ("train:\n  epochs: 2\n   batch_size: 3\n", [], "line 3, column 14: YAML syntax error"),
        ("", [], "is empty"),
        ("- a\n- b\n", [], "must be a mapping of sections"),
        ("seed: 1\n", ["train.epochs"], "--set 'train.epochs' is not of the form section.key=value"),
        ("seed: 1\n", ["seed.value=3"], "seed is a value, not a section"),
        ("seed: 1\n", ["model.hidden=[1, 2"], "the value is not valid YAML"),
    ],
)
def test_bad_config_gives_one_line_naming_the_key(tmp_path, text, overrides, expected):
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, overrides)
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message
    assert caught.value.exit_code == 2


def test_missing_config_names_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"config file nope.yaml not found") as caught:
        load_config("nope.yaml")
    assert f"({', '.join(shipped_config_names())})" in str(caught.value)


def test_a_directory_is_not_a_config(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_a_missing_path_with_folders_is_not_looked_up_as_a_shipped_name(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "mnist.yaml")


# --- strict values: taken only as YAML typed them -------------------------------------------------


def config_error(overrides: list[str], spec: str = "mnist-sample") -> str:
    """The one-line message of the ConfigError that `overrides` on `spec` raise."""
    with pytest.raises(ConfigError) as caught:
        load_config(spec, overrides)
    message = str(caught.value)
    assert "\n" not in message, message
    assert caught.value.exit_code == 2
    return message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        # Before strict validation `true` trained a model with a latent of 1.
        ("model.latent_dim=true", "model.latent_dim: Input should be a valid integer (got True)"),
        ("train.epochs=false", "train.epochs: Input should be a valid integer (got False)"),
        ("model.hidden=[64, true]", "model.hidden.1: Input should be a valid integer (got True)"),
        ('train.learning_rate="3"', "train.learning_rate: Input should be a valid number (got '3')"),
        ("train.learning_rate='0.001'", "train.learning_rate: Input should be a valid number (got '0.001')"),
        ('model.latent_dim="8"', "model.latent_dim: Input should be a valid integer (got '8')"),
        ("train.iw_samples=2.0", "train.iw_samples: Input should be a valid integer (got 2.0)"),
        ("train.beta=true", "train.beta: Input should be a valid number (got True)"),
        ("train.ema=true", "train.ema: Input should be a valid number (got True)"),
    ],
)
def test_a_value_of_another_yaml_type_is_refused_naming_the_key(override, expected):
    assert expected in config_error([override])


def test_an_integer_is_a_valid_float():
    config = load_config("mnist-sample", ["train.learning_rate=3", "train.beta=0", "train.kl_warmup_epochs=2"])
    assert config.train.learning_rate == 3.0 and isinstance(config.train.learning_rate, float)
    assert config.train.beta == 0.0 and config.train.kl_warmup_epochs == 2.0


@pytest.mark.parametrize("written", ["3e-4", "1e-4", "1E-3", "3.0e-4"])
def test_a_float_in_scientific_notation_is_a_float(tmp_path, written):
    """The README's own example, `--set train.learning_rate=3e-4`: YAML 1.1 reads 3e-4 (no dot) as a string."""
    expected = float(written)
    assert load_config("mnist-sample", [f"train.learning_rate={written}"]).train.learning_rate == expected
    path = write_config(tmp_path, f"train:\n  learning_rate: {written}\n")
    assert load_config(path).train.learning_rate == expected


def test_lists_become_tuples(tmp_path):
    from_set = load_config("mnist", ["model.hidden=[64, 32]", "data.mirrors=[http://a.local/x, https://b.local/y/]"])
    assert from_set.model.hidden == (64, 32)
    assert from_set.data.mirrors == ("http://a.local/x/", "https://b.local/y/")
    from_file = load_config(write_config(tmp_path, "model:\n  hidden:\n    - 16\n    - 8\n"))
    assert from_file.model.hidden == (16, 8)
    assert from_file == load_config(write_config(tmp_path, "model: {hidden: [16, 8]}\n", name="flow.yaml"))


# --- the new keys: each value allowed, and each kind of bad one refused in one line ---------------


def test_every_new_key_takes_its_allowed_values():
    config = load_config(
        "mnist-sample",
        [
            "model.arch=conv",
            "model.activation=gelu",
            "model.likelihood=logistic",
            "model.mixtures=3",
            "data.binarize=none",
            "train.lr_schedule=cosine",
            "train.lr_warmup_epochs=1.5",
            "train.kl_warmup_epochs=2",
            "train.beta=1",
            "train.iw_samples=5",
            "train.ema=0.999",
            "model.dtype=bfloat16",
        ],
    )
    assert (config.model.arch, config.model.activation, config.model.likelihood) == ("conv", "gelu", "logistic")
    assert config.model.mixtures == 3
    assert (config.train.lr_schedule, config.train.lr_warmup_epochs) == ("cosine", 1.5)
    assert (config.train.kl_warmup_epochs, config.train.beta, config.train.iw_samples) == (2.0, 1.0, 5)
    assert config.train.ema == 0.999
    assert config.model.dtype == "bfloat16"
    beta_vae = load_config("mnist-sample", ["train.beta=4", "train.iw_samples=1"])
    assert beta_vae.train.beta == 4.0
    for activation in ("relu", "elu", "gelu", "silu", "tanh", "softplus"):
        assert load_config("mnist-sample", [f"model.activation={activation}"]).model.activation == activation


def test_the_new_keys_default_to_the_plain_elbo():
    config = Config()
    assert (config.model.arch, config.model.activation, config.model.likelihood) == ("mlp", "relu", "bernoulli")
    assert (config.train.beta, config.train.kl_warmup_epochs, config.train.iw_samples) == (1.0, 0.0, 1)
    assert (config.train.lr_schedule, config.train.lr_warmup_epochs, config.train.ema) == ("constant", 0.0, None)
    assert config.model.dtype == "float32"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.iw_samples=0"], "train.iw_samples: Input should be greater than or equal to 1 (got 0)"),
        (["train.ema=1.0"], "train.ema: Input should be less than 1 (got 1.0)"),
        (["train.ema=-0.5"], "train.ema: Input should be greater than or equal to 0 (got -0.5)"),
        (["train.lr_schedule=foo"], "train.lr_schedule: Input should be 'constant' or 'cosine' (got 'foo')"),
        (["train.lr_warmup_epochs=-1"], "train.lr_warmup_epochs: Input should be greater than or equal to 0"),
        (["train.kl_warmup_epochs=-1"], "train.kl_warmup_epochs: Input should be greater than or equal to 0"),
        (["train.beta=-1"], "train.beta: Input should be greater than or equal to 0 (got -1)"),
        (["model.activation=foo"], "model.activation: Input should be 'relu', 'elu', 'gelu', 'silu', 'tanh' or"),
        (["model.arch=resnet"], "model.arch: Input should be 'mlp' or 'conv' (got 'resnet')"),
        (["model.likelihood=gaussian"], "model.likelihood: Input should be 'bernoulli' or 'logistic'"),
        (["model.mixtures=0"], "model.mixtures: Input should be greater than or equal to 1 (got 0)"),
        (["model.dtype=float16"], "model.dtype: Input should be 'float32' or 'bfloat16' (got 'float16')"),
        (["model.dtype=true"], "model.dtype: Input should be 'float32' or 'bfloat16' (got True)"),
        (
            ["model.likelihood=logistic", "data.binarize=dynamic"],
            "model.likelihood logistic models the 256 grey levels, not binary pixels; set data.binarize: none",
        ),
        (
            ["model.likelihood=logistic", "data.binarize=static"],
            "model.likelihood logistic models the 256 grey levels, not binary pixels; set data.binarize: none",
        ),
        (
            ["train.beta=2", "train.iw_samples=5"],
            "train.beta applies to the ELBO (train.iw_samples: 1); the IWAE bound is trained with beta 1",
        ),
    ],
)
def test_a_bad_value_of_a_new_key_is_one_line(overrides, expected):
    assert expected in config_error(overrides)


@pytest.mark.parametrize("name", shipped_config_names())
def test_every_shipped_config_loads_and_round_trips(name):
    config = load_config(name)
    assert isinstance(config, Config)
    assert config_from_dict(parse_yaml_mapping(config_to_yaml(config), "saved"), "saved") == config
