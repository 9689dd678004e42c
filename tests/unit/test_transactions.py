"""Exactly-once processing: RTIM's sequence of transaction calls, batch by batch.

These are unit tests of RTIM's sequencing (rtim/stream/transactions.py and the
processor's use of it), not integration tests: the producer is an in-memory stand-in
of aiokafka's (begin, send, send_offsets_to_transaction, commit, abort, and the
broker's epoch fencing), because the embedded broker has no transactions. What a
real Kafka or Redpanda does with these calls is not tested here
(docs/architecture.md, "Exactly-once processing").
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import (
    IllegalOperation,
    KafkaConnectionError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
)
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatch
from faust.types import TP

from rtim.engine import Record
from rtim.errors import ConfigError
from rtim.names import CLICKSTREAM_TOPIC, DECISIONS_TOPIC, DLQ_TOPIC, RESPONSES_TOPIC
from rtim.settings import KafkaConnection, Settings
from rtim.stream.app import ClickstreamProcessor, create_app
from rtim.stream.consumer import FetchedBatch
from rtim.stream.publish import OutRecord
from rtim.stream.transactions import (
    Fenced,
    TransactionalPublisher,
    check_transactions,
    transactional_id,
)

from .test_engine import T0, cart_events, page


@dataclass
class Entry:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    txn: str
    state: str = "open"  # committed, aborted
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass
class TxnBroker:
    """What a broker with transactions keeps: logs, epochs per transactional id, the
    group's committed offsets; and errors to answer with, per call."""

    partitions: int = 4
    #: Record batches over this many bytes are refused (MESSAGE_TOO_LARGE).
    limit: int | None = None
    #: The producers' record batch size.
    batch_bytes: int = 512 * 1024
    entries: list[Entry] = field(default_factory=list)
    epochs: dict[str, int] = field(default_factory=dict)
    group_offsets: dict[TopicPartition, int] = field(default_factory=dict)
    #: call name ("send", "commit") -> errors raised by the next such calls.
    faults: dict[str, list[Exception]] = field(default_factory=lambda: defaultdict(list))
    calls: list[tuple[str, str]] = field(default_factory=list)
    #: Called before a fault is raised.
    on_fault: Callable[[], Any] | None = None

    def init(self, txn: str) -> int:
        """InitProducerId: a new epoch; the id's open transaction is aborted."""
        for entry in self.entries:
            if entry.txn == txn and entry.state == "open":
                entry.state = "aborted"
        self.epochs[txn] = self.epochs.get(txn, -1) + 1
        return self.epochs[txn]

    def committed(self, topic: str | None = None) -> list[Entry]:
        """What a read_committed reader sees."""
        return [e for e in self.entries if e.state == "committed" and topic in (None, e.topic)]

    def fault(self, call: str) -> None:
        if self.faults[call]:
            if self.on_fault is not None:
                self.on_fault()
            raise self.faults[call].pop(0)


