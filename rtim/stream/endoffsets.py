"""True end offsets on the embedded broker and on real Kafka.

Why this exists: the embedded Tansu broker answers ListOffsets(latest) with the
*last batch's base offset + 1* instead of the last offset + 1: 100 records
produced in one batch at offset 0 report an end offset of 1. Its Fetch responses
carry the right high watermark, though (docs/architecture.md, "The embedded
broker's end offsets"). Anything that trusts
``consumer.end_offsets`` (lag, "have I read everything", table recovery) is short by
the last batch's size minus one.

:class:`EndOffsetProbe` asks for the end offsets as usual, then reads the tail of every
non-empty partition from *reported end - 1* and returns
``max(reported, last offset seen + 1, fetch high watermark)``. On real Kafka the
reported value is already right and the fetch only confirms it (or returns a larger
value if records arrived meanwhile), so the same code holds on both.

:func:`stop_consumer`, which every consumer of the worker stops through, also makes a
consumer leave its group in the embedded broker's generation 0, which aiokafka skips
(it wraps the coordinator's ``_maybe_leave_group``; tests/unit/test_faust_overrides.py
guards the code it relies on).

Examples
--------
100 records produced in one batch to the embedded broker, which reports an end offset
of 1 for them:

>>> import asyncio
>>> from aiokafka import AIOKafkaProducer
>>> from rtim.broker import EmbeddedBroker
>>> async def produce_then_probe(bootstrap: str) -> dict:
...     producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=100)
...     await producer.start()
...     for _ in range(100):
...         await producer.send("clicks", b"click", partition=0)
...     await producer.stop()  # sends the batch
...     async with EndOffsetProbe(bootstrap) as probe:
...         return await probe.end_offsets([TopicPartition("clicks", 0)])
>>> with EmbeddedBroker() as broker:
...     asyncio.run(produce_then_probe(broker.bootstrap))
{TopicPartition(topic='clicks', partition=0): 100}
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Self

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.consumer.group_coordinator import GroupCoordinator
from aiokafka.errors import KafkaError
from aiokafka.protocol.group import LeaveGroupRequest

from rtim.settings import KafkaConnection

__all__ = ["EndOffsetProbe", "stop_consumer", "true_end_offsets"]

log = logging.getLogger(__name__)

#: Seconds the probe's consumer gets to close (it is in no group: nothing to leave).
STOP_TIMEOUT = 3.0


async def stop_consumer(consumer: AIOKafkaConsumer, timeout: float) -> None:
    """Stop an aiokafka consumer within ``timeout`` seconds, broker or no broker.

    With the broker gone, ``AIOKafkaConsumer.stop()`` raises ``CancelledError``
    from ``Fetcher.close()`` (which awaits a fetch task it has just cancelled
    while that task sleeps out its retry back-off) before it closes the
    connections, and leaving the group waits for a broker that may not answer.
    Either way the connections are dropped and the caller goes on stopping.
    """
    _leave_generation_zero(consumer)
    try:
        async with asyncio.timeout(timeout):
            await consumer.stop()
    except (Exception, asyncio.CancelledError) as exc:
        task = asyncio.current_task()
        if isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling():
            raise  # the caller itself is cancelled
        log.warning("Kafka consumer did not close cleanly (%r); dropping its connections", exc)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await consumer._client.close()


def _leave_generation_zero(consumer: AIOKafkaConsumer) -> None:
    """Have the consumer leave its group as it closes in generation 0 too.

    aiokafka's close sends LeaveGroup only in a generation above 0, and the embedded
    broker numbers a group's first generation 0 (Kafka starts at 1): the first worker of
    a group stopped without leaving it, and the worker started next waited for its
    session timeout and one more rebalance (8 s in the tests) before it had partitions.
    The coordinator's own leave step is wrapped, so that the request goes at the same
    point of the close, once the coordinator's tasks are done.
    """
    coordinator = getattr(consumer, "_coordinator", None)
    if not isinstance(coordinator, GroupCoordinator):  # not started, or in no group
        return
    aiokafka_leave = coordinator._maybe_leave_group

    async def leave() -> None:
        member = coordinator.member_id
        if coordinator.generation == 0 and member and coordinator._group_instance_id is None:
            try:
                await coordinator._send_req(LeaveGroupRequest(coordinator.group_id, member))
            except KafkaError as exc:
                log.warning("LeaveGroup request failed: %r", exc)
            else:
                log.info("LeaveGroup request succeeded (generation 0)")
            coordinator.reset_generation()
        else:
            await aiokafka_leave()

    coordinator._maybe_leave_group = leave


class EndOffsetProbe:
    """Reports true end offsets with a private, group-less consumer.

    The consumer is started on first use and reused; calls are serialised because
    they share its assignment.

    Parameters
    ----------
    kafka
        The connection (or bootstrap servers, ``host:port[,host:port]``).
    timeout
        Default deadline in seconds for one :meth:`end_offsets` call.
    committed
        Speak of committed records only (exactly-once processing): the offset after the
        last record of a committed transaction, which readers with ``read_committed``
        (table recovery) see last. Not the last stable offset itself: a transaction's
        commit marker takes the offset before it, and is never delivered, so a reader
        waiting for the record at *last stable offset - 1* would wait for ever.
    **consumer_config
        Extra :class:`aiokafka.AIOKafkaConsumer` arguments.
    """

    def __init__(
        self,
        kafka: KafkaConnection | str,
        *,
        timeout: float = 10.0,
        committed: bool = False,
        **consumer_config: Any,
    ) -> None:
        self.timeout = timeout
        self.committed = committed
        self._config: dict[str, Any] = {
            **KafkaConnection.parse(kafka).client_config(),
            "group_id": None,
            "enable_auto_commit": False,
            # read_uncommitted, so ListOffsets and the fetch both speak of the high
            # watermark (read_committed would mix the last stable offset in).
            "isolation_level": "read_committed" if committed else "read_uncommitted",
            # If end-1 was deleted by retention, fall back to the end, not the start.
            "auto_offset_reset": "latest",
            # Short long-polls: after the tail fetch the fetcher polls the (empty) end
            # of the log, and a new call should not wait behind that.
            "fetch_max_wait_ms": 50,
            **consumer_config,
        }
        self._consumer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Start the consumer (done lazily by :meth:`end_offsets`)."""
        if self._consumer is None:
            consumer = AIOKafkaConsumer(**self._config)
            try:
                await consumer.start()
            except BaseException:
                await stop_consumer(consumer, STOP_TIMEOUT)
                raise
            self._consumer = consumer

    async def stop(self) -> None:
        """Stop the consumer. Idempotent; the probe can be started again."""
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await stop_consumer(consumer, STOP_TIMEOUT)

    async def end_offsets(
        self, tps: Iterable[TopicPartition], *, timeout: float | None = None
    ) -> dict[TopicPartition, int]:
        """Return the offset the next record of each partition will get.

        Parameters
        ----------
        tps
            Partitions to ask about, all handled in one assignment.
        timeout
            Deadline in seconds for the whole call; defaults to ``self.timeout``.

        Returns
        -------
        dict
            ``TopicPartition -> end offset`` (0 for an empty partition).

        Raises
        ------
        TimeoutError
            If the broker does not answer in time (never a possibly short value).
        """
        wanted = list(dict.fromkeys(tps))
        if not wanted:
            return {}
        async with self._lock:
            await self.start()
            consumer = self._consumer
            assert consumer is not None
            seconds = self.timeout if timeout is None else timeout
            pending = set(wanted)
            try:
                async with asyncio.timeout(seconds):
                    ends = dict(await consumer.end_offsets(wanted))
                    # A reported 0 is right on both brokers: Tansu's wrong answer is at
                    # least 1 for a partition holding any record.
                    pending = {tp for tp in wanted if ends[tp] > 0}
                    if pending and self.committed:
                        await self._last_committed(consumer, ends, pending)
                    elif pending:
                        await self._read_tails(consumer, ends, pending)
            except TimeoutError:
                missing = ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(pending))
                raise TimeoutError(
                    f"end offsets not known within {seconds} s for {missing} "
                    "(unknown partition, or broker unreachable?)"
                ) from None
            return ends

    @staticmethod
    async def _read_tails(
        consumer: AIOKafkaConsumer,
        ends: dict[TopicPartition, int],
        pending: set[TopicPartition],
    ) -> None:
        """Fetch each pending partition from ``ends[tp] - 1``, increasing ``ends`` in place.

        Partitions leave ``pending`` as they complete, so on a timeout it names the
        ones that did not.

        A partition is done once a fetch response for it arrived: aiokafka sets the
        high watermark from every successful response, records or not, and a new
        assignment starts with none, so a stale value from an earlier call cannot
        end the wait early.
        """
        consumer.assign(list(pending))
        for tp in pending:
            consumer.seek(tp, ends[tp] - 1)
        try:
            while pending:
                batches = await consumer.getmany(timeout_ms=20)
                for tp, records in batches.items():
                    if records:
                        ends[tp] = max(ends[tp], records[-1].offset + 1)
                for tp in list(pending):
                    highwater = consumer.highwater(tp)
                    if highwater is not None:
                        ends[tp] = max(ends[tp], highwater)
                        pending.discard(tp)
        finally:
            # Stop background fetching between calls.
            consumer.unsubscribe()

    @staticmethod
    async def _last_committed(
        consumer: AIOKafkaConsumer,
        ends: dict[TopicPartition, int],
        pending: set[TopicPartition],
    ) -> None:
        """Set ``ends`` to the offset after each partition's last committed record.

        ``ends`` holds the last stable offsets (ListOffsets with ``read_committed``).
        Each partition is read from a little before it up to it; if only markers and
        aborted records are there, from further back (twice as far each time), down
        to the start of the partition (then 0: no committed record).
        """
        stable = dict(ends)
        last: dict[TopicPartition, int] = {}
        back = 16
        upto = dict(stable)
        while pending:
            starts = {tp: max(0, upto[tp] - back) for tp in pending}
            consumer.assign(list(pending))
            for tp, start in starts.items():
                consumer.seek(tp, start)
            try:
                reading = set(pending)
                while reading:
                    batches = await consumer.getmany(timeout_ms=20)
                    for tp, records in batches.items():
                        if records:
                            last[tp] = max(last.get(tp, -1), records[-1].offset)
                    for tp in list(reading):
                        if await consumer.position(tp) >= upto[tp]:
                            reading.discard(tp)
            finally:
                consumer.unsubscribe()
            for tp in list(pending):
                if tp in last or starts[tp] == 0:
                    ends[tp] = last.get(tp, -1) + 1
                    pending.discard(tp)
                else:
                    upto[tp] = starts[tp]
            back *= 2

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def true_end_offsets(
    kafka: KafkaConnection | str,
    tps: Iterable[TopicPartition],
    *,
    timeout: float = 10.0,
) -> dict[TopicPartition, int]:
    """One-shot :meth:`EndOffsetProbe.end_offsets` with its own short-lived consumer."""
    async with EndOffsetProbe(kafka, timeout=timeout) as probe:
        return await probe.end_offsets(tps)
