"""Publishing a batch's outputs with aiokafka's batch API, awaited as a whole.

One :class:`~aiokafka.producer.message_accumulator.BatchBuilder` per
topic-partition (more if it fills up), sent with ``send_batch``: one produce
call per partition instead of one per record (docs/architecture.md, "Why Faust's
consumer is subclassed"). The caller awaits
:meth:`BatchPublisher.publish` before it acknowledges the input, which is what
makes the pipeline at-least-once.

:class:`BatchWriter` is that way of producing, for every RTIM client that
produces in bulk: the publisher, the simulator and the bench.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka import errors as kafka_errors
from aiokafka.partitioner import DefaultPartitioner, murmur2

from rtim.settings import KafkaConnection

log = logging.getLogger(__name__)

#: Keys whose murmur2 hash is remembered (aiokafka's murmur2 is pure Python,
#: about 20 us for a customer id; the same customers come back all the time).
KEY_HASHES_CACHED = 100_000


@dataclass(slots=True)
class OutRecord:
    """A record to publish; ``partition=None`` means Kafka's default partitioner on the key.

    ``source`` is the input partition whose records caused it (exactly-once processing
    publishes it in that partition's transaction; see :mod:`rtim.stream.transactions`).
    """

    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    partition: int | None = None
    source: int | None = None


_NO_HEADERS: list[tuple[str, bytes]] = []

#: Broker errors about the records themselves: sending them again cannot succeed.
REFUSALS: tuple[type[Exception], ...] = (
    kafka_errors.MessageSizeTooLargeError,
    kafka_errors.RecordListTooLargeError,
    kafka_errors.CorruptRecordException,
    kafka_errors.InvalidTimestampError,
    kafka_errors.RecordTooLargeError,
)
#: What a transactional producer's batches get after the broker refused an earlier batch
#: of their partition.
OUT_OF_SEQUENCE = kafka_errors.OutOfOrderSequenceNumber
#: Kafka's INVALID_RECORD (a record the broker's validation refuses), unknown to aiokafka.
INVALID_RECORD = 87


def is_refusal(exc: BaseException) -> bool:
    """Whether Kafka refused the records themselves (not a failure to reach it)."""
    return isinstance(exc, REFUSALS) or getattr(exc, "errno", None) == INVALID_RECORD


def record_size(rec: OutRecord) -> int:
    """Bytes of a record's key, value and headers (what a broker's size limit counts,
    less a few dozen bytes of framing)."""
    size = len(rec.key or b"") + len(rec.value or b"")
    for name, value in rec.headers:
        size += len(name) + len(value or b"")
    return size


#: A batch handed to the producer: (topic, partition), its record count, its delivery.
Sent = tuple[tuple[str, int], int, "asyncio.Future[Any]"]


class BatchWriter:
    """Fills one aiokafka batch per (topic, partition) and hands full ones to ``send_batch``.

    :meth:`append` records, then :meth:`flush`; each returns the batches it
    handed over (:data:`Sent`), whose futures resolve to the batch's record
    metadata (its base offset) once the broker has it.
    """

    __slots__ = ("_open", "_producer")

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer
        self._open: dict[tuple[str, int], tuple[Any, int]] = {}

    async def append(
        self,
        topic: str,
        partition: int,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> Sent | None:
        """Add a record; returns the full batch it sent first, if its batch was full."""
        if headers is None:
            headers = _NO_HEADERS  # aiokafka's builder takes a list only
        tp = (topic, partition)
        builder, count = self._open.get(tp) or (self._producer.create_batch(), 0)
        sent = None
        if builder.append(key=key, value=value, timestamp=None, headers=headers) is None:
            sent = await self._send(tp, builder, count)
            builder, count = self._producer.create_batch(), 0
            if builder.append(key=key, value=value, timestamp=None, headers=headers) is None:
                raise ValueError(f"record too large for one batch on {topic}")
        self._open[tp] = (builder, count + 1)
        return sent

    async def flush(self) -> list[Sent]:
        """Send every batch not sent yet."""
        open_, self._open = self._open, {}
        return [await self._send(tp, builder, count) for tp, (builder, count) in open_.items()]

    async def _send(self, tp: tuple[str, int], builder: Any, count: int) -> Sent:
        # Closed batches go out at once, whatever the producer's linger.
        builder.close()
        fut = await self._producer.send_batch(builder, tp[0], partition=tp[1])
        return tp, count, fut


class BatchPublisher:
    """An aiokafka producer that publishes lists of records, batch per partition."""

    def __init__(
        self,
        kafka: KafkaConnection | str,
        *,
        client_id: str = "rtim",
        max_batch_size: int = 512 * 1024,
        linger_ms: int = 0,
        request_timeout_ms: int = 30_000,
        max_record_bytes: int | None = None,
        transactional_id: str | None = None,
        producer_class: Callable[..., AIOKafkaProducer] = AIOKafkaProducer,
    ) -> None:
        # aiokafka binds its producer to the running loop: it is built in start().
        self._config = {
            **KafkaConnection.parse(kafka).client_config(),
            "client_id": client_id,
            "acks": "all",
            "max_batch_size": max_batch_size,
            "linger_ms": linger_ms,
            "request_timeout_ms": request_timeout_ms,
            "max_request_size": 4 * 1024 * 1024,
        }
        if transactional_id is not None:
            self._config["transactional_id"] = transactional_id
        self._producer_class = producer_class
        self._producer: AIOKafkaProducer | None = None
        self._partitioner = DefaultPartitioner()
        self._key_hashes: dict[bytes, int] = {}
        self._partitions: dict[str, list[int]] = {}
        self._started = False
        self.max_record_bytes = max_record_bytes
        #: The records of the last :meth:`publish` that Kafka refused (or that were
        #: over ``max_record_bytes``), as (index in its list, error), not published.
        self.refused: list[tuple[int, BaseException]] = []
        #: Whether the broker refused a batch in the last :meth:`publish`. A
        #: transactional producer cannot send that partition's records again one at a
        #: time (its sequence numbers went on without the refused batch, so the broker
        #: takes nothing more from it): the whole batch is listed in :attr:`refused`,
        #: and the partition's later batches, which the broker then refuses as out of
        #: sequence, are not (they are to be sent again, by a new producer).
        self.broker_refused = False

    async def start(self) -> None:
        if not self._started:
            self._producer = self._producer_class(**self._config)
            try:
                await self._producer.start()
            except BaseException:
                await self._producer.stop()
                raise
            self._started = True

    @property
    def producer(self) -> AIOKafkaProducer:
        """The started producer (its transaction calls, in exactly-once processing)."""
        assert self._producer is not None and self._started, "start() the publisher first"
        return self._producer

    async def stop(self, timeout: float | None = None) -> None:
        """Deliver what the producer holds, then close it.

        With a ``timeout``, records not acknowledged by then are given up (aiokafka
        would otherwise retry them for ``request_timeout_ms`` with the broker gone);
        the caller acknowledged no input for them, so that input comes again.
        """
        if self._started:
            self._started = False
            producer = self._producer
            assert producer is not None
            try:
                async with asyncio.timeout(timeout):
                    await producer.stop()
            except Exception as exc:  # timed out, or aiokafka failed on the way
                log.warning("publisher did not close cleanly (%r); dropping what it holds", exc)
                sender = producer._sender.sender_task
                if sender is not None:
                    sender.cancel()  # not awaited: its retries end with the connections
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(1.0):
                        await producer.client.close()

    async def _partitions_of(self, topic: str) -> list[int]:
        parts = self._partitions.get(topic)
        if parts is None:
            assert self._producer is not None
            found = await self._producer.partitions_for(topic)
            parts = self._partitions[topic] = sorted(found)
        return parts

    def partition_for(self, key: bytes | None, partitions: list[int]) -> int:
        """Kafka's default partitioner (the Java client's murmur2), with key hashes cached."""
        if key is None:
            return self._partitioner(key, partitions, partitions)
        hashed = self._key_hashes.get(key)
        if hashed is None:
            if len(self._key_hashes) >= KEY_HASHES_CACHED:
                self._key_hashes.clear()
            hashed = self._key_hashes[key] = murmur2(key) & 0x7FFFFFFF
        return partitions[hashed % len(partitions)]

    async def publish(self, records: list[OutRecord]) -> dict[tuple[str, int], int]:
        """Publish all records; return the last offset written per (topic, partition).

        A record Kafka refuses (too large for the topic, invalid to the broker),
        or larger than ``max_record_bytes``, is left out and listed in
        :attr:`refused`; the others are published. Raises whatever aiokafka
        raises if Kafka does not take them for any other reason (the caller
        retries the whole batch: at-least-once).
        """
        assert self._producer is not None, "start() the publisher first"
        self.refused = refused = []
        self.broker_refused = False
        limit = self.max_record_bytes
        writer = BatchWriter(self._producer)
        pending: list[Sent] = []
        # Per topic-partition, the indexes of its records in the order appended.
        placed: dict[tuple[str, int], list[int]] = {}
        for index, rec in enumerate(records):
            if limit is not None and (rec.headers or len(rec.value or b"") + 1024 > limit):
                size = record_size(rec)
                if size > limit:
                    too_large = f"{size} bytes, over the limit of {limit} (RTIM_MAX_RECORD_BYTES)"
                    refused.append((index, kafka_errors.RecordTooLargeError(too_large)))
                    continue
            partition = rec.partition
            if partition is None:
                parts = await self._partitions_of(rec.topic)
                partition = self.partition_for(rec.key, parts)
            sent = await writer.append(rec.topic, partition, rec.key, rec.value, rec.headers)
            placed.setdefault((rec.topic, partition), []).append(index)
            if sent is not None:
                pending.append(sent)
        pending.extend(await writer.flush())
        last: dict[tuple[str, int], int] = {}
        results = await asyncio.gather(*(fut for _, _, fut in pending), return_exceptions=True)
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        transactional = "transactional_id" in self._config
        if failed is not None and not all(
            is_refusal(r) or (transactional and isinstance(r, OUT_OF_SEQUENCE))
            for r in results
            if isinstance(r, BaseException)
        ):
            raise failed
        # A batch is refused as a whole: its records are sent again one at a time,
        # so that only those Kafka refuses on their own are left out.
        done: dict[tuple[str, int], int] = {}
        for (tp, count, _), meta in zip(pending, results, strict=True):
            first = done.get(tp, 0)
            done[tp] = first + count
            if isinstance(meta, BaseException):
                self.broker_refused = True
                if transactional:
                    if is_refusal(meta):
                        refused.extend((index, meta) for index in placed[tp][first : first + count])
                    continue
                for index in placed[tp][first : first + count]:
                    end = await self._publish_alone(records[index], tp, index)
                    if end is not None and end > last.get(tp, -1):
                        last[tp] = end
                continue
            end = meta.offset + count - 1
            if end > last.get(tp, -1):
                last[tp] = end
        refused.sort(key=lambda item: item[0])
        return last

    async def _publish_alone(self, rec: OutRecord, tp: tuple[str, int], index: int) -> int | None:
        """Publish one record in a batch of its own; its offset, None if refused."""
        assert self._producer is not None
        writer = BatchWriter(self._producer)
        await writer.append(tp[0], tp[1], rec.key, rec.value, rec.headers)
        ((_, _, fut),) = await writer.flush()
        try:
            meta = await fut
        except Exception as exc:
            if not is_refusal(exc):
                raise
            self.refused.append((index, exc))
            return None
        return int(meta.offset)
