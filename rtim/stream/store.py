"""Direct access to the context table's store, a batch at a time.

Faust's table API writes one key per event and needs the current event's
partition (docs/architecture.md, "Why Faust's consumer is subclassed"). RTIM
writes a batch's contexts itself: one RocksDB ``WriteBatch`` per partition,
plus the changelog offset Faust's recovery resumes from (what
``Store.apply_changelog_batch`` does during recovery). For the memory store it
updates the store's dict. Reads go to the partition's database directly, as the
key's partition is known.
"""

from __future__ import annotations

from typing import Any

import rocksdict
from faust.stores.rocksdb import Store as RocksDBStore
from faust.types import TP


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
        store = self._store
        if self.durable:
            return store._db_for_partition(partition).get(key)
        return store.data.get(key)

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
