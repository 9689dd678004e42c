"""A worker SIGKILLed mid-stream loses nothing and applies nothing twice.

The replacement worker either restarts on the dead worker's RocksDB data dir
or starts on a fresh one (and rebuilds the table from the changelog). Both
must end with exactly the contexts an uninterrupted run builds from the same
records: in the changelog, and in the new worker's own store on disk. The
embedded broker under-reports end offsets (DESIGN.md §4); without RTIM's exact
end offsets, recovery stops short (fresh dir) or crashes (same dir).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from rtim.simulate import JourneySimulator

from .support import (
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


@pytest.mark.parametrize("datadir", ["same", "fresh"])
def test_sigkill_mid_stream_then_restart_recovers_exact_contexts(kafka, workers, tmp_path, datadir) -> None:
    sim = JourneySimulator(customers=300, seed=5, start_ms=NOW_MS - 60 * 86_400_000)
    events = [segment(e) for e in sim.events(24_000)]
    first, second = events[:16_000], events[16_000:]

    doomed = workers("doomed", datadir=tmp_path / "doomed-data").wait_ready()
    asyncio.run(produce(kafka.bootstrap, first))
    # Kill it while it is in the middle of the stream: some batches applied and
    # in the changelog, their offsets not all committed yet.
    deadline = time.monotonic() + 60
    while doomed.metric("rtim_events_consumed_total", topic="rtim.clickstream") < 4_000:
        assert time.monotonic() < deadline, doomed.log_tail()
        time.sleep(0.02)
    doomed.kill()
    # Mid-stream indeed: part of the first half is not committed.
    assert sum(asyncio.run(committed(kafka.bootstrap, "rtim")).values()) < len(first)

    survivor_dir = tmp_path / "doomed-data" if datadir == "same" else tmp_path / "fresh-data"
    survivor = workers("survivor", datadir=survivor_dir)
    asyncio.run(produce(kafka.bootstrap, second))
    survivor.wait_ready(timeout=120)
    asyncio.run(wait_committed(kafka.bootstrap, "rtim", worker=survivor, timeout=180))
    # Redelivered records were recognised, not applied again.
    assert survivor.metric("rtim_events_duplicate_total") > 0
    assert survivor.stop() == 0

    clickstream = asyncio.run(read_topic(kafka.bootstrap, "rtim.clickstream"))
    assert len(clickstream) == len(events)
    expected = expected_contexts(clickstream)
    assert len(expected) >= 250
    changelog = latest_values(asyncio.run(read_topic(kafka.bootstrap, "rtim-customers-changelog")))
    assert changelog == expected
    assert read_store(survivor_dir) == expected
