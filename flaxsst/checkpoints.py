"""What makes rerunning a training command safe: committed and checksummed checkpoints, one run per
workdir, and bookkeeping that always matches the checkpoint a run resumes from.

A workdir holds:

    .lock                        held (``flock``) by the run's process 0; the OS releases it when that dies
    config.yaml                  the run's resolved config; a rerun must match it (``config_differences``)
    checkpoints/<step>/          a committed checkpoint: state/ (orbax), meta.json and MANIFEST.sha256
    checkpoints/.partial-<step>/ a save in progress: never read, removed by the next run
    metrics.jsonl                each (kind, step) once, in step order (``rewind_metrics``)

A checkpoint is committed by renaming a complete folder whose manifest lists the size and SHA-256 of
every file in it, so a kill at any moment leaves the checkpoints as they were before the save or as
they are after it. On resume the newest checkpoint whose files match its manifest is used; a damaged
one is skipped with a warning naming it, and if none is intact the error lists them all.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any, Collection

import numpy as np

from flaxsst.config import TrainConfig, config_keys, load_train_config, train_config_to_yaml
from flaxsst.errors import CheckpointError, ConfigError, WorkdirError
from flaxsst.workdir import Workdir

logger = logging.getLogger("flaxsst")

MANIFEST = "MANIFEST.sha256"
META = "meta.json"
STATE = "state"
PARTIAL = ".partial-"
DELETING = ".deleting-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, text: str) -> None:
    """``path`` holds either its old content or ``text``, whatever moment the process dies."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _barrier(name: str) -> None:
    """All processes wait here for each other (nothing to wait for in a single process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def write_manifest(folder: Path) -> None:
    """``MANIFEST.sha256``: ``<sha256> <bytes> <relative path>`` for every file under ``folder``."""
    lines = [f"{_sha256(p)} {p.stat().st_size} {p.relative_to(folder).as_posix()}\n" for p in _files(folder)]
    write_atomically(folder / MANIFEST, "".join(lines))


def check_manifest(folder: Path) -> str | None:
    """``None`` if every file listed in ``folder``'s manifest is there with its size and checksum
    (and no other file is); otherwise what is wrong, naming the first bad file."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return f"{MANIFEST} is missing"
    listed: dict[str, tuple[str, int]] = {}
    for number, line in enumerate(manifest.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        parts = line.split(" ", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            return f"{MANIFEST} line {number} is damaged"
        listed[parts[2]] = (parts[0], int(parts[1]))
    present = {p.relative_to(folder).as_posix(): p for p in _files(folder)}
    for name, (digest, size) in listed.items():
        path = present.get(name)
        if path is None:
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
        if _sha256(path) != digest:
            return f"{name} does not match its checksum"
    extra = sorted(set(present) - set(listed))
    if extra:
        return f"{extra[0]} is not in the manifest"
    return None


class Checkpoints:
    """Committed train-state checkpoints under ``directory``: save, verify, restore, prune.

    Every process calls ``save`` and ``restore`` (orbax coordinates the writers); process 0 alone
    writes the meta file and the manifest, commits and prunes.
    """

    def __init__(self, directory: Path, keep: int, is_main: bool = True):
        import orbax.checkpoint as ocp

        self.directory = Path(directory).absolute()
        self.keep = keep
        self.is_main = is_main
        self._checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
        self._ocp = ocp

    def path(self, step: int) -> Path:
        return self.directory / str(step)

    def committed_steps(self) -> list[int]:
        """The steps of committed checkpoints, oldest first (intact or not)."""
        if not self.directory.is_dir():
            return []
        return sorted(int(p.name) for p in self.directory.iterdir() if p.is_dir() and p.name.isdigit())

    def remove_leftovers(self) -> None:
        """Saves and deletions a killed run left half done (process 0, holding the workdir lock)."""
        if self.is_main and self.directory.is_dir():
            for path in self.directory.iterdir():
                if path.name.startswith((PARTIAL, DELETING)):
                    shutil.rmtree(path, ignore_errors=True)

    def save(self, step: int, state: Any, meta: dict, protect: Collection[int] = ()) -> Path:
        """Write, checksum and commit the checkpoint of ``step``; then keep the newest ``keep``
        checkpoints and those in ``protect`` (the best one). -> the committed folder."""
        partial = self.directory / f"{PARTIAL}{step}"
        final = self.path(step)
        self._check_space(step, state)
        try:
            if self.is_main:
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir(parents=True)
            _barrier(f"flaxsst checkpoint {step} start")
            self._checkpointer.save(partial / STATE, state)
            if self.is_main:
                write_atomically(partial / META, json.dumps(meta, indent=2, sort_keys=True) + "\n")
                write_manifest(partial)
                if final.exists():  # the same step saved again (a rerun after a kill): the new one replaces it
                    os.replace(final, self.directory / f"{DELETING}{step}")
                os.replace(partial, final)
                _fsync_dir(self.directory)
                shutil.rmtree(self.directory / f"{DELETING}{step}", ignore_errors=True)
        except Exception as error:
            if self.is_main:
                shutil.rmtree(partial, ignore_errors=True)
            reason = "no space left on device" if "No space left" in str(error) else \
                (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            raise WorkdirError(f"cannot write checkpoint {step} to {self.directory}: {reason}; "
                               f"free the space, then rerun the same command ({self._resume_note(step)})") from None
        _barrier(f"flaxsst checkpoint {step} committed")
        if self.is_main:
            self._prune(protect)
        return final

    def _check_space(self, step: int, state: Any) -> None:
        """Refuse a save the disk cannot hold before writing a byte of it (a write that runs out of
        space midway fails inside orbax's writer threads, which log tracebacks of their own)."""
        import jax

        self.directory.mkdir(parents=True, exist_ok=True)
        needed = int(sum(np.asarray(leaf).nbytes for leaf in jax.tree_util.tree_leaves(state)) * 1.05) + (64 << 10)
        free = shutil.disk_usage(self.directory).free
        if free < needed:
            raise WorkdirError(f"cannot write checkpoint {step} to {self.directory}: no space left on the device "
                               f"({free / 2**20:.1f} MiB free, about {needed / 2**20:.1f} MiB needed); free the space, "
                               f"then rerun the same command ({self._resume_note(step)})")

    def _resume_note(self, step: int) -> str:
        previous = [s for s in self.committed_steps() if s != step]
        return f"it resumes from {self.path(previous[-1])}" if previous else "it starts over"

    def _prune(self, protect: Collection[int]) -> None:
        steps = self.committed_steps()
        keep = set(steps[-self.keep:]) | set(protect)
        for step in steps:
            if step not in keep:
                doomed = self.directory / f"{DELETING}{step}"
                os.replace(self.path(step), doomed)  # a kill mid-delete leaves no half checkpoint behind
                shutil.rmtree(doomed, ignore_errors=True)

    def verify(self, step: int) -> str | None:
        """``None`` if checkpoint ``step`` is intact; else why not."""
        return check_manifest(self.path(step))

    def latest_intact(self, warn: bool = True) -> int | None:
        """The newest intact checkpoint's step (``None`` when there is no checkpoint at all); damaged
        newer ones are skipped with a warning. All damaged: ``CheckpointError`` listing each."""
        damaged = []
        for step in reversed(self.committed_steps()):
            problem = self.verify(step)
            if problem is None:
                if damaged and warn and self.is_main:
                    logger.warning("skipped damaged checkpoints (%s); resuming from %s",
                                   "; ".join(f"{path}: {why}" for path, why in damaged), self.path(step))
                return step
            damaged.append((self.path(step), problem))
        if damaged:
            raise CheckpointError(f"every checkpoint in {self.directory} is damaged: "
                                  + "; ".join(f"{path}: {why}" for path, why in damaged)
                                  + "; move the workdir aside to start over")
        return None

    def read_meta(self, step: int) -> dict:
        return json.loads((self.path(step) / META).read_text(encoding="utf-8"))

    def restore(self, step: int, template: Any) -> tuple[Any, dict]:
        """The state of an intact checkpoint, shaped like ``template`` (host arrays), and its meta."""
        state = self._checkpointer.restore(self.path(step) / STATE,
                                           args=self._ocp.args.StandardRestore(template))
        return state, self.read_meta(step)


# ---- one run per workdir --------------------------------------------------------------------

class WorkdirLock:
    """An exclusive ``flock`` on ``workdir/.lock``, released by the OS when the holder dies (a kill
    leaves no stale lock). The file names the holder, for the error a second run prints."""

    def __init__(self, workdir: Path):
        self.path = Workdir(workdir).lock
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", "replace")
            os.close(fd)
            try:
                info = json.loads(holder)
                who = f"pid {info['pid']} on {info['host']} (started {info['started']}: {info['command']})"
            except (ValueError, KeyError, TypeError):
                who = "another process"
            raise WorkdirError(f"workdir {self.path.parent} is in use by {who}; wait for it to finish, "
                               "stop it, or use another --workdir") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None


# ---- the run's bookkeeping --------------------------------------------------------------------

# Keys a rerun may change without changing the result: how often it logs, evaluates and saves,
# how many checkpoints it keeps, where it stops early, and where it caches and runs.
RESUMABLE_KEYS = ("train.log_every_steps", "train.eval_every_steps", "train.checkpoint_every_steps",
                  "train.keep_checkpoints", "train.max_steps", "train.precompile", "data.cache_dir", "distributed.")


def _value(config: TrainConfig, key: str) -> Any:
    for part in key.split("."):
        config = getattr(config, part)
    return config


def config_differences(saved: TrainConfig, current: TrainConfig) -> list[str]:
    """``key: saved -> current`` for every key that changes the result (``RESUMABLE_KEYS`` aside);
    a mapping (``model.config``) is compared key by key."""
    differences = []
    for key in config_keys():
        old, new = _value(saved, key), _value(current, key)
        if key.startswith(RESUMABLE_KEYS) or old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            differences += [f"{key}.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
                            if old.get(k) != new.get(k)]
        else:
            differences.append(f"{key}: {old!r} -> {new!r}")
    return differences


def check_resumable(workdir: Path, config: TrainConfig) -> None:
    """A workdir with checkpoints resumes only under the config it was started with."""
    saved_path = Workdir(workdir).config
    if not saved_path.is_file():
        return
    try:
        saved = load_train_config(saved_path)
    except ConfigError as e:
        raise ConfigError(f"{saved_path} (the workdir's config) cannot be read: {e}; "
                          "restore it or use a new workdir") from None
    differences = config_differences(saved, config)
    if differences:
        raise ConfigError(f"{workdir} holds a run started with another config ({'; '.join(differences)}); "
                          "rerun with the workdir's settings (its config.yaml) or use a new --workdir")


def write_config(workdir: Path, config: TrainConfig) -> None:
    write_atomically(Workdir(workdir).config, train_config_to_yaml(config))


def rewind_metrics(path: Path, step: int) -> None:
    """Keep the records of steps up to ``step`` (those the resumed checkpoint has seen), each
    (kind, step) once (the last written) and in step order; a line torn by a kill is dropped."""
    if not path.is_file():
        return
    records: dict[tuple[str, int], str] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
            key = (str(record["kind"]), int(record["step"]))
        except (ValueError, KeyError, TypeError):
            continue
        if key[1] <= step:
            records.pop(key, None)
            records[key] = line
    ordered = sorted(records.items(), key=lambda item: item[0][1])
    write_atomically(path, "".join(line + "\n" for _, line in ordered))
