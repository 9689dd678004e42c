"""Running an RTIM worker: make sure the topics exist, then run the Faust worker."""

from __future__ import annotations

import asyncio
import logging
import os
import socket

import faust
from aiokafka import AIOKafkaProducer

from rtim.errors import ConfigError
from rtim.names import CLICKSTREAM_TOPIC
from rtim.settings import Settings
from rtim.stream.app import create_app
from rtim.stream.consumer import BatchConsumer
from rtim.stream.topics import create_topics, topic_specs

log = logging.getLogger("rtim.worker")

#: Logged at the end of the ``kill -USR1`` report.
STATE_REPORT_END = "end of state report"


class TopicMismatch(ConfigError):
    """An existing topic cannot be used as it is (for example, wrong partition count)."""


async def check_copartitioning(settings: Settings) -> None:
    """The clickstream must have RTIM_PARTITIONS partitions, like the context table.

    Faust keeps a customer's context in the table partition numbered like the
    clickstream partition its events arrive on: with other counts, contexts
    would be split and recovered into the wrong partitions.
    """
    # A producer, as aiokafka's consumer cancels itself if stopped right after start.
    producer = AIOKafkaProducer(**settings.kafka.client_config())
    await producer.start()
    try:
        found = await producer.partitions_for(CLICKSTREAM_TOPIC)
    finally:
        await producer.stop()
    if len(found) != settings.partitions:
        raise TopicMismatch(
            f"{CLICKSTREAM_TOPIC} has {len(found)} partitions but RTIM_PARTITIONS is "
            f"{settings.partitions}: set RTIM_PARTITIONS={len(found)}, or recreate the topic "
            "(the clickstream and the context table must be co-partitioned)"
        )


async def ensure_topics(settings: Settings, *, give_up_after: float | None = None) -> None:
    """Create missing topics (waiting for the broker if it is not there yet), then
    check the clickstream's partition count."""
    loop = asyncio.get_running_loop()
    deadline = None if give_up_after is None else loop.time() + give_up_after
    delay = 0.5
    specs = topic_specs(settings)
    while True:
        try:
            await create_topics(
                settings.kafka, specs, replication_factor=settings.replication_factor, timeout=15.0
            )
            break
        except Exception as exc:  # any broker error: wait and retry
            if deadline is not None and loop.time() > deadline:
                raise
            log.warning(
                "broker %s not available (%r); retrying in %.1f s", settings.broker, exc, delay
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
    await check_copartitioning(settings)


def check_web_port(settings: Settings) -> None:
    """Fail at once, naming the setting, if the web port cannot be listened on.

    Faust would find out only once the worker runs, with a long traceback.
    """
    host, port = settings.web_host, settings.web_port
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise ConfigError(f"RTIM_WEB_HOST={host!r}: not an address to listen on ({exc})") from None
    with socket.socket(family, kind, proto) as sock:
        # As the web server itself binds: a port in TIME_WAIT is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise ConfigError(
                f"RTIM_WEB_PORT={port}: cannot listen on {host}:{port} ({exc.strerror}); "
                "set RTIM_WEB_PORT to a free port"
            ) from None


class Worker(faust.Worker):
    """Faust's worker; ``kill -USR1`` also logs where each partition stands.

    (Faust's own SIGUSR1 handler, kept, prints every thread's and task's stack.)
    """

    def _on_sigusr1(self) -> None:
        consumer = self.app.consumer
        if isinstance(consumer, BatchConsumer):
            log.warning("partitions:\n%s", consumer.partition_report())
        super()._on_sigusr1()
        # After Faust's dump (a task scheduled before this one), so that a reader of the
        # log knows the report is complete.
        self.add_future(self._report_done())

    async def _report_done(self) -> None:
        log.warning(STATE_REPORT_END)


def run_worker(settings: Settings) -> None:
    """Run a worker until it is stopped (SIGINT/SIGTERM)."""
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        os.makedirs(settings.datadir, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"RTIM_DATADIR={str(settings.datadir)!r}: {exc.strerror}") from None
    check_web_port(settings)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.run_until_complete(ensure_topics(settings))
    app = create_app(settings)
    worker = Worker(app, loglevel=settings.log_level, loop=loop, redirect_stdouts=False)
    worker.execute_from_commandline()
