"""Direct access to the context table's store, a batch at a time.

Faust's table API writes one key per event and needs the current event's
partition (docs/architecture.md, "Why Faust's consumer is subclassed"). RTIM
writes a batch's contexts itself: one RocksDB ``WriteBatch`` per partition,
plus the changelog offset Faust's recovery resumes from (what
``Store.apply_changelog_batch`` does during recovery). For the memory store it
updates the store's dict. Reads go to the partition's database directly, as the
key's partition is known.

:class:`ContextTable` is the table whose recovery keeps the newest context of each
key (docs/architecture.md, "Zombie writers").
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any

import faust
import rocksdict
from faust.stores.rocksdb import Store as RocksDBStore
from faust.types import TP

from rtim import metrics
from rtim.context.model import context_version

log = logging.getLogger(__name__)


def _stored(store: Any, partition: int, key: bytes) -> bytes | None:
    if isinstance(store, RocksDBStore):
        value: bytes | None = store._db_for_partition(partition).get(key)
        return value
    return store.data.get(key)


class ContextTable(faust.Table):
    """The context table, whose recovery keeps the newest context of each customer.

    Faust's recovery applies changelog records in changelog order, the last one
    winning. A worker that lost its partitions without knowing it yet (paused or
    cut off past its session timeout) can write records after the new owner's,
    built from fewer events; the ordinary order would then bring back an old
    context, or one built from the same events without what the new owner changed
    since (a window closed, a response joined). Each context carries how far it was
    built (``src``, :func:`~rtim.context.model.context_version`), so a record older than what is
    already stored for its key is skipped (``rtim_changelog_stale_records_total``).
    Compaction on Kafka would keep such a record as the latest of its key: the keys
    whose latest record was skipped are kept in :attr:`stale` until the processor
    publishes their stored context again (:meth:`ContextStore.to_heal`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Per changelog partition, keys whose latest changelog record is stale.
        self.stale: dict[int, set[bytes]] = {}
        #: Awaited with the new assignment before the table's recovery is told of it
        #: (exactly-once processing starts its producers there, fencing earlier owners).
        self.before_recovery: Callable[[set[TP]], Awaitable[None]] | None = None

    async def on_rebalance(
        self, assigned: set[TP], revoked: set[TP], newly_assigned: set[TP], generation_id: int = 0
    ) -> None:
        # Faust's TableManager calls this for every table, then starts the recovery.
        if self.before_recovery is not None:
            await self.before_recovery(assigned)
        await super().on_rebalance(assigned, revoked, newly_assigned, generation_id)

    def apply_changelog_batch(self, batch: Iterable[Any]) -> None:
        data = self.data
        newest: dict[bytes, tuple[int, int, int] | None] = {}
        fresh = []
        skipped = 0
        for event in batch:
            message = event.message
            key, partition = message.key, message.partition
            version = None if message.value is None else context_version(message.value)
            if key in newest:
                current = newest[key]
            else:
                raw = _stored(data, partition, key)
                current = None if raw is None else context_version(raw)
            if (
                version is not None
                and current is not None
                and version[0] == current[0]
                and version[1:] < current[1:]
            ):
                skipped += 1
                self.stale.setdefault(partition, set()).add(key)
                continue
            newest[key] = version
            stale = self.stale.get(partition)
            if stale:
                stale.discard(key)
            fresh.append(event)
        if skipped and isinstance(data, RocksDBStore):
            # (A memory store is recovered again from where its last recovery stopped,
            # which replays this worker's own writes since: older than what it holds.)
            metrics.CHANGELOG_STALE_RECORDS.inc(skipped)
            log.warning(
                "table recovery skipped %d changelog records older than the stored contexts "
                "(written late by a worker that had lost its partitions)",
                skipped,
            )
        super().apply_changelog_batch(fresh)


class ContextStore:
    """Reads and batch-writes serialised contexts in a Faust table's store."""

    def __init__(self, table: Any) -> None:
        self.table = table
        self._count: int | None = None

    @property
    def _store(self) -> Any:
        return self.table.data

    @property
    def durable(self) -> bool:
        # (Every Faust store has set_persisted_offset; the memory store's does nothing.)
        return isinstance(self._store, RocksDBStore)

    def get(self, partition: int, key: bytes) -> bytes | None:
        return _stored(self._store, partition, key)

    def items(
        self, partition: int, partition_of: Callable[[bytes], int]
    ) -> Iterator[tuple[bytes, bytes]]:
        """The stored contexts of one partition (``partition_of``: a key's partition,
        for the memory store, which keeps every partition in one dict)."""
        store = self._store
        if not self.durable:
            for key, value in list(store.data.items()):
                if partition_of(key) == partition:
                    yield key, value
            return
        for key, value in store._db_for_partition(partition).items():
            if not key.startswith(b"__faust"):
                yield key, value

    def write(self, partition: int, items: dict[bytes, bytes], changelog_offset: int) -> None:
        """Write a batch of contexts, all already in the changelog up to ``changelog_offset``."""
        store = self._store
        if not self.durable:
            store.data.update(items)
            return
        batch = rocksdict.WriteBatch(raw_mode=True)
        for key, value in items.items():
            batch.put(key, value)
        store._db_for_partition(partition).write(batch)
        store.set_persisted_offset(
            TP(self.table.changelog_topic.get_topic_name(), partition), changelog_offset
        )

    def distrust(self, partitions: Iterable[int]) -> None:
        """Discard what is stored for these partitions: the next recovery rebuilds them
        from the whole changelog.

        For partitions whose records this worker published without being sure it
        still owned them: what it stored for them may miss another owner's records,
        and its persisted offset may be past them. Rebuilt from empty, a record
        recovery skips is one older than an earlier record of its key. (The memory
        store keeps what it has: without a persisted offset it is recovered from the
        start or from where its last recovery stopped, and keeps the newest context.)
        """
        store = self._store
        if self.durable:
            changelog = self.table.changelog_topic.get_topic_name()
            # Faust's recovery resumes a partition it keeps from where it last read,
            # unless a persisted offset says otherwise: make it read from the start.
            read = self.table.app.tables.recovery.active_offsets
            for partition in partitions:
                read.pop(TP(changelog, partition), None)
                db = store._db_for_partition(partition)
                batch = rocksdict.WriteBatch(raw_mode=True)
                keys = db.keys()  # (iterating an Rdict yields pairs); the offset key too
                for key in keys:
                    batch.delete(key)
                db.write(batch)

    def to_heal(self, partitions: Iterable[int]) -> dict[int, dict[bytes, bytes]]:
        """The stored contexts whose latest changelog record recovery found stale.

        Published again, they make the changelog's latest record of each key the
        newest context again (what compaction keeps, what a fresh recovery ends with).
        """
        stale: dict[int, set[bytes]] = getattr(self.table, "stale", {})
        out: dict[int, dict[bytes, bytes]] = {}
        for partition in partitions:
            for key in stale.get(partition, ()):
                value = self.get(partition, key)
                if value is not None:
                    out.setdefault(partition, {})[key] = value
        return out

    def healed(self, contexts: Mapping[int, Mapping[bytes, bytes]]) -> None:
        """These contexts are in the changelog again as their key's latest record."""
        stale: dict[int, set[bytes]] = getattr(self.table, "stale", {})
        for partition, items in contexts.items():
            stale.get(partition, set()).difference_update(items)

    def recount(self) -> None:
        """Forget the customer count; the next :meth:`size` counts the store again.

        Called after a rebalance, when recovery may have changed the store.
        """
        self._count = None

    def added(self, n: int) -> None:
        """``n`` customers were stored for the first time."""
        if self._count is not None:
            self._count += n

    def size(self) -> float:
        """Number of customers in this worker's store (counted once per assignment)."""
        if self._count is None:
            store = self._store
            if not self.durable:
                self._count = len(store.data)
            else:
                total = 0
                for db in list(store._dbs.values()):
                    try:
                        # keys(): iterating an Rdict itself yields (key, value) pairs.
                        keys = db.keys()
                        total += sum(1 for key in keys if not key.startswith(b"__faust"))
                    except Exception:  # a db closed during a rebalance
                        continue
                self._count = total
        return float(self._count)
