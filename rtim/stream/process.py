"""An RTIM worker as a child process: start, wait until ready, read metrics, stop or kill.

Used by ``rtim demo``, ``rtim bench`` and the integration tests, which all need
a real worker process (one that can be SIGKILLed) next to the embedded broker.

The child never outlives the process that started it: it runs in its own session
(a Ctrl-C in the terminal reaches only the parent, which then stops it in order)
and, on Linux, asks the kernel to SIGKILL it when its parent dies, however that
happens (SIGKILL, an unhandled signal, a crash), so no orphan keeps the web port
or logs errors about a broker that has gone with its parent.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

from prometheus_client.parser import text_string_to_metric_families

from rtim.settings import DEFAULTS

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class WorkerError(RuntimeError):
    """The worker process died or did not become ready; carries its log tail."""


class WorkerProcess:
    """``rtim worker`` in a child process, configured through ``RTIM_*`` variables."""

    def __init__(
        self,
        *,
        broker: str,
        datadir: str | Path,
        app_id: str = DEFAULTS.app_id,
        web_port: int | None = None,
        store: str = DEFAULTS.store,
        log_path: str | Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.web_port = web_port or free_port()
        self.datadir = Path(datadir)
        self.log_path = Path(log_path) if log_path else self.datadir.with_suffix(".log")
        self.env = dict(os.environ)
        self.env.update(
            RTIM_BROKER=broker,
            RTIM_APP_ID=app_id,
            RTIM_DATADIR=str(self.datadir),
            RTIM_STORE=store,
            RTIM_WEB_PORT=str(self.web_port),
            RTIM_WEB_HOST="127.0.0.1",
        )
        self.env.update(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def start(self) -> WorkerProcess:
        """Start the worker (it does not wait until it is ready: see :meth:`wait_ready`).

        Linux ties the child's life to the *thread* that starts it, not only to the
        process: call this from the main thread, or from a thread that lives as long
        as the worker (not from ``asyncio.to_thread``).
        """
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", __name__, str(os.getpid()), "worker"],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def status(self, path: str, timeout: float = 2.0) -> int | None:
        """HTTP status of ``path`` on the worker's web port (None if it does not answer)."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except (urllib.error.URLError, OSError):
            return None

    def wait_ready(self, timeout: float = 90.0) -> WorkerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise WorkerError(
                    f"worker exited ({self.proc and self.proc.returncode}):\n{self.log_tail()}"
                )
            if self.status("/health/ready") == 200:
                return self
            time.sleep(0.1)
        raise WorkerError(f"worker not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def metrics(self) -> dict[str, float]:
        """Current samples as ``{'name{label="v",...}': value}`` (labels sorted)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples

    def metric(self, name: str, **labels: str) -> float:
        """One sample's value (0 if absent, as for a counter never incremented)."""
        key = name
        if labels:
            key += "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
        return self.metrics().get(key, 0.0)

    def report_state(self, wait: float = 10.0) -> str:
        """Ask the worker to log its partitions and task stacks (SIGUSR1); return them
        (what it logged within ``wait`` seconds if the report does not finish)."""
        from rtim.stream.worker import STATE_REPORT_END  # (Faust is not loaded before this)

        if not self.alive:
            return self.log_tail()
        assert self.proc is not None
        start = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + wait
        while True:
            with self.log_path.open("rb") as f:
                f.seek(start)
                report = f.read().decode(errors="replace")
            if STATE_REPORT_END in report or time.monotonic() > deadline or not self.alive:
                return report
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as when a machine dies."""
        if self.alive:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)
        self._close_log()

    def stop(self, timeout: float = 30.0) -> int | None:
        """Graceful stop (SIGTERM), then SIGKILL after ``timeout``; returns the exit code."""
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._close_log()
        return self.proc.returncode if self.proc else None

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when ``parent`` dies (Linux only).

    Set here, in the child after ``exec``, rather than in a ``preexec_fn``, which is
    unsafe when the parent runs threads (the demo's event loop and the tests do).
    SIGKILL, not SIGTERM: the broker usually dies at the same moment, and a worker
    whose broker has gone must not linger in a graceful shutdown.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


if __name__ == "__main__":
    # The child of WorkerProcess.start: ``python -m rtim.stream.process PARENT_PID worker``.
    _die_with_parent(int(sys.argv[1]))
    from rtim.cli import main

    main(args=sys.argv[2:], prog_name="rtim")
