"""Signal handlers installed for the length of a ``with`` block, and restored after it.

The trainer (a stop request), the server (a drain) and the streaming predict command (SIGTERM as
Ctrl-C) each take SIGTERM and SIGINT while they run; Python lets only the main thread install a
handler, so elsewhere (a test's thread, a library caller's worker) the block runs with the
process's handlers as they are.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Callable, Iterable, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def handling(handler: Callable[[int, Any], None], signals: Iterable[int] = STOP_SIGNALS) -> Iterator[bool]:
    """``handler(signum, frame)`` for ``signals`` inside the block; yields whether it was installed
    (only the main thread can)."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield True
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def as_ctrl_c(signum: int, frame: Any) -> None:
    """A handler that ends the program as Ctrl-C does, through its ``finally`` blocks."""
    raise KeyboardInterrupt
