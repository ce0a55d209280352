"""The int8 dot's AVX2 inner loops alone (``bench/int8_loops.c``), one core: what a 255-level row costs
without VNNI, and the row quantization's variants. JSON lines, each loop's best and median rate.

    python -m bench.int8_loops
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from bench.cpu_peers import cpu_facts

SOURCE = Path(__file__).with_name("int8_loops.c")


def main() -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise SystemExit("int8_loops: no C compiler (cc, gcc or $CC)")
    with tempfile.TemporaryDirectory() as work:
        binary = Path(work) / "int8_loops"
        subprocess.run([compiler, "-O3", "-march=haswell", str(SOURCE), "-o", str(binary)], check=True)
        print(json.dumps({"what": "meta", **cpu_facts()}), flush=True)
        pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
        print(subprocess.run(pin + [str(binary)], capture_output=True, text=True).stdout, end="", flush=True)


if __name__ == "__main__":
    main()
