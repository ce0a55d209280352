"""Process-wide JAX set-up: a quiet start on machines without a TPU, the persistent compilation
cache, and XLA's slow-compile banner kept off the console.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import threading
from typing import Iterator

GOOGLE_PCI_VENDOR = "0x1ae0"  # the vendor id TPU chips show on the PCI bus


def tpu_chips_present() -> bool:
    """Whether this machine has TPU chips (a Google PCI device, or the TPU driver's device files)."""
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor, encoding="ascii") as f:
                if f.read().strip() == GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def quiet_tpu_runtime(accelerator_type: str = "v5litepod-4") -> None:
    """With ``libtpu`` installed (the ``tpu`` extra) on a machine without TPU chips, JAX's first
    device query loads libtpu, which prints several lines of start-up errors before JAX falls back
    to the CPU or GPU, and takes a lock that stops a second JAX process from loading it. Naming an
    accelerator type and a host list (as a TPU VM's metadata would) keeps it quiet, and with no chips
    to share the lock is not needed; on a TPU VM, or where the user set them, nothing changes. Call
    before JAX initialises its backends."""
    if tpu_chips_present():
        return
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    if not os.environ.get("JAX_PLATFORMS") and not other_pjrt_plugins():
        # The CPU is the only backend there is: skip loading libtpu (~0.4 s of every start) at all.
        # Compiling for a slice (flaxsst.aot) loads libtpu through its topology API all the same.
        os.environ["JAX_PLATFORMS"] = "cpu"


def other_pjrt_plugins() -> list[str]:
    """The JAX PJRT plugins installed (CUDA, ROCm, ...; libtpu is not one): where any is, the set of
    backends is left to JAX, since naming one that cannot start would be an error."""
    import importlib.util
    import pkgutil
    from importlib.metadata import entry_points

    names = [entry.value for entry in entry_points(group="jax_plugins")]
    spec = importlib.util.find_spec("jax_plugins")
    if spec is not None and spec.submodule_search_locations:
        names += [name for _, name, _ in pkgutil.iter_modules(spec.submodule_search_locations)]
    return names


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache, so a second process skips compiles
    (``FLAXSST_COMPILATION_CACHE=0`` turns it off; ``FLAXSST_CACHE_DIR`` moves it)."""
    import jax

    if os.environ.get("FLAXSST_COMPILATION_CACHE", "1") == "0" or getattr(jax.config, "jax_compilation_cache_dir", None):
        return
    from flaxsst.paths import cache_home

    cache_dir = os.environ.get("FLAXSST_CACHE_DIR", str(cache_home() / "jax"))
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    # every DistilBERT-base inference program (~0.5 s each on a CPU) is kept, so a server restarts warm
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)


# XLA logs this block from C++ (straight to file descriptor 2) when a compile takes over two
# minutes; the command lines say what they compile themselves.
SLOW_COMPILE_BANNER = re.compile(rb"slow_operation_alarm|Very slow compile\?|^\s*\*{8,}\s*$")


@contextlib.contextmanager
def without_slow_compile_banner() -> Iterator[None]:
    """Inside: every line written to file descriptor 2 passes through a filter that drops XLA's
    slow-compile banner; everything else reaches the terminal unchanged."""
    import sys

    sys.stderr.flush()
    terminal = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            pending = b""
            while chunk := pipe.read(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if not SLOW_COMPILE_BANNER.search(line):
                        os.write(terminal, line + b"\n")
            if pending and not SLOW_COMPILE_BANNER.search(pending):
                os.write(terminal, pending)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(terminal, 2)  # closes the pipe's last write end: the pump reads to the end and stops
        thread.join(timeout=10)
        os.close(terminal)


def release_free_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's ``malloc_trim``): a server's warm-up leaves
    hundreds of MB of freed compiler and tracing garbage that would otherwise count in its resident size."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: its allocator keeps its own policy
        pass
