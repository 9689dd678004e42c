"""While the broker is unreachable, the log keeps one line per kind of Kafka client
connection error, and every other record."""

from __future__ import annotations

import logging

import aiokafka.consumer.fetcher  # noqa: F401  (creates the aiokafka loggers)

from rtim.stream.health import BrokerHealth, ConnectionErrorFilter


def record(name: str, msg: str, *args: object, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def refused(node: int = 111) -> logging.LogRecord:
    return record("aiokafka", "Unable connect to node with id %s: %s", node, "refused")


def test_every_record_passes_while_the_broker_is_up() -> None:
    health = BrokerHealth("127.0.0.1:9")
    keep = ConnectionErrorFilter(health)
    assert all(keep.filter(refused()) for _ in range(5))
    assert health.suppressed == 0


def test_repeats_of_connection_errors_are_dropped_while_the_broker_is_down() -> None:
    health = BrokerHealth("127.0.0.1:9")
    keep = ConnectionErrorFilter(health)
    health.up = False
    assert keep.filter(refused())  # the first says what failed
    assert not keep.filter(refused(112))
    assert not keep.filter(refused())
    assert health.suppressed == 2
    # Another kind of connection error, and any other record, pass.
    assert keep.filter(record("aiokafka.consumer.fetcher", "Failed fetch messages from %s: %s"))
    other = record("aiokafka.consumer.fetcher", "Unexpected error in fetcher routine")
    assert keep.filter(other) and keep.filter(other)
    assert keep.filter(record("aiokafka.producer.sender", "Got error produce response: %s", 1))
    # Once the broker is back (reset), the next outage's first error passes again.
    health.up = True
    keep.reset()
    health.up = False
    assert keep.filter(refused())


def test_the_filter_sits_on_the_kafka_client_loggers_only() -> None:
    health = BrokerHealth("127.0.0.1:9")
    keep = ConnectionErrorFilter(health)
    keep.install()
    try:
        assert keep in logging.getLogger("aiokafka").filters  # aiokafka's client logs here
        assert keep in logging.getLogger("aiokafka.consumer.fetcher").filters
        assert keep not in logging.getLogger("rtim.stream").filters
        assert keep not in logging.getLogger().filters
    finally:
        keep.remove()
    assert keep not in logging.getLogger("aiokafka").filters
