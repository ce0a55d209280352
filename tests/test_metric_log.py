"""The console of a run: the time left after a resume, and progress on a terminal that reports no width."""

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

from flaxsst.metric_log import Console
from tests.commands import ROOT


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_the_first_eta_after_a_resume_is_the_pace_of_the_resumed_steps(capsys):
    clock = FakeClock()
    console = Console(start=189, end=252, enabled=True, clock=clock)  # stderr is not a terminal: lines
    clock.now = 100.0  # the first resumed step also places the state and warms up
    console.step()
    for _ in range(10):  # then a step a second
        clock.now += 1.0
        console.step()
    console.log(200, {"loss": 0.5, "accuracy": 0.8, "learning_rate": 1e-3, "examples_per_sec": 100.0})
    console.close()
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert line.startswith("step 200/252") and line.endswith("elapsed 0:01:50  ETA 0:00:52"), line


CHILD = """
import sys
from flaxsst.metric_log import Console
console = Console(start=0, end=4, enabled=True)
for step in range(1, 5):
    console.step()
    console.log(step, {"loss": 0.5, "accuracy": 0.8, "learning_rate": 1e-3, "examples_per_sec": 100.0})
console.close()
"""


def test_progress_reaches_a_terminal_that_reports_zero_columns():
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 0, 0, 0))  # rows 24, columns 0
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "COLUMNS")}
    process = subprocess.Popen([sys.executable, "-c", CHILD], cwd=ROOT, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=follower, env=env)
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    assert process.wait(timeout=120) == 0, output.decode(errors="replace")
    text = output.decode(errors="replace")
    assert [line.split()[1] for line in text.splitlines() if line.startswith("step ")] == ["1/4", "2/4", "3/4", "4/4"], text
