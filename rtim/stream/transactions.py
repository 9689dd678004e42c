"""Exactly-once processing: a batch's outputs and its input offsets in Kafka transactions.

``RTIM_PROCESSING_GUARANTEE=exactly_once`` (docs/architecture.md, "Exactly-once
processing"). For every input partition of a batch, one transaction holds the outputs
that partition's records caused (:attr:`~rtim.stream.publish.OutRecord.source`:
changelog records, triggers, dead letters, re-keyed copies, whatever the batch
publishes) and the partition's next offset for the consumer group; it is committed
or aborted as a whole, and readers with ``read_committed`` see either all of it or
nothing.

Why a transactional producer per input partition (transactional id
``<app_id>-<topic>-<partition>``) and not one per worker: aiokafka 0.14.0 sends its
``TxnOffsetCommit`` as version 0 (``aiokafka/protocol/transaction.py``:
transactional id, group id, producer id and epoch, offsets), with no generation and
no member id (KIP-447 needs version 3), so the group coordinator takes offsets from
any producer, a zombie's too. What stops a zombie is the producer epoch of the
transactional id: the new owner of a partition starts that partition's producer
(``InitProducerId``) when it is assigned the partition, before the partition's table
is recovered (:meth:`TransactionalPublisher.assign`, called from
``ContextTable.on_rebalance``); that aborts whatever transaction the old owner had
open and refuses its later ones (``ProducerFenced``). A worker fenced this way
starts no producer for that partition again until an assignment gives it back.

What the producer does not take back: a batch the broker refused
(``MESSAGE_TOO_LARGE`` and the like) leaves a transactional producer's sequence
numbers past records the broker does not have, and it can send nothing more to that
partition. The transaction is aborted, the producer replaced (a new epoch) and the
partition's outputs sent again without the refused batch's records, which are all
reported refused (their causes are dead-lettered): a record over
``RTIM_MAX_RECORD_BYTES`` is caught before it is sent, so this happens only if that
setting is above a topic's ``max.message.bytes``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka import errors as kafka_errors

from rtim import metrics
from rtim.errors import ConfigError
from rtim.settings import KafkaConnection
from rtim.stream.publish import BatchPublisher, OutRecord

log = logging.getLogger(__name__)

#: Errors meaning another producer took this transactional id (or the broker expired
#: the transaction): what this worker did for the partition is not its to commit.
FENCING_ERRORS: tuple[type[Exception], ...] = (
    kafka_errors.ProducerFenced,
    kafka_errors.InvalidProducerEpoch,
    kafka_errors.InvalidProducerIdMapping,
)


class Fenced(Exception):
    """A partition's producer was fenced: the batch is not this worker's to commit.

    Not a :class:`~aiokafka.errors.KafkaError`: the publish retries must not catch it.
    """


def transactional_id(app_id: str, topic: str, partition: int) -> str:
    """The transactional id of an input partition's producer (stable across workers)."""
    return f"{app_id}-{topic}-{partition}"


def is_fencing(exc: BaseException) -> bool:
    fencing: tuple[type[BaseException], ...] = (Fenced, *FENCING_ERRORS)
    return isinstance(exc, fencing) or isinstance(exc.__cause__, fencing)


