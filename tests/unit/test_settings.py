"""Every setting a user can change reaches the component that uses it.

For each ``RTIM_*`` setting: a value other than the default, then the part of
the worker that must act on it (the Faust configuration, the aiokafka consumer
the consumer thread builds, the publisher, the engine, the web server) is
asked what it got. A new setting without a case here fails
:func:`test_every_setting_has_a_case`.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faust
import pytest

from rtim.errors import ConfigError
from rtim.names import CLICKSTREAM_TOPIC, CONTEXT_TABLE, changelog_topic
from rtim.settings import DEFAULT_CATALOG, DEFAULTS, KafkaConnection, Settings, load_settings
from rtim.stream.app import create_app


@dataclass
class Worker:
    """The parts of a worker built from one set of settings (nothing started)."""

    app: Any
    kafka_consumer: Any  # the aiokafka consumer Faust's consumer thread builds
    processor: Any
    site: Any  # the web server's listening site


async def build(settings: Settings) -> Worker:
    app = create_app(settings)
    kafka_consumer = app.consumer._thread._create_worker_consumer(app.transport)
    await kafka_consumer.stop()  # built, never started: only its configuration is read
    processor = app.consumer._batch_sink.__self__
    runner = app.web._runner
    await runner.setup()
    try:
        site = app.web._create_site()
    finally:
        await runner.cleanup()
    return Worker(app, kafka_consumer, processor, site)


def table(w: Worker) -> Any:
    return w.app.tables[CONTEXT_TABLE]


@dataclass
class Case:
    value: Any
    #: What the components got, and what they must have got.
    got: Callable[[Worker], Any]
    expected: Any


def catalog_copy(tmp: Path) -> Path:
    path = tmp / "offers.yaml"
    shutil.copy(DEFAULT_CATALOG, path)
    return path


CASES: dict[str, Callable[[Path], Case]] = {
    "broker": lambda tmp: Case(
        "kafka-a:9093,kafka-b:9093",
        lambda w: (
            w.kafka_consumer._client._bootstrap_servers,
            w.processor.publisher._config["bootstrap_servers"],
            [str(u) for u in w.app.conf.broker],
        ),
        (
            ["kafka-a:9093", "kafka-b:9093"],
            ["kafka-a:9093", "kafka-b:9093"],
            ["kafka://kafka-a:9093", "kafka://kafka-b:9093"],
        ),
    ),
    "app_id": lambda tmp: Case(
        "shop",
        lambda w: (
            w.kafka_consumer._group_id,
            table(w).changelog_topic.get_topic_name(),
            w.processor.engine.source,
            w.processor.publisher._config["client_id"],
        ),
        ("shop", changelog_topic("shop"), "/rtim/shop", "shop-publisher"),
    ),
    "web_port": lambda tmp: Case(7077, lambda w: w.site._port, 7077),
    "web_host": lambda tmp: Case("127.0.0.2", lambda w: w.site._host, "127.0.0.2"),
    "web_canonical_url": lambda tmp: Case(
        "http://rtim-1.example:7077/",
        lambda w: str(w.app.conf.canonical_url),
        "http://rtim-1.example:7077",
    ),
    "datadir": lambda tmp: Case(
        tmp / "data", lambda w: w.app.conf.tabledir.is_relative_to(tmp / "data"), True
    ),
    "store": lambda tmp: Case(
        "memory", lambda w: type(table(w).data).__module__, "faust.stores.memory"
    ),
    "catalog": lambda tmp: Case(
        catalog_copy(tmp),
        lambda w: w.processor.engine.catalog.source,
        str(tmp / "offers.yaml"),
    ),
    "partitions": lambda tmp: Case(
        6,
        lambda w: (
            w.app.conf.topic_partitions,
            table(w).partitions,
            next(t for t in w.app.topics if CLICKSTREAM_TOPIC in t.topics).partitions,
        ),
        (6, 6, 6),
    ),
    "max_event_bytes": lambda tmp: Case(1000, lambda w: w.processor.engine.max_event_bytes, 1000),
    "max_future_skew_s": lambda tmp: Case(
        60.0, lambda w: w.processor.engine.max_future_skew_ms, 60_000
    ),
    "trigger_ttl_s": lambda tmp: Case(30.0, lambda w: w.processor.engine.trigger_ttl_ms, 30_000),
    "max_fetch_records": lambda tmp: Case(123, lambda w: w.kafka_consumer._max_poll_records, 123),
    "fetch_max_wait_ms": lambda tmp: Case(77, lambda w: w.kafka_consumer._fetch_max_wait_ms, 77),
    "commit_interval_s": lambda tmp: Case(2.5, lambda w: w.app.consumer.commit_interval, 2.5),
    "cache_customers": lambda tmp: Case(5000, lambda w: w.processor.engine.cache_size, 5000),
    "session_timeout_s": lambda tmp: Case(
        20.0, lambda w: w.kafka_consumer._session_timeout_ms, 20_000
    ),
    "replication_factor": lambda tmp: Case(
        3,
        # Faust creates the changelog with the app's factor when the topic has none.
        lambda w: (table(w).changelog_topic.replicas, w.app.conf.topic_replication_factor),
        (None, 3),
    ),
    "max_record_bytes": lambda tmp: Case(
        50_000, lambda w: w.processor.publisher.max_record_bytes, 50_000
    ),
    "processing_guarantee": lambda tmp: Case(
        "exactly_once",
        lambda w: (
            type(w.processor.publisher).__name__,
            w.kafka_consumer._isolation_level,  # the fetcher reads committed records only
            table(w).before_recovery == w.processor._assigned,  # producers fence first
        ),
        ("TransactionalPublisher", "read_committed", True),
    ),
    "dedupe_window_s": lambda tmp: Case(
        3600.0, lambda w: w.processor.engine.dedupe_window_ms, 3_600_000
    ),
    "attribution_window_s": lambda tmp: Case(
        7200.0, lambda w: w.processor.engine.window_ms, 7_200_000
    ),
    "idle_close_s": lambda tmp: Case(5.0, lambda w: w.processor.engine.idle_ms, 5_000),
    "api_answer": lambda tmp: Case("stored", lambda w: w.app.rtim_api.answer_early, False),
    "model_snapshot_interval_s": lambda tmp: Case(2.5, lambda w: w.app.rtim_shared.interval, 2.5),
    "stall_error_s": lambda tmp: Case(30.0, lambda w: w.app.conf.stream_processing_timeout, 30.0),
}


#: Settings whose component is a whole worker process, and where that is tested.
ELSEWHERE = {
    "log_level": "tests/integration/test_config_errors.py::test_log_level_reaches_the_worker",
    "shutdown_timeout_s": (
        "tests/integration/test_broker_outage.py"
        "::test_stop_is_bounded_when_the_broker_does_not_answer"
    ),
}


def test_every_setting_has_a_case() -> None:
    assert sorted([*CASES, *ELSEWHERE]) == sorted(Settings.model_fields)


@pytest.mark.parametrize("name", sorted(CASES))
def test_setting_reaches_its_component(name: str, tmp_path: Path) -> None:
    case = CASES[name](tmp_path)
    assert case.value != getattr(DEFAULTS, name), "pick a value other than the default"
    base: dict[str, Any] = {"datadir": tmp_path / "data"}
    settings = Settings(**{**base, name: case.value})
    worker = asyncio.run(build(settings))
    assert case.got(worker) == case.expected


def test_the_changelog_name_is_fausts() -> None:
    assert faust.App("shop").Table(CONTEXT_TABLE)._changelog_topic_name() == changelog_topic("shop")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"partitions": "four"},
            "RTIM_PARTITIONS='four': Input should be a valid integer, "
            "unable to parse string as an integer",
        ),
        ({"store": "disk"}, "RTIM_STORE='disk': Input should be 'rocksdb' or 'memory'"),
        (
            {"max_event_bytes": 10},
            "RTIM_MAX_EVENT_BYTES=10: Input should be greater than or equal to 256",
        ),
        (
            {"web_port": 99999},
            "RTIM_WEB_PORT=99999: Input should be less than or equal to 65535",
        ),
        (
            {"max_future_skew_s": float("nan")},
            "RTIM_MAX_FUTURE_SKEW_S=nan: Input should be a finite number",
        ),
        (
            {"session_timeout_s": -1},
            "RTIM_SESSION_TIMEOUT_S=-1: Input should be greater than or equal to 1",
        ),
        (
            {"web_canonical_url": "notaurl"},
            "RTIM_WEB_CANONICAL_URL='notaurl': Value error, must be an http:// or https:// "
            "URL with a host",
        ),
    ],
)
def test_invalid_settings_name_the_variable(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(**overrides)
    assert str(err.value) == message


def test_invalid_environment_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RTIM_WEB_PORT", "http")
    monkeypatch.setenv("RTIM_LOG_LEVEL", "loud")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "RTIM_WEB_PORT='http'" in str(err.value)
    assert "RTIM_LOG_LEVEL='loud'" in str(err.value)


def test_kafka_connection_of_every_client() -> None:
    kafka = KafkaConnection.parse(" k1:9092 ,k2:9092,")
    assert kafka.client_config() == {"bootstrap_servers": ["k1:9092", "k2:9092"]}
    assert kafka.faust_config() == {"broker": ["kafka://k1:9092", "kafka://k2:9092"]}
    assert str(kafka) == "k1:9092,k2:9092"
    with pytest.raises(ConfigError, match="RTIM_BROKER"):
        KafkaConnection.parse(" , ")
    for bad in ("notahost:zz", "kafka", "kafka:0", ":9092", "k1:9092,k2:99999"):
        with pytest.raises(ConfigError, match="is not host:port"):
            load_settings(broker=bad)
