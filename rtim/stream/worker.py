"""Running an RTIM worker: make sure the topics exist, then run the Faust worker."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

import faust
from aiokafka import AIOKafkaProducer

from rtim.errors import ConfigError
from rtim.learn.models import import_in_background
from rtim.names import CLICKSTREAM_TOPIC
from rtim.settings import Settings
from rtim.stream.app import create_app
from rtim.stream.consumer import BatchConsumer
from rtim.stream.topics import create_topics, topic_specs
from rtim.stream.transactions import check_transactions

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


#: Exit code of a worker that did not stop within RTIM_SHUTDOWN_TIMEOUT_S.
EXIT_SHUTDOWN_TIMED_OUT = 1


class Worker(faust.Worker):
    """Faust's worker, whose stop is bounded; ``kill -USR1`` also logs where each
    partition stands.

    (Faust's own SIGUSR1 handler, kept, prints every thread's and task's stack.)
    Once SIGTERM or SIGINT arrives, the worker has ``shutdown_timeout`` seconds to
    stop; then it logs what it still waits for and exits with
    :data:`EXIT_SHUTDOWN_TIMED_OUT`, before the orchestrator's SIGKILL. The clock
    runs in a thread of its own: it must fire even if the event loop is blocked.
    """

    #: Seconds the event loop still runs once every task is done, before it closes, so
    #: that closed connections finish closing (a few turns of the loop). mode waits a
    #: whole second here, at every stop: a rolling restart waited that long per worker.
    close_grace_s: float = 0.1

    def __init__(self, *args: Any, shutdown_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.shutdown_timeout = shutdown_timeout

    async def _sentinel_task(self) -> None:
        await asyncio.sleep(self.close_grace_s)

    def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
        # No terminal spinner (a worker is a service). Faust keeps one at levels from
        # WARN up and sets the root logger to DEBUG so that it spins on every record:
        # each debug call of aiokafka, Faust and mode then built a record (a few per
        # request to the broker, in both the worker's threads), for nothing.
        self.spinner = None

    def _schedule_shutdown(self, signal: signal.Signals) -> None:
        if not self._signal_stop_time:
            timer = threading.Timer(self.shutdown_timeout, self._give_up)
            timer.daemon = True
            timer.start()
        super()._schedule_shutdown(signal)

    def _give_up(self) -> None:
        try:
            waiting = "; ".join(self._still_stopping()) or "unknown"
        except Exception as exc:  # read from another thread: a snapshot may fail
            waiting = f"unknown ({exc!r})"
        log.error(
            "not stopped within %g s (RTIM_SHUTDOWN_TIMEOUT_S), exiting with code %d; "
            "still waiting for: %s",
            self.shutdown_timeout,
            EXIT_SHUTDOWN_TIMED_OUT,
            waiting,
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(EXIT_SHUTDOWN_TIMED_OUT)

    def _still_stopping(self) -> Iterator[str]:
        """The innermost services still stopping, and where the stop itself waits."""

        def leaves(service: Any) -> Iterator[str]:
            stopping = [c for c in service._children if c.state == "stopping"]
            for child in stopping:
                yield from leaves(child)
            if not stopping and service.state == "stopping":
                yield service.shortlabel

        yield from leaves(self)
        for thread in threading.enumerate():  # the process cannot end before these
            if not thread.daemon and thread is not threading.main_thread():
                yield f"thread {thread.name}"
        future = self._signal_stop_future
        coro = future.get_coro() if isinstance(future, asyncio.Task) else None
        frame = None
        while coro is not None:  # down the chain of awaits to the innermost one
            frame = getattr(coro, "cr_frame", None) or frame
            coro = getattr(coro, "cr_await", None)
        if frame is not None:
            code = frame.f_code
            yield f"{code.co_qualname} ({code.co_filename}:{frame.f_lineno})"

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
    if settings.processing_guarantee == "exactly_once":
        loop.run_until_complete(check_transactions(settings.kafka, settings.app_id))
    app = create_app(settings)
    # river's models import in about a second: meanwhile the worker joins its group.
    import_in_background()
    worker = Worker(
        app,
        loglevel=settings.log_level,
        loop=loop,
        redirect_stdouts=False,
        shutdown_timeout=settings.shutdown_timeout_s,
    )
    worker.execute_from_commandline()