class TransactionalPublisher:
    """Publishes a batch's outputs in one transaction per input partition.

    The processor calls :meth:`publish` (any number of times for one batch: the
    outputs, then the dead letters of what Kafka refused), then :meth:`commit` with
    the batch's next offsets, or :meth:`abort`. A failed :meth:`publish` aborts every
    open transaction of the batch; the next call sends again what the batch's earlier
    calls had sent, so a retry of the failed call alone gives the whole batch. A
    fencing error raises :class:`Fenced` and aborts the batch.

    Parameters
    ----------
    kafka
        The connection.
    app_id
        The consumer group, and the prefix of the transactional ids.
    input_topic
        The topic whose partitions each have a producer.
    client_id, max_record_bytes
        As for :class:`~rtim.stream.publish.BatchPublisher`.
    producer_class
        The producer (aiokafka's; a stand-in in unit tests).
    """

    def __init__(
        self,
        kafka: KafkaConnection | str,
        *,
        app_id: str,
        input_topic: str,
        client_id: str = "rtim",
        max_record_bytes: int | None = None,
        producer_class: Callable[..., AIOKafkaProducer] = AIOKafkaProducer,
        retry_delay: float = 0.2,
    ) -> None:
        self.kafka = KafkaConnection.parse(kafka)
        self.app_id = app_id
        self.input_topic = input_topic
        self.client_id = client_id
        self.max_record_bytes = max_record_bytes
        self.retry_delay = retry_delay
        self._producer_class = producer_class
        #: Kafka's default partitioner, as the at-least-once publisher has it (never started).
        self._keys = BatchPublisher(self.kafka)
        #: Input partitions this worker was assigned (and not fenced on since).
        self._owned: set[int] = set()
        self._producers: dict[int, BatchPublisher] = {}
        #: Per input partition with an open transaction, the records sent in it.
        self._open: dict[int, list[OutRecord]] = {}
        #: Input partitions whose records of the batch must be sent again (aborted).
        self._replay: set[int] = set()
        #: The last offset written per (topic, partition) in the batch's transactions.
        self._written: dict[tuple[str, int], int] = {}
        self.refused: list[tuple[int, BaseException]] = []

    def partition_for(self, key: bytes | None, partitions: list[int]) -> int:
        return self._keys.partition_for(key, partitions)

    async def start(self) -> None:
        """Nothing to start: producers are started on assignment."""

    async def assign(self, partitions: Iterable[int]) -> None:
        """The input partitions assigned now: start their producers, fencing any other
        worker's. Every assignment starts them anew: a partition kept across a rebalance
        may have been another worker's in between (this worker's producer then fenced)."""
        for partition in sorted(self._producers):
            await self._close(partition)
        self._owned = set(partitions)
        await asyncio.gather(*(self._producer(p) for p in sorted(self._owned)))

    async def stop(self, timeout: float | None = None) -> None:
        await self.abort()
        for partition in sorted(self._producers):
            await self._close(partition, timeout)
        self._owned.clear()

    async def publish(self, records: list[OutRecord]) -> dict[tuple[str, int], int]:
        """Send ``records``, each in its source partition's transaction (begun if none is
        open); return the last offset written per (topic, partition) in the batch so far.

        Records Kafka refuses, or over ``max_record_bytes``, are left out and listed in
        :attr:`refused` (indexes into ``records``). Raises :class:`Fenced`, or whatever
        else failed, after aborting the batch's transactions.
        """
        self.refused = []
        by_source: dict[int, list[int]] = {}
        fallback = min(self._owned) if self._owned else 0
        for index, rec in enumerate(records):
            source = rec.source if rec.source is not None else fallback
            by_source.setdefault(source, []).append(index)
        sent_before = {p: len(sent) for p, sent in self._open.items()}
        try:
            for source in sorted(by_source):
                await self._send(source, records, by_source[source])
        except Exception as exc:
            # What this call sent is the caller's to send again; earlier calls' records
            # are sent again by the next call.
            for partition, sent in self._open.items():
                del sent[sent_before.get(partition, 0) :]
            await self._failed(exc)
            raise
        self.refused.sort(key=lambda item: item[0])
        return dict(self._written)

    async def commit(
        self, offsets: dict[int, dict[str, int]], group_id: str, current: Callable[[], bool]
    ) -> dict[tuple[str, int], int] | None:
        """Commit the batch: per input partition, its next offset in each input topic
        (the clickstream and the topics co-partitioned with it) for ``group_id`` and its
        outputs in one transaction. A partition with outputs and no input records (a
        batch of windows closed on the wall clock) commits its outputs alone.

        Returns the last offset written per (topic, partition); None if the batch
        stopped being ``current`` while a failed commit waited to be tried again (then
        nothing uncommitted is kept). Raises :class:`Fenced`. Other failures are
        retried, the outputs sent again in new transactions.
        """
        delay = self.retry_delay
        done: set[int] = set()
        while True:
            pending = sorted((set(offsets) | set(self._open)) - done)
            results = await asyncio.gather(
                *(self._commit_one(p, offsets.get(p, {}), group_id) for p in pending),
                return_exceptions=True,
            )
            errors = []
            for partition, result in zip(pending, results, strict=True):
                if isinstance(result, BaseException):
                    errors.append(result)
                else:
                    done.add(partition)
            if not errors:
                written = dict(self._written)
                self._open.clear()
                self._replay.clear()
                self._written.clear()
                return written
            failed = next((e for e in errors if is_fencing(e)), errors[0])
            if not isinstance(failed, Exception):
                raise failed  # cancelled
            await self._failed(failed)
            metrics.PUBLISH_RETRIES.inc()
            log.warning("transaction commit failed (%r); retrying in %.1f s", failed, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            if not current():
                await self.abort()
                return None

    async def abort(self) -> None:
        """Abort the batch's open transactions; nothing of the batch is sent again."""
        await self._abort_all(keep=False)

    async def _failed(self, exc: Exception) -> None:
        """After a failed send or commit: abort the batch's transactions, to be sent again
        by the next call; raises :class:`Fenced` if it was a fencing error (the partitions
        are then no longer this worker's until the next assignment)."""
        fenced = is_fencing(exc)
        if fenced:
            self._owned.clear()
        await self._abort_all(keep=True)
        if fenced:
            if isinstance(exc, Fenced):
                raise exc
            raise Fenced(repr(exc)) from exc

    async def _commit_one(self, partition: int, offsets: dict[str, int], group_id: str) -> None:
        pub = await self._begin(partition)
        if offsets:
            tps = {TopicPartition(topic, partition): at for topic, at in offsets.items()}
            await pub.producer.send_offsets_to_transaction(tps, group_id)
        await pub.producer.commit_transaction()
        self._open.pop(partition, None)
        self._replay.discard(partition)

    async def _send(self, source: int, records: list[OutRecord], indexes: list[int]) -> None:
        """Send one source partition's records in its transaction."""
        while True:
            pub = await self._begin(source)
            last = await pub.publish([records[i] for i in indexes])
            refused = {i for i, _ in pub.refused}
            self.refused.extend((indexes[i], exc) for i, exc in pub.refused)
            if not pub.broker_refused:
                self._open[source].extend(
                    records[index] for i, index in enumerate(indexes) if i not in refused
                )
                self._merge(last)
                return
            # The producer can send nothing more to the refused batch's partition: a new
            # producer (a new epoch) sends the transaction again, without those records.
            log.warning(
                "Kafka refused %d records in a transaction of %s[%d]: aborted, sending "
                "the rest again with a new producer",
                len(refused),
                self.input_topic,
                source,
            )
            await self._close(source)
            self._replay.add(source)
            indexes = [index for i, index in enumerate(indexes) if i not in refused]
            if not indexes:
                await self._begin(source)  # the partition's earlier records, again
                return

    async def _begin(self, partition: int) -> BatchPublisher:
        """The partition's publisher with its transaction open (begun now if not, with the
        batch's earlier records of the partition sent again if it was aborted)."""
        pub = await self._producer(partition)
        if partition not in self._open:
            await pub.producer.begin_transaction()
            self._open[partition] = []
            self._replay.discard(partition)
        elif partition in self._replay:
            await pub.producer.begin_transaction()
            self._replay.discard(partition)
            again = self._open[partition]
            if again:
                self._merge(await pub.publish(again))
                if pub.refused:  # taken before: nothing to dead-letter, but never silent
                    log.error(
                        "Kafka refused %d records it had taken before in this batch: dropped",
                        len(pub.refused),
                    )
        return pub

    async def _producer(self, partition: int) -> BatchPublisher:
        """The started producer of an owned input partition."""
        pub = self._producers.get(partition)
        if pub is not None:
            return pub
        if partition not in self._owned:
            raise Fenced(f"{self.input_topic}[{partition}] is not assigned to this worker")
        pub = BatchPublisher(
            self.kafka,
            client_id=f"{self.client_id}-{partition}",
            max_record_bytes=self.max_record_bytes,
            transactional_id=transactional_id(self.app_id, self.input_topic, partition),
            producer_class=self._producer_class,
        )
        self._producers[partition] = pub
        try:
            await pub.start()  # InitProducerId: fences the partition's earlier producers
        except BaseException:
            self._producers.pop(partition, None)
            raise
        return pub

    async def _abort_all(self, *, keep: bool) -> None:
        """Abort every open transaction; with ``keep``, their records are sent again by
        the next :meth:`publish` or :meth:`commit`. A producer that cannot abort (fenced,
        or failed) is replaced; a fenced partition is no longer owned."""
        for partition in sorted(self._open):
            pub = self._producers.get(partition)
            if pub is not None and partition not in self._replay:
                try:
                    await pub.producer.abort_transaction()
                except Exception as exc:
                    if is_fencing(exc):
                        self._owned.discard(partition)
                    await self._close(partition)
            self._replay.add(partition)
        if not keep:
            self._open.clear()
            self._replay.clear()
        self._written.clear()

    async def _close(self, partition: int, timeout: float | None = 2.0) -> None:
        pub = self._producers.pop(partition, None)
        if pub is not None:
            await pub.stop(timeout=timeout)

    def _merge(self, last: dict[tuple[str, int], int]) -> None:
        written = self._written
        for tp, offset in last.items():
            if offset > written.get(tp, -1):
                written[tp] = offset


#: Seconds the start-up check waits for a transactional producer.
STARTUP_CHECK_TIMEOUT = 30.0

NO_TRANSACTIONS = (
    "the broker at RTIM_BROKER={broker} does not support transactions ({error}): "
    "RTIM_PROCESSING_GUARANTEE=exactly_once needs Kafka or Redpanda with transactions; "
    "use RTIM_PROCESSING_GUARANTEE=at_least_once"
)


async def check_transactions(
    kafka: KafkaConnection,
    app_id: str,
    *,
    timeout: float = STARTUP_CHECK_TIMEOUT,
    producer_class: Callable[..., Any] = AIOKafkaProducer,
) -> None:
    """Raise :class:`~rtim.errors.ConfigError` unless the broker gives a transactional
    producer its id and epoch (``InitProducerId``).

    Its own transactional id, so that no running worker's producer is fenced by it.
    """
    producer = producer_class(
        **kafka.client_config(),
        client_id=f"{app_id}-transactions-check",
        transactional_id=f"{app_id}-transactions-check",
    )
    # Its log lines (the coordinator found, the error) would come before the one line
    # that says what to do; the error is in that line.
    sender_log = logging.getLogger("aiokafka.producer.sender")
    level = sender_log.level
    sender_log.setLevel(logging.CRITICAL)
    try:
        async with asyncio.timeout(timeout):
            await producer.start()
        return
    except TimeoutError:
        error = f"no producer id within {timeout:g} s"
    except kafka_errors.TransactionalIdAuthorizationFailed as exc:
        raise ConfigError(
            "RTIM_PROCESSING_GUARANTEE=exactly_once: the broker does not authorise the "
            f"transactional ids {app_id}-* ({exc})"
        ) from None
    except kafka_errors.KafkaConnectionError:
        raise  # not reachable: not a matter of configuration
    except kafka_errors.KafkaError as exc:
        error = repr(exc)
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5.0):
                await producer.stop()
        sender_log.setLevel(level)
    raise ConfigError(NO_TRANSACTIONS.format(broker=kafka, error=error))
