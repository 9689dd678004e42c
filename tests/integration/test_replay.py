"""A replayed topic is not applied twice: events sent again are recognised by messageId.

Segment-style pipelines resend on retries and operators replay topics. The same
5,000 events sent a second time (new records, new offsets), after a restart that
rebuilt the worker's contexts from the changelog, must change no context and
publish no trigger again.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from rtim.names import TRIGGER_TOPIC_PREFIX
from rtim.settings import Settings
from rtim.simulate import JourneySimulator
from rtim.stream.topics import topic_specs

from .support import (
    CHANGELOG,
    PARTITIONS,
    expected_contexts,
    latest_values,
    produce,
    read_topic,
    segment,
    wait_committed,
)

EVENTS = 5_000


def trigger_ids(bootstrap: str) -> list[str]:
    """The CloudEvent id of every trigger published so far, on every channel."""
    topics = [
        t
        for t in topic_specs(Settings(partitions=PARTITIONS))
        if t.startswith(TRIGGER_TOPIC_PREFIX)
    ]
    ids = []
    for topic in topics:
        for record in asyncio.run(read_topic(bootstrap, topic)):
            ids.append(record.value.split(b'"id":"', 1)[1].split(b'"', 1)[0].decode())
    return ids


def test_a_replayed_topic_changes_nothing(kafka, workers, tmp_path: Path) -> None:
    # Simulated journeys of the last two days (25 events a customer span about half a
    # day): the replay is within the dedupe window of each customer's event time.
    sim = JourneySimulator(customers=200, seed=5, start_ms=int(time.time() * 1000) - 2 * 86_400_000)
    items = [segment(event) for event in sim.events(EVENTS)]

    first = workers("first").wait_ready()
    asyncio.run(produce(kafka.bootstrap, items))
    asyncio.run(wait_committed(kafka.bootstrap, "rtim", worker=first))
    clickstream = asyncio.run(read_topic(kafka.bootstrap, "rtim.clickstream"))
    before = latest_values(asyncio.run(read_topic(kafka.bootstrap, CHANGELOG)))
    assert before == expected_contexts(clickstream)
    triggers_before = trigger_ids(kafka.bootstrap)
    assert triggers_before, "the journeys made no trigger: the test would show nothing"
    assert first.metric("rtim_events_applied_total") == EVENTS
    first.kill()

    # A new worker on an empty data directory: everything it knows comes from the changelog.
    second = workers("second", datadir=tmp_path / "fresh").wait_ready()
    asyncio.run(produce(kafka.bootstrap, items))
    asyncio.run(wait_committed(kafka.bootstrap, "rtim", worker=second))

    assert second.metric("rtim_events_applied_total") == 0
    assert second.metric("rtim_events_duplicate_total") == EVENTS
    after = latest_values(asyncio.run(read_topic(kafka.bootstrap, CHANGELOG)))
    assert after == before
    triggers_after = trigger_ids(kafka.bootstrap)
    assert sorted(triggers_after) == sorted(triggers_before)  # no trigger published again
