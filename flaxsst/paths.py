"""Paths a user names on a command line: folders to write into and text files to read, checked before
any long work starts, each problem as one ``ConfigError`` line naming the flag and the path."""

from __future__ import annotations

import os
from pathlib import Path

from flaxsst.errors import ConfigError, not_utf8


def cache_home() -> Path:
    """``FLAXSST_HOME``, else ``~/.cache/flaxsst``: JAX's compilation cache (``jax/``), stored inference
    programs (``programs/``), the packed-dot kernel (``kernels/``) and the tokenized splits of evaluations
    (``tokens/``). One variable moves them all, e.g. to a container image's or a volume's folder."""
    home = os.environ.get("FLAXSST_HOME")
    return Path(home).expanduser() if home else Path(os.path.expanduser("~")) / ".cache" / "flaxsst"


def output_folder(value: str | os.PathLike, flag: str) -> Path:
    """The folder ``value``, created with its parents where missing; an existing file, a folder that
    cannot be created or one that cannot be written is an error naming ``flag``."""
    if not str(value).strip():
        raise ConfigError(f"{flag} is empty; name a folder (it is created if missing)")
    folder = Path(value).expanduser()
    blocker = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        what = "is a file" if blocker == folder else f"cannot be created: {blocker} is a file"
        raise ConfigError(f"{flag}={value} {what}, not a folder; name a folder (it is created if missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{flag}={value}: cannot create the folder ({e.strerror})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag}={value}: the folder is not writable by this user")
    return folder


def output_file(value: str | os.PathLike, flag: str) -> Path:
    """A file path to write: its folder is created where missing; an existing folder is an error."""
    if not str(value).strip():
        raise ConfigError(f"{flag} is empty; name a file")
    path = Path(value).expanduser()
    if path.is_dir():
        raise ConfigError(f"{flag}={value} is a folder; name a file")
    output_folder(path.parent, f"{flag} folder")
    return path


def read_text(path: str | os.PathLike, flag: str | None = None, error: type[Exception] = ConfigError) -> str:
    """A UTF-8 text file; a missing, unreadable or non-UTF-8 file raises ``error``, one line naming it
    (and the line of the first bad byte)."""
    path = Path(path)
    where = f"{flag} {path}" if flag else str(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise error(f"{where}: cannot be read ({e.strerror})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{where}: {not_utf8(e)}") from None
