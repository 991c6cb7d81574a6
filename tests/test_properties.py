"""Properties that must hold for any input, checked with hypothesis.

- Any bytes given as a picture: model input of the right shape, or an ImageError; nothing else.
- Any small picture Pillow can write: read without error, right shape and dtype.
- Any --set override: a Config, or a ConfigError whose message is one line; nothing else.
- Every key takes a value only as YAML typed it: a bool is not a number, a whole float not an integer,
  a quoted number not a number.

Deterministic (derandomize) so CI sees the same examples every run; deadlines catch a hang.
"""

from __future__ import annotations

import string
import types
import typing

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from pydantic import BaseModel

from vaecli.common.config import Config, load_config
from vaecli.common.errors import ConfigError, ImageError
from vaecli.common.images import load_model_input, load_photo_input

MNIST_SHAPE = (28, 28)
PHOTO_SIZE = 16


def checked(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=2000,  # milliseconds: far above any single example, so only a hang trips it
        derandomize=True,
        database=None,  # derandomized examples need no saved failures to replay
        suppress_health_check=[HealthCheck.function_scoped_fixture],  # tmp_path is only a place to write
    )


# --- any bytes: an image or an ImageError -------------------------------------------------------

# Magic numbers that make Pillow pick a decoder, so random bytes after them get past identification.
FORMAT_HEADERS = {
    "png": b"\x89PNG\r\n\x1a\n",
    "gif": b"GIF89a",
    "jpeg": b"\xff\xd8\xff",
    "bmp": b"BM",
    "tiff-little-endian": b"II*\x00",
    "tiff-big-endian": b"MM\x00*",
}


def assert_image_or_image_error(path) -> None:
    """Both readers return uint8 input of the right shape or raise a one-line ImageError; anything else fails."""
    try:
        model_input = load_model_input(path, MNIST_SHAPE)
    except ImageError as error:
        assert len(str(error).splitlines()) == 1, str(error)  # the CLI prints it as its one line
    else:
        assert model_input.shape == MNIST_SHAPE and model_input.dtype == np.uint8
    try:
        photo_input = load_photo_input(path, PHOTO_SIZE, 3)
    except ImageError as error:
        assert len(str(error).splitlines()) == 1, str(error)
    else:
        assert photo_input.shape == (PHOTO_SIZE, PHOTO_SIZE, 3) and photo_input.dtype == np.uint8


@checked(max_examples=300)
@given(content=st.binary(max_size=4096))
def test_any_bytes_are_an_image_or_an_image_error(tmp_path, content):
    path = tmp_path / "upload.png"
    path.write_bytes(content)
    assert_image_or_image_error(path)


@checked(max_examples=1500)
@given(header=st.sampled_from(sorted(FORMAT_HEADERS)), content=st.binary(max_size=4096))
# Found by this property: Pillow's "Corrupt EXIF data" warning escaped the reader (and reached stderr).
@example(header="tiff-big-endian", content=b"\x14.dT\xa7\xc2\x8b\xba4\x84\x98\x0c\xf1")
def test_bytes_after_a_format_header_are_an_image_or_an_image_error(tmp_path, header, content):
    path = tmp_path / "upload.img"
    path.write_bytes(FORMAT_HEADERS[header] + content)
    assert_image_or_image_error(path)


# --- any small picture: read as the model expects ---------------------------------------------

CHANNELS_BY_MODE = {"L": (), "RGB": (3,), "RGBA": (4,)}
# JPEG has no alpha channel; every other format takes all three modes.
FORMATS_BY_MODE = {
    "L": ("PNG", "JPEG", "GIF", "BMP", "TIFF"),
    "RGB": ("PNG", "JPEG", "GIF", "BMP", "TIFF"),
    "RGBA": ("PNG", "GIF", "BMP", "TIFF"),
}


@st.composite
def small_pictures(draw) -> tuple[np.ndarray, str, str]:
    """(pixels, mode, format): 1..64 pixels a side, any uint8 content."""
    mode = draw(st.sampled_from(sorted(CHANNELS_BY_MODE)))
    file_format = draw(st.sampled_from(FORMATS_BY_MODE[mode]))
    height, width = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    pixels = draw(arrays(np.uint8, (height, width, *CHANNELS_BY_MODE[mode])))
    return pixels, mode, file_format


@checked(max_examples=500)
@given(picture=small_pictures(), channels=st.sampled_from([1, 3]))
def test_any_small_picture_is_read_with_the_right_shape(tmp_path, picture, channels):
    pixels, mode, file_format = picture
    path = tmp_path / f"picture.{file_format.lower()}"
    Image.fromarray(pixels, mode=mode).save(path, format=file_format)

    try:
        model_input = load_model_input(path, MNIST_SHAPE)
    except ImageError as error:
        assert "no ink found" in str(error)  # a blank (or flat-noise) picture is refused, not read as blank
    else:
        assert model_input.shape == MNIST_SHAPE and model_input.dtype == np.uint8
    photo_input = load_photo_input(path, PHOTO_SIZE, channels)

    expected_photo_shape = (PHOTO_SIZE, PHOTO_SIZE) if channels == 1 else (PHOTO_SIZE, PHOTO_SIZE, 3)
    assert photo_input.shape == expected_photo_shape and photo_input.dtype == np.uint8


# --- any --set override: a Config or a one-line ConfigError ------------------------------------

SHIPPED_CONFIG = "mnist-sample"


