"""The live catalog in the worker: every version read from ``rtim.offers``, swapped in.

Data flow (docs/architecture.md, "The live catalog")::

    rtim offers apply FILE --(checked; version = previous + 1)--> rtim.offers (one key)
    rtim.offers --(its one partition, from the start, no group)--> LiveCatalog
      --> Engine.set_catalog, under the processor's lock (between two batches)

The record formats are in :mod:`rtim.offers.live`. A worker decides with the file
it started with until it has read the topic up to the end it had when the worker
started (:attr:`LiveCatalog.loaded`; the clickstream waits for it), then with the
newest catalog it could load.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import ConsumerStoppedError, KafkaError
from mode import Service

from rtim import metrics
from rtim.names import OFFERS_TOPIC
from rtim.offers.catalog import Catalog, CatalogError
from rtim.offers.live import (
    CATALOG_KEY,
    CatalogVersion,
    decode_catalog,
    encode_catalog,
    previous_version,
)
from rtim.settings import KafkaConnection
from rtim.stream.endoffsets import EndOffsetProbe, stop_consumer
from rtim.stream.models import Throttled

log = logging.getLogger("rtim.catalog")

#: The one partition of rtim.offers.
OFFERS_TP = TopicPartition(OFFERS_TOPIC, 0)
#: Seconds each client gets to stop at shutdown.
STOP_TIMEOUT = 3.0
#: Seconds the clickstream waits for rtim.offers to be read at start; then it is decided
#: with the catalog in force (the newest version is swapped in once read).
LOAD_TIMEOUT_S = 30.0


class LiveCatalog(Service):
    """Reads ``rtim.offers`` from the start and hands each loadable catalog to ``swap``.

    Parameters
    ----------
    kafka
        The connection.
    client_id
        Its consumer's client id.
    current
        The catalog in force at start (the file, version 0).
    swap
        ``await swap(catalog)`` puts a catalog in force (between batches).
    loaded
        The event to set once the topic is read (cleared when the service starts).
    """

    def __init__(
        self,
        kafka: KafkaConnection,
        *,
        client_id: str,
        current: CatalogVersion,
        swap: Callable[[Catalog], Awaitable[None]],
        loaded: asyncio.Event | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.kafka = kafka
        self.client_id = client_id
        self.current = current
        self._swap = swap
        #: Set once the topic was read up to its end as it was at the start.
        self.loaded = loaded if loaded is not None else asyncio.Event()
        self.read_to = 0
        self._progress = asyncio.Event()
        self._reader: AIOKafkaConsumer | None = None
        self._probe = EndOffsetProbe(kafka)
        self._bad = Throttled(log)
        metrics.CATALOG_VERSION.set(current.version)

    async def on_start(self) -> None:
        self.loaded.clear()

    @Service.task
    async def _read(self) -> None:
        reader = self._reader = AIOKafkaConsumer(
            **self.kafka.client_config(),
            client_id=self.client_id,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=200,
        )
        delay = 0.5
        while not self.should_stop:
            try:
                await reader.start()
                break
            except KafkaError as exc:
                log.warning("catalog reader not started (%r); retrying in %.1f s", exc, delay)
                await self.sleep(delay)
                delay = min(delay * 2, 5.0)
        reader.assign([OFFERS_TP])
        await reader.seek_to_beginning(OFFERS_TP)
        while not self.should_stop:
            try:
                fetched = await reader.getmany(OFFERS_TP, timeout_ms=500)
            except (KafkaError, ConsumerStoppedError) as exc:
                if not self.should_stop:
                    log.warning("reading %s failed (%r); retrying", OFFERS_TOPIC, exc)
                    await self.sleep(1.0)
                continue
            records = fetched.get(OFFERS_TP, [])
            if records:
                await self.take(records)
                self.read_to = records[-1].offset + 1
                self._progress.set()

    async def take(self, records: list[Any]) -> None:
        """Put the newest loadable catalog among ``records`` in force (older ones of the
        same fetch would be replaced at once)."""
        newest: tuple[CatalogVersion, Catalog] | None = None
        for rec in records:
            if rec.key != CATALOG_KEY:
                continue  # (no other key is written; a stray one is not a catalog)
            try:
                newest = decode_catalog(rec.value, rec.offset)
            except CatalogError as exc:
                metrics.CATALOG_REJECTED.inc()
                self._bad.warning(
                    "%s@%d refused, catalog version %d stays in force: %s",
                    OFFERS_TOPIC,
                    rec.offset,
                    self.current.version,
                    exc,
                )
        if newest is None:
            return
        version, catalog = newest
        await self._swap(catalog)
        self.current = version
        metrics.CATALOG_VERSION.set(version.version)
        log.info(
            "catalog version %d in force (%d triggers, %d offers, %d placements; applied by %s)",
            version.version,
            len(catalog.triggers),
            len(catalog.offers),
            len(catalog.placements),
            version.by,
        )

    @Service.task
    async def _watchdog(self) -> None:
        try:
            await asyncio.wait_for(self.loaded.wait(), LOAD_TIMEOUT_S)
        except TimeoutError:
            log.warning(
                "%s not read within %.0f s: deciding with catalog version %d (%s) until it is",
                OFFERS_TOPIC,
                LOAD_TIMEOUT_S,
                self.current.version,
                self.current.source,
            )
            self.loaded.set()

    @Service.task
    async def _load(self) -> None:
        delay = 0.5
        while not self.should_stop:
            try:
                async with asyncio.timeout(15.0):
                    end = (await self._probe.end_offsets([OFFERS_TP]))[OFFERS_TP]
                break
            except (KafkaError, TimeoutError) as exc:
                log.warning("end offset of %s not known (%r); retrying", OFFERS_TOPIC, exc)
                await self.sleep(delay)
                delay = min(delay * 2, 5.0)
        else:
            return
        await self._probe.stop()
        while self.read_to < end and not self.should_stop:
            self._progress.clear()
            await self.wait_first(self._progress.wait(), timeout=1.0)
        self.loaded.set()

    async def on_stop(self) -> None:
        await self._probe.stop()
        if self._reader is not None:
            await stop_consumer(self._reader, STOP_TIMEOUT)


async def apply_catalog(
    kafka: KafkaConnection | str, text: str, *, by: str, timeout: float = 30.0
) -> int:
    """Publish a checked catalog's text as the next version; returns that version.

    The version is the newest record's plus one (two applies at the same moment may
    both take the same number: the one published last is in force everywhere).
    """
    connection = KafkaConnection.parse(kafka)
    async with asyncio.timeout(timeout):
        version = await _newest_version(connection) + 1
        producer = AIOKafkaProducer(**connection.client_config(), acks="all")
        await producer.start()
        try:
            value = encode_catalog(text, version=version, by=by, at_ms=int(time.time() * 1000))
            await producer.send_and_wait(OFFERS_TOPIC, value, key=CATALOG_KEY, partition=0)
        finally:
            await producer.stop()
    return version


async def _newest_version(kafka: KafkaConnection) -> int:
    """The version of the newest record of rtim.offers (0 if it has none)."""
    async with EndOffsetProbe(kafka) as probe:
        end = (await probe.end_offsets([OFFERS_TP]))[OFFERS_TP]
    if end == 0:
        return 0
    consumer = AIOKafkaConsumer(**kafka.client_config(), group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([OFFERS_TP])
        newest = 0
        # Read from the start: compaction may have removed end - 1, and the embedded
        # broker's offsets may have gaps.
        await consumer.seek_to_beginning(OFFERS_TP)
        position = 0
        while position < end:
            fetched = await consumer.getmany(OFFERS_TP, timeout_ms=500)
            for rec in fetched.get(OFFERS_TP, []):
                if rec.key == CATALOG_KEY:
                    newest = max(newest, previous_version(rec.value))
                position = rec.offset + 1
    finally:
        await stop_consumer(consumer, STOP_TIMEOUT)
    return newest
