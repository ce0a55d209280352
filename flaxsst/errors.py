"""The errors a user can fix. Each message is one line naming the file, key or value, and what
would be right; the command lines print it as ``error: ...`` and exit 2 (``flaxsst.cli``).

Any other exception is a bug of flaxsst's and keeps its traceback.
"""

from __future__ import annotations


class FlaxsstError(Exception):
    """A problem with the user's input, files or machine, described in one line."""


class ConfigError(FlaxsstError, ValueError):
    """A config file, override or argument that does not fit; names the key and the value."""


class DataError(FlaxsstError, ValueError):
    """A data source, file or row that cannot be used; names the file and the row."""


class CheckpointError(FlaxsstError, ValueError):
    """A model folder, checkpoint or weights file that cannot be used; names the file and the keys."""


class HubError(FlaxsstError, FileNotFoundError):
    """A name that is neither a local path nor reachable on the Hugging Face Hub."""


class WorkdirError(FlaxsstError):
    """A workdir that cannot be used now: another run holds it, or its files cannot be written."""


class Interrupted(FlaxsstError):
    """SIGTERM or Ctrl-C; the message says what was saved and how to resume."""


def not_utf8(error: UnicodeDecodeError) -> str:
    """Where a file stops being UTF-8: ``line N is not UTF-8 text (byte 0x.. at offset M)``."""
    line = error.object.count(b"\n", 0, error.start) + 1
    return (f"line {line} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start}); "
            "save the file as UTF-8")


def yaml_error(path, error: Exception) -> ConfigError:
    """A YAML file that does not parse or cannot be read, as one line naming ``file:line:column``."""
    import yaml

    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        return ConfigError(f"{where}: invalid YAML: {error.problem or error.context}")
    if isinstance(error, UnicodeDecodeError):
        return ConfigError(f"{path}: {not_utf8(error)}")
    if isinstance(error, OSError) and error.errno is None:  # OmegaConf's word for a scalar where a mapping belongs
        return ConfigError(f"{path}: expected a mapping of keys, got something else ({error})")
    return ConfigError(f"{path}: cannot be read ({getattr(error, 'strerror', None) or error})")
