"""Helpers for tests against a real broker and real worker processes.

Each test gets its own embedded broker (it starts in tens of milliseconds), so
topic names are the product's own (``rtim.clickstream`` ...) and tests cannot
see each other's records.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from rtim.engine import Engine, Record
from rtim.names import CLICKSTREAM_TOPIC, changelog_topic
from rtim.offers.catalog import load_catalog
from rtim.settings import DEFAULTS
from rtim.stream.endoffsets import true_end_offsets
from rtim.stream.process import WorkerProcess

PARTITIONS = 4
#: The context table's changelog under the default app id.
CHANGELOG = changelog_topic(DEFAULTS.app_id)
# Short group timeouts, so that a killed worker's partitions move in seconds.
#: The catalog the tests' workers run: one offer per trigger (see the file).
TEST_CATALOG = Path(__file__).with_name("one_offer_catalog.yaml")
TEST_ENV = {
    "RTIM_CATALOG": str(TEST_CATALOG),
    "RTIM_PARTITIONS": str(PARTITIONS),
    "RTIM_SESSION_TIMEOUT_S": "6",
    "RTIM_LOG_LEVEL": "info",
    "RTIM_COMMIT_INTERVAL_S": "0.5",
    # The clean run tests compare contexts with (expected_contexts) has no wall clock: no
    # attribution window may close because a partition sat idle (after 60 s by default,
    # which a long test can reach, moving one customer's decision from pending to closed).
    "RTIM_IDLE_CLOSE_S": "86400",
}


async def produce(
    bootstrap: str,
    items: Iterable[tuple[bytes | None, bytes | None]],
    topic: str = CLICKSTREAM_TOPIC,
    rate: float | None = None,
) -> int:
    """Produce (key, value) pairs in order (at about ``rate`` a second if given, else at
    once); return how many."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=5, max_request_size=4 * 1024 * 1024
    )
    await producer.start()
    try:
        started = time.monotonic()
        futures = []
        for i, (key, value) in enumerate(items):
            futures.append(await producer.send(topic, value, key=key))
            if rate and i % 100 == 0:
                await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
        for fut in futures:
            await fut
        return len(futures)
    finally:
        await producer.stop()


def segment(event: dict[str, Any]) -> tuple[bytes, bytes]:
    """(key, value) of a Segment event, keyed as RTIM expects."""
    key = event.get("userId") or event.get("anonymousId")
    return str(key).encode(), orjson.dumps(event)


async def read_topic(bootstrap: str, topic: str, timeout: float = 30.0) -> list[Any]:
    """Every record of a topic, up to its true end offsets, in (partition, offset) order."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=20
    )
    await consumer.start()
    try:
        parts = sorted(
            (
                await consumer._client._wait_on_metadata(topic)
                and consumer.partitions_for_topic(topic)
            )
            or ()
        )
        tps = [TopicPartition(topic, p) for p in parts]
        ends = await true_end_offsets(bootstrap, tps)
        if not any(ends.values()):
            return []
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[Any] = []
        positions = {tp: 0 for tp in tps}
        deadline = time.monotonic() + timeout
        while any(positions[tp] < ends[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise TimeoutError(f"read {len(records)} records of {topic}, ends {ends}")
            for tp, recs in (await consumer.getmany(timeout_ms=200)).items():
                for rec in recs:
                    if rec.offset < ends[tp]:
                        records.append(rec)
                        positions[tp] = rec.offset + 1
        records.sort(key=lambda r: (r.partition, r.offset))
        return records
    finally:
        await consumer.stop()


async def committed(bootstrap: str, group: str, topic: str = CLICKSTREAM_TOPIC) -> dict[int, int]:
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await reader.start()
    try:
        return {
            p: (await reader.committed(TopicPartition(topic, p))) or 0 for p in range(PARTITIONS)
        }
    finally:
        await reader.stop()


async def wait_committed(
    bootstrap: str,
    group: str,
    timeout: float = 120.0,
    worker: WorkerProcess | None = None,
    topic: str = CLICKSTREAM_TOPIC,
) -> None:
    """Wait until the group committed every record of the topic (the clickstream)."""
    import asyncio

    tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    ends = await true_end_offsets(bootstrap, tps)
    deadline = time.monotonic() + timeout
    while True:
        done = await committed(bootstrap, group, topic)
        if all(done[tp.partition] >= ends[tp] for tp in tps):
            return
        if worker is not None and not worker.alive:
            raise AssertionError(f"worker died:\n{worker.log_tail()}")
        if time.monotonic() > deadline:
            tail = ""
            if worker is not None:
                tail = (
                    f"\nworker log:\n{worker.log_tail(60)}\nworker state:\n{worker.report_state()}"
                )
            raise TimeoutError(f"committed {done}, ends {ends}{tail}")
        await asyncio.sleep(0.2)


def expected_contexts(records: list[Any]) -> dict[str, dict[str, Any]]:
    """The contexts a clean, uninterrupted run builds from these records (the pure core)."""
    store: dict[bytes, bytes] = {}
    engine = Engine(catalog=load_catalog(TEST_CATALOG), load=lambda p, k: store.get(k))
    for record in records:
        result = engine.process(
            CLICKSTREAM_TOPIC, [Record(record.partition, record.offset, record.key, record.value)]
        )
        for items in result.updates.values():
            store.update(items)
    return {k.decode(): orjson.loads(v) for k, v in store.items()}


def latest_values(records: list[Any]) -> dict[str, dict[str, Any]]:
    """Latest value per key of a changelog (what compaction would keep)."""
    latest: dict[str, dict[str, Any]] = {}
    for rec in records:
        if rec.value is None:
            latest.pop(rec.key.decode(), None)
        else:
            latest[rec.key.decode()] = orjson.loads(rec.value)
    return latest


def read_store(datadir: Path, table: str = "customers") -> dict[str, dict[str, Any]]:
    """Every context in a stopped worker's RocksDB store, read from disk."""
    import rocksdict

    contexts: dict[str, dict[str, Any]] = {}
    for path in sorted((datadir / "v1" / "tables").glob(f"{table}-*.db")):
        db = rocksdict.Rdict(
            str(path),
            options=rocksdict.Options(raw_mode=True),
            access_type=rocksdict.AccessType.read_only(),
        )
        try:
            for key, value in db.items():
                if key.startswith(b"__faust"):
                    continue
                contexts[key.decode()] = orjson.loads(value)
        finally:
            db.close()
    return contexts
