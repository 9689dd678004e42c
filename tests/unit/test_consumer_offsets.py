"""The batch consumer's offset bookkeeping: what Faust commits after a seek.

Faust commits a partition from the offset it tracks as committed, over the
offsets acknowledged since. Recovery seeks every partition to the committed
offsets the broker returns; one of our own commits can land while that answer
is on its way. The stale answer must not move the tracked offset backwards,
or the partition is never committed again and its lag never goes down; and
each acknowledged offset must count once, or the commit crawls.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

from rtim.names import CLICKSTREAM_TOPIC, RESPONSES_TOPIC
from rtim.settings import Settings
from rtim.stream.app import create_app
from rtim.stream.consumer import BatchConsumer

TP1 = TP(CLICKSTREAM_TOPIC, 1)
TP2 = TP(CLICKSTREAM_TOPIC, 2)


def consumer_for(tmp_path: Path, broker_committed: dict[TP, int]) -> BatchConsumer:
    app = create_app(Settings(broker="127.0.0.1:9", partitions=4, datadir=tmp_path, store="memory"))
    consumer = app.consumer
    assert isinstance(consumer, BatchConsumer)

    async def seek_to_committed() -> dict[TP, int]:
        # What the broker answers (the aiokafka seek itself needs no check here).
        return dict(broker_committed)

    consumer.seek_to_committed = seek_to_committed  # type: ignore[method-assign]
    return consumer


def commit(consumer: BatchConsumer, tp: TP) -> int | None:
    """Faust's commit of ``tp``, up to the broker call (assumed to succeed)."""
    offsets = consumer._filter_committable_offsets([tp])
    consumer._committed_offset.update(offsets)  # as Faust records a commit
    return offsets.get(tp)


def test_a_stale_committed_offset_from_a_seek_does_not_stop_commits(tmp_path: Path) -> None:
    consumer = consumer_for(tmp_path, {TP1: 1613, TP2: 1323})
    asyncio.run(consumer.perform_seek())  # the worker starts where the group left off
    assert consumer._committed_offset[TP1] == 1613

    consumer.ack_batch(TP1, list(range(1613, 1700)))
    assert commit(consumer, TP1) == 1700
    # Recovery seeks again; the broker's answer was read before that commit landed.
    asyncio.run(consumer.perform_seek())
    # Records fetched before the seek, processed after it, are acknowledged...
    consumer.ack_batch(TP1, list(range(1700, 1801)))
    # ...and the partition's commit moves on past them.
    assert commit(consumer, TP1) == 1801
    # A partition with nothing newer keeps the broker's offset.
    assert consumer._committed_offset[TP2] == 1323


def test_records_fetched_again_after_the_seek_are_not_committed_twice(tmp_path: Path) -> None:
    consumer = consumer_for(tmp_path, {TP1: 1613})
    asyncio.run(consumer.perform_seek())
    consumer.ack_batch(TP1, list(range(1613, 1700)))
    assert commit(consumer, TP1) == 1700
    asyncio.run(consumer.perform_seek())  # stale: the position goes back to 1613
    # The records 1613..1699 come again (the engine sees them as applied); their
    # acknowledgement changes nothing, the new ones are committed.
    consumer.ack_batch(TP1, list(range(1613, 1750)))
    assert commit(consumer, TP1) == 1750
    assert commit(consumer, TP1) is None


def test_a_revoked_partition_takes_the_broker_offset_when_assigned_again(tmp_path: Path) -> None:
    broker = {TP1: 1613}
    consumer = consumer_for(tmp_path, broker)
    asyncio.run(consumer.perform_seek())
    consumer.ack_batch(TP1, list(range(1613, 1700)))
    assert commit(consumer, TP1) == 1700
    # Revoked (as Faust does it), another worker goes on, then it comes back.
    consumer._committed_offset.pop(TP1)
    consumer._acked.pop(TP1, None)
    consumer._acked_index.pop(TP1, None)
    broker[TP1] = 2500
    asyncio.run(consumer.perform_seek())
    assert consumer._committed_offset[TP1] == 2500
    consumer.ack_batch(TP1, [2400, 2500, 2501])  # the old offset is below the commit: ignored
    assert commit(consumer, TP1) == 2502


def test_offsets_in_a_gap_count_once_and_the_commit_moves_in_one_step(tmp_path: Path) -> None:
    consumer = consumer_for(tmp_path, {TP1: 100})
    asyncio.run(consumer.perform_seek())
    consumer.ack_batch(TP1, list(range(100, 150)))
    # Offsets 150..159 never come (transaction markers); Faust's gap takes in 160 too,
    # which is then acknowledged with its batch.
    asyncio.run(consumer._add_gap(TP1, 150, 160))
    consumer.ack_batch(TP1, list(range(160, 200)))
    assert commit(consumer, TP1) == 200
    assert consumer._acked[TP1] == []
    assert commit(consumer, TP1) is None


