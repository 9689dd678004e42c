"""Bad input: every malformed event in rtim.dlq with its reason, nothing else lost."""

from __future__ import annotations

import asyncio
import time

import orjson

from rtim.simulate import JourneySimulator

from .support import CHANGELOG, latest_values, produce, read_topic, segment, wait_committed

NOW_MS = int(time.time() * 1000)


def malformed() -> list[tuple[str, bytes | None, bytes | None]]:
    """(expected reason, key, value) for each kind of bad record."""
    ok = {
        "type": "track",
        "event": "Product Viewed",
        "messageId": "m-bad",
        "userId": "u-bad",
        "timestamp": "2026-01-01T00:00:00.000Z",
    }

    def variant(**changes: object) -> bytes:
        event = dict(ok)
        for key, value in changes.items():
            if value is None:
                event.pop(key, None)
            else:
                event[key] = value
        return orjson.dumps(event)

    return [
        ("malformed_json", b"u-bad", b'{"type": "track", "event": '),
        ("malformed_json", b"u-bad", b"\xff\xfe not utf-8"),
        ("not_an_object", b"u-bad", b'["track"]'),
        ("empty", b"u-bad", None),
        ("empty", b"u-bad", b""),
        ("unknown_type", b"u-bad", variant(type="purchase")),
        ("missing_id", b"u-bad", variant(messageId=None)),
        ("missing_id", None, variant(userId=None)),
        ("missing_timestamp", b"u-bad", variant(timestamp=None)),
        ("bad_timestamp", b"u-bad", variant(timestamp="yesterday")),
        ("clock_skew", b"u-bad", variant(timestamp="2099-01-01T00:00:00Z")),
        ("wrong_type", b"u-bad", variant(properties=["not", "an", "object"])),
        ("wrong_type", b"u-bad", variant(event=None)),
        ("oversize", b"u-bad", variant(properties={"blob": "x" * 40_000})),
    ]


def test_malformed_events_are_dead_lettered_and_the_rest_processed(kafka, workers) -> None:
    sim = JourneySimulator(customers=25, seed=11, start_ms=NOW_MS - 30 * 86_400_000)
    valid = list(sim.events(300))
    bad = malformed()
    items = [segment(e) for e in valid]
    # Interleave: a bad record after every 20 valid ones, and every 50 a producer
    # retry (the same record again) that must not be applied twice.
    mixed: list[tuple[bytes | None, bytes | None]] = []
    pending_bad = [(key, value) for _, key, value in bad]
    for i, item in enumerate(items, 1):
        mixed.append(item)
        if i % 20 == 0 and pending_bad:
            mixed.append(pending_bad.pop(0))
        if i % 50 == 0:
            mixed.append(item)
    mixed.extend(pending_bad)
    expected_bad = bad
    worker = workers().wait_ready()
    asyncio.run(produce(kafka.bootstrap, mixed))
    asyncio.run(wait_committed(kafka.bootstrap, "rtim", worker=worker))

    dlq = asyncio.run(read_topic(kafka.bootstrap, "rtim.dlq"))
    assert len(dlq) == len(expected_bad)
    got = sorted(
        (dict(r.headers)["rtim.errors.reason"].decode(), r.key or b"", r.value or b"") for r in dlq
    )
    want = sorted((reason, key or b"", value or b"") for reason, key, value in expected_bad)
    assert got == want  # original key and value bytes, and the reason
    for rec in dlq:
        headers = dict(rec.headers)
        assert headers["__connect.errors.topic"] == b"rtim.clickstream"
        assert int(headers["__connect.errors.offset"]) >= 0
        assert 0 <= int(headers["__connect.errors.partition"]) < 4
        assert headers["__connect.errors.exception.class.name"].endswith(b"InvalidEvent")
        assert headers["__connect.errors.exception.message"]

    # Every valid event was applied exactly once (the duplicates were not).
    duplicates = len(mixed) - len(items) - len(expected_bad)
    assert duplicates > 0
    assert worker.metric("rtim_events_applied_total") == len(valid)
    assert worker.metric("rtim_events_duplicate_total") == duplicates
    contexts = latest_values(asyncio.run(read_topic(kafka.bootstrap, CHANGELOG)))
    per_customer: dict[str, int] = {}
    for event in valid:
        cid = event.get("userId") or event["anonymousId"]
        per_customer[cid] = per_customer.get(cid, 0) + 1
    assert {cid: ctx["n"] for cid, ctx in contexts.items()} == per_customer
    # Counted by reason, and the worker is still alive and ready.
    for reason in {r for r, _, _ in expected_bad}:
        count = sum(1 for r, _, _ in expected_bad if r == reason)
        assert worker.metric("rtim_events_dead_lettered_total", reason=reason) == count
    assert worker.alive
    assert worker.status("/health/live") == 200
    assert worker.status("/health/ready") == 200
