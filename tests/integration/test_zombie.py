"""A worker that lost its group membership cannot overwrite the new owner's contexts.

Worker B is paused (SIGSTOP) or cut off from the broker for longer than the session
timeout while events flow; A takes over B's partitions and goes on; then B comes back
with the batches it had in hand and the records its fetcher still returns (fetches need
no membership). Whatever B does then, every customer's context must end exactly as a
clean run builds it: in the changelog (what a fresh worker recovers), in A's store, and
in B's store once it owns its partitions again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson

from rtim.simulate import JourneySimulator
from rtim.stream.api import ANSWERED_BY
from rtim.stream.process import WorkerProcess

from .support import (
    TEST_ENV,
    expected_contexts,
    latest_values,
    produce,
    read_store,
    read_topic,
    segment,
    wait_committed,
)

NOW_MS = int(time.time() * 1000)
#: Seconds B is away: well above the session timeout (TEST_ENV: 6 s).
AWAY_S = 9.0


def events(n: int, seed: int, customers: int = 2_000) -> list[tuple[bytes, bytes]]:
    sim = JourneySimulator(customers=customers, seed=seed, start_ms=NOW_MS - 30 * 86_400_000)
    return [segment(e) for e in sim.events(n)]


class Burst:
    """Produces events in a thread, as fast as the broker takes them."""

    def __init__(self, bootstrap: str, items: list[tuple[bytes, bytes]]) -> None:
        self._thread = threading.Thread(
            target=lambda: asyncio.run(produce(bootstrap, items)), daemon=True
        )

    def __enter__(self) -> Burst:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(timeout=60)


def wait_for(condition: Callable[[], bool], timeout: float, what: str, *ws: WorkerProcess) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for w in ws:
            assert w.alive, f"worker exited while waiting until {what}:\n{w.log_tail()}"
        assert time.monotonic() < deadline, f"not {what} after {timeout} s:\n" + "\n".join(
            w.log_tail(60) for w in ws
        )
        time.sleep(0.05)


def when_busy(worker: WorkerProcess, timeout: float = 30.0) -> None:
    """Return once the worker's main thread is running (not waiting on its event loop):
    most likely in the middle of a batch, which it will carry on with afterwards."""
    assert worker.proc is not None
    stat = Path(f"/proc/{worker.proc.pid}/stat")
    deadline = time.monotonic() + timeout
    while stat.read_text().rsplit(")", 1)[1].split()[0] != "R":
        assert time.monotonic() < deadline, "the worker never seemed busy"


def signal_when_busy(worker: WorkerProcess, signum: int) -> None:
    when_busy(worker)
    assert worker.proc is not None
    os.kill(worker.proc.pid, signum)


def consumed(worker: WorkerProcess) -> float:
    return worker.metric("rtim_events_consumed_total", topic="rtim.clickstream")


def fields_differing(
    expected: dict[str, dict[str, Any]], got: dict[str, dict[str, Any]], keys: Iterable[str]
) -> dict[str, dict[str, tuple[Any, Any]]]:
    """Per customer, the context's fields that differ: (expected, got)."""
    out = {}
    for k in keys:
        want, have = expected.get(k, {}), got.get(k, {})
        out[k] = {
            f: (want.get(f), have.get(f))
            for f in sorted(set(want) | set(have))
            if want.get(f) != have.get(f)
        }
    return out


def check_every_context(
    bootstrap: str, survivors: list[tuple[WorkerProcess, bool]], fresh: Callable[[], WorkerProcess]
) -> None:
    """Each survivor alone in turn (so with every partition, some of which moved while it
    was away) stores exactly the clean run's contexts; so does the changelog, and a fresh
    worker that rebuilds its store from it."""
    for seed, (worker, restart) in enumerate(survivors, start=100):
        if restart:
            worker.start()
        # Processing new events on every partition means it owns them all, recovered.
        asyncio.run(produce(bootstrap, events(400, seed)))
        asyncio.run(wait_committed(bootstrap, "rtim", worker=worker, timeout=60))
        assert worker.stop() == 0
        clickstream = asyncio.run(read_topic(bootstrap, "rtim.clickstream"))
        expected = expected_contexts(clickstream)
        changelog = latest_values(asyncio.run(read_topic(bootstrap, "rtim-customers-changelog")))
        differ = {
            k: (v["n"], changelog.get(k, {}).get("n"))
            for k, v in expected.items()
            if changelog.get(k) != v
        }
        assert not differ, (
            f"{sum(n - (got or 0) for n, got in differ.values())} events lost in "
            f"{len(differ)} customers in the changelog (n, got): {differ}; "
            f"{fields_differing(expected, changelog, differ)}"
        )
        stored = read_store(worker.datadir)
        differ = {
            k: (v["n"], stored.get(k, {}).get("n"))
            for k, v in expected.items()
            if stored.get(k) != v
        }
        assert not differ, (
            f"{len(differ)} contexts differ in {worker.datadir.name} (n, got): {differ}"
        )
    worker = fresh()
    wait_for(lambda: worker.status("/health/ready") == 200, 60, "ready", worker)
    asyncio.run(wait_committed(bootstrap, "rtim", worker=worker, timeout=60))
    assert worker.stop() == 0
    assert read_store(worker.datadir) == expected