def real_keys() -> list[str]:
    """Every dotted key a config has, read from the Config model itself."""
    keys = []
    for name, field in Config.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            keys += [f"{name}.{key}" for key in section.model_fields]
        else:
            keys.append(name)
    return keys


JUNK_CHARACTERS = string.printable + "ÿé中\x00\x85\u2028"
junk = st.text(alphabet=JUNK_CHARACTERS, max_size=8)

dotted_keys = st.one_of(
    st.sampled_from(real_keys()),
    st.builds(lambda key, extra: key + extra, st.sampled_from(real_keys()), junk),  # e.g. train.epochs.x, model.hiddenz
    st.builds(lambda key, extra: extra + key, st.sampled_from(real_keys()), junk),
    st.lists(st.text(alphabet=JUNK_CHARACTERS, min_size=1, max_size=6), min_size=1, max_size=4).map(".".join),
)

# Values YAML reads in surprising ways, values near the allowed ranges, and values that are not YAML at all.
SPECIAL_YAML_VALUES = (
    "0", "-1", "1e400", "-1e400", "3e-4", ".inf", "-.inf", ".nan", "1_000", "0x10", "0o17", "1.5",
    "null", "~", "true", "false", "yes", "no", "''", '""', "[]", "{}", "2001-01-01",
    "dynamic", "mnist_sample", "folder", "http://example.invalid/", "~no-such-user-vaecli/x",
    "!!binary aGVsbG8=", "!!python/object:os.system {}", "&anchor 1", "*alias", "{a: 1}", "'unterminated",
    "[1, 2", "- 1", "a: b: c",
)  # fmt: skip

yaml_scalars = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(SPECIAL_YAML_VALUES),
    junk,
)
yaml_values = st.recursive(
    yaml_scalars,
    lambda inner: st.lists(inner, max_size=4).map(lambda items: "[" + ", ".join(items) + "]"),
    max_leaves=8,
)

structured_overrides = st.builds(
    lambda key, separator, value: f"{key}{separator}{value}",
    dotted_keys,
    st.sampled_from(["=", " = ", "==", "= ", "=\n"]),
    yaml_values,
)


def assert_config_or_one_line_config_error(override: str) -> None:
    try:
        config = load_config(SHIPPED_CONFIG, [override])
    except ConfigError as error:
        message = str(error)
        assert message.strip() and len(message.splitlines()) == 1, message
    else:
        assert isinstance(config, Config)


# Inputs that once broke the one-line rule (an unknown ~user, line breaks in a key) stay as explicit examples.


@checked(max_examples=500)
@given(override=st.text(max_size=40))
@example(override="foo\nbar=1")
def test_any_text_override_is_a_config_or_a_one_line_error(override):
    assert_config_or_one_line_config_error(override)


@checked(max_examples=300)
@given(override=structured_overrides)
@example(override="data.dir=~no-such-user-vaecli/digits")
@example(override="model.latent\ndim=8")
@example(override="seed\x850=[]")  # U+0085 is a line break too: found by this property
def test_any_structured_override_is_a_config_or_a_one_line_error(override):
    assert_config_or_one_line_config_error(override)


# --- strict types: a value is taken only as YAML typed it, for every key -----------------------


def value_types(annotation) -> set[type]:
    """The Python types a config field's annotation admits: Literal[1, 3] -> {int}, float | None -> {float, None}."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return value_types(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return set().union(*(value_types(arg) for arg in typing.get_args(annotation)))
    if origin is typing.Literal:
        return {type(choice) for choice in typing.get_args(annotation)}
    return {origin or annotation}


def key_types(dotted_key: str) -> set[type]:
    section, _, key = dotted_key.rpartition(".")
    fields = Config.model_fields[section].annotation.model_fields if section else Config.model_fields
    return value_types(fields[key].annotation)


def current_value_of(config: Config, dotted_key: str):
    value = config
    for part in dotted_key.split("."):
        value = getattr(value, part)
    return value


def current_value(dotted_key: str):
    """The value `dotted_key` has in the shipped config the overrides are applied to."""
    return current_value_of(load_config(SHIPPED_CONFIG), dotted_key)


def assert_refused_naming_the_key(dotted_key: str, yaml_value: str) -> None:
    try:
        config = load_config(SHIPPED_CONFIG, [f"{dotted_key}={yaml_value}"])
    except ConfigError as error:
        assert f"{dotted_key}: " in str(error) and len(str(error).splitlines()) == 1, str(error)
    else:
        raise AssertionError(f"{dotted_key}={yaml_value} was taken as {current_value_of(config, dotted_key)!r}")


@pytest.mark.parametrize("dotted_key", [key for key in real_keys() if bool not in key_types(key)])
@pytest.mark.parametrize("yaml_bool", ["true", "false"])
def test_a_yaml_bool_is_taken_only_by_a_yes_no_key(dotted_key, yaml_bool):
    assert_refused_naming_the_key(dotted_key, yaml_bool)


@pytest.mark.parametrize("dotted_key", [key for key in real_keys() if key_types(key) == {int}])
def test_an_integer_key_refuses_a_float_even_a_whole_one(dotted_key):
    assert_refused_naming_the_key(dotted_key, repr(float(current_value(dotted_key))))


@pytest.mark.parametrize(
    "dotted_key", [key for key in real_keys() if float in key_types(key) and current_value(key) is not None]
)
def test_a_number_key_refuses_a_quoted_number(dotted_key):
    assert_refused_naming_the_key(dotted_key, f'"{current_value(dotted_key)}"')