class StandInProducer:
    """aiokafka's transactional producer as RTIM uses it, on a :class:`TxnBroker`; without
    a transactional id, a plain producer (its records visible at once)."""

    def __init__(self, broker: TxnBroker, **config: Any) -> None:
        self.broker = broker
        self.txn: str = config.get("transactional_id") or ""
        self.epoch = -1
        self.in_txn = False
        self.offsets: dict[TopicPartition, int] = {}
        #: Partitions where a batch was refused: the sequence numbers went on without it.
        self.out_of_sequence: set[tuple[str, int]] = set()

    def _check_epoch(self) -> None:
        if self.broker.epochs.get(self.txn) != self.epoch:
            raise ProducerFenced()

    async def start(self) -> None:
        if self.txn:
            self.epoch = self.broker.init(self.txn)

    async def stop(self) -> None:
        self._closed = True

    async def partitions_for(self, topic: str) -> set[int]:
        return set(range(self.broker.partitions))

    def create_batch(self) -> BatchBuilder:
        return BatchBuilder(self.broker.batch_bytes, 0, is_transactional=bool(self.txn))

    async def begin_transaction(self) -> None:
        assert not self.in_txn, "begin_transaction inside a transaction"
        self.broker.calls.append(("begin", self.txn))
        self.in_txn = True

    async def send_batch(self, builder: BatchBuilder, topic: str, *, partition: int) -> Any:
        if self.txn and not self.in_txn:
            raise IllegalOperation("Can't send messages while not in transaction")
        fut = asyncio.get_running_loop().create_future()
        try:
            self.broker.fault("send")
            if self.txn:
                self._check_epoch()
            if (topic, partition) in self.out_of_sequence:
                raise OutOfOrderSequenceNumber()
            if self.broker.limit is not None and builder.size() > self.broker.limit:
                self.out_of_sequence.add((topic, partition))
                raise MessageSizeTooLargeError()
        except Exception as exc:
            fut.set_exception(exc)
            return fut
        records = list(DefaultRecordBatch(bytes(builder._build())))
        log = [e for e in self.broker.entries if (e.topic, e.partition) == (topic, partition)]
        base = len(log)
        state = "open" if self.txn else "committed"
        for i, r in enumerate(records):
            headers = tuple(r.headers)
            entry = Entry(topic, partition, base + i, r.key, r.value, self.txn, state, headers)
            self.broker.entries.append(entry)
        fut.set_result(SimpleNamespace(offset=base))
        return fut

    async def send_offsets_to_transaction(
        self, offsets: dict[TopicPartition, int], group_id: str
    ) -> None:
        assert self.in_txn and group_id
        self._check_epoch()
        self.broker.calls.append(("offsets", self.txn))
        self.offsets.update(offsets)

    async def commit_transaction(self) -> None:
        self.broker.fault("commit")
        self._check_epoch()
        self.broker.calls.append(("commit", self.txn))
        for entry in self.broker.entries:
            if entry.txn == self.txn and entry.state == "open":
                entry.state = "committed"
        self.broker.group_offsets.update(self.offsets)
        self.offsets = {}
        self.in_txn = False

    async def abort_transaction(self) -> None:
        self._check_epoch()
        self.broker.calls.append(("abort", self.txn))
        for entry in self.broker.entries:
            if entry.txn == self.txn and entry.state == "open":
                entry.state = "aborted"
        self.offsets = {}
        self.in_txn = False


def publisher(broker: TxnBroker) -> TransactionalPublisher:
    return TransactionalPublisher(
        "127.0.0.1:1",
        app_id="rtim",
        input_topic=CLICKSTREAM_TOPIC,
        producer_class=partial(StandInProducer, broker),
        retry_delay=0.01,
    )


def txn(partition: int) -> str:
    return transactional_id("rtim", CLICKSTREAM_TOPIC, partition)


def out(topic: str, value: bytes, source: int, partition: int = 0) -> OutRecord:
    return OutRecord(topic, b"k", value, [], partition, source)


def test_each_input_partitions_outputs_and_next_offset_commit_in_its_own_transaction() -> None:
    broker = TxnBroker()
    pub = publisher(broker)
    records = [
        out("changelog", b"ctx-0", 0, partition=0),
        out("changelog", b"ctx-1", 1, partition=1),
        out("rtim.triggers.web", b"trigger-0", 0, partition=2),
        out("rtim.triggers.web", b"trigger-1", 1, partition=2),
        out(DLQ_TOPIC, b"letter-1", 1),
        out(CLICKSTREAM_TOPIC, b"rekeyed-0", 0, partition=3),
    ]

    async def batch() -> dict[tuple[str, int], int]:
        await pub.assign([0, 1])
        await pub.publish(records)
        assert broker.committed() == []  # nothing visible before the commit
        written = await pub.commit(
            {0: {CLICKSTREAM_TOPIC: 11}, 1: {CLICKSTREAM_TOPIC: 21}}, "rtim", lambda: True
        )
        assert written is not None
        return written

    written = asyncio.run(batch())
    by_txn = {
        p: sorted(e.value for e in broker.committed() if e.txn == txn(p) and e.value)
        for p in (0, 1)
    }
    assert by_txn == {
        0: [b"ctx-0", b"rekeyed-0", b"trigger-0"],
        1: [b"ctx-1", b"letter-1", b"trigger-1"],
    }
    assert broker.group_offsets == {
        TopicPartition(CLICKSTREAM_TOPIC, 0): 11,
        TopicPartition(CLICKSTREAM_TOPIC, 1): 21,
    }
    # The last offsets written, for the store's persisted changelog offset.
    assert written[("changelog", 0)] == 0 and written[("rtim.triggers.web", 2)] == 1
    # Per transaction: begin, then the offsets, then the commit (sends in between).
    for p in (0, 1):
        assert [c for c, t in broker.calls if t == txn(p)] == ["begin", "offsets", "commit"]


