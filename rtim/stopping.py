"""The signals that stop RTIM's commands, handled on the running event loop.

A handler set with the loop applies whatever the process inherited: a script's
background job starts with SIGINT ignored, and Python then leaves Ctrl-C ignored
(``asyncio.run`` cancels its task on SIGINT only where Python's own handler is in
place), so a command meant to stop cleanly on it sets its handler here.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator

#: Signals that end a command in order (SIGINT: Ctrl-C; SIGHUP: the terminal closed).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def on_signals(callback: Callable[[], object]) -> Iterator[None]:
    """Call ``callback`` on each of :data:`STOP_SIGNALS` while in the block (in the running
    event loop); their default handling is back after it."""
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, callback)
    try:
        yield
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
