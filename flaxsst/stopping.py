"""A request to stop a training run (SIGTERM, Ctrl-C, or a caller) and the error it ends the run with.

Inside the step loop a request is only remembered: the loop finishes the step, saves a checkpoint and
returns. Outside it the run ends at once, with ``Interrupted``. Python drops (and prints) an exception
raised while it runs a callback of its own (a garbage collector callback, a ``__del__``; JAX frees
buffers from one), so a request that lands there raises nothing, and ``check`` ends the run at the
next phase instead.
"""

from __future__ import annotations

import gc
from typing import Any

from flaxsst.errors import Interrupted


def _in_a_callback(frame: Any) -> bool:
    """Whether ``frame`` runs inside a garbage collector callback or a ``__del__``."""
    callbacks = {getattr(callback, "__code__", None) for callback in gc.callbacks}
    while frame is not None:
        if frame.f_code in callbacks or frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


class StopRequest:
    """Whether a stop was requested, and what ending the run for it says."""

    def __init__(self):
        self.requested = False
        self.in_loop = False  # the step loop runs: it ends at the next step boundary itself
        self.trained = False  # the loop reached the last step: what is left is the final evaluation and export
        self.last_checkpoint: str | None = None  # the last step's checkpoint, once trained

    def request(self, signum: int = 0, frame: Any = None) -> None:
        """A signal handler: remember the request; outside the loop and a callback, end the run now."""
        self.requested = True
        if not self.in_loop and not _in_a_callback(frame):
            raise self.interrupted()

    def check(self) -> None:
        """Outside the loop, end the run if a stop was requested (its exception may have been dropped)."""
        if self.requested and not self.in_loop:
            raise self.interrupted()

    def training_done(self, checkpoint: str | None) -> None:
        self.trained, self.last_checkpoint = True, checkpoint

    def interrupted(self) -> Interrupted:
        if self.trained:
            return Interrupted(f"interrupted after the last step; its checkpoint is saved in {self.last_checkpoint}, "
                               "rerun the same command to evaluate and export it")
        return Interrupted("interrupted before the first step; nothing was trained, rerun the same command")
