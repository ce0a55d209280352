"""Compiled inference programs kept on disk as executables, loaded without tracing or compiling.

JAX's persistent compilation cache still traces and lowers a function before it finds the program
(0.3-0.5 s a DistilBERT-base program on a 2-core CPU); a stored executable
(``jax.experimental.serialize_executable``) loads in ~0.08 s, so a restarted server is ready in
seconds. A program is stored under a key of everything that makes it: the model's config and
parameter shapes, the compute precision, the batch shape, the flaxsst source, the jax and jaxlib
versions, the platform and this CPU's model and instruction-set flags, and ``XLA_FLAGS``. A
machine with another CPU (a shared volume, an image built elsewhere) finds no program under its
key and compiles its own: it never loads code built for another CPU. An entry that cannot be read
or loaded is compiled again and replaced, with one log line.

``FLAXSST_PROGRAM_DIR`` moves the store (default ``programs/`` in the flaxsst cache);
``FLAXSST_PROGRAM_STORE=0`` turns it off. A stored program is machine code that runs when it loads:
keep the store in a folder only its user (or the image's build) writes, as with any cache of binaries.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import pickle
import platform
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax

from flaxsst.paths import cache_home

log = logging.getLogger(__name__)
SOURCE = Path(__file__).resolve().parent


def store_dir() -> Path:
    return Path(os.environ.get("FLAXSST_PROGRAM_DIR") or cache_home() / "programs")


def enabled() -> bool:
    return os.environ.get("FLAXSST_PROGRAM_STORE", "1") != "0"


def cpu_identity() -> str:
    """This CPU's model name and instruction-set flags (``/proc/cpuinfo``), or the platform's words."""
    model, flags = "", ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return f"{platform.machine()} {model or platform.processor()} {flags}"


@functools.cache
def source_digest() -> str:
    """A digest of the package's Python and kernel source: a changed model is a new program."""
    digest = hashlib.sha256()
    for path in sorted([*SOURCE.rglob("*.py"), *SOURCE.rglob("*.cc")]):
        digest.update(path.relative_to(SOURCE).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def program_key(model: dict[str, Any]) -> str:
    """The store's folder name for programs of ``model`` (a JSON-able description of what is compiled)
    on this machine and software."""
    import jaxlib

    device = jax.devices()[0]
    facts = {"model": model, "source": source_digest(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
             "platform": device.platform, "device": getattr(device, "device_kind", ""), "cpu": cpu_identity(),
             "xla_flags": os.environ.get("XLA_FLAGS", "")}
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:24]


class ProgramStore:
    """The executables of one model on this machine, one file per batch shape, under ``folder/key``."""

    def __init__(self, key: str, folder: Path | None = None):
        self.folder = (folder or store_dir()) / key
        self.unwritable = False  # one warning for a store that cannot be written, not one per program

    def path(self, rows: int, length: int) -> Path:
        return self.folder / f"{rows}x{length}.xla"

    def load(self, rows: int, length: int) -> Callable | None:
        """The stored executable of a ``rows`` x ``length`` batch, or None (absent or unloadable)."""
        from jax.experimental.serialize_executable import deserialize_and_load

        path = self.path(rows, length)
        try:
            with open(path, "rb") as f:
                payload, in_tree, out_tree = pickle.load(f)
            return deserialize_and_load(payload, in_tree, out_tree, execution_devices=jax.devices()[:1])
        except FileNotFoundError:
            return None
        except Exception as e:  # a damaged or foreign file: compiled again and replaced
            log.warning("stored program %s cannot be loaded (%s: %s); compiling it again", path, type(e).__name__,
                        str(e).splitlines()[0][:200] if str(e) else "")
            return None

    def save(self, rows: int, length: int, compiled: Any) -> None:
        """Write ``compiled`` atomically (complete or absent); a store that cannot be written is one warning.
        ``compiled`` must come from a compile that bypassed JAX's persistent cache: an executable that
        cache hands back serializes without its kernels' code (it loads, then fails with "Function ...
        not found")."""
        from jax.experimental.serialize_executable import serialize

        path = self.path(rows, length)
        try:
            data = pickle.dumps(serialize(compiled))
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
                f.write(data)
            os.replace(f.name, path)
        except Exception as e:  # a read-only image or a full disk: serving goes on, the next start compiles
            if not self.unwritable:
                log.warning("cannot store the program %s (%s); the next start compiles these programs again",
                            path, e)
            self.unwritable = True