def test_a_failed_send_aborts_and_the_retry_commits_each_output_once() -> None:
    """A batch published in two calls (outputs, then dead letters of refusals): the second
    call fails; the retry of that call alone commits everything exactly once."""
    broker = TxnBroker()
    pub = publisher(broker)

    async def batch() -> None:
        await pub.assign([0])
        await pub.publish([out("changelog", b"ctx", 0), out("t", b"trigger", 0)])
        broker.faults["send"].append(KafkaConnectionError())
        with pytest.raises(KafkaConnectionError):
            await pub.publish([out(DLQ_TOPIC, b"letter", 0)])
        assert [e.state for e in broker.entries] == ["aborted", "aborted"]
        await pub.publish([out(DLQ_TOPIC, b"letter", 0)])
        await pub.commit({0: {CLICKSTREAM_TOPIC: 5}}, "rtim", lambda: True)

    asyncio.run(batch())
    assert sorted(e.value for e in broker.committed()) == [b"ctx", b"letter", b"trigger"]
    assert broker.group_offsets == {TopicPartition(CLICKSTREAM_TOPIC, 0): 5}


def test_a_failed_commit_is_retried_with_the_outputs_sent_again_once() -> None:
    broker = TxnBroker()
    pub = publisher(broker)
    broker.faults["commit"].append(KafkaConnectionError())

    async def batch() -> None:
        await pub.assign([0])
        await pub.publish([out("changelog", b"ctx", 0), out("t", b"trigger", 0)])
        assert await pub.commit({0: {CLICKSTREAM_TOPIC: 3}}, "rtim", lambda: True) is not None

    asyncio.run(batch())
    assert sorted(e.value for e in broker.committed()) == [b"ctx", b"trigger"]
    assert [c for c, _ in broker.calls] == [
        "begin",
        "offsets",
        "abort",
        "begin",
        "offsets",
        "commit",
    ]


def test_offsets_of_every_input_topic_and_outputs_without_inputs_commit() -> None:
    """Responses are read with the clickstream (co-partitioned): their next offset goes
    in the same partition's transaction; a partition with outputs and no input records
    (windows closed on the wall clock) commits its outputs alone."""
    broker = TxnBroker()
    pub = publisher(broker)

    async def batch() -> None:
        await pub.assign([0, 1])
        await pub.publish([out("changelog", b"ctx-0", 0), out("changelog", b"ctx-1", 1)])
        offsets = {0: {CLICKSTREAM_TOPIC: 7, RESPONSES_TOPIC: 3}}
        assert await pub.commit(offsets, "rtim", lambda: True) is not None

    asyncio.run(batch())
    assert sorted(e.value for e in broker.committed()) == [b"ctx-0", b"ctx-1"]
    assert broker.group_offsets == {
        TopicPartition(CLICKSTREAM_TOPIC, 0): 7,
        TopicPartition(RESPONSES_TOPIC, 0): 3,
    }
    assert [c for c, t in broker.calls if t == txn(1)] == ["begin", "commit"]


def test_a_record_kafka_refuses_in_a_transaction_is_reported_and_the_rest_committed() -> None:
    """A refused batch leaves a transactional producer unable to send to that partition:
    the transaction is aborted, a new producer (a new epoch) sends the rest."""
    broker = TxnBroker(limit=3_000)
    pub = publisher(broker)

    async def batch() -> list[int]:
        await pub.assign([0])
        await pub.publish([out("changelog", b"ctx", 0, partition=0)])
        await pub.publish(
            [
                out("t", b"small", 0, partition=1),
                out("t", b"x" * 5_000, 0, partition=2),
                out("t", b"other", 0, partition=3),
            ]
        )
        refused = [i for i, _ in pub.refused]
        await pub.commit({0: {CLICKSTREAM_TOPIC: 1}}, "rtim", lambda: True)
        return refused

    assert asyncio.run(batch()) == [1]
    assert sorted(e.value for e in broker.committed()) == [b"ctx", b"other", b"small"]
    assert broker.epochs[txn(0)] == 1  # the producer was replaced


def test_batches_after_a_refused_one_are_sent_again_not_refused() -> None:
    """The partition's later batches, out of sequence after the refused one, are sent
    again with a new producer; only the refused batch's records are reported."""
    broker = TxnBroker(limit=3_000, batch_bytes=1_000)
    pub = publisher(broker)
    values = [b"x" * 5_000, b"a" * 400, b"b" * 400, b"c" * 400, b"d" * 400]

    async def batch() -> list[int]:
        await pub.assign([0])
        await pub.publish([out("t", v, 0, partition=1) for v in values])
        refused = [i for i, _ in pub.refused]
        await pub.commit({0: {CLICKSTREAM_TOPIC: 1}}, "rtim", lambda: True)
        return refused

    assert asyncio.run(batch()) == [0]
    assert [e.value for e in broker.committed()] == values[1:]


