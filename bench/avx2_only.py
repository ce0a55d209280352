"""Run a command on this CPU as an AVX2 + FMA machine without AVX-512, VNNI or AMX would run it.

    python -m bench.avx2_only -- python -m bench.cpu_peers --tokenizer-dir ... --texts ...

For the AVX2 figures on a machine that has more: ``bench/avx2_only.c``, preloaded into the command's
processes, makes CPUID fault (Linux, CPUs with the ``cpuid_fault`` flag) and answers it with AVX-512,
AVX-512/AVX VNNI, BF16/FP16 and AMX cleared, so XLA, ONNX Runtime, oneDNN (PyTorch) and the project's
kernel all choose their AVX2 code. Before that, the project's kernel is built for ``haswell`` (AVX2, FMA)
without the preload, since a compiler's own fault handler cannot answer CPUID; the command gets
``FLAXSST_PACKED_DOT_MARCH=haswell`` and a ``FLAXSST_HOME`` of its own (programs compiled for this
CPU's full set must not be loaded), and ``FLAXSST_BENCH_CPU_NOTE`` for the benches' meta line.

It is the same core, caches and memory: an AVX2-only CPU of another make (an AMD EPYC) differs in
those. The figures say which ISA each runner used, not what another machine measures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("avx2_only.c")
NOTE = "AVX-512, VNNI and AMX hidden by CPUID faulting (bench/avx2_only.py): AVX2 + FMA code paths"


def cpuid_faulting() -> bool:
    try:
        return "cpuid_fault" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def build(folder: Path) -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise SystemExit("avx2_only: no C compiler (cc, gcc or $CC) to build bench/avx2_only.c")
    library = folder / "avx2_only.so"
    subprocess.run([compiler, "-O2", "-shared", "-fPIC", str(SOURCE), "-o", str(library)], check=True)
    return library


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", help="FLAXSST_HOME for the command (default: a new temporary folder)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("name a command after --")
    if not cpuid_faulting():
        raise SystemExit("avx2_only: this CPU has no cpuid_fault flag in /proc/cpuinfo; CPUID cannot be answered")
    work = Path(tempfile.mkdtemp(prefix="avx2_only_"))
    env = dict(os.environ, FLAXSST_PACKED_DOT_MARCH="haswell", FLAXSST_HOME=args.home or str(work / "home"),
               FLAXSST_BENCH_CPU_NOTE=NOTE)
    env.pop("FLAXSST_KERNEL_DIR", None)
    env.pop("FLAXSST_CACHE_DIR", None)
    # the kernel, built without the preload: a compiler's cc1 handles SIGSEGV itself
    subprocess.run([sys.executable, "-c", "from flaxsst import packed_dot; import sys; "
                    "sys.exit(0 if packed_dot.load() else 'avx2_only: the haswell kernel did not build')"],
                   env=env, check=True)
    env["LD_PRELOAD"] = " ".join(filter(None, [str(build(work)), os.environ.get("LD_PRELOAD")]))
    check = ("import ctypes, sys\n"
             "from flaxsst import packed_dot\n"
             "lanes, pairs, amx = packed_dot.load(build=False), packed_dot.int8_pairs(), packed_dot.int8_amx()\n"
             "if (lanes, pairs, amx) != (8, True, False):\n"
             "    sys.exit(f'avx2_only: the kernel runs {lanes} lanes, int16 pairs {pairs}, amx {amx}: '\n"
             "             'not the AVX2 build')\n")
    subprocess.run([sys.executable, "-c", check], env=env, check=True)
    try:
        sys.exit(subprocess.run(command, env=env).returncode)
    finally:
        if args.home is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
