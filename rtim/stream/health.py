"""Whether the worker reaches its Kafka cluster: one probe, one state, one log line per retry.

The Kafka clients inside a worker (Faust's consumer, the publisher, the end-offset
probe) all retry by themselves when the broker goes away, and each logs every failed
attempt: about 77 ERROR lines a second. :class:`BrokerHealth` is the one place that
says whether the cluster answers. It asks the brokers for their list every
``interval`` seconds with a client of its own; once none answers it logs one line per
retry with back-off (as the worker does at start-up), readiness answers 503,
``rtim_broker_up`` is 0, and :class:`ConnectionErrorFilter` keeps the clients' repeats
of known connection errors out of the log until the cluster answers again. The clients
reconnect by themselves; nothing is restarted.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError
from aiokafka.protocol.metadata import MetadataRequest
from mode import Service

from rtim import metrics
from rtim.settings import KafkaConnection

log = logging.getLogger("rtim.broker")

#: aiokafka's log messages (format strings) that say a request or connection to a
#: broker failed. Other messages, warnings and errors always pass.
CONNECTION_ERRORS = frozenset(
    {
        'Unable connect to "%s:%s": %s',
        'Unable to request metadata from "%s:%s": %s',
        "Unable to request metadata from node with id %s: %r",
        "Unable to update metadata from %s",
        "Unable connect to node with id %s: %s",
        "Error sending %s to node %s [%s] -- marking coordinator dead",
        "Marking the coordinator dead (node %s)for group %s.",
        "Group Coordinator Request failed: %s",
        "FindCoordinator Request failed: %s",
        "Heartbeat session expired - marking coordinator dead",
        "Heartbeat send request failed: %s. Will retry.",
        "Failed fetch messages from %s: %s",
        "Failed fetch offsets from %s: %s",
        "Cannot send %r to %s: %r",
        "Could not send %r: %r",
        "Got error produce response: %s",
        "LeaveGroup request failed: %s",
        "OffsetCommit failed before join, ignoring: %s",
        "Auto offset commit failed: %s",
        "Failed to commit on finallization: %s",
    }
)


class BrokerHealth(Service):
    """Probes the cluster; ``up`` is False from a failed probe to the next answered one.

    Parameters
    ----------
    kafka
        How to connect (:class:`~rtim.settings.KafkaConnection`, or ``host:port,...``).
    interval
        Seconds between probes while the cluster answers.
    timeout
        Seconds a probe may take before the cluster counts as unreachable.
    max_backoff
        Longest wait between probes while it is unreachable.
    """

    def __init__(
        self,
        kafka: KafkaConnection | str,
        *,
        client_id: str = "rtim-health",
        interval: float = 1.0,
        timeout: float = 3.0,
        max_backoff: float = 5.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.kafka = KafkaConnection.parse(kafka)
        self.client_id = client_id
        self.interval = interval
        self.timeout = timeout
        self.max_backoff = max_backoff
        # The worker starts once it has reached the cluster (it creates its topics).
        self.up = True
        self.down_since: float | None = None
        self.suppressed = 0
        self._client: AIOKafkaClient | None = None
        self._wake: asyncio.Event | None = None
        self._filter = ConnectionErrorFilter(self)
        metrics.BROKER_UP.set(1)

    def suspect(self) -> None:
        """Probe now (a client just failed to reach a broker). Safe from any thread."""
        if self._wake is not None and self.up and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._wake_if_up)

    def _wake_if_up(self) -> None:
        # Not once the probe has found the broker down: it is backing off then.
        if self.up and self._wake is not None:
            self._wake.set()

    async def on_start(self) -> None:
        self._wake = asyncio.Event()
        self._filter.install()

    async def on_stop(self) -> None:
        self._filter.remove()
        client, self._client = self._client, None
        if client is not None:
            try:
                async with asyncio.timeout(1.0):
                    await client.close()
            except Exception as exc:  # unreachable broker: the sockets close with the process
                log.debug("broker probe client did not close: %r", exc)

    async def probe(self) -> None:
        """Ask the brokers for their list (no topics) until one answers; raise if none
        does in time."""
        async with asyncio.timeout(self.timeout):
            if self._client is None:
                client = AIOKafkaClient(
                    **self.kafka.client_config(),
                    client_id=self.client_id,
                    request_timeout_ms=int(self.timeout * 1000),
                )
                try:
                    await client.bootstrap()
                except BaseException:
                    await client.close()
                    raise
                self._client = client
                return
            nodes = [broker.nodeId for broker in self._client.cluster.brokers()]
            random.shuffle(nodes)
            failed: Exception = KafkaError("no broker known")
            for node in nodes:
                try:
                    await self._client.send(node, MetadataRequest([]))
                    return
                except KafkaError as exc:
                    failed = exc
            raise failed

    @Service.task
    async def _watch(self) -> None:
        assert self._wake is not None
        delay = 0.5
        while not self.should_stop:
            try:
                await self.probe()
            except Exception as exc:  # any failure to get an answer counts as unreachable
                if self.up:
                    self.up = False
                    self.down_since = time.monotonic()
                    self.suppressed = 0
                    metrics.BROKER_UP.set(0)
                    delay = 0.5
                log.warning(
                    "broker %s not reachable (%r); retrying in %.1f s",
                    self.kafka,
                    exc,
                    delay,
                )
                wait, delay = delay, min(delay * 2, self.max_backoff)
            else:
                if not self.up:
                    assert self.down_since is not None
                    log.warning(
                        "broker %s reachable again after %.1f s "
                        "(%d repeated connection errors of the Kafka clients not logged)",
                        self.kafka,
                        time.monotonic() - self.down_since,
                        self.suppressed,
                    )
                    self.up = True
                    self._filter.reset()
                    metrics.BROKER_UP.set(1)
                wait = self.interval
            self._wake.clear()
            await self.wait_first(self._wake.wait(), timeout=wait)


class ConnectionErrorFilter(logging.Filter):
    """Drops repeats of aiokafka's connection errors while the cluster is known unreachable.

    The first record of each kind during an outage passes (it says which client
    failed and how); the rest are counted in ``BrokerHealth.suppressed``. While
    the cluster is up, every record passes and a connection error makes the
    health probe run at once.
    """

    def __init__(self, health: BrokerHealth) -> None:
        super().__init__()
        self.health = health
        self._seen: set[tuple[str, Any]] = set()
        self._loggers: list[logging.Logger] = []

    def install(self) -> None:
        # A logger's filters see only the records made on it, not its children's.
        self._loggers = [
            logging.getLogger(name)
            for name in list(logging.root.manager.loggerDict)
            if name == "aiokafka" or name.startswith("aiokafka.")
        ]
        for logger in self._loggers:
            logger.addFilter(self)

    def remove(self) -> None:
        for logger in self._loggers:
            logger.removeFilter(self)
        self._loggers = []

    def reset(self) -> None:
        self._seen = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg not in CONNECTION_ERRORS:
            return True
        health = self.health
        if health.up:
            health.suspect()
            return True
        kind = (record.name, record.msg)
        if kind in self._seen:
            health.suppressed += 1
            return False
        self._seen.add(kind)
        return True