def test_a_partition_kept_across_a_rebalance_gets_a_new_producer() -> None:
    """The partition was another worker's between two assignments of this one (this
    worker was cut off meanwhile): its old producer is fenced, the new one commits."""
    broker = TxnBroker()
    pub = publisher(broker)

    async def batch() -> None:
        await pub.assign([0])
        broker.init(txn(0))  # the other worker's producer, while it had the partition
        await pub.assign([0])
        await pub.publish([out("changelog", b"ctx", 0)])
        await pub.commit({0: {CLICKSTREAM_TOPIC: 1}}, "rtim", lambda: True)

    asyncio.run(batch())
    assert [e.value for e in broker.committed()] == [b"ctx"]


# The processor (rtim/stream/app.py) with the transactional publisher, on the stand-in.


class FakeConsumer:
    """The parts of BatchConsumer the processor calls."""

    def __init__(self) -> None:
        self.acked: list[tuple[TP, list[int]]] = []
        self.committed: dict[TP, int] = {}
        self.rejoined = 0

    def assignment(self) -> set[TP]:
        return {TP(CLICKSTREAM_TOPIC, 0), TP(CLICKSTREAM_TOPIC, 1)}

    def membership_lease(self, generation_id: int) -> bool:
        return True

    async def confirm_membership(self, generation_id: int) -> bool:
        return True

    async def rejoin(self) -> None:
        self.rejoined += 1

    def ack_batch(self, tp: TP, offsets: list[int]) -> None:
        self.acked.append((tp, offsets))

    def committed_in_transaction(self, tp: TP, offset: int) -> None:
        self.committed[tp] = offset

    def highwater(self, tp: TP) -> int | None:
        return None


def eos_processor(
    tmp_path: Path, broker: TxnBroker, **more: Any
) -> tuple[ClickstreamProcessor, FakeConsumer]:
    settings = Settings(
        datadir=tmp_path, store="memory", processing_guarantee="exactly_once", partitions=4, **more
    )
    app = create_app(settings)
    processor: ClickstreamProcessor = app.consumer._batch_sink.__self__
    assert isinstance(processor.publisher, TransactionalPublisher)
    processor.publisher._producer_class = partial(StandInProducer, broker)
    processor.handover_producer = partial(StandInProducer, broker)
    processor.publisher.retry_delay = 0.01
    consumer = FakeConsumer()
    processor._consumer = lambda: consumer  # type: ignore[method-assign]
    return processor, consumer


def customer_on(processor: ClickstreamProcessor, partition: int) -> str:
    """A customer id Kafka's default partitioner puts on ``partition`` (of 4)."""
    return next(
        f"c-{i}"
        for i in range(1000)
        if processor.publisher.partition_for(f"c-{i}".encode(), [0, 1, 2, 3]) == partition
    )


def fetched(events: dict[int, list[Any]], offset: int = 0) -> FetchedBatch:
    records = {}
    for partition, values in events.items():
        records[TP(CLICKSTREAM_TOPIC, partition)] = [
            Record(
                partition,
                offset + i,
                v.get("userId", "").encode() if isinstance(v, dict) else b"?",
                orjson.dumps(v) if isinstance(v, dict) else v,
                (),
                T0,
            )
            for i, v in enumerate(values)
        ]
    return FetchedBatch(0, records)


