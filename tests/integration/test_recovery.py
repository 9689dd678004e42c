"""A worker SIGKILLed mid-stream loses nothing and applies nothing twice.

The replacement worker either restarts on the dead worker's RocksDB data dir
or starts on a fresh one (and rebuilds the table from the changelog). Both
must end with exactly the contexts an uninterrupted run builds from the same
records: in the changelog, and in the new worker's own store on disk. The
embedded broker under-reports end offsets (docs/architecture.md, "The embedded
broker's end offsets"); without RTIM's exact end offsets, recovery stops short
(fresh dir) or crashes (same dir).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from rtim.simulate import JourneySimulator

from .support import (
    CHANGELOG,
    committed,
    expected_contexts,
    latest_values,
    produce,
    read_store,
    read_topic,
    segment,
    wait_committed,
)

NOW_MS = int(time.time() * 1000)


def applied(ctx: dict | None, record) -> bool:
    """Whether this context already has the record's effect (its last applied offset is past it)."""
    return ctx is not None and ctx["src"][0] == record.partition and record.offset <= ctx["src"][1]


@pytest.mark.parametrize("datadir", ["same", "fresh"])
def test_sigkill_mid_stream_then_restart_recovers_exact_contexts(
    kafka, workers, tmp_path, datadir
) -> None:
    sim = JourneySimulator(customers=300, seed=5, start_ms=NOW_MS - 60 * 86_400_000)
    events = [segment(e) for e in sim.events(24_000)]
    first, second = events[:16_000], events[16_000:]

    # Commits every 2 s: most of the time, some applied records are not committed yet.
    doomed = workers(
        "doomed", datadir=tmp_path / "doomed-data", env={"RTIM_COMMIT_INTERVAL_S": "2"}
    )
    doomed.wait_ready()
    asyncio.run(produce(kafka.bootstrap, first))
    deadline = time.monotonic() + 60
    while doomed.metric("rtim_events_consumed_total", topic="rtim.clickstream") < 4_000:
        assert time.monotonic() < deadline, doomed.log_tail()
        time.sleep(0.02)
    # Kill it in the middle of the stream, at a moment when some records are
    # applied (their contexts in the changelog) but their offsets not committed:
    # these come again to the survivor, which must recognise them. Stopped
    # (SIGSTOP), the worker can neither apply nor commit while we look.
    while True:
        os.kill(doomed.proc.pid, signal.SIGSTOP)
        done = asyncio.run(committed(kafka.bootstrap, "rtim"))
        snapshot = latest_values(asyncio.run(read_topic(kafka.bootstrap, CHANGELOG)))
        redelivered = [
            r
            for r in asyncio.run(read_topic(kafka.bootstrap, "rtim.clickstream"))
            if r.offset >= done[r.partition] and applied(snapshot.get(r.key.decode()), r)
        ]
        if redelivered:
            break
        assert time.monotonic() < deadline, f"never caught uncommitted work: {done}"
        os.kill(doomed.proc.pid, signal.SIGCONT)
        time.sleep(0.05)  # let it work a little before the next look (bounded by the deadline)
    doomed.kill()
    assert sum(done.values()) < len(first)

    survivor_dir = tmp_path / "doomed-data" if datadir == "same" else tmp_path / "fresh-data"
    survivor = workers("survivor", datadir=survivor_dir)
    asyncio.run(produce(kafka.bootstrap, second))
    survivor.wait_ready(timeout=120)
    asyncio.run(wait_committed(kafka.bootstrap, "rtim", worker=survivor, timeout=180))
    # Redelivered records were recognised, not applied again.
    assert survivor.metric("rtim_events_duplicate_total") >= len(redelivered)
    assert survivor.stop() == 0

    clickstream = asyncio.run(read_topic(kafka.bootstrap, "rtim.clickstream"))
    assert len(clickstream) == len(events)
    expected = expected_contexts(clickstream)
    assert len(expected) >= 250
    changelog = latest_values(asyncio.run(read_topic(kafka.bootstrap, CHANGELOG)))
    assert changelog == expected
    assert read_store(survivor_dir) == expected
