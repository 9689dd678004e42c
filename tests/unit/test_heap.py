"""The worker's garbage collector policy: collections walk only young objects, and
cycles left among frozen ones are reclaimed by a full collection."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from rtim.stream import heap


class Node:
    """An object a weak reference can watch, to hold in a reference cycle."""

    def __init__(self) -> None:
        self.other: object = None


@pytest.fixture
def policy() -> Iterator[None]:
    threshold = gc.get_threshold()
    heap.tune_gc()
    try:
        yield
    finally:
        heap.untune_gc(threshold)


def test_what_survives_a_young_collection_is_never_walked_again(policy) -> None:
    # A cache's worth of live contexts: with CPython's policy they would reach the
    # oldest generation, which a full collection walks whole.
    frozen = gc.get_freeze_count()
    cache = {f"customer-{i}": {"pages": [i], "cart": {"items": {}}} for i in range(20_000)}
    gc.collect(0)
    assert gc.get_objects(generation=1) == []
    assert gc.get_objects(generation=2) == []
    assert gc.get_freeze_count() >= frozen + 3 * len(cache)
    assert gc.get_threshold()[0] == heap.GC_YOUNG_THRESHOLD
    # Frozen objects are still freed by reference counting.
    watched = weakref.ref(cache["customer-7"]["cart"]["items"].setdefault("x", Node()))
    gc.collect(0)
    del cache
    assert watched() is None


def test_a_cycle_that_becomes_garbage_once_frozen_is_reclaimed_by_a_full_collection(
    policy,
) -> None:
    a, b = Node(), Node()
    a.other, b.other = b, a
    watched = weakref.ref(a)
    gc.collect(0)  # both survive it: frozen
    del a, b
    gc.collect(0)
    assert watched() is not None, "a young collection walked a frozen object"
    assert heap.collect_all() >= 2
    assert watched() is None
    assert gc.get_objects(generation=2) == []  # all frozen again after it


def test_untune_gives_back_cpythons_policy() -> None:
    threshold = gc.get_threshold()
    heap.tune_gc()
    heap.untune_gc(threshold)
    assert gc.get_threshold() == threshold
    assert gc.get_freeze_count() == 0
    assert all(cb is not heap._freeze_survivors for cb in gc.callbacks)
    survivor = [Node()]
    gc.collect(0)
    assert any(o is survivor for o in gc.get_objects(generation=1))  # not frozen
