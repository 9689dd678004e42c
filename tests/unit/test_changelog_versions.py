"""Table recovery keeps the newest context of each customer, whatever the changelog order.

A worker that lost its partitions without knowing it can publish a context after the
new owner's newer one; recovery must not bring the older one back.
"""

from __future__ import annotations

from types import SimpleNamespace

import orjson
import pytest
from faust.types import TP

from rtim import metrics
from rtim.context.model import context_version
from rtim.settings import Settings
from rtim.stream.app import create_app
from rtim.stream.store import ContextStore


def ctx(n: int, partition: int = 1) -> bytes:
    return orjson.dumps({"n": n, "src": [partition, 100 + n]})


def event(key: bytes, value: bytes | None, offset: int, partition: int = 1) -> SimpleNamespace:
    tp = TP("rtim-customers-changelog", partition)
    message = SimpleNamespace(key=key, value=value, partition=partition, offset=offset, tp=tp)
    return SimpleNamespace(key=key, value=value, message=message)


@pytest.fixture
def table(tmp_path):
    app = create_app(Settings(store="rocksdb", datadir=tmp_path, broker="localhost:1"))
    return app.tables["customers"]


def stale_count() -> float:
    return metrics.CHANGELOG_STALE_RECORDS._value.get()


def test_an_older_context_after_a_newer_one_is_skipped_and_healed(table) -> None:
    before = stale_count()
    store = ContextStore(table)
    table.apply_changelog_batch([event(b"c1", ctx(5), 0), event(b"c2", ctx(1), 1)])
    # A zombie's late records: older than what is stored (c1) or than earlier in the batch.
    table.apply_changelog_batch(
        [event(b"c1", ctx(3), 2), event(b"c2", ctx(4), 3), event(b"c2", ctx(2), 4)]
    )
    assert store.get(1, b"c1") == ctx(5)
    assert store.get(1, b"c2") == ctx(4)
    assert stale_count() - before == 2
    # Both keys' latest changelog records are stale: their stored contexts go out again.
    heal = store.to_heal([1])
    assert heal == {1: {b"c1": ctx(5), b"c2": ctx(4)}}
    store.healed(heal)
    assert store.to_heal([1]) == {}


def test_a_newer_record_after_a_skipped_one_needs_no_healing(table) -> None:
    store = ContextStore(table)
    table.apply_changelog_batch([event(b"c1", ctx(5), 0), event(b"c1", ctx(3), 1)])
    table.apply_changelog_batch([event(b"c1", ctx(6), 2)])
    assert store.get(1, b"c1") == ctx(6)
    assert store.to_heal([1]) == {}


def test_contexts_of_another_partition_or_without_version_are_applied(table) -> None:
    store = ContextStore(table)
    table.apply_changelog_batch([event(b"c1", ctx(5), 0)])
    table.apply_changelog_batch([event(b"c1", ctx(1, partition=2), 1)])
    assert store.get(1, b"c1") == ctx(1, partition=2)
    table.apply_changelog_batch([event(b"c1", b'{"n":0,"src":null}', 2)])
    assert store.get(1, b"c1") == b'{"n":0,"src":null}'


def changed(n: int, changes: int) -> bytes:
    """A context built from ``n`` events with ``changes`` that are not events since."""
    return orjson.dumps({"n": n, "closed": changes, "src": [1, 100 + n, changes]})


def test_of_two_contexts_from_the_same_events_the_one_changed_since_is_kept(table) -> None:
    """The new owner closed a window (or joined a response) on a customer whose last
    event a paused worker had also applied: the paused worker's late record, built from
    the same events without that change, does not bring the closed window back."""
    store = ContextStore(table)
    table.apply_changelog_batch([event(b"c1", ctx(5), 0), event(b"c1", changed(5, 1), 1)])
    table.apply_changelog_batch([event(b"c1", ctx(5), 2)])  # the zombie's, late
    assert store.get(1, b"c1") == changed(5, 1)
    assert store.to_heal([1]) == {1: {b"c1": changed(5, 1)}}
    # A newer event still wins over any number of changes before it.
    table.apply_changelog_batch([event(b"c1", ctx(6), 3), event(b"c1", changed(5, 9), 4)])
    assert store.get(1, b"c1") == ctx(6)


def test_context_version_reads_src_of_any_stored_context() -> None:
    assert context_version(ctx(7)) == (1, 107, 0)
    assert context_version(changed(7, 3)) == (1, 107, 3)
    assert context_version(b'{"src":[2,9],"n":1}') == (2, 9, 0)  # another field order
    assert context_version(b'{"src":[2,9,4],"n":1}') == (2, 9, 4)
    assert context_version(b'{"traits":{"src":[1,9]},"src":null}') is None
    assert context_version(b"not json") is None


def test_a_distrusted_partition_is_recovered_from_the_start(table) -> None:
    store = ContextStore(table)
    tp = TP("rtim-customers-changelog", 1)
    table.apply_changelog_batch([event(b"c1", ctx(5), 7), event(b"c2", ctx(5, 2), 8, 2)])
    table.app.tables.recovery.active_offsets[tp] = 7  # where its last recovery stopped
    assert table.data.persisted_offset(tp) == 7
    store.distrust([1])
    assert store.get(1, b"c1") is None and table.data.persisted_offset(tp) is None
    assert tp not in table.app.tables.recovery.active_offsets
    assert store.get(2, b"c2") == ctx(5, 2)  # other partitions keep theirs
