"""One customer, one context: records keyed otherwise are re-keyed to the customer's partition.

Producers send some of a customer's events with no key, an empty key or another id
(a session id), and some with the right key on another partition than Kafka's
default partitioner gives (librdkafka's default partitioner is CRC32-based). A worker
is killed in the middle (SIGKILL) and a fresh one takes over. Every customer must end
with one context, on the changelog partition its id maps to, equal to what a clean
run builds from the events read on that partition: nothing lost, nothing applied twice.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import time
import uuid
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import murmur2

from rtim.names import CLICKSTREAM_TOPIC
from rtim.stream.endoffsets import true_end_offsets
from rtim.stream.process import WorkerProcess

from .support import (
    CHANGELOG,
    PARTITIONS,
    expected_contexts,
    latest_values,
    read_topic,
    wait_committed,
)

REASONS = ("key", "partition")
NOW_MS = int(time.time() * 1000)


def owner(customer: str | bytes) -> int:
    """The partition Kafka's default partitioner (the Java client's murmur2) gives a key."""
    key = customer.encode() if isinstance(customer, str) else customer
    return (murmur2(key) & 0x7FFFFFFF) % PARTITIONS


def iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds")


def events(customers: int, per_customer: int) -> list[dict[str, Any]]:
    """Interleaved page views and cart additions within the last hour."""
    rng = random.Random(12)
    out = []
    for i in range(per_customer):
        for c in range(customers):
            event: dict[str, Any] = {
                "type": "track" if i % 3 else "page",
                "messageId": str(uuid.UUID(int=rng.getrandbits(128))),
                "userId": f"cust-{c}",
                "timestamp": iso(NOW_MS - 3_600_000 + (i * customers + c) * 50),
                "context": {"page": {"path": f"/p/{i}"}},
            }
            if event["type"] == "track":
                event["event"] = "Product Added"
                event["properties"] = {"product_id": f"sku-{i}", "price": 10.0, "quantity": 1}
            else:
                event["properties"] = {"path": f"/p/{i}"}
            out.append(event)
    return out


def placed(i: int, event: dict[str, Any]) -> tuple[bytes | None, bytes, int | None]:
    """(key, value, partition) of the i-th event: keyed right, or not, or misplaced."""
    customer = event["userId"].encode()
    value = orjson.dumps(event)
    match (i + i // 7) % 5:
        case 0:
            return None, value, None  # no key: any partition
        case 1:
            return b"", value, None
        case 2:
            return f"session-{i % 17}".encode(), value, None
        case 3:  # the right key on another partition (another partitioner)
            return customer, value, (owner(customer) + 1 + i % 3) % PARTITIONS
        case _:
            return customer, value, None


async def produce_placed(
    bootstrap: str, items: list[tuple[bytes | None, bytes, int | None]]
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        futures = [
            await producer.send(CLICKSTREAM_TOPIC, value, key=key, partition=partition)
            for key, value, partition in items
        ]
        for fut in futures:
            await fut
    finally:
        await producer.stop()


def wait_settled(bootstrap: str, worker: WorkerProcess) -> None:
    """Every clickstream record committed, the re-keyed copies the worker wrote included."""
    tps = [TopicPartition(CLICKSTREAM_TOPIC, p) for p in range(PARTITIONS)]
    while True:
        before = asyncio.run(true_end_offsets(bootstrap, tps))
        asyncio.run(wait_committed(bootstrap, "rtim", worker=worker, timeout=120))
        if asyncio.run(true_end_offsets(bootstrap, tps)) == before:
            return


def test_events_keyed_otherwise_end_in_one_context_on_the_customers_partition(
    kafka, workers, tmp_path
) -> None:
    stream = events(customers=40, per_customer=25)
    items = [placed(i, e) for i, e in enumerate(stream)]
    first, second = items[:600], items[600:]

    doomed = workers("doomed", env={"RTIM_COMMIT_INTERVAL_S": "2"}).wait_ready()
    asyncio.run(produce_placed(kafka.bootstrap, first))
    deadline = time.monotonic() + 60
    while doomed.metric("rtim_events_consumed_total", topic=CLICKSTREAM_TOPIC) < 300:
        assert time.monotonic() < deadline, doomed.log_tail()
        time.sleep(0.02)
    doomed.kill()

    survivor = workers("survivor", datadir=tmp_path / "fresh-data")
    asyncio.run(produce_placed(kafka.bootstrap, second))
    survivor.wait_ready(timeout=120)
    wait_settled(kafka.bootstrap, survivor)
    rekeyed = {r: survivor.metric("rtim_events_rekeyed_total", reason=r) for r in REASONS}
    assert survivor.stop() == 0

    clickstream = asyncio.run(read_topic(kafka.bootstrap, CLICKSTREAM_TOPIC))
    # What a clean run builds from each customer's events as they stand on its
    # partition (a copy there twice is one event, by its messageId).
    on_owner = [r for r in clickstream if r.key and r.partition == owner(r.key)]
    expected = expected_contexts(on_owner)
    changelog = asyncio.run(read_topic(kafka.bootstrap, CHANGELOG))
    # Each customer's context is on one changelog partition: its own.
    assert {(r.key.decode(), r.partition) for r in changelog} == {(c, owner(c)) for c in expected}
    assert latest_values(changelog) == expected
    # Nothing lost, nothing applied twice.
    per_customer: dict[str, int] = {}
    for event in stream:
        per_customer[event["userId"]] = per_customer.get(event["userId"], 0) + 1
    assert {c: ctx["n"] for c, ctx in expected.items()} == per_customer
    assert asyncio.run(read_topic(kafka.bootstrap, "rtim.dlq")) == []
    # Each misplaced record was copied to its customer's partition (some twice).
    copies = [r for r in clickstream if "rtim.rekeyed.from.partition" in dict(r.headers)]
    assert len(copies) >= len(items) * 3 // 5
    for copy in copies:
        assert copy.partition == owner(copy.key)
    # Counted by reason (the survivor's share).
    assert all(count > 0 for count in rekeyed.values()), rekeyed
