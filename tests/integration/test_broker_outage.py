"""A worker that loses its broker: rides out the outage, says so once, stops on time.

A TCP proxy sits between the worker and the embedded broker, which advertises the
proxy's address, so every connection of the worker's Kafka clients goes through it.
Cutting the proxy is the broker going away for the worker, and for it only.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rtim.broker import EmbeddedBroker
from rtim.settings import Settings
from rtim.simulate import JourneySimulator
from rtim.stream.process import WorkerProcess

from .proxy import TcpProxy
from .support import (
    CHANGELOG,
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
#: Log lines a worker may write during a 15 s outage: one per retry and the first
#: of each kind of Kafka client error (it wrote about 77 a second).
MAX_LOG_LINES_DURING_OUTAGE = 60


@pytest.fixture
def worker_behind(
    proxied: tuple[EmbeddedBroker, TcpProxy], tmp_path: Path
) -> Iterator[Callable[..., WorkerProcess]]:
    """Factory of workers that reach the broker through the proxy only."""
    started: list[WorkerProcess] = []
    _, proxy = proxied

    def make(*, datadir: Path | None = None, name: str = "w", **env: str) -> WorkerProcess:
        worker = WorkerProcess(
            broker=proxy.address,
            datadir=datadir or tmp_path / f"{name}-data",
            log_path=tmp_path / f"{name}.log",
            env={**TEST_ENV, **env},
        )
        started.append(worker)
        return worker.start()

    yield make
    for worker in started:
        worker.kill()


def poll(condition: Callable[[], Any], timeout: float, what: str, worker: WorkerProcess) -> Any:
    """Poll ``condition`` until it is true; fail with the worker's log after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert worker.alive, f"worker exited while waiting until {what}:\n{worker.log_tail()}"
        assert time.monotonic() < deadline, f"not {what} after {timeout} s:\n{worker.log_tail()}"
        time.sleep(0.05)
    return result


def log_lines_since(worker: WorkerProcess, offset: int) -> list[str]:
    with worker.log_path.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace").splitlines()


def events(n: int, seed: int) -> list[tuple[bytes, bytes]]:
    sim = JourneySimulator(customers=300, seed=seed, start_ms=NOW_MS - 30 * 86_400_000)
    return [segment(e) for e in sim.events(n)]


def test_worker_rides_out_a_broker_outage_and_processes_every_event_once(
    proxied: tuple[EmbeddedBroker, TcpProxy], worker_behind: Callable[..., WorkerProcess]
) -> None:
    broker, proxy = proxied
    # Small fetches, so that the outage comes in the middle of the flow.
    worker = worker_behind(RTIM_MAX_FETCH_RECORDS="500").wait_ready()
    pid = worker.proc.pid
    before, after = events(50_000, seed=11), events(4_000, seed=12)
    asyncio.run(produce(proxy.address, before))

    def consumed() -> float:
        return worker.metric("rtim_events_consumed_total", topic="rtim.clickstream")

    poll(lambda: consumed() >= 2_000, 60, "consuming", worker)
    log_at_cut = worker.log_path.stat().st_size
    proxy.cut()
    cut_at = time.monotonic()
    assert consumed() < len(before), "the outage must come while events flow"

    # Readiness and the metric show the outage within seconds.
    poll(lambda: worker.status("/health/ready") == 503, 5, "not ready", worker)
    poll(lambda: worker.metric("rtim_broker_up") == 0, 5, "rtim_broker_up 0", worker)
    assert worker.metric("rtim_worker_ready") == 0
    # The outage lasts 15 s; the worker stays up and not ready all along.
    while time.monotonic() - cut_at < 15:
        assert worker.alive, worker.log_tail()
        assert worker.status("/health/ready") == 503
        time.sleep(0.2)
    during = log_lines_since(worker, log_at_cut)
    assert len(during) <= MAX_LOG_LINES_DURING_OUTAGE, "\n".join(during)
    assert any("not reachable" in line and "retrying in" in line for line in during), during

    log_at_restore = worker.log_path.stat().st_size
    proxy.restore()
    poll(lambda: worker.status("/health/ready") == 200, 30, "ready again", worker)
    assert worker.metric("rtim_broker_up") == 1
    assert any("reachable again" in line for line in log_lines_since(worker, log_at_restore))

    asyncio.run(produce(proxy.address, after))
    asyncio.run(wait_committed(broker.bootstrap, "rtim", worker=worker, timeout=90))
    assert worker.proc.pid == pid and worker.stop() == 0

    clickstream = asyncio.run(read_topic(broker.bootstrap, "rtim.clickstream"))
    assert len(clickstream) == len(before) + len(after)
    expected = expected_contexts(clickstream)
    changelog = latest_values(asyncio.run(read_topic(broker.bootstrap, CHANGELOG)))
    assert changelog == expected


