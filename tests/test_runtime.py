"""Process-wide set-up: XLA's slow-compile banner kept off the console, nothing else lost."""

import subprocess
import sys

BANNER = (b"2026-11-23 06:23:03.016556: E external/xla/xla/service/slow_operation_alarm.cc:73] \n"
          b"********************************\n"
          b"[Compiling module jit_step] Very slow compile? If you want to file a bug, run with envvar "
          b"XLA_FLAGS=--xla_dump_to=/tmp/foo and attach the results.\n"
          b"********************************\n"
          b"2026-11-23 06:24:05.368570: E external/xla/xla/service/slow_operation_alarm.cc:140] The operation took 3m2.369747s\n")

PROGRAM = f"""
import os, sys
from flaxsst.runtime import without_slow_compile_banner
with without_slow_compile_banner():
    os.write(2, b"before\\n")
    os.write(2, {BANNER!r})
    print("from python", file=sys.stderr)
    os.write(2, b"after, no newline")
os.write(2, b"\\noutside\\n")
"""


def test_the_slow_compile_banner_is_dropped_and_every_other_line_passes_in_order():
    result = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == b"before\nfrom python\nafter, no newline\noutside\n"
