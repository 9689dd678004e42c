"""Publishing a batch's outputs with aiokafka's batch API, awaited as a whole.

One :class:`~aiokafka.producer.message_accumulator.BatchBuilder` per
topic-partition (more if it fills up), sent with ``send_batch``: one produce
call per partition instead of one per record (DESIGN.md §3). The caller awaits
:meth:`BatchPublisher.publish` before it acknowledges the input, which is what
makes the pipeline at-least-once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner, murmur2

log = logging.getLogger(__name__)

#: Keys whose murmur2 hash is remembered (aiokafka's murmur2 is pure Python,
#: about 20 us for a customer id; the same customers come back all the time).
KEY_HASHES_CACHED = 100_000


@dataclass(slots=True)
class OutRecord:
    """A record to publish; ``partition=None`` means Kafka's default partitioner on the key."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    partition: int | None = None


class BatchPublisher:
    """An aiokafka producer that publishes lists of records, batch per partition."""

    def __init__(
        self,
        *,
        bootstrap_servers: str,
        client_id: str = "rtim",
        max_batch_size: int = 512 * 1024,
        linger_ms: int = 0,
        request_timeout_ms: int = 30_000,
    ) -> None:
        # aiokafka binds its producer to the running loop: it is built in start().
        self._config = {
            "bootstrap_servers": bootstrap_servers,
            "client_id": client_id,
            "acks": "all",
            "max_batch_size": max_batch_size,
            "linger_ms": linger_ms,
            "request_timeout_ms": request_timeout_ms,
            "max_request_size": 4 * 1024 * 1024,
        }
        self._producer: AIOKafkaProducer | None = None
        self._partitioner = DefaultPartitioner()
        self._key_hashes: dict[bytes, int] = {}
        self._partitions: dict[str, list[int]] = {}
        self._started = False

    async def start(self) -> None:
        if not self._started:
            self._producer = AIOKafkaProducer(**self._config)
            try:
                await self._producer.start()
            except BaseException:
                await self._producer.stop()
                raise
            self._started = True

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

        Raises whatever aiokafka raises if Kafka does not take them (the caller
        retries the whole batch: at-least-once).
        """
        grouped: dict[tuple[str, int], list[OutRecord]] = defaultdict(list)
        for rec in records:
            partition = rec.partition
            if partition is None:
                parts = await self._partitions_of(rec.topic)
                partition = self.partition_for(rec.key, parts)
            grouped[(rec.topic, partition)].append(rec)
        producer = self._producer
        assert producer is not None, "start() the publisher first"
        pending: list[tuple[tuple[str, int], int, asyncio.Future]] = []
        for (topic, partition), recs in grouped.items():
            batch = producer.create_batch()
            count = 0
            for rec in recs:
                if (
                    batch.append(key=rec.key, value=rec.value, timestamp=None, headers=rec.headers)
                    is None
                ):
                    fut = await producer.send_batch(batch, topic, partition=partition)
                    pending.append(((topic, partition), count, fut))
                    batch = producer.create_batch()
                    count = 0
                    if (
                        batch.append(
                            key=rec.key, value=rec.value, timestamp=None, headers=rec.headers
                        )
                        is None
                    ):
                        raise ValueError(f"record too large for one batch on {topic}")
                count += 1
            fut = await producer.send_batch(batch, topic, partition=partition)
            pending.append(((topic, partition), count, fut))
        last: dict[tuple[str, int], int] = {}
        results = await asyncio.gather(*(fut for _, _, fut in pending))
        for (tp, count, _), meta in zip(pending, results, strict=False):
            end = meta.offset + count - 1
            if end > last.get(tp, -1):
                last[tp] = end
        return last