def test_offsets_below_the_commit_are_dropped_not_committed(tmp_path: Path) -> None:
    consumer = consumer_for(tmp_path, {TP1: 100})
    asyncio.run(consumer.perform_seek())
    consumer.ack_batch(TP1, list(range(100, 160)))
    consumer._committed_offset[TP1] = 150  # committed meanwhile up to 149
    consumer.ack_batch(TP1, list(range(160, 170)))
    assert commit(consumer, TP1) == 170
    assert commit(consumer, TP1) is None


def test_a_partition_whose_commit_is_stuck_is_read_again_from_the_commit(
    tmp_path: Path, caplog
) -> None:
    consumer = consumer_for(tmp_path, {TP1: 100})
    sought: list[tuple[TP, int]] = []

    async def record_seek(partitions: dict[TP, int]) -> None:  # done by the consumer thread
        sought.extend(partitions.items())

    consumer.seek_wait = record_seek  # type: ignore[method-assign]

    async def scenario() -> None:
        await consumer.perform_seek()
        consumer._read_offset[TP1] = 349
        # Records 100..299 were read but are not acknowledged and never will be.
        consumer.ack_batch(TP1, list(range(300, 350)))
        with caplog.at_level("WARNING"):
            assert commit(consumer, TP1) is None
        await asyncio.sleep(0)  # the seek runs as a task of the consumer
        assert sought == [(TP1, 100)]
        assert consumer._read_offset[TP1] == 100  # so the drain loop takes them again
        assert "offsets 100..299 were read but not acknowledged" in caplog.text
        # Not once per commit interval: the records are on their way.
        assert commit(consumer, TP1) is None
        await asyncio.sleep(0)
        assert sought == [(TP1, 100)]
        # They come again and are acknowledged: the commit moves past all of them.
        consumer.ack_batch(TP1, list(range(100, 350)))
        assert commit(consumer, TP1) == 350

    asyncio.run(scenario())


def test_a_transactions_commit_is_kept_as_faust_keeps_its_own(tmp_path: Path) -> None:
    """Exactly once: offsets are committed by the batch's transactions, none by Faust.
    The tracked offset follows them (a seek that answers an older one does not take it
    back), and the gaps of transaction markers below them do not pile up."""
    consumer = consumer_for(tmp_path, {TP1: 100})
    asyncio.run(consumer.perform_seek())
    asyncio.run(consumer._add_gap(TP1, 150, 151))  # a commit marker
    asyncio.run(consumer._add_gap(TP1, 250, 251))
    consumer.committed_in_transaction(TP1, 200)
    consumer.committed_in_transaction(TP1, 180)  # an older answer comes late
    assert consumer._committed_offset[TP1] == 200
    assert sorted((i.begin, i.end) for i in consumer._gap[TP1]) == [(250, 252)]  # (Faust's end)
    asyncio.run(consumer.perform_seek())  # the broker's answer read before the commit
    assert consumer._committed_offset[TP1] == 200
    assert commit(consumer, TP1) is None  # nothing for Faust to commit


def test_a_partition_never_committed_is_read_again_from_its_beginning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch of a partition no commit ever reached is dropped (its generation ended):
    the seek after the rebalance takes that partition back to its beginning, for the
    records to come again, where aiokafka's seek leaves it where the fetch left it."""
    consumer = consumer_for(tmp_path, {})
    del consumer.seek_to_committed  # (the stand-in: this test is of the method itself)
    fresh, committed_zero = TP(RESPONSES_TOPIC, 1), TP(RESPONSES_TOPIC, 2)
    answer = {TP1: 1613, fresh: None, committed_zero: 0, TP("other", 0): None}

    async def aiokafka_seek(self: Any) -> dict[TP, int | None]:
        return answer  # aiokafka sought TP1 to 1613, and nothing else

    sought: dict[TP, int] = {}
    asked: list[tuple[TP, ...]] = []

    async def earliest(*partitions: TP) -> dict[TP, int]:
        asked.append(partitions)
        return {tp: 40 for tp in partitions}  # (the log's start, after retention)

    async def seek_wait(partitions: dict[TP, int]) -> None:
        sought.update(partitions)

    monkeypatch.setattr(faust_aiokafka.Consumer, "seek_to_committed", aiokafka_seek)
    consumer.earliest_offsets = earliest  # type: ignore[method-assign]
    consumer.seek_wait = seek_wait  # type: ignore[method-assign]
    consumer._read_offset[fresh] = 7  # the dropped batch's last record
    asyncio.run(consumer.perform_seek())
    assert asked == [(fresh, committed_zero)]  # only the batch topics' partitions
    assert sought == {fresh: 40, committed_zero: 40}
    assert consumer._read_offset[fresh] is None  # the drain loop takes every record again
    assert consumer._committed_offset[TP1] == 1613