def duplicate_triggers(bootstrap: str) -> int:
    """Triggers published more than once (same CloudEvent id), on every channel."""
    ids: Counter[str] = Counter()
    for channel in ("web", "app", "email", "call_centre", "sms", "push", "store"):
        for rec in asyncio.run(read_topic(bootstrap, f"rtim.triggers.{channel}")):
            ids[orjson.loads(rec.value)["id"]] += 1
    return sum(n - 1 for n in ids.values() if n > 1)


def take_over_and_back(
    bootstrap: str,
    a: WorkerProcess,
    b: WorkerProcess,
    cut_off: Callable[[], None],
    back: Callable[[], None],
) -> None:
    """B leaves (``cut_off``) in the middle of a batch, past its session timeout; A takes
    over and applies everything; then B comes back (``back``) and both settle."""
    asyncio.run(produce(bootstrap, events(4_000, seed=20)))
    wait_for(lambda: consumed(a) > 1_000 and consumed(b) > 1_000, 60, "both consuming", a, b)
    with Burst(bootstrap, events(40_000, seed=21)):
        # B is busy with big batches now.
        at = consumed(b)
        wait_for(lambda: consumed(b) > at + 2_000, 60, "B busy", a, b)
        cut_off()
        away = time.monotonic()
        try:
            at = consumed(a)
            wait_for(lambda: consumed(a) > at + 2_000, 60, "A taking over", a)
        except BaseException:
            back()
            raise
    try:
        # A has applied everything when B comes back: nothing A writes afterwards
        # hides what B may overwrite.
        asyncio.run(wait_committed(bootstrap, "rtim", worker=a, timeout=90))
        while time.monotonic() - away < AWAY_S:
            assert b.alive, b.log_tail()
            time.sleep(0.1)  # B stays away past its session timeout (bounded)
    finally:
        back()
    # B learns it lost its partitions (a rebalance: not ready), then both own some again.
    wait_for(lambda: b.status("/health/ready") != 200, 30, "B rejoining", a, b)
    wait_for(
        lambda: a.status("/health/ready") == b.status("/health/ready") == 200, 60, "ready", a, b
    )
    at = consumed(b)
    asyncio.run(produce(bootstrap, events(2_000, seed=22)))
    asyncio.run(wait_committed(bootstrap, "rtim", worker=b, timeout=60))
    assert consumed(b) > at, "B owns no partition"
    assert a.alive and b.alive
    print(f"duplicate triggers: {duplicate_triggers(bootstrap)}")


def explain(url: str, customer: str, answers: list[tuple[int, str | None]]) -> None:
    """GET /v1/customers/{id} (which changes nothing: a decision at the wall clock's time
    would close the windows of its partition, whose events are a month old); appends
    (status, the worker that answered)."""
    req = urllib.request.Request(f"{url}/v1/customers/{customer}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            answers.append((resp.status, resp.headers.get(ANSWERED_BY)))
    except urllib.error.HTTPError as exc:
        answers.append((exc.code, exc.headers.get(ANSWERED_BY)))


def test_paused_worker_does_not_overwrite_the_new_owner(kafka, workers) -> None:
    a = workers("a").wait_ready()
    b = workers("b").wait_ready()
    answers: list[tuple[int, str | None]] = []

    def back() -> None:
        # Requests that reach B while it is away are read the moment it resumes, before
        # it learns it lost its partitions: it must not answer them as their owner.
        asking = [
            threading.Thread(target=explain, args=(b.url, f"asked-{i}", answers), daemon=True)
            for i in range(12)
        ]
        for thread in asking:
            thread.start()
        time.sleep(0.5)
        os.kill(b.proc.pid, signal.SIGCONT)
        for thread in asking:
            thread.join(timeout=40)

    take_over_and_back(kafka.bootstrap, a, b, lambda: signal_when_busy(b, signal.SIGSTOP), back)
    assert len(answers) == 12
    assert all(status == 503 or by == a.url for status, by in answers), answers
    assert a.stop() == 0
    check_every_context(kafka.bootstrap, [(b, False), (a, True)], lambda: workers("fresh"))


def test_worker_cut_off_does_not_overwrite_the_new_owner(proxied, tmp_path) -> None:
    broker, proxy = proxied
    started: list[WorkerProcess] = []

    def cut_off() -> None:
        # Frozen while its connections are cut, so that it is still in the middle of
        # its batch when it finds itself cut off.
        signal_when_busy(b, signal.SIGSTOP)
        try:
            proxy.isolate(b.proc.pid)
        finally:
            os.kill(b.proc.pid, signal.SIGCONT)

    def worker(name: str) -> WorkerProcess:
        w = WorkerProcess(
            broker=proxy.address,
            datadir=tmp_path / f"{name}-data",
            log_path=tmp_path / f"{name}.log",
            env=dict(TEST_ENV),
        )
        started.append(w)
        return w.start()

    try:
        a = worker("a").wait_ready()
        b = worker("b").wait_ready()
        # B keeps running, cut off: the batch in hand retries its publish.
        take_over_and_back(broker.bootstrap, a, b, lambda: proxy.isolate(b.proc.pid), proxy.restore)
        assert a.stop() == 0
        check_every_context(broker.bootstrap, [(b, False), (a, True)], lambda: worker("fresh"))
    finally:
        for w in started:
            w.kill()