def test_sigterm_while_cut_off_stops_the_worker_at_once(
    proxied: tuple[EmbeddedBroker, TcpProxy], worker_behind: Callable[..., WorkerProcess]
) -> None:
    _, proxy = proxied
    worker = worker_behind(RTIM_MAX_FETCH_RECORDS="500").wait_ready()
    asyncio.run(produce(proxy.address, events(50_000, seed=13)))
    poll(
        lambda: worker.metric("rtim_events_consumed_total", topic="rtim.clickstream") >= 2_000,
        60,
        "consuming",
        worker,
    )
    proxy.cut()  # in the middle of a batch, its publish or commit in flight
    assert worker.metric("rtim_events_consumed_total", topic="rtim.clickstream") < 50_000
    poll(lambda: worker.metric("rtim_broker_up") == 0, 5, "rtim_broker_up 0", worker)

    worker.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    deadline = signalled + Settings().shutdown_timeout_s
    while worker.alive and time.monotonic() < deadline:
        time.sleep(0.05)
    took = time.monotonic() - signalled
    assert not worker.alive, f"still running {took:.1f} s after SIGTERM:\n{worker.log_tail()}"
    # It stopped by itself, not by the RTIM_SHUTDOWN_TIMEOUT_S bound.
    assert worker.proc.returncode == 0, worker.log_tail()


def test_stop_is_bounded_when_the_broker_does_not_answer(
    proxied: tuple[EmbeddedBroker, TcpProxy], worker_behind: Callable[..., WorkerProcess]
) -> None:
    _, proxy = proxied
    # A bound shorter than even a clean stop (about 1 s), so that the bound, not a
    # stop that happens to find nothing to wait for, ends it in every run.
    worker = worker_behind(RTIM_SHUTDOWN_TIMEOUT_S="0.5", RTIM_MAX_FETCH_RECORDS="500")
    worker.wait_ready()
    asyncio.run(produce(proxy.address, events(50_000, seed=14)))
    poll(
        lambda: worker.metric("rtim_events_consumed_total", topic="rtim.clickstream") >= 2_000,
        60,
        "consuming",
        worker,
    )
    # Requests in flight now wait for their timeouts (a publish, a commit).
    proxy.stall()
    assert worker.metric("rtim_events_consumed_total", topic="rtim.clickstream") < 50_000
    poll(lambda: worker.metric("rtim_broker_up") == 0, 10, "rtim_broker_up 0", worker)

    log_at_term = worker.log_path.stat().st_size
    worker.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    while worker.alive and time.monotonic() - signalled < 0.5 + 5:
        time.sleep(0.05)
    assert not worker.alive, f"still running after SIGTERM:\n{worker.log_tail()}"
    assert worker.proc.returncode == 1
    said = "\n".join(log_lines_since(worker, log_at_term))
    assert "not stopped within 0.5 s (RTIM_SHUTDOWN_TIMEOUT_S)" in said, said
    assert "still waiting for: " in said and "still waiting for: unknown" not in said, said


def test_broker_lost_during_table_recovery_is_waited_for(
    proxied: tuple[EmbeddedBroker, TcpProxy],
    worker_behind: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:
    broker, proxy = proxied
    first = worker_behind().wait_ready()
    asyncio.run(produce(proxy.address, events(4_000, seed=15)))
    asyncio.run(wait_committed(broker.bootstrap, "rtim", worker=first, timeout=60))
    assert first.stop() == 0

    # A worker on a fresh data dir recovers its table from the changelog; the
    # broker goes away as it gets its partitions, before it reads the changelog.
    worker = worker_behind(datadir=tmp_path / "fresh-data", name="fresh")
    poll(lambda: "opening partition" in worker.log_tail(400), 60, "assigned", worker)
    proxy.cut()
    # The cut lands before recovery knows its end offsets (then it retries them) or
    # while it reads the changelog (then its fetches wait): either way it must wait.
    poll(lambda: "not reachable" in worker.log_tail(400), 15, "the broker's loss noticed", worker)
    poll(lambda: worker.metric("rtim_broker_up") == 0, 10, "rtim_broker_up 0", worker)
    time.sleep(5)  # the outage itself, held while recovery is under way (what is tested)
    assert worker.alive, worker.log_tail()
    assert worker.status("/health/ready") == 503
    proxy.restore()
    worker.wait_ready(timeout=60)
    asyncio.run(produce(proxy.address, events(1_000, seed=16)))
    asyncio.run(wait_committed(broker.bootstrap, "rtim", worker=worker, timeout=60))
    assert worker.stop() == 0

    clickstream = asyncio.run(read_topic(broker.bootstrap, "rtim.clickstream"))
    changelog = latest_values(asyncio.run(read_topic(broker.bootstrap, CHANGELOG)))
    assert changelog == expected_contexts(clickstream)
    assert read_store(tmp_path / "fresh-data") == changelog
