"""Triggers and dead letters land on the partition Kafka's default partitioner picks."""

from __future__ import annotations

from aiokafka.partitioner import DefaultPartitioner

from rtim.stream import publish
from rtim.stream.publish import BatchPublisher


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
