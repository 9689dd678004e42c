"""Fixtures for tests against a real broker and real worker processes.

Each test gets its own embedded broker (it starts in tens of milliseconds), so
topic names are the product's own (``rtim.clickstream`` ...) and tests cannot
see each other's records.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rtim.broker import EmbeddedBroker
from rtim.settings import Settings
from rtim.stream.process import WorkerProcess
from rtim.stream.topics import create_topics, topic_specs

from .proxy import TcpProxy
from .support import PARTITIONS, TEST_ENV


@pytest.fixture
def kafka(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A fresh embedded broker for one test, with RTIM's topics created."""
    with EmbeddedBroker(log_path=tmp_path / "broker.log") as started:
        settings = Settings(broker=started.bootstrap, partitions=PARTITIONS)
        asyncio.run(create_topics(started.bootstrap, topic_specs(settings)))
        yield started


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[tuple[EmbeddedBroker, TcpProxy]]:
    """A broker that advertises a proxy in front of it, with RTIM's topics created."""
    proxy = TcpProxy()
    with proxy, EmbeddedBroker(log_path=tmp_path / "broker.log", advertise=proxy.address) as broker:
        proxy.target = ("127.0.0.1", broker.port)
        settings = Settings(broker=broker.bootstrap, partitions=PARTITIONS)
        asyncio.run(create_topics(broker.bootstrap, topic_specs(settings)))
        yield broker, proxy


@pytest.fixture
def workers(kafka: EmbeddedBroker, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Factory of worker processes on the test's broker; all stopped at the end."""
    started: list[WorkerProcess] = []

    def make(name: str = "w1", *, datadir: Path | None = None, **kwargs: Any) -> WorkerProcess:
        env = dict(TEST_ENV)
        env.update(kwargs.pop("env", {}))
        worker = WorkerProcess(
            broker=kafka.bootstrap,
            datadir=datadir or tmp_path / f"{name}-data",
            log_path=tmp_path / f"{name}.log",
            env=env,
            **kwargs,
        )
        started.append(worker)
        return worker.start()

    yield make
    for worker in started:
        worker.stop(timeout=15)
