"""However `rtim demo` ends, it leaves nothing behind: no process, no taken port, no files.

Each demo runs with its own TMPDIR, which every process it starts inherits, so the
processes that belong to one demo are found by that variable in /proc/*/environ,
even after they have lost their parent.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rtim.stream.process import free_port

DEMO = [sys.executable, "-m", "rtim", "demo", "--rate", "50"]
READY_S = 90.0  # a worker starts in seconds; a busy machine is slower
GONE_S = 10.0  # "promptly": the children end within this after the demo does


class Demo:
    """One demo's environment: its own TMPDIR and web port (given as RTIM_WEB_PORT)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmpdir = tmp_path / "tmp"
        self.tmpdir.mkdir()
        self.port = free_port()
        self.out = tmp_path / "demo.out"
        self.err = tmp_path / "demo.err"
        self.env = dict(os.environ, TMPDIR=str(self.tmpdir), RTIM_WEB_PORT=str(self.port))
        self.env.pop("RTIM_LOG_LEVEL", None)
        self.tee: subprocess.Popen[bytes] | None = None

    def start(self, *args: str, tee: bool = False) -> subprocess.Popen[bytes]:
        """The demo in its own process group, as a shell runs a foreground job.

        With ``tee``, as ``rtim demo | tee demo.out``: both in that group.
        """
        self.out.write_bytes(b"")  # to read before tee has opened it
        with self.err.open("wb") as err:
            if not tee:
                with self.out.open("wb") as out:
                    return subprocess.Popen(
                        [*DEMO, *args], env=self.env, stdout=out, stderr=err, process_group=0
                    )
            proc = subprocess.Popen(
                [*DEMO, *args], env=self.env, stdout=subprocess.PIPE, stderr=err, process_group=0
            )
        assert proc.stdout is not None
        with proc.stdout:  # tee's alone to read
            self.tee = subprocess.Popen(
                ["tee", str(self.out)],
                env=self.env,
                stdin=proc.stdout,
                stdout=subprocess.DEVNULL,
                process_group=proc.pid,
            )
        return proc

    def processes(self) -> dict[int, str]:
        """Live processes of this demo (pid -> command line)."""
        marker = f"TMPDIR={self.tmpdir}".encode()
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if marker not in (entry / "environ").read_bytes().split(b"\0"):
                    continue
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:  # gone meanwhile, or a zombie's environment
                continue
            found[int(entry.name)] = cmdline
        return found

    def metrics_answer(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as r:
                return b"rtim_events_consumed_total" in r.read()
        except OSError:
            return False

    def port_taken(self) -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in self.tmpdir.iterdir())

    def assert_nothing_left(self) -> None:
        """No process of the demo, a free port and an empty TMPDIR, within GONE_S."""
        until(lambda: not self.processes(), GONE_S, lambda: f"still running: {self.processes()}")
        until(lambda: not self.port_taken(), GONE_S, lambda: f"port {self.port} still taken")
        until(lambda: not self.leftovers(), GONE_S, lambda: f"left behind: {self.leftovers()}")


def until(condition: Callable[[], bool], timeout: float, explain: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {explain()}")
        time.sleep(0.05)


def is_worker(cmdline: str) -> bool:
    return cmdline.split()[-1:] == ["worker"]


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    started = Demo(tmp_path)
    yield started
    for pid in started.processes():  # only after a failure: ours, found by our TMPDIR
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def start_until_ready(demo: Demo, tee: bool = False) -> subprocess.Popen[bytes]:
    """A running demo whose worker answers on RTIM_WEB_PORT (no --web-port given)."""
    proc = demo.start(tee=tee)
    until(
        lambda: "worker ready" in demo.out.read_text() or proc.poll() is not None,
        READY_S,
        lambda: "the demo never said its worker was ready",
    )
    assert proc.poll() is None, demo.err.read_text()
    assert demo.metrics_answer()  # on RTIM_WEB_PORT, not on the option's own default
    return proc


def test_demo_piped_into_head_ends_and_takes_its_worker_and_broker_with_it(demo: Demo) -> None:
    started = time.monotonic()
    done = subprocess.run(
        ["bash", "-c", 'set -o pipefail; "$@" | head -3', "demo", *DEMO],
        env=demo.env,
        capture_output=True,
        text=True,
        timeout=READY_S + 30,
    )
    took = time.monotonic() - started
    # The reader going away is a normal end: status 0, nothing on stderr.
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and not done.stderr.strip(), done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and f"http://127.0.0.1:{demo.port}/metrics" in lines[1], lines
    assert took < READY_S + 20
    demo.assert_nothing_left()


@pytest.mark.parametrize("how", ["Ctrl-C on rtim demo | tee", "SIGTERM", "SIGHUP"])
def test_demo_stopped_by_a_signal_stops_everything_and_exits_0(demo: Demo, how: str) -> None:
    piped = how.endswith("| tee")
    proc = start_until_ready(demo, tee=piped)
    if piped:  # the terminal sends SIGINT to the whole job: tee dies, the demo's output too
        os.killpg(proc.pid, signal.SIGINT)
        assert demo.tee is not None
        demo.tee.wait(timeout=10)
    else:
        proc.send_signal(signal.Signals[how])
    assert proc.wait(timeout=30) == 0, demo.err.read_text()
    err = demo.err.read_text()
    assert "Traceback" not in err, err
    if not piped:
        out = demo.out.read_text()
        assert "stopping worker and broker" in out and "sent " in out, out
    demo.assert_nothing_left()


def test_killed_demo_takes_its_worker_and_broker_with_it(demo: Demo) -> None:
    proc = start_until_ready(demo)
    children = demo.processes()
    assert any("tansu" in c for c in children.values()), children
    assert any(is_worker(c) for c in children.values()), children
    proc.kill()
    proc.wait(timeout=10)
    demo.assert_nothing_left()


def test_dead_worker_ends_the_demo_with_its_log_and_status_1(demo: Demo, tmp_path: Path) -> None:
    logs = tmp_path / "kept-logs"
    proc = demo.start("--keep-logs", str(logs))
    until(lambda: "worker ready" in demo.out.read_text(), READY_S, demo.err.read_text)
    (worker,) = [p for p, c in demo.processes().items() if is_worker(c)]
    os.kill(worker, signal.SIGKILL)
    assert proc.wait(timeout=30) == 1
    err = demo.err.read_text()
    assert "the worker exited while the demo ran (status -9)" in err, err
    assert f"logs kept in {logs}" in err and "Traceback" not in err, err
    assert (logs / "worker.log").is_file() and (logs / "broker.log").is_file()
    demo.assert_nothing_left()


def test_taken_web_port_is_one_line_naming_the_setting_and_nothing_starts(demo: Demo) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", demo.port))
        holder.listen()
        done = subprocess.run(
            [*DEMO, "--duration", "5"], env=demo.env, capture_output=True, text=True, timeout=60
        )
        assert demo.processes() == {}
    assert done.returncode == 2, (done.stdout, done.stderr)
    (line,) = done.stderr.strip().splitlines()
    assert str(demo.port) in line and "RTIM_WEB_PORT" in line and "--web-port" in line, line
    assert done.stdout == ""  # no broker, no worker
    assert demo.leftovers() == []
