"""A record Kafka will not take is dead-lettered with the reason, never retried forever.

The embedded broker enforces no record size limit (a 2 MB record is taken by a topic
with max.message.bytes=1000), so here the limit is the worker's own
RTIM_MAX_RECORD_BYTES, checked before publishing; a broker's refusal takes the same way
(tests/unit/test_publish.py). A dead letter too large for the limit, and the re-keyed
copy of a large event, are refused: their causes are in rtim.dlq with the reason
(without their values, which are the part too large), and everything else goes on.
A trigger too large: the event that made it is in rtim.dlq, as it was.
"""

from __future__ import annotations

import asyncio
import time

import orjson

from rtim.simulate import JourneySimulator

from .support import (
    CHANGELOG,
    expected_contexts,
    latest_values,
    produce,
    read_store,
    read_topic,
    segment,
    wait_committed,
)
from .test_pipeline import scripted_moments

NOW_MS = int(time.time() * 1000)
LIMIT = 20_000


def test_records_over_the_limit_are_dead_lettered_and_the_rest_goes_on(kafka, workers) -> None:
    sim = JourneySimulator(customers=20, seed=4, start_ms=NOW_MS - 86_400_000)
    valid = [segment(e) for e in sim.events(300)]
    big = {
        "type": "track",
        "event": "Product Viewed",
        "messageId": "m-big",
        "userId": "u-big",
        "timestamp": "2026-11-01T00:00:00.000Z",
    }
    # Valid (under RTIM_MAX_EVENT_BYTES) but keyed otherwise: its re-keyed copy is too large.
    large = orjson.dumps({**big, "properties": {"note": "x" * 25_000}})
    # Oversize: its dead letter is too large.
    oversize = orjson.dumps({**big, "properties": {"note": "y" * 40_000}})
    items = [*valid[:100], (b"session-1", large), *valid[100:200], (b"u-big", oversize)]
    items += valid[200:]
    worker = workers(env={"RTIM_MAX_RECORD_BYTES": str(LIMIT)}).wait_ready()
    asyncio.run(produce(kafka.bootstrap, items))
    asyncio.run(wait_committed(kafka.bootstrap, "rtim", worker=worker))

    # Both causes are in the dead-letter topic, keyed as they were, with the reason.
    dlq = asyncio.run(read_topic(kafka.bootstrap, "rtim.dlq"))
    assert sorted((r.key, r.value) for r in dlq) == [(b"session-1", None), (b"u-big", None)]
    for rec in dlq:
        reasons = [v for k, v in rec.headers if k == "rtim.errors.reason"]
        stages = [v for k, v in rec.headers if k == "__connect.errors.stage"]
        messages = [v for k, v in rec.headers if k == "__connect.errors.exception.message"]
        assert reasons[-1] == b"refused" and stages[-1] == b"publish"
        assert b"RTIM_MAX_RECORD_BYTES" in messages[-1]
        if rec.key == b"u-big":
            assert reasons == [b"oversize", b"refused"]  # its first reason is kept
    # Not retried: the worker went on, and nothing else was lost.
    assert worker.metric("rtim_publish_retries_total") == 0
    assert worker.metric("rtim_records_refused_total") == 3  # a dead letter, a copy, its letter
    assert worker.metric("rtim_events_dead_lettered_total", reason="refused") == 1
    assert worker.metric("rtim_events_dead_lettered_total", reason="oversize") == 1
    assert worker.metric("rtim_events_applied_total") == len(valid)
    changelog = latest_values(asyncio.run(read_topic(kafka.bootstrap, CHANGELOG)))
    clickstream = asyncio.run(read_topic(kafka.bootstrap, "rtim.clickstream"))
    assert changelog == expected_contexts(
        [r for r in clickstream if r.value not in (large, oversize)]
    )
    assert "u-big" not in changelog
    assert worker.alive and worker.status("/health/ready") == 200


def test_a_trigger_over_the_limit_dead_letters_the_event_that_made_it(kafka, workers) -> None:
    events = scripted_moments()  # three customers, one trigger each (about 1.2 KB)
    items = [segment(e) for e in events]
    worker = workers(env={"RTIM_MAX_RECORD_BYTES": "1100"}).wait_ready()
    asyncio.run(produce(kafka.bootstrap, items))
    asyncio.run(wait_committed(kafka.bootstrap, "rtim", worker=worker))

    for channel in ("web", "app", "call_centre"):
        assert asyncio.run(read_topic(kafka.bootstrap, f"rtim.triggers.{channel}")) == []
    dlq = asyncio.run(read_topic(kafka.bootstrap, "rtim.dlq"))
    # The events that made the decisions, as they were, with the reason.
    made = {b"cust-web": items[2], b"cust-app": items[4], b"cust-svc": items[5]}
    assert sorted((r.key, r.value) for r in dlq) == sorted(made.values())
    for rec in dlq:
        headers = dict(rec.headers)
        assert headers["rtim.errors.reason"] == b"refused"
        assert headers["__connect.errors.stage"] == b"publish"
        assert b"RTIM_MAX_RECORD_BYTES" in headers["__connect.errors.exception.message"]
    assert worker.metric("rtim_records_refused_total") == 3
    assert worker.metric("rtim_publish_retries_total") == 0
    # The contexts are whole (the decisions were made, and not delivered).
    changelog = latest_values(asyncio.run(read_topic(kafka.bootstrap, CHANGELOG)))
    clickstream = asyncio.run(read_topic(kafka.bootstrap, "rtim.clickstream"))
    assert changelog == expected_contexts(clickstream)
    assert worker.alive and worker.status("/health/ready") == 200


def test_a_context_over_the_limit_keeps_its_stored_value_and_dead_letters_the_events(
    kafka, workers, tmp_path
) -> None:
    def page(user: str, i: int) -> tuple[bytes, bytes]:
        return segment(
            {
                "type": "page",
                "messageId": f"{user}-{i}",
                "userId": user,
                "timestamp": f"2026-11-01T00:{i:02d}:00.000Z",
                "properties": {"path": f"/a/rather/long/path/to/page/number/{i:04d}/" + "p" * 40},
            }
        )

    # One customer whose context grows past the limit (many long pages), one that stays small.
    items = [page("grows", i) for i in range(30)] + [page("small", 0), page("small", 1)]
    worker = workers(env={"RTIM_MAX_RECORD_BYTES": "1500"}).wait_ready()
    asyncio.run(produce(kafka.bootstrap, items))
    asyncio.run(wait_committed(kafka.bootstrap, "rtim", worker=worker))
    assert worker.metric("rtim_publish_retries_total") == 0
    assert worker.stop() == 0

    changelog = latest_values(asyncio.run(read_topic(kafka.bootstrap, CHANGELOG)))
    assert changelog["small"]["n"] == 2
    dlq = asyncio.run(read_topic(kafka.bootstrap, "rtim.dlq"))
    assert dlq and {r.key for r in dlq} == {b"grows"}
    assert {dict(r.headers)["rtim.errors.reason"] for r in dlq} == {b"refused"}
    # Each event of the customer is either in its stored context or dead-lettered, once.
    kept = changelog["grows"]["n"] if "grows" in changelog else 0
    assert kept + len(dlq) == 30
    assert len({r.value for r in dlq}) == len(dlq)
    # The worker's store holds what the changelog holds, nothing of the refused events.
    assert read_store(tmp_path / "w1-data") == changelog
