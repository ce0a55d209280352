"""float32 CPU dots over weights packed in column panels: ``kernels/packed_dot.cc``, an XLA FFI custom call.

For the few rows of an endpoint's one-text batch, a dense layer's time is its weights' bytes streaming
from memory. XLA's and YNNPACK's dots read a ``[K, N]`` kernel as rows of ``N``; the packed kernel
reads each panel of ``lanes`` columns (16 with AVX-512, 8 with AVX2) as one contiguous run, every row
of the input consuming a pair of panels on the way. On the 36 dots of DistilBERT-base it takes
0.68-0.79x the time of the faster of XLA's and YNNPACK's dots at 1-24 rows, 0.86x at 128 and
0.94-0.99x at 384-1536 (``bench.dense_dots``, bench/RESULTS.md).

The source is compiled once per machine and jaxlib, for this CPU's instruction set (``c++ -O3
-march=native``; ``FLAXSST_PACKED_DOT_MARCH`` names another, as ``haswell`` for the AVX2 kernel), into
``kernel_dir()``, under a name of the CPU's flags: a machine with another CPU never loads it. Where
there is no compiler (and no kernel built), no AVX2 and FMA, or ``FLAXSST_PACKED_DOT=0``, ``load()``
returns None and callers keep XLA's dots; ``load(build=False)`` (the server) loads a kernel built
ahead of time and never compiles one.

A packed kernel keeps its ``[K, N]`` shape (the parameter tree is unchanged); only the order of its
floats differs: flat index ``p*K*lanes + k*lanes + j`` holds ``w[k, p*lanes + j]``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxsst.paths import cache_home

TARGET = "flaxsst_packed_dot"
INT8_TARGET = "flaxsst_int8_dot"  # flaxsst.int8's dot, in the same library
SOURCE = Path(__file__).with_name("kernels") / "packed_dot.cc"

log = logging.getLogger(__name__)


def kernel_dir() -> Path:
    """Where the compiled kernel lives: ``FLAXSST_KERNEL_DIR``, else ``~/.cache/flaxsst/kernels``."""
    return Path(os.environ.get("FLAXSST_KERNEL_DIR") or cache_home() / "kernels")


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


_LOCK = threading.Lock()
_WHY_NOT: list[str] = []  # why load() returned None, latest last
_INT8 = {"levels": 0, "pairs": False, "amx": False}  # the loaded kernel's int8 dot


def load(build: bool = True) -> int | None:
    """Register the packed dot, compiling it first (once per machine) where ``build``; its lanes, or None
    where it cannot run here (or, without ``build``, is not built for this machine yet)."""
    with _LOCK:  # two Classifiers starting at once build and register it once
        return _load(build)


@functools.cache
def _load(build: bool) -> int | None:
    if os.environ.get("FLAXSST_PACKED_DOT", "1") == "0":
        return _unavailable(logging.DEBUG, "FLAXSST_PACKED_DOT=0 turns the kernel off")
    flags = cpu_flags().split()
    if platform.machine() not in ("x86_64", "AMD64") or not {"avx2", "fma"} <= set(flags):
        return _unavailable(logging.INFO, "the kernel needs an x86-64 CPU with AVX2 and FMA")
    library = kernel_dir() / f"packed_dot-{kernel_key(flags)}.so"
    if not library.exists() and not build:
        return _unavailable(logging.INFO, f"no packed-dot kernel built for this CPU in {library.parent} "
                                          "(python -m flaxsst.serve --prepare builds it)")
    compiler = _compiler()
    if not library.exists() and not compiler:
        return _unavailable(logging.INFO, "no C++ compiler (c++, g++, clang++ or $CXX) for the packed dots")
    try:
        if not library.exists():
            library.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=library.parent) as scratch:  # complete or absent: no half-written .so
                built = Path(scratch) / library.name
                march = os.environ.get("FLAXSST_PACKED_DOT_MARCH", "native")
                subprocess.run([compiler, "-O3", f"-march={march}", "-std=c++17", "-shared", "-fPIC", "-w",
                                f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(built)],
                               check=True, capture_output=True, text=True, timeout=300)
                os.replace(built, library)
        lib = ctypes.cdll.LoadLibrary(str(library))
        lanes = int(lib.flaxsst_packed_dot_lanes())
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.flaxsst_packed_dot), platform="cpu")
        levels = int(lib.flaxsst_int8_dot_levels())
        if levels:
            jax.ffi.register_ffi_target(INT8_TARGET, jax.ffi.pycapsule(lib.flaxsst_int8_dot), platform="cpu")
        _INT8.update(levels=levels, pairs=bool(lib.flaxsst_int8_dot_pairs()), amx=bool(lib.flaxsst_int8_dot_amx()))
    except subprocess.CalledProcessError as e:
        last = (e.stderr or "").strip().splitlines()[-1:] or ["(no output)"]
        return _unavailable(logging.WARNING, f"compiling {SOURCE} failed ({last[0]})")
    except (OSError, subprocess.TimeoutExpired, AttributeError) as e:
        return _unavailable(logging.WARNING, f"the packed dots could not be loaded from {library} ({e})")
    return lanes


def _unavailable(level: int, reason: str) -> None:
    _WHY_NOT.append(reason)
    log.log(level, "%s; using XLA's dots", reason)
    return None


def unavailable_reason() -> str:
    """Why the kernel is not loaded here (after ``load`` returned None), in a few words."""
    return _WHY_NOT[-1] if _WHY_NOT else "the kernel is not loaded"


def int8_levels(build: bool = True) -> int:
    """The levels the int8 dot quantizes an input row to (255), registering it as ``load(build)`` does; 0 where
    it cannot run here."""
    return _INT8["levels"] if load(build) else 0


def int8_pairs(build: bool = True) -> bool:
    """Whether the int8 dot sums two products in int16 here (AVX2's or AVX-512BW's ``vpmaddubsw``, without VNNI),
    so that its weights are quantized with ``flaxsst.int8.quantize_kernel(pairs=True)``."""
    return _INT8["pairs"] if load(build) else False


def int8_amx(build: bool = True) -> bool:
    """Whether the int8 dot multiplies batches of 8 rows or more with AMX tiles here (a CPU with amx_int8,
    Linux granting the tiles, ``FLAXSST_INT8_AMX`` not 0); below that, and elsewhere, ``vpdpbusd``/``vpmaddubsw``."""
    return _INT8["amx"] if load(build) else False


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def kernel_key(flags: list[str]) -> str:
    """The compiled kernel's name: its source, the instruction set it targets (this CPU's flags unless
    ``FLAXSST_PACKED_DOT_MARCH``) and the jax it links against; a CPU with other flags gets its own."""
    march = os.environ.get("FLAXSST_PACKED_DOT_MARCH", "native")
    return hashlib.sha256("\n".join([SOURCE.read_text(), march, jax.ffi.include_dir(), jax.__version__,
                                     " ".join(sorted(flags))]).encode()).hexdigest()[:16]


def pack(kernel: Any, lanes: int) -> np.ndarray:
    """``kernel`` ``[K, N]`` float32 with its floats in panel order (``N`` a multiple of ``2 * lanes``)."""
    kernel = np.asarray(kernel, np.float32)
    k, n = kernel.shape
    if n % (2 * lanes):
        raise ValueError(f"a packed kernel needs N a multiple of {2 * lanes} (two panels of {lanes}); got shape {kernel.shape}")
    return np.ascontiguousarray(kernel.reshape(k, n // lanes, lanes).transpose(1, 0, 2)).reshape(k, n)


def packs(features: int, lanes: int) -> bool:
    """Whether a dense layer of ``features`` outputs runs packed: a whole number of panel pairs."""
    return lanes > 0 and features % (2 * lanes) == 0


def pack_params(params: dict, lanes: int) -> dict:
    """``params`` with every dense kernel whose outputs ``packs`` in panel order (the model built with
    ``Precision(packed_lanes=lanes)`` reads them so); everything else as it is."""

    def visit(tree):
        if isinstance(tree, dict):
            if set(tree) >= {"kernel", "bias"} and np.ndim(tree["kernel"]) == 2 and packs(np.shape(tree["kernel"])[1], lanes):
                return {**tree, "kernel": pack(tree["kernel"], lanes)}  # placed with the rest by the caller
            return {name: visit(child) for name, child in tree.items()}
        return tree

    return visit(params)


def packed_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """``nn.Dense``'s ``dot_general`` over a packed ``rhs``: ``lhs [..., K] @ rhs [K, N]`` in float32."""
    (lhs_contract, rhs_contract), batch = dimension_numbers
    if tuple(lhs_contract) != (lhs.ndim - 1,) or tuple(rhs_contract) != (0,) or any(batch) or rhs.ndim != 2:
        raise ValueError(f"packed_dot_general takes x [..., K] @ W [K, N]; got dimension numbers {dimension_numbers}")
    out = jax.ShapeDtypeStruct(lhs.shape[:-1] + rhs.shape[1:], jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(lhs.astype(jnp.float32), rhs.astype(jnp.float32))
