"""A TCP proxy that can cut the network between Kafka clients and the broker.

The broker advertises the proxy's address (``EmbeddedBroker(advertise=...)``), so
every connection a client makes after bootstrap goes through it. :meth:`TcpProxy.cut`
closes every connection and refuses new ones (the port stops listening), as when
the broker's host goes away; :meth:`TcpProxy.stall` keeps connections open but
forwards nothing (a network that drops packets: requests wait for their
timeouts); :meth:`TcpProxy.restore` undoes either.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from types import TracebackType
from typing import Self

_HOST = "127.0.0.1"


def _listen(port: int) -> socket.socket:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((_HOST, port))
    server.listen(64)
    return server


def _process_of(port: int, proxy_port: int, pids: set[int]) -> int | None:
    """Which of ``pids`` holds the client end (local ``port``) of a connection to the proxy.

    Found as ``ss -p`` does: the socket's inode from /proc/net/tcp, then the
    process whose file descriptors include that socket.
    """
    inode = None
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if int(local.split(":")[1], 16) == port and int(remote.split(":")[1], 16) == proxy_port:
                inode = fields[9]
                break
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return pid
    return None


class TcpProxy:
    """Forwards connections on a loopback port to ``target`` (set before the first one)."""

    def __init__(self) -> None:
        self._server: socket.socket | None = _listen(0)
        self.port = int(self._server.getsockname()[1])
        self.target: tuple[str, int] | None = None
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._peers: dict[socket.socket, int] = {}  # client socket -> its port
        self._isolated: set[int] = set()  # processes cut off by isolate()
        self.accepted = 0
        self._flowing = threading.Event()
        self._flowing.set()
        self._accepting = threading.Thread(target=self._accept, args=(self._server,), daemon=True)
        self._accepting.start()

    @property
    def address(self) -> str:
        return f"{_HOST}:{self.port}"

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, peer = server.accept()
            except OSError:  # closed by cut() or close()
                return
            if self._isolated and _process_of(peer[1], self.port, self._isolated):
                client.close()
                continue
            try:
                assert self.target is not None, "set the proxy's target first"
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._server is not server:  # cut meanwhile
                    client.close()
                    upstream.close()
                    return
                self._conns.update((client, upstream))
                self._peers[client] = peer[1]
                self.accepted += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self._flowing.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._drop(src, dst)

    def _drop(self, *socks: socket.socket) -> None:
        with self._lock:
            for sock in socks:
                self._conns.discard(sock)
                self._peers.pop(sock, None)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    @property
    def connections(self) -> int:
        """Open client connections (each counts once)."""
        with self._lock:
            return len(self._conns) // 2

    def cut(self) -> None:
        """Close every connection and stop listening: new connections are refused."""
        with self._lock:
            server, self._server = self._server, None
            conns, self._conns = list(self._conns), set()
        if server is not None:
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread (Linux)
            server.close()
        self._drop(*conns)

    def isolate(self, pid: int) -> None:
        """Cut one process off: close its connections and refuse its new ones.

        Every client reaches the broker through the one address it advertises; the
        connections are told apart by the process holding their client end.
        """
        self._isolated.add(pid)
        with self._lock:
            peers = list(self._peers.items())
        for client, port in peers:
            if _process_of(port, self.port, {pid}):
                self._drop(client)  # its pipe threads then drop the upstream end

    def stall(self) -> None:
        """Forward nothing from now on, in either direction; connections stay open."""
        self._flowing.clear()

    def restore(self) -> None:
        """Forward again, listen again on the same port, and let isolated processes in."""
        self._isolated.clear()
        self._flowing.set()
        with self._lock:
            if self._server is not None:
                return
            server = self._server = _listen(self.port)
        self._accepting = threading.Thread(target=self._accept, args=(server,), daemon=True)
        self._accepting.start()

    def close(self) -> None:
        self.cut()
        self._flowing.set()  # lets the stalled threads see their closed sockets

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
