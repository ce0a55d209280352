"""Names that may be Hugging Face Hub ids: model folders through ``huggingface_hub``, data sets
through ``datasets.load_dataset``; their caches and ``HF_HUB_OFFLINE`` are honoured.

A name is a local path when it exists, starts with ``.``, ``/`` or ``~``, has more than one
``/``, or ends in a file suffix; anything else (``name``, ``org/name``, ``org/name:subset``) is a
hub id. A hub id that can be neither reached nor found in the cache is one ``HubError`` line
saying what to pass instead. Where the hub's host has no address (no network), the hub clients are
put offline at once: they read their caches instead of retrying for half a minute.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

from flaxsst.errors import CheckpointError, DataError, HubError

MODEL_PATTERNS = ["*.json", "*.safetensors", "vocab.txt"]
FILE_SUFFIXES = (".tsv", ".csv", ".json", ".jsonl", ".parquet", ".txt", ".safetensors", ".bin")
# GLUE's tasks live in one hub data set with a subset per task: ``glue/sst2`` is ``nyu-mll/glue:sst2``.
GLUE_REPO = "nyu-mll/glue"

logger = logging.getLogger(__name__)
_unreachable_host: str | None = None  # the hub host found to have no address, once looked up


def looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a hub id (see the module docstring)."""
    return (Path(os.path.expanduser(name)).exists() or name.startswith((".", "/", "~")) or "\\" in name
            or name.count("/") > 1 or name.lower().endswith(FILE_SUFFIXES))


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _offline_if_unreachable() -> None:
    """Put ``huggingface_hub`` and ``datasets`` offline when the hub's host has no address here: a
    failed lookup takes milliseconds, where their retries take ~25 s to fail the same way."""
    global _unreachable_host
    if _offline():
        return
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
        return
    except OSError:
        _unreachable_host = host
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    import datasets.config

    datasets.config.HF_HUB_OFFLINE = True
    logger.debug(f"{host} has no address from here: the hub is used offline, from its local caches")


def _why(error: BaseException) -> str:
    """The first line of a hub library's error, or the offline setting that caused it."""
    if _unreachable_host:
        return f"{_unreachable_host} has no address from here (no network?) and it is not in the local cache"
    if _offline():
        return "HF_HUB_OFFLINE=1 is set and it is not in the local cache"
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first}"[:300]


def resolve_model_dir(name_or_path: str | os.PathLike, *, key: str | None = None, revision: str | None = None,
                      cache_dir: str | os.PathLike | None = None, local_files_only: bool = False) -> Path:
    """A local model folder as it is, or a hub model id downloaded to (or found in) the hub cache.

    ``key`` names the setting the value came from (``model.init``, ``--model``) in the error.
    """
    name = str(name_or_path)
    path = Path(os.path.expanduser(name))
    setting = f"{key}={name}" if key else repr(name)
    instead = f"{key}=<a local folder with config.json and model.safetensors>" if key else \
        "a local folder with config.json and model.safetensors"
    if not name.strip():
        raise HubError(f"{key or 'the model name'} is empty; pass {instead}, or a hub id")
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{setting} is a file; expected a folder with config.json and weights, or a hub id")
    if looks_like_path(name):
        raise HubError(f"{setting}: folder {path} does not exist")
    from huggingface_hub import snapshot_download

    _offline_if_unreachable()

    def download(patterns: list[str]) -> Path:
        return Path(snapshot_download(name, revision=revision, cache_dir=cache_dir, allow_patterns=patterns,
                                      local_files_only=local_files_only))

    try:
        folder = download(MODEL_PATTERNS)
        if not any(folder.glob("*.safetensors")):
            folder = download(MODEL_PATTERNS + ["pytorch_model*.bin"])
    except Exception as error:  # any failure of the hub client means: not reachable and not cached
        raise HubError(f"{setting} is neither a local folder nor a hub model that could be reached "
                       f"({_why(error)}); pass {instead}") from None
    return folder


def dataset_id(name: str) -> tuple[str, str | None]:
    """``glue/sst2`` -> ``("nyu-mll/glue", "sst2")``; ``org/name:subset`` -> ``("org/name", "subset")``."""
    repo, _, subset = name.partition(":")
    if repo.startswith("glue/") and repo.count("/") == 1:
        return GLUE_REPO, repo.split("/", 1)[1]
    return repo, subset or None


def load_dataset_split(name: str, split: str) -> Any:
    """One split of a hub data set (``datasets.Dataset``); errors name ``data.path`` and say what to pass."""
    import datasets

    repo, subset = dataset_id(name)
    _offline_if_unreachable()
    try:
        return datasets.load_dataset(repo, subset, split=split)
    except ValueError as error:
        message = str(error)
        if "split" in message.lower():
            raise DataError(f"data.path={name}: {message.splitlines()[0]} (set data.train_split / data.eval_split)") from None
        raise DataError(f"data.path={name}: {message.splitlines()[0]}") from None
    except Exception as error:  # offline, unreachable, or no such data set
        raise HubError(f"data.path={name} is not a local folder or file, nor a hub data set that could be reached "
                       f"({_why(error)}); pass data.path=<a GLUE folder with train.tsv and dev.tsv, or a "
                       ".tsv/.csv/.jsonl/.parquet file>") from None
