"""Typed, frozen run configuration: YAML file + `--set section.key=value` overrides, validated.

Every error is a `ConfigError` whose message is one line naming the key, what was wrong and what is
allowed, so the CLI can print it as it is.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from vaecli.common.errors import ConfigError

SHIPPED_CONFIG_DIR = Path(__file__).parents[1] / "configs"


class _Section(BaseModel):
    # Frozen so a config cannot drift after validation; forbid extras so a typo is an error, not a no-op.
    # Strict, so a value is taken only as YAML typed it: `true` is not the integer 1 and "3" is not a
    # number (an integer is still a valid float).
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


def _list_as_tuple(value: Any) -> Any:
    # YAML and JSON have lists, not tuples; strict mode would refuse a list for a tuple field.
    return tuple(value) if isinstance(value, list) else value


def Sequence(item_type: Any, **limits: Any) -> Any:
    """A tuple field that also takes a YAML list, its items still checked strictly."""
    return Annotated[tuple[item_type, ...], BeforeValidator(_list_as_tuple), Field(**limits)]


DOWNLOADABLE_DATASETS = ("mnist", "fashion_mnist", "kmnist", "cifar10")
# (image_size, channels) of the datasets whose images come in one size; folder's are chosen.
NATIVE_IMAGE_SHAPES = {"cifar10": (32, 3)}  # the rest: 28x28 grey


class DataConfig(_Section):
    """Which images to train on and how pixels become Bernoulli targets."""

    # The embedded 5,000-digit MNIST subset needs no network, so it is the safe default.
    name: Literal["mnist", "fashion_mnist", "kmnist", "cifar10", "mnist_sample", "folder"] = "mnist_sample"
    # Folder holding the dataset's files. Default for the downloadable ones: the per-user cache
    # ($VAECLI_DATA, else $XDG_CACHE_HOME/vaecli, else ~/.cache/vaecli), one folder per dataset.
    # Required for folder. Stored as an absolute path.
    dir: str | None = None
    # dynamic: fresh binary pixels drawn from the intensities every step (the protocol behind
    # published MNIST likelihoods); static: one fixed draw made with the seed; none: the
    # intensities in [0, 1] are the Bernoulli targets. cifar10: none, its default.
    binarize: Literal["none", "dynamic", "static"] = "dynamic"
    # Base URLs to download a downloadable dataset's files from, tried in order, instead of the built-in
    # mirrors (for a proxy or an internal mirror). Checksums are verified either way.
    mirrors: Sequence(str, min_length=1) | None = None
    # folder: images are scaled and centre-cropped to image_size x image_size ...
    image_size: Annotated[int, Field(ge=4, le=1024)] = 28
    # ... with 1 (grey) or 3 (RGB) channels. Any other dataset: its own size, 28 and 1 (32 and 3 for
    # cifar10, its defaults), so the saved config describes the images.
    channels: Annotated[int, Field(ge=1, le=3)] = 1

    @model_validator(mode="before")
    @classmethod
    def _defaults_of_the_dataset(cls, values: Any) -> Any:
        # cifar10's images are 32x32 colour and are modelled at their 256 levels: keys left out say so,
        # so `data.name: cifar10` alone is a valid section and the saved config describes the data.
        if isinstance(values, dict) and values.get("name") == "cifar10":
            image_size, channels = NATIVE_IMAGE_SHAPES["cifar10"]
            values = {"image_size": image_size, "channels": channels, "binarize": "none", **values}
        return values

    @field_validator("dir")
    @classmethod
    def _absolute_dir(cls, value: str | None) -> str | None:
        # Absolute, so the saved config still finds the data when used from another folder.
        return None if value is None else str(expand_user(value).resolve())

    @field_validator("channels")
    @classmethod
    def _grey_or_colour(cls, value: int) -> int:
        # Not Literal[1, 3]: a Literal compares by equality, so it would take true and 1.0 for 1.
        if value not in (1, 3):
            raise ValueError(f"data.channels must be 1 (grey) or 3 (colour), got {value}")
        return value

    @field_validator("mirrors", mode="before")
    @classmethod
    def _one_mirror_is_a_list_of_one(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else _list_as_tuple(value)

    @field_validator("mirrors")
    @classmethod
    def _http_base_urls(cls, mirrors: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if mirrors is None:
            return None
        for url in mirrors:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"data.mirrors: {url!r} is not an http:// or https:// URL")
        # A base URL names a folder: the file names are appended to it.
        return tuple(url if url.endswith("/") else url + "/" for url in mirrors)

    @model_validator(mode="after")
    def _settings_fit_the_dataset(self) -> DataConfig:
        if self.name == "folder" and self.dir is None:
            raise ValueError("data.dir is required for data.name: folder; set it to the folder of images")
        native_size, native_channels = NATIVE_IMAGE_SHAPES.get(self.name, (28, 1))
        if self.name != "folder" and (self.image_size, self.channels) != (native_size, native_channels):
            colour = "grey" if native_channels == 1 else "colour"
            raise ValueError(
                f"data.image_size and data.channels apply to data.name: folder; "
                f"{self.name} images are {native_size}x{native_size} {colour}"
            )
        if self.name == "cifar10" and self.binarize != "none":
            raise ValueError(
                f"data.binarize: cifar10 photos are modelled at their 256 levels per channel, not as binary "
                f"pixels; set data.binarize: none (got {self.binarize})"
            )
        if self.mirrors is not None and self.name not in DOWNLOADABLE_DATASETS:
            raise ValueError(f"data.mirrors applies to {', '.join(DOWNLOADABLE_DATASETS)}, not to {self.name}")
        return self


ACTIVATIONS = ("relu", "elu", "gelu", "silu", "tanh", "softplus")


class ModelConfig(_Section):
    """Encoder/decoder shape and the likelihood p(x|z); the decoder mirrors the encoder."""

    # mlp: dense layers on the flattened image; conv: residual convolutional stages (square images of
    # 28, 32 or 64 pixels), the better choice for photos and colour.
    arch: Literal["mlp", "conv"] = "mlp"
    # mlp: the encoder's hidden widths, first layer first; conv: the channels of each stage, each
    # stage halving the image side. The decoder uses them reversed.
    hidden: Sequence(Annotated[int, Field(gt=0, le=65536)], min_length=1, max_length=16) = (512, 256)
    latent_dim: Annotated[int, Field(gt=0, le=4096)] = 32
    activation: Literal[ACTIVATIONS] = "relu"  # type: ignore[valid-type]
    # bernoulli: one probability per value, for binarized images (the MNIST likelihood protocol);
    # logistic: a discretized logistic mixture over the 256 levels of each value, a true likelihood
    # of 8-bit images, grey or colour, reported in bits per dimension.
    likelihood: Literal["bernoulli", "logistic"] = "bernoulli"
    # Components of the logistic mixture per value (logistic only).
    mixtures: Annotated[int, Field(ge=1, le=64)] = 5
    # The layers' arithmetic. bfloat16 halves the bytes each layer moves and runs on the bf16 units of
    # GPUs, TPUs and recent CPUs (AMX, AVX512-BF16); the weights, Adam's state and the loss (likelihood,
    # KL, importance weights) stay float32 either way. On a CPU without bf16 units it is slower.
    dtype: Literal["float32", "bfloat16"] = "float32"
    # 0: the values are independent given z. An odd N >= 3: each pixel's likelihood also sees the pixels
    # before it in an N x N window (the rows above, and its left on its own row), a local autoregressive
    # decoder (vaecli.models.pixel_context). Much shorter codes for photos, whose flat areas and smooth gradients
    # the neighbours predict; sampling then draws the pixels one at a time.
    pixel_context: Annotated[int, Field(ge=0, le=15)] = 0

    @field_validator("pixel_context")
    @classmethod
    def _odd_window(cls, size: int) -> int:
        if size != 0 and (size < 3 or size % 2 == 0):
            raise ValueError(f"model.pixel_context is a window's side: 0 (none), or odd and at least 3; got {size}")
        return size


class TrainConfig(_Section):
    """Objective and optimisation settings (Adam)."""

    epochs: Annotated[int, Field(gt=0, le=100_000)] = 20
    # 128 is the batch size of the reference VAE experiments; larger batches run faster per image.
    batch_size: Annotated[int, Field(gt=0, le=65536)] = 128
    # Devices that train data-parallel, each on an equal share of every batch (batch_size is the global
    # batch, so it must divide by their number); null: all of this process's devices. The losses and
    # weights agree with one device's to float rounding (the batch's sums are added in another order).
    devices: Annotated[int, Field(gt=0, le=65536)] | None = None
    learning_rate: Annotated[float, Field(gt=0, le=10)] = 1e-3
    # constant: learning_rate throughout; cosine: down to 1% of it by the last step (the usual
    # final gain of a decayed rate). Either way after lr_warmup_epochs of linear warm-up from 0.
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_warmup_epochs: Annotated[float, Field(ge=0, le=100_000)] = 0.0
    # Weight of the KL term: 1 is the ELBO (the likelihood bound); other values train a beta-VAE.
    beta: Annotated[float, Field(ge=0, le=1000)] = 1.0
    # The KL weight rises linearly from 0 to beta over this many epochs (0: beta from the start);
    # a common guard against posterior collapse early in training.
    kl_warmup_epochs: Annotated[float, Field(ge=0, le=100_000)] = 0.0
    # Importance samples per image: 1 trains the ELBO, k > 1 the tighter IWAE bound (Burda et al.
    # 2016), which costs about k decoder passes per image.
    iw_samples: Annotated[int, Field(ge=1, le=4096)] = 1
    # Decay of an exponential moving average of the weights (e.g. 0.999), used by validation,
    # evaluate, generate and reconstruct; null: none.
    ema: Annotated[float, Field(ge=0, lt=1)] | None = None
    # Gradients whose global norm exceeds this are scaled down to it; null: no clipping.
    clip_norm: Annotated[float, Field(gt=0)] | None = None
    # A step whose loss or gradient is not finite: false stops the run (the last checkpoint is
    # untouched); true skips that update and counts it in metrics.jsonl (skipped_steps).
    skip_nonfinite: bool = False
    # Checkpoints kept: the newest keep_checkpoints, plus the best by validation ELBO.
    keep_checkpoints: Annotated[int, Field(ge=1, le=1000)] = 3
    # TensorBoard event files in RUN_DIR/tensorboard/ (scalars and pictures per epoch), for
    # `tensorboard --logdir runs`; false writes none.
    tensorboard: bool = True


class Config(_Section):
    """A whole run's configuration; saved with every checkpoint."""

    # Every random draw (init, batch order, binarization, reparameterization) derives from it.
    seed: Annotated[int, Field(ge=0, lt=2**32)] = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _likelihood_fits_the_data(self) -> Config:
        if self.model.likelihood == "logistic" and self.data.binarize != "none":
            raise ValueError(
                "model.likelihood logistic models the 256 grey levels, not binary pixels; "
                "set data.binarize: none, or use model.likelihood: bernoulli"
            )
        if self.train.beta != 1 and self.train.iw_samples > 1:
            raise ValueError(
                "train.beta applies to the ELBO (train.iw_samples: 1); the IWAE bound is trained with beta 1"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-ready dict (tuples become lists)."""
        return self.model_dump(mode="json")


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading floats as YAML 1.2 does.

    PyYAML follows YAML 1.1, where 1e-4 (no dot) is the string "1e-4"; with strict types that would
    refuse learning_rate: 3e-4, the way everyone writes it.
    """


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def expand_user(path: str | Path) -> Path:
    """Path.expanduser, with an unknown ~user a ValueError (pydantic and callers turn it into a message)."""
    try:
        return Path(path).expanduser()
    except RuntimeError as error:  # ~name for a user this machine does not know
        raise ValueError(f"cannot expand {str(path).split('/')[0]!r}: no such user; give the full path") from error


def one_line(text: str) -> str:
    """`text` with line breaks and other control characters escaped, so a message stays one line."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def shipped_config_names() -> list[str]:
    """Names of the configs packaged with vaecli (without .yaml)."""
    return sorted(path.stem for path in SHIPPED_CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(spec: str | Path) -> Path:
    """A path that exists is used as given; otherwise a bare name picks the shipped config of that name."""
    try:
        path = expand_user(spec)
    except ValueError as error:
        raise ConfigError(f"config {spec}: {error}") from error
    if path.is_dir():
        raise ConfigError(f"config {spec} is a directory; give a YAML file such as {path / 'mnist.yaml'}")
    if path.exists():
        return path
    shipped = sorted(SHIPPED_CONFIG_DIR.glob(f"{path.stem}.y*ml")) if path.name == str(spec) else []
    if shipped:
        return shipped[0]
    names = ", ".join(shipped_config_names())
    raise ConfigError(f"config file {spec} not found; give a path to a YAML file or a shipped config ({names})")


def load_config(spec: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (path or shipped name), apply `section.key=value` overrides, validate."""
    path = resolve_config_path(spec)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config {path}: {getattr(error, 'strerror', None) or error}") from error
    raw = parse_yaml_mapping(text, source=str(path))
    for override in overrides:
        apply_override(raw, override)
    return validate_config(raw, source=str(path))


def parse_yaml_mapping(text: str, source: str) -> dict[str, Any]:
    """Parse YAML text that must hold a mapping; syntax errors name the line and column."""
    try:
        loaded = yaml.load(text, Loader=ConfigLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{source}{where}: YAML syntax error ({problem}); fix the YAML syntax") from error
    if loaded is None:
        raise ConfigError(f"{source} is empty; it needs sections such as data:, model:, train:")
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"{source} must be a mapping of sections (data:, model:, train:), not {type(loaded).__name__}"
        )
    return loaded


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `section.key=value` in the raw config dict; the value is parsed as a YAML scalar or list."""
    dotted_key, separator, value_text = override.partition("=")
    keys = dotted_key.strip().split(".")
    if not separator or not all(keys):
        raise ConfigError(f"--set {override!r} is not of the form section.key=value (e.g. train.epochs=5)")
    try:
        value = yaml.load(value_text, Loader=ConfigLoader) if value_text.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {override!r}: the value is not valid YAML; quote it or fix it") from error
    node = raw
    for depth, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            parent = ".".join(keys[: depth + 1])
            raise ConfigError(f"--set {override!r}: {parent} is a value, not a section; use --set {parent}=VALUE")
        node = child
    node[keys[-1]] = value


def validate_config(raw: dict[str, Any], source: str) -> Config:
    """Turn a raw dict into a Config, or raise ConfigError describing the first problem in one line."""
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        problems = error.errors()
        message = describe_problem(problems[0])
        more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
        raise ConfigError(f"{source}: {message}{more}") from error


def describe_problem(problem: dict[str, Any]) -> str:
    """One readable sentence for one pydantic error: key, what was wrong, what is allowed."""
    location = [str(part) for part in problem["loc"]]
    key = one_line(".".join(location))
    if problem["type"] == "extra_forbidden":
        return _describe_unknown_key(location)
    if problem["type"] == "value_error":  # our own validators' words, naming the key unless they do
        message = str(problem["ctx"]["error"])
        return message if key in message else f"{key}: {message}"
    if problem["type"] in ("model_type", "model_attributes_type", "dict_type"):
        section_class = _section_class(location)
        allowed = ", ".join(section_class.model_fields) if section_class else ""
        return f"{key} must be a section with keys {allowed}; got {problem['input']!r}"
    got = problem.get("input")
    return f"{key}: {problem['msg'].rstrip('.')} (got {got!r})"


def _section_class(location: list[str]) -> type[BaseModel] | None:
    """The pydantic model that the key path `location` points into (None if it is not a section)."""
    section: type[BaseModel] = Config
    for part in location:
        field = section.model_fields.get(part)
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        section = annotation
    return section


def _describe_unknown_key(location: list[str]) -> str:
    parent, unknown = location[:-1], location[-1]
    section = _section_class(parent) or Config
    allowed = list(section.model_fields)
    prefix = one_line(".".join([*parent, ""]))
    closest = difflib.get_close_matches(unknown, allowed, n=1, cutoff=0.6)
    hint = f"did you mean {prefix}{closest[0]}? " if closest else ""
    return f"unknown key {prefix}{one_line(unknown)}; {hint}allowed: {', '.join(prefix + name for name in allowed)}"


def config_to_yaml(config: Config) -> str:
    """The resolved config as YAML text, as saved in the run directory."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def config_from_dict(raw: dict[str, Any], source: str) -> Config:
    """Rebuild a Config saved with a run (same validation as a user's file)."""
    return validate_config(raw, source=source)
