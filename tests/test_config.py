"""Config loading: shipped names, overrides, and one-line errors for every kind of bad input."""

from pathlib import Path

import pydantic
import pytest

from vaecli.config import (
    Config,
    config_from_dict,
    config_to_yaml,
    load_config,
    parse_yaml_mapping,
    resolve_config_path,
    shipped_config_names,
)
from vaecli.errors import ConfigError

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
            "data.name: Input should be 'mnist', 'fashion_mnist', 'kmnist', 'mnist_sample' or",
        ),
        ("data: {binarize: yes}\n", [], "data.binarize: Input should be 'none', 'dynamic' or 'static'"),
        ("data: {name: folder}\n", [], "data.dir is required for data.name: folder"),
        ("data: {name: mnist, image_size: 32}\n", [], "apply to data.name: folder; mnist images are 28x28"),
        ("data: {name: folder, dir: x, channels: 2}\n", [], "data.channels: Input should be 1 or 3"),
        ("data: {name: mnist, mirrors: [ftp://x]}\n", [], "'ftp://x' is not an http:// or https:// URL"),
        ("data: {mirrors: [http://x/]}\n", [], "data.mirrors applies to mnist, fashion_mnist, kmnist"),
        ("model: 3\n", [], "model must be a section with keys arch, hidden, latent_dim, likelihood"),
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
    with pytest.raises(ConfigError, match=r"config file nope.yaml not found.*mnist, mnist-sample"):
        load_config("nope.yaml")


def test_a_directory_is_not_a_config(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_a_missing_path_with_folders_is_not_looked_up_as_a_shipped_name(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "mnist.yaml")