def test_a_committed_batch_is_stored_and_its_offsets_are_the_transactions(
    tmp_path: Path,
) -> None:
    broker = TxnBroker()
    processor, consumer = eos_processor(tmp_path, broker)
    a, b = customer_on(processor, 0), customer_on(processor, 1)
    batch = fetched({0: cart_events(a), 1: [page("/", user=b), b"not json"]}, offset=10)

    async def run() -> None:
        await processor._assigned(set(batch.records) | {TP("other", 0)})
        await processor.handle(batch)

    asyncio.run(run())
    committed = broker.committed()
    changelog = processor.changelog_topic
    # Partition 0's transaction: its customer's context and its cart trigger(s);
    # partition 1's: its customer's context and the dead letter of its bad record.
    topics = {p: sorted({e.topic for e in committed if e.txn == txn(p)}) for p in (0, 1)}
    # the decisions made on partition 0, recorded with their triggers
    triggers = {e.topic for e in committed if "triggers" in e.topic}
    assert topics[0] == sorted({changelog, DECISIONS_TOPIC, *triggers})
    assert any("triggers" in t for t in topics[0])
    assert topics[1] == sorted([DLQ_TOPIC, changelog])
    assert {(e.partition, e.key) for e in committed if e.topic == changelog} == {
        (0, a.encode()),
        (1, b.encode()),
    }
    assert broker.group_offsets == {
        TopicPartition(CLICKSTREAM_TOPIC, 0): 13,
        TopicPartition(CLICKSTREAM_TOPIC, 1): 12,
    }
    assert processor.store.get(0, a.encode()) is not None
    assert processor.store.get(1, b.encode()) is not None
    # The consumer's own commit is not asked for: the transactions committed the offsets.
    assert consumer.acked == []
    assert consumer.committed == {TP(CLICKSTREAM_TOPIC, 0): 13, TP(CLICKSTREAM_TOPIC, 1): 12}


def test_a_batch_dropped_after_a_failed_publish_leaves_nothing(tmp_path: Path) -> None:
    """The worker is stopping when the publish fails: the batch's transaction is aborted,
    nothing is stored, acknowledged or visible to read_committed readers."""
    broker = TxnBroker()
    processor, consumer = eos_processor(tmp_path, broker)
    a = customer_on(processor, 0)
    batch = fetched({0: cart_events(a)})
    broker.faults["send"].append(KafkaConnectionError())
    broker.on_fault = processor.app._stopped.set  # (should_stop)

    async def run() -> None:
        await processor._assigned(set(batch.records))
        await processor.handle(batch)

    asyncio.run(run())
    assert broker.entries and {e.state for e in broker.entries} == {"aborted"}
    assert broker.committed() == []
    assert broker.group_offsets == {}
    assert processor.store.get(0, a.encode()) is None
    assert consumer.acked == [] and consumer.committed == {} and consumer.rejoined == 0


@pytest.mark.parametrize("when", ["publish", "commit"])
def test_a_fenced_producer_drops_the_batch_as_a_lost_membership_does(
    tmp_path: Path, when: str
) -> None:
    """Another worker took partition 0 (it started the partition's producer: a new epoch)
    before this worker published its batch, or before it committed it. Its send or its
    commit is refused: nothing of the batch is stored or visible, the worker rejoins its
    group (the lost-membership path), and it does not start that partition's producer
    again (which would fence the new owner) before it is assigned the partition again."""
    broker = TxnBroker()
    processor, consumer = eos_processor(tmp_path, broker)
    a = customer_on(processor, 0)
    batch = fetched({0: cart_events(a)})

    async def run() -> None:
        await processor._assigned(set(batch.records))
        if when == "publish":
            broker.init(txn(0))  # the new owner's producer
        else:
            broker.faults["commit"].append(ProducerFenced())
            broker.on_fault = lambda: broker.init(txn(0))
        await processor.handle(batch)
        epoch = broker.epochs[txn(0)]
        with pytest.raises(Fenced):
            await processor.publisher.publish([out("t", b"late", 0)])
        assert broker.epochs[txn(0)] == epoch

    asyncio.run(run())
    assert broker.committed() == []
    assert broker.group_offsets == {}
    assert processor.store.get(0, a.encode()) is None
    assert consumer.rejoined == 1
    assert processor._fenced_generation == 0
    assert consumer.acked == [] and consumer.committed == {}


class NeverStarts:
    """A producer whose transaction coordinator never answers (Kafka with a transaction
    state log it cannot create, say)."""

    def __init__(self, **config: Any) -> None:
        pass

    async def start(self) -> None:
        await asyncio.Event().wait()

    async def stop(self) -> None:
        pass


def test_the_start_up_check_gives_up_with_a_configuration_error() -> None:
    """A broker that never gives a transactional producer its id stops the worker with
    the one line, instead of leaving it waiting before it consumes anything."""
    with pytest.raises(ConfigError) as err:
        asyncio.run(
            check_transactions(
                KafkaConnection.parse("k1:9092"), "shop", timeout=0.05, producer_class=NeverStarts
            )
        )
    assert str(err.value).startswith(
        "the broker at RTIM_BROKER=k1:9092 does not support transactions (no producer id "
        "within 0.05 s)"
    )
    assert str(err.value).endswith("use RTIM_PROCESSING_GUARANTEE=at_least_once")
