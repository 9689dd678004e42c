"""``rtim simulate`` started before its broker waits for it, then sends everything."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rtim.broker import EmbeddedBroker
from rtim.names import CLICKSTREAM_TOPIC
from rtim.stream.process import free_port
from rtim.stream.topics import create_topics

from .support import read_topic

pytestmark = pytest.mark.integration

EVENTS = 300


def simulate(
    bootstrap: str, *, ignoring: str = "", args: tuple[str, ...] = ("-n", str(EVENTS))
) -> subprocess.Popen[bytes]:
    """``rtim simulate`` started with the signals ``ignoring`` names ignored (``"INT"``: as
    a script's background job is, which is also how a CI runner may start the tests)."""
    command = [sys.executable, "-m", "rtim", "simulate", "--broker", bootstrap, *args]
    proc = subprocess.Popen(
        ["sh", "-c", f"trap '' {ignoring}; exec \"$@\"", "sh", *command] if ignoring else command,
        env={k: v for k, v in os.environ.items() if not k.startswith("RTIM_")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stderr is not None
    os.set_blocking(proc.stderr.fileno(), False)
    return proc


def wait_for_output(proc: subprocess.Popen[bytes], text: bytes, timeout: float = 20) -> bytes:
    assert proc.stderr is not None
    seen = b""
    deadline = time.monotonic() + timeout
    while text not in seen:
        assert time.monotonic() < deadline, seen.decode()
        assert proc.poll() is None, seen.decode()
        seen += proc.stderr.read() or b""
        time.sleep(0.05)
    return seen


def test_simulate_waits_for_the_broker_then_sends_everything(tmp_path: Path) -> None:
    port = free_port()
    proc = simulate(f"127.0.0.1:{port}")
    try:
        waited = wait_for_output(proc, b"retrying in")
        with EmbeddedBroker(port=port, log_path=tmp_path / "broker.log") as broker:
            asyncio.run(create_topics(broker.bootstrap, {CLICKSTREAM_TOPIC: 2}))
            stdout, stderr = proc.communicate(timeout=60)
            assert proc.returncode == 0, (waited + stderr).decode()
            assert f"sent {EVENTS:,} events" in stdout.decode()
            assert len(asyncio.run(read_topic(broker.bootstrap, CLICKSTREAM_TOPIC))) == EVENTS
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    retries = [line for line in (waited + stderr).decode().splitlines() if line.strip()]
    # One line per retry, nothing else (aiokafka's own connection errors stay out).
    assert retries and all("retrying in" in line for line in retries), retries
    assert "Traceback" not in (waited + stderr).decode()


@pytest.mark.parametrize(
    ("sig", "ignoring"),
    [(signal.SIGINT, ""), (signal.SIGINT, "INT"), (signal.SIGTERM, "")],
    ids=["Ctrl-C", "Ctrl-C, started with it ignored", "SIGTERM"],
)
def test_simulate_stops_cleanly_on_a_signal_while_waiting(sig: int, ignoring: str) -> None:
    proc = simulate(f"127.0.0.1:{free_port()}", ignoring=ignoring)
    try:
        waited = wait_for_output(proc, b"retrying in")
        proc.send_signal(sig)
        try:
            stdout, stderr = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(
                f"still running 20 s after {signal.Signals(sig).name}:\n"
                + (waited + (exc.stderr or b"")).decode()
            ) from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in (waited + stderr).decode()
    assert "stopped." in stdout.decode() and proc.returncode == 0


def test_simulate_with_a_rate_sends_until_stopped_and_says_how_many(tmp_path: Path) -> None:
    """``rtim simulate --rate R`` without ``-n`` (as the README runs it against a cluster)
    sends without end, shows a running count, and on Ctrl-C says how many the broker took."""
    with EmbeddedBroker(log_path=tmp_path / "broker.log") as broker:
        asyncio.run(create_topics(broker.bootstrap, {CLICKSTREAM_TOPIC: 2}))
        proc = simulate(broker.bootstrap, args=("--rate", "400"))
        try:
            counted = wait_for_output(proc, b"events (", timeout=30)
            proc.send_signal(signal.SIGINT)
            stdout, stderr = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        said = (counted + stderr).decode()
        assert proc.returncode == 0 and "Traceback" not in said, said
        assert f"sending to {CLICKSTREAM_TOPIC}: " in said, said
        last = stdout.decode().strip().splitlines()[-1]
        assert last.startswith("stopped after ") and last.endswith(" events."), last
        sent = int(last.removeprefix("stopped after ").removesuffix(" events.").replace(",", ""))
        # More than one count line's worth (5 s at 400/s), and every one of them is there.
        assert sent >= 1000, last
        assert len(asyncio.run(read_topic(broker.bootstrap, CLICKSTREAM_TOPIC))) >= sent
