"""Turns of the event loop for input that waits while a batch is worked on.

A batch's core, serialisation and store writes run in the worker's one event loop;
a decision request that arrives meanwhile would wait for whatever part of them is
running. Between small parts, :func:`give_way` peeks at the loop's selector and, if
input waits, lets the loop run until what that input set going is done
(docs/architecture.md, "Core, in parts").
"""

from __future__ import annotations

import asyncio

#: Records the core handles between two looks at whether input waits: ~0.3 ms.
PEEK_CHUNK = 16
#: Most turns of the event loop given to waiting input at once.
MAX_TURNS = 6


async def give_way(loop: asyncio.AbstractEventLoop) -> None:
    """Give the event loop turns if input waits for it (a decision request, an ack), until
    what that input set going is done: a request then waits for ~0.3 ms of a batch's work,
    not for a whole part of it. (Peeks at asyncio's selector loop, whose selector is
    level-triggered: the loop still sees what the peek saw. Another loop gets no peek.)"""
    selector = getattr(loop, "_selector", None)
    if selector is None or not selector.select(0):
        return
    ready = getattr(loop, "_ready", None)
    # A request through aiohttp needs four: the read, the connection's task, the request's
    # task, its answer (through rtim/stream/fastpath.py, one).
    for _ in range(MAX_TURNS):
        await asyncio.sleep(0)
        if ready is not None and not ready:
            return  # nothing else is waiting to run
