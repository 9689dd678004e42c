"""Triggers and dead letters land on the partition Kafka's default partitioner picks."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatch

from rtim.stream import publish
from rtim.stream.publish import BatchPublisher, OutRecord


def test_partition_for_matches_kafkas_default_partitioner_with_and_without_the_cache(
    monkeypatch,
) -> None:
    publisher = BatchPublisher("127.0.0.1:1")
    monkeypatch.setattr(publish, "KEY_HASHES_CACHED", 50)  # forces the cache to be cleared
    keys = [f"customer-{i}".encode() for i in range(200)] + [b"", b"\xff\x00\x10", "é".encode()]
    for partitions in ([0], [0, 1, 2], list(range(7)), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]):
        for _ in range(2):  # the second time from the cache
            for key in keys:
                assert publisher.partition_for(key, partitions) == DefaultPartitioner()(
                    key, partitions, partitions
                ), (key, partitions)
    assert len(publisher._key_hashes) <= 50


def test_records_without_a_key_are_spread() -> None:
    publisher = BatchPublisher("127.0.0.1:1")
    seen = {publisher.partition_for(None, [0, 1, 2, 3]) for _ in range(400)}
    assert seen == {0, 1, 2, 3}


class RefusingProducer:
    """A producer whose broker takes record batches of at most ``limit`` bytes, as
    Kafka's max.message.bytes does, and answers MessageSizeTooLarge to bigger ones."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.offsets: dict[tuple[str, int], int] = {}
        self.written: list[tuple[str, int, bytes]] = []

    def create_batch(self) -> BatchBuilder:
        return BatchBuilder(512 * 1024, 0, is_transactional=False)

    async def send_batch(self, builder: BatchBuilder, topic: str, *, partition: int) -> Any:
        fut = asyncio.get_running_loop().create_future()
        if builder.size() > self.limit:
            fut.set_exception(MessageSizeTooLargeError())
            return fut
        records = list(DefaultRecordBatch(bytes(builder._build())))
        offset = self.offsets.get((topic, partition), 0)
        self.offsets[(topic, partition)] = offset + len(records)
        self.written.extend((topic, partition, r.value) for r in records)
        fut.set_result(SimpleNamespace(offset=offset))
        return fut


def test_records_kafka_refuses_are_left_out_and_the_rest_published() -> None:
    publisher = BatchPublisher("127.0.0.1:1", max_record_bytes=50_000)
    producer = RefusingProducer(limit=3_000)
    publisher._producer = producer  # type: ignore[assignment]
    values = [b"a" * 100, b"b" * 5_000, b"c" * 100, b"d" * 60_000, b"e" * 100, b"f" * 2_000]
    records = [OutRecord("t", b"k", v, [], partition=0) for v in values]
    last = asyncio.run(publisher.publish(records))
    # The batch of all six was refused as a whole, and sent again record by record:
    # the one over the broker's limit and the one over RTIM_MAX_RECORD_BYTES are left out.
    assert [i for i, _ in publisher.refused] == [1, 3]
    assert isinstance(publisher.refused[0][1], MessageSizeTooLargeError)
    assert "RTIM_MAX_RECORD_BYTES" in str(publisher.refused[1][1])
    assert [v for _, _, v in producer.written] == [values[i] for i in (0, 2, 4, 5)]
    assert last == {("t", 0): 3}


def test_a_publish_that_fails_for_another_reason_raises() -> None:
    class Down(RefusingProducer):
        async def send_batch(self, builder: BatchBuilder, topic: str, *, partition: int) -> Any:
            fut = asyncio.get_running_loop().create_future()
            fut.set_exception(KafkaConnectionError())
            return fut

    publisher = BatchPublisher("127.0.0.1:1")
    publisher._producer = Down(limit=0)  # type: ignore[assignment]
    with pytest.raises(KafkaConnectionError):
        asyncio.run(publisher.publish([OutRecord("t", b"k", b"v", [], partition=0)]))


def test_the_record_limit_counts_the_headers() -> None:
    publisher = BatchPublisher("127.0.0.1:1", max_record_bytes=2_000)
    producer = RefusingProducer(limit=100_000)
    publisher._producer = producer  # type: ignore[assignment]
    headers = [("__connect.errors.exception.message", b"m" * 1_500)]
    records = [
        OutRecord("dlq", b"k", b"v" * 600, headers, partition=0),  # 2,138 bytes in all
        OutRecord("dlq", b"k", b"v" * 400, headers, partition=0),
    ]
    asyncio.run(publisher.publish(records))
    assert [i for i, _ in publisher.refused] == [0]
    assert [v for _, _, v in producer.written] == [b"v" * 400]
