"""The worker's garbage collector policy: short pauses whatever the cache holds.

CPython's cyclic collector stops every thread while it walks the objects of the
generations it collects. A worker holds most of its objects for long (up to
``RTIM_CACHE_CUSTOMERS`` decoded contexts, Faust's and river's state), and with
CPython's policy those objects reach the oldest generation, which a full
collection walks whole: 80-90 ms with the 5,000 customers of ``rtim bench --api``
(and growing with the cache), plus 10-35 ms collections of the middle
generation, each a stall of every decision request that arrives meanwhile.

The policy (:func:`tune_gc`): what is alive when the worker starts is frozen
(``gc.freeze``: moved to a generation no collection walks), young collections
run every :data:`GC_YOUNG_THRESHOLD` container allocations, and whatever
survives one is frozen as soon as it ends. So a collection walks only the
objects made since the last one: 1.5-2 ms, however large the cache. Objects in
the frozen generation are still freed by reference counting when the last
reference goes (a context evicted from the cache, a model swapped out); only
reference cycles that become garbage once frozen are left to
:func:`collect_all`, which a new consumer generation runs (the cache has just
been emptied then, and processing waits for the rebalance anyway). RTIM's own
data holds no cycles; in ``rtim bench --api``, three full collections 10 s
apart under load found no unreachable object.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)

#: Container allocations (less deallocations) between two young collections (CPython's
#: default is 700). Each walks about that many objects: 5,000 keeps it at 1.5-2 ms on
#: the bench's worker (10,000: 3.5 ms; 50,000: up to 18 ms).
GC_YOUNG_THRESHOLD = 5_000


def _freeze_survivors(phase: str, info: dict[str, int]) -> None:
    """A ``gc.callbacks`` entry: once a collection ends, what it left is frozen."""
    if phase == "stop":
        gc.freeze()  # (splices the generations' lists: constant time)


def tune_gc() -> None:
    """Set the worker's policy (once per process) and start from a full collection."""
    if _freeze_survivors not in gc.callbacks:
        gc.callbacks.append(_freeze_survivors)
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)
    collect_all()


def untune_gc(threshold: tuple[int, int, int]) -> None:
    """Back to CPython's own policy with ``threshold`` (after a measurement)."""
    if _freeze_survivors in gc.callbacks:
        gc.callbacks.remove(_freeze_survivors)
    gc.unfreeze()
    gc.set_threshold(*threshold)


def collect_all() -> int:
    """A full collection of every object, frozen ones too, then all frozen again; the
    number of unreachable objects found (reference cycles that became garbage)."""
    started = time.perf_counter()
    gc.unfreeze()
    found = gc.collect()
    gc.freeze()
    log.debug(
        "full garbage collection: %d unreachable objects, %.1f ms",
        found,
        (time.perf_counter() - started) * 1000,
    )
    return found
