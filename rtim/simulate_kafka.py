"""Ship simulated (or any Segment) events to Kafka, fast and optionally paced.

Kept apart from :mod:`rtim.simulate` so that the journey generator stays free
of asyncio and aiokafka.

Why the batch API
-----------------
``AIOKafkaProducer.send`` costs a coroutine, a metadata check, a pure-Python
murmur2 hash and a future per record, which tops out well below what the
20k events/s benchmark needs once the generator also runs in the process.
Instead :class:`rtim.stream.publish.BatchWriter` (the publisher's too) fills one
:class:`aiokafka.producer.message_accumulator.BatchBuilder` per partition and
hands complete batches to ``send_batch``. The
partition of each key is computed once with aiokafka's own
:class:`~aiokafka.partitioner.DefaultPartitioner` (murmur2, like the Java
client and Kafka Streams/Faust), so records land exactly where
``producer.send(topic, value, key=key)`` would have put them, and a
customer's events stay in order on one partition.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from itertools import islice
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError, UnknownTopicOrPartitionError
from aiokafka.partitioner import DefaultPartitioner

from rtim.events import customer_key
from rtim.settings import KafkaConnection
from rtim.stream.publish import BatchWriter, Sent

log = logging.getLogger("rtim.simulate")

__all__ = ["produce_events"]

# When paced, each chunk covers about this much time: small enough to look
# like a smooth flow to consumers, large enough that the sleep overhead of
# asyncio (~0.1 ms) stays negligible.
_PACE_CHUNK_S = 0.005
# If we fall behind the schedule (GC pause, broker hiccup) we catch up at most
# this much; older debt is forgiven instead of being paid back as a burst.
_MAX_PACING_DEBT_S = 0.02
# Bound on the key -> (bytes, partition) cache for arbitrary event iterables.
_KEY_CACHE_MAX = 1_000_000
# Back-off while the broker (or the topic) is not there yet, as a worker starting.
_FIRST_RETRY_S = 0.5
_LONGEST_RETRY_S = 10.0


async def _start(config: dict[str, Any], topic: str) -> tuple[AIOKafkaProducer, list[int]]:
    """A started producer and the topic's partitions, once the broker and the topic are there.

    Waits with back-off and one warning per retry (a simulator started with
    its broker, or before the worker created the topic, starts sending when
    they are up); cancellation ends the wait.
    """
    delay = _FIRST_RETRY_S
    while True:
        producer = AIOKafkaProducer(**config)
        try:
            await producer.start()
            partitions = sorted(await producer.partitions_for(topic))
            if partitions:
                return producer, partitions
            problem = f"topic {topic} has no partitions yet"  # pragma: no cover
        except KafkaConnectionError:
            problem = "broker not available"
        except (UnknownTopicOrPartitionError, KafkaTimeoutError):
            problem = f"topic {topic} does not exist yet"
        except BaseException:
            await producer.stop()
            raise
        await producer.stop()
        log.warning(
            "%s at %s; retrying in %.1f s", problem, ",".join(config["bootstrap_servers"]), delay
        )
        await asyncio.sleep(delay)
        delay = min(delay * 2, _LONGEST_RETRY_S)


async def produce_events(
    kafka: KafkaConnection | str,
    topic: str,
    events: Iterable[dict[str, Any]],
    *,
    rate: float | None = None,
    progress: Callable[[int], None] | None = None,
    batch_size: int = 500,
    max_batch_bytes: int = 512 * 1024,
    producer_config: Mapping[str, Any] | None = None,
) -> int:
    """Produce events to a Kafka topic, keyed by customer.

    Parameters
    ----------
    kafka : KafkaConnection or str
        The connection, or bootstrap servers (``"localhost:9092"``). Until the
        broker answers and the topic exists, waits and retries with back-off,
        logging one warning per retry.
    topic : str
        Destination topic (must exist, or be auto-creatable by the broker).
    events : iterable of dict
        Segment-spec events, e.g. ``JourneySimulator(...).events(n)``. May be
        infinite (then only cancellation ends the call).
    rate : float or None
        Target events per second. ``None`` produces as fast as possible.
        Pacing is done per chunk of about 5 ms worth of events against a
        monotonic clock, and every chunk is handed to the producer right
        away, so consumers see a smooth flow with low latency.
    progress : callable or None
        Called from this coroutine as ``progress(delta)`` with the number of
        events acknowledged by the broker since the previous call (e.g.
        ``click.progressbar(...).update``).
    batch_size : int
        Events pulled from ``events`` between two yields to the event loop
        when unpaced (upper bound of a chunk when paced).
    max_batch_bytes : int
        Maximum size of one record batch (per partition and request). Keep it
        below the broker's ``message.max.bytes`` (1 MiB by default).
    producer_config : mapping or None
        Extra :class:`aiokafka.AIOKafkaProducer` keyword arguments (``acks``,
        ``compression_type``, security settings, ...); they override ours.

    Returns
    -------
    int
        Number of events acknowledged by the broker.

    Raises
    ------
    ValueError
        For a non-positive ``rate`` / ``batch_size`` or an event without ids.
    aiokafka.errors.KafkaError
        If the broker rejects a batch or goes away.

    Notes
    -----
    Records are keyed by :func:`rtim.events.customer_key` (``userId``, else
    ``anonymousId``) and serialised with :func:`orjson.dumps`. Their Kafka
    timestamp is the produce time, not the event's ``timestamp``: simulated
    time may lie days in the future, which brokers with
    ``log.message.timestamp.after.max.ms`` (1 hour by default since Kafka 4.0)
    reject. Partitions are looked up once at start.

    On cancellation the producer is stopped cleanly: every batch already
    handed to aiokafka is flushed, while events still buffered here (at most
    one partial batch per partition, and none while pacing sleeps) are
    dropped; then :class:`asyncio.CancelledError` propagates.
    """
    if rate is not None and not rate > 0:
        raise ValueError("rate must be > 0 events/s (or None for unpaced)")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")

    config: dict[str, Any] = {
        **KafkaConnection.parse(kafka).client_config(),
        "max_batch_size": max_batch_bytes,
    }
    if producer_config:
        config.update(producer_config)
    producer, partitions = await _start(config, topic)

    acked = 0  # updated by delivery callbacks
    reported = 0  # part of `acked` already passed to `progress`
    failure: BaseException | None = None
    in_flight: set[asyncio.Future[Any]] = set()

    def on_delivered(fut: asyncio.Future[Any], count: int) -> None:
        nonlocal acked, failure
        in_flight.discard(fut)
        if fut.cancelled():
            return
        exc = fut.exception()  # also marks the exception as retrieved
        if exc is None:
            acked += count
        elif failure is None:
            failure = exc

    def report() -> None:
        nonlocal reported
        if failure is not None:
            raise failure
        if progress is not None and acked > reported:
            delta, reported = acked - reported, acked
            progress(delta)

    def track(sent: Sent | None) -> None:
        if sent is not None:
            _, count, fut = sent
            in_flight.add(fut)
            fut.add_done_callback(lambda f: on_delivered(f, count))

    try:
        partitioner = DefaultPartitioner()
        key_cache: dict[str, tuple[bytes, int]] = {}
        writer = BatchWriter(producer)
        dumps = orjson.dumps

        chunk_size = batch_size
        if rate is not None:
            chunk_size = max(1, min(batch_size, round(rate * _PACE_CHUNK_S)))
        iterator = iter(events)
        next_at = time.monotonic()
        while True:
            chunk = list(islice(iterator, chunk_size))
            if not chunk:
                break
            for event in chunk:
                key = customer_key(event)
                cached = key_cache.get(key)
                if cached is None:
                    if len(key_cache) >= _KEY_CACHE_MAX:
                        key_cache.clear()
                    key_bytes = key.encode()
                    cached = key_cache[key] = (
                        key_bytes,
                        partitioner(key_bytes, partitions, partitions),
                    )
                key_bytes, partition = cached
                track(await writer.append(topic, partition, key_bytes, dumps(event)))
            if rate is None:
                # Let the sender task, delivery callbacks and any UI run.
                await asyncio.sleep(0)
            else:
                for sent in await writer.flush():
                    track(sent)
                now = time.monotonic()
                next_at = max(next_at + len(chunk) / rate, now - _MAX_PACING_DEBT_S)
                await asyncio.sleep(max(0.0, next_at - now))
            report()
        for sent in await writer.flush():
            track(sent)
        if in_flight:
            await asyncio.wait(list(in_flight))
        report()
        return acked
    except asyncio.CancelledError:
        # Deliver what aiokafka already holds, then let a progress bar show
        # the final count before the cancellation propagates.
        await producer.stop()
        if progress is not None and failure is None and acked > reported:
            progress(acked - reported)
        raise
    finally:
        # Flushes batches already handed over, also on errors; idempotent.
        await producer.stop()
