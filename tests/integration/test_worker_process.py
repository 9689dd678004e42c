"""A worker started through WorkerProcess never outlives the process that started it."""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from rtim.broker import EmbeddedBroker

# A parent running another thread when it starts the worker, as the demo's event
# loop and pytest do, then waiting until it is killed.
PARENT = """
import sys, threading
from rtim.stream.process import WorkerProcess

threading.Thread(target=threading.Event().wait, daemon=True).start()
broker, datadir = sys.argv[1:]
worker = WorkerProcess(broker=broker, datadir=datadir).start()
print(worker.proc.pid, worker.web_port, flush=True)
sys.stdin.read()
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/live", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def test_worker_dies_within_seconds_when_its_parent_is_killed(
    kafka: EmbeddedBroker, tmp_path: Path
) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, kafka.bootstrap, str(tmp_path / "data")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    pid_text, port_text = parent.stdout.readline().split()
    pid, port = int(pid_text), int(port_text)
    try:
        deadline = time.monotonic() + 90
        while not _answers(port):
            assert _alive(pid) and time.monotonic() < deadline, "the worker never answered"
            time.sleep(0.1)
        parent.kill()  # no code of the parent runs: only the kernel can end the worker
        parent.wait(10)
        deadline = time.monotonic() + 10
        while _alive(pid) or _listening(port):  # its threads may close the port a bit later
            assert time.monotonic() < deadline, "the worker outlived its parent by 10 s"
            time.sleep(0.05)
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def _logged_at(log: str, what: str) -> dt.datetime:
    """When the worker's log first says ``what`` (its lines start ``[date time,ms]``)."""
    line = next(line for line in log.splitlines() if what in line)
    return dt.datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f")


def test_a_worker_stopped_alone_leaves_its_groups_and_closes_soon_after(workers) -> None:
    """SIGTERM to the first worker of a group: it exits 0, having left both its groups
    (the clickstream's and the learners'; in generation 0 on the embedded broker, where
    aiokafka alone would not leave), and its event loop closes a tenth of a second after
    its last task ended, not the whole second mode waits at every stop. The next worker
    is then ready (its partitions no longer held by the one that stopped)."""
    first = workers("w1").wait_ready()
    assert first.stop() == 0
    log = first.log_path.read_text()
    assert log.count("LeaveGroup request succeeded") == 2, first.log_tail()
    gap = _logged_at(log, "Closing event loop") - _logged_at(log, "Gathering all futures")
    assert gap.total_seconds() < 0.5, f"the loop closed {gap} after the last task"
    started = time.monotonic()
    workers("w2").wait_ready()
    print(f"the next worker was ready {time.monotonic() - started:.1f} s after its start")
