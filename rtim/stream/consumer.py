"""A Faust consumer that hands the clickstream to RTIM a whole fetch at a time.

Faust's own drain loop turns every record into a message and awaits a
conductor -> channel -> stream round for each (DESIGN.md §3: that path stays
near 4-10k events/s). :class:`BatchConsumer` changes one thing: records of the
*batch topics* are collected per fetch and handed over as one
:class:`FetchedBatch`; records of every other topic take Faust's normal path.
Faust still owns the group, assignment, tables, recovery, commits and
rebalances:

- a batch is acknowledged (:meth:`BatchConsumer.ack_batch`) only after its
  effects are durable, so Faust commits no offset past unprocessed work;
- a batch is processed in the drain loop itself (not queued, so nothing can
  drop it after its read offsets moved on); records fetched while the flow is
  suspended for a rebalance are dropped before that, and Faust seeks back to
  the committed offsets (the engine recognises what it already applied);
- :meth:`BatchConsumer.wait_empty`, which Faust awaits before it commits on
  revocation and at shutdown, also waits for the batch being processed.

It also replaces ``highwaters`` (the end offsets that table recovery reads up
to) with :class:`~rtim.stream.endoffsets.EndOffsetProbe`, which is exact on the
embedded broker, whose ListOffsets under-reports (DESIGN.md §4), and on Kafka.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

from rtim.stream.endoffsets import EndOffsetProbe


@dataclass(slots=True)
class FetchedBatch:
    """The records of one fetch for the batch topics, per topic-partition."""

    generation_id: int
    records: dict[TP, list[Any]]


BatchSink = Callable[[FetchedBatch], Awaitable[None]]


class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's consumer thread, with a fetch wait that is ours to set.

    Faust hard-codes ``fetch_max_wait_ms=1500``; a broker that holds each fetch
    for the whole wait when little data is there (the embedded one does) then
    adds up to 1.5 s to every decision.
    """

    fetch_max_wait_ms: int = 25

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = self.fetch_max_wait_ms  # read by start()
        return consumer


class BatchConsumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer with a batch path for selected topics."""

    fetch_max_wait_ms: int = 25
    batch_topics: frozenset[str] = frozenset()
    _batch_sink: BatchSink | None = None
    _idle_waiters: list[Callable[[], Awaitable[None]]]
    _probe: EndOffsetProbe | None = None

    def _new_consumer_thread(self) -> ConsumerThread:
        thread = ConsumerThread(self, loop=self.loop, beacon=self.beacon)
        thread.fetch_max_wait_ms = self.fetch_max_wait_ms
        return thread

    def __post_init__(self) -> None:
        super().__post_init__()
        self._idle_waiters = []

    def route_batches(
        self, topics: set[str], sink: BatchSink, wait_idle: Callable[[], Awaitable[None]]
    ) -> None:
        """Send records of ``topics`` to ``sink`` a fetch at a time.

        ``wait_idle`` must return once the batch being processed (if any) is
        done; it is awaited before Faust commits on revocation and shutdown.
        """
        self.batch_topics = frozenset(topics)
        self._batch_sink = sink
        self._idle_waiters.append(wait_idle)

    def ack_batch(self, tp: TP, offsets: list[int]) -> None:
        """Mark processed offsets of one partition as done (Faust commits them)."""
        committed = self._committed_offset[tp]
        acked_index = self._acked_index[tp]
        acked = self._acked[tp]
        for offset in offsets:
            if (committed is None or offset >= committed) and offset not in acked_index:
                acked_index.add(offset)
                acked.append(offset)

    async def wait_empty(self) -> None:
        for wait_idle in self._idle_waiters:
            await wait_idle()
        await super().wait_empty()

    async def highwaters(self, *partitions: TP) -> Mapping[TP, int]:
        if self._probe is None:
            servers = ",".join(
                f"{url.host}:{url.port or 9092}" for url in self.app.conf.broker_consumer
            )
            self._probe = EndOffsetProbe(bootstrap_servers=servers)
        return await self._probe.end_offsets(partitions)

    async def on_stop(self) -> None:
        await super().on_stop()
        if self._probe is not None:
            await self._probe.stop()

    async def _drain_messages(self, fetcher: Any) -> None:  # noqa: C901 - mirrors Faust's
        # Faust's loop (faust.transport.consumer.Consumer._drain_messages) with
        # the batch path added; the per-record path is kept for other topics.
        callback = self.callback
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        read_offset = self._read_offset
        acks_enabled_for = self.app.topics.acks_enabled_for
        to_message = self._to_message
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                records, active_partitions = await self._wait_next_records(1.0)
                generation_id = self.app.consumer_generation_id
                if not records or self.should_stop:
                    await asyncio.sleep(0)
                    continue
                if not self.flow_active:
                    # A rebalance began while we fetched: drop the fetch, Faust
                    # seeks back to the committed offsets once it is over.
                    await self.perform_seek()
                    continue
                batch: dict[TP, list[Any]] = {}
                others: list[tuple[TP, Any]] = []
                for tp, tp_records in records.items():
                    if active_partitions is not None and not (
                        tp in active_partitions or tp in self._buffered_partitions
                    ):
                        continue
                    r_offset = read_offset[tp]
                    fresh = [
                        r for r in tp_records if r_offset is None or r.offset >= r_offset
                    ]
                    if not fresh:
                        continue
                    first = fresh[0].offset
                    if r_offset and first - r_offset > 1 and acks_enabled_for(tp.topic):
                        await self._add_gap(tp, r_offset + 1, first)
                    if tp.topic in self.batch_topics:
                        batch[tp] = fresh
                        read_offset[tp] = fresh[-1].offset
                    else:
                        others.extend((tp, r) for r in fresh)
                if batch and self._batch_sink is not None:
                    # Awaited here, not queued: a queued batch can be dropped by
                    # Faust (it clears stream buffers when the flow resumes) after
                    # its read offsets moved on, which would leave a gap that no
                    # commit passes. Not raced against suspend_flow either: a
                    # batch always finishes (wait_empty waits for it on revocation).
                    await self._batch_sink(FetchedBatch(generation_id, batch))
                for tp, record in others:
                    if not self.flow_active or self.app.consumer_generation_id != generation_id:
                        break
                    await self.wait_first(
                        callback(to_message(tp, record)), self.suspend_flow.wait()
                    )
                    read_offset[tp] = record.offset
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise


class Transport(faust_aiokafka.Transport):
    """The aiokafka transport with :class:`BatchConsumer`."""

    Consumer = BatchConsumer
