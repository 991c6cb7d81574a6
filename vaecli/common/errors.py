"""Exception types a user can see: the CLI prints their message as one line and exits non-zero."""


class VaeError(Exception):
    """Base class: a problem the user can fix, described in one line."""

    exit_code = 1


class ConfigError(VaeError):
    """The config file or a --set override is missing, malformed or out of range."""

    exit_code = 2


class DataError(VaeError):
    """A dataset file is missing, truncated or malformed."""


class ImageError(VaeError):
    """An input image cannot be read or is not an image."""


class CheckpointError(VaeError):
    """A run directory is missing, has no checkpoint, or holds an unusable one."""


class TrainingError(VaeError):
    """Training could not go on (for example the loss became NaN); the message says what to change."""


class Interrupted(VaeError):
    """The user asked to stop (Ctrl-C) before there was anything to save."""

    exit_code = 130


class ProcessesError(VaeError):
    """A multi-process run cannot start: the coordinator is unreachable, or JAX cannot join the processes."""


class OutputError(VaeError):
    """An output file or directory cannot be written."""


class UsageError(VaeError):
    """A command-line value is out of range (for example --n 0)."""

    exit_code = 2
