"""The decision API's fast path: ``POST /v1/decide`` answered in the callback that reads it.

Through aiohttp a request takes four turns of the worker's event loop (the read, the
connection's task, the request's task, the write) and about as much CPU as the decision
itself (routing, a request object, its headers as a multidict, a task, a response object),
and it waits for each of those turns behind whatever else the loop runs, the batches of
the clickstream included. So the worker's web port meets each connection with
:class:`DecideConnection`, which serves plain HTTP/1.1 ``POST /v1/decide`` requests with a
``Content-Length`` itself:

- at once, in the callback that read it, when it can be decided now
  (:meth:`~rtim.stream.api.DecisionApi.decide_at_once`: a valid request for a customer
  this worker owns, answered when decided);
- otherwise through :meth:`~rtim.stream.api.DecisionApi.serve_decide`, as aiohttp's view
  serves it (400 with the reason, forwarded to the owner, 503, or decided in a batch of
  its own), in a task; the connection's next requests wait for it, and are answered in
  order.

Anything else (other paths and methods, chunked bodies, ``Expect``, ``Connection: close``,
HTTP/1.0, heads over 8 KiB) hands the connection, with the bytes not answered yet, to
aiohttp's own protocol, which serves it from there on as it would have from the start. The
answers, their headers and the metrics are the same whichever serves the request. A head
with a line ended by a bare LF rather than CRLF, which aiohttp refuses too, is answered
400 (:data:`BARE_LF`) as soon as it is seen, and the connection closed; waiting for the
CRLF CRLF that ends a head would hold it until it timed out. aiohttp's router's 404 and
405 are JSON like the API's other errors (:func:`json_errors`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp.web_runner import BaseSite, TCPSite
from faust.web.drivers.aiohttp import Web as AiohttpWeb

from rtim.decide.request import MAX_REQUEST_BYTES, InvalidRequest
from rtim.stream.api import FORWARDED, DecisionApi, Reply

log = logging.getLogger("rtim.api")

#: The one request line served here; every other goes to aiohttp.
REQUEST_LINE = b"POST /v1/decide HTTP/1.1"
#: Larger heads or bodies go to aiohttp, whose limits answer them.
MAX_HEAD_BYTES = 8192
MAX_BODY_BYTES = 65536
#: Seconds an idle keep-alive connection stays open (aiohttp's own default).
KEEPALIVE_S = 75.0
#: Headers whose presence sends a request to aiohttp (lower case).
_HANDED = (b"transfer-encoding", b"expect", b"upgrade")
_FORWARDED = FORWARDED.lower().encode()
#: The longest request line aiohttp reads (its ``max_line_size``): a longer one is
#: answered here, in JSON, rather than by aiohttp's plain-text 400 and logged traceback.
MAX_LINE_BYTES = 8190
URI_TOO_LONG = Reply(
    414,
    orjson.dumps(
        {
            "error": "uri_too_long",
            "message": f"the request line is longer than {MAX_LINE_BYTES} bytes "
            "(a customer id is at most 256 characters)",
        }
    ),
    {"Connection": "close"},
)
#: The answer to a decision request whose head declares a body longer than this path
#: reads (the request's own limit is :data:`~rtim.decide.request.MAX_REQUEST_BYTES`).
BODY_TOO_LONG = Reply(
    400,
    orjson.dumps(InvalidRequest("body", f"longer than {MAX_REQUEST_BYTES} bytes").as_json()),
    {"Connection": "close"},
)
#: The answer to a decision request whose Content-Length is given twice or is no number.
BAD_LENGTH = Reply(
    400,
    orjson.dumps(
        {
            "error": "bad_request",
            "message": "Content-Length must be given once, as a number of bytes",
        }
    ),
    {"Connection": "close"},
)
#: The answer to a request whose head has a line ended by a bare LF, not CRLF.
BARE_LF = Reply(
    400,
    orjson.dumps(
        {
            "error": "bad_request",
            "message": "the request's head has a line ending in a bare LF: HTTP/1.1 ends "
            "each line of the request line and headers with CRLF (\\r\\n)",
        }
    ),
    {"Connection": "close"},
)


class DecideConnection(asyncio.Protocol):
    """One connection to the web port, until it is handed to aiohttp's protocol."""

    __slots__ = (
        "_buffer",
        "_busy",
        "_connections",
        "_fallback",
        "_server",
        "idle_since",
        "transport",
    )

    def __init__(
        self,
        fallback: Callable[[], asyncio.Protocol],
        server: DecideServer,
        connections: set[DecideConnection],
    ) -> None:
        self._fallback = fallback
        self._server = server
        self._connections = connections
        self._buffer = bytearray()
        #: A request is being answered asynchronously: what comes meanwhile waits.
        self._busy = False
        self.transport: asyncio.Transport | None = None
        self.idle_since = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        self.transport = None

    def eof_received(self) -> bool:
        return False  # the client is done: close

    def data_received(self, data: bytes) -> None:
        self.idle_since = time.monotonic()
        self._buffer += data
        if not self._busy:
            self._serve()
        elif len(self._buffer) > MAX_HEAD_BYTES + MAX_BODY_BYTES and self.transport is not None:
            # A client that sends on while its request waits: read no more until answered.
            self.transport.pause_reading()

    def _serve(self) -> None:
        """Answer the whole requests in the buffer, in order."""
        buffer = self._buffer
        while buffer and self.transport is not None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                # Not whole yet, or never will be: a head with bare LF line ends (which
                # aiohttp refuses too) is answered now, not when the connection times out.
                if buffer.count(b"\n") != buffer.count(b"\r\n"):
                    self._refuse(BARE_LF)
                elif len(buffer) > MAX_HEAD_BYTES:
                    line_end = buffer.find(b"\r\n", 0, MAX_LINE_BYTES + 2)
                    if line_end < 0 or line_end > MAX_LINE_BYTES:
                        self._refuse(URI_TOO_LONG)
                    else:
                        self._hand_over()
                return
            head = _head(buffer, end)
            if not isinstance(head, tuple):
                if head is None:
                    self._hand_over()
                else:
                    self._refuse(head)
                return
            length, forwarded_by = head
            total = end + 4 + length
            if len(buffer) < total:
                return  # the body's rest is on its way
            body = bytes(buffer[end + 4 : total])
            del buffer[:total]
            reply = self._server.at_once(body)
            if reply is None:
                self._busy = True
                task = asyncio.ensure_future(self._server.serve(body, forwarded_by))
                task.add_done_callback(self._served)
                return
            self.transport.write(reply)

    def _served(self, task: asyncio.Future[bytes]) -> None:
        self._busy = False
        if self.transport is None or task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("decide request failed", exc_info=exc)
            self.transport.close()
            return
        self.transport.write(task.result())
        if not self.transport.is_reading():
            self.transport.resume_reading()
        self._serve()

    def _refuse(self, reply: Reply) -> None:
        """Answer a request that cannot be read (400), and close the connection: where the
        next request would begin is not known."""
        transport = self.transport
        assert transport is not None
        self._buffer.clear()
        transport.write(self._server.render(reply))
        transport.close()

    def _hand_over(self) -> None:
        """Let aiohttp's protocol serve the connection from here on, from the request
        not answered yet."""
        transport = self.transport
        assert transport is not None
        self._connections.discard(self)
        protocol = self._fallback()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        pending, self._buffer = bytes(self._buffer), bytearray()
        if pending:
            protocol.data_received(pending)


def _head(buffer: bytearray, end: int) -> tuple[int, str | None] | Reply | None:
    """The body's length and the forwarding worker of a request served here (None: it
    is aiohttp's to serve; a :class:`Reply`: it is refused with it)."""
    raw = bytes(buffer[:end])
    lines = raw.split(b"\r\n")
    if raw.count(b"\n") != len(lines) - 1:
        # A bare LF: a line end to some parsers and not to others (a header hidden in
        # another's value), so no head with one is read.
        return BARE_LF
    if lines[0] != REQUEST_LINE:
        return URI_TOO_LONG if len(lines[0]) > MAX_LINE_BYTES else None
    length = None
    forwarded_by = None
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            return None
        name = name.strip().lower()
        if name == b"content-length":
            if length is not None or not value.strip().isdigit():
                return BAD_LENGTH  # twice, or not a length: where the body ends is unknown
            length = int(value)
        elif name == _FORWARDED:
            forwarded_by = value.strip().decode("latin-1")
        elif name in _HANDED or (name == b"connection" and b"close" in value.lower()):
            return None
    if length is None:
        return None
    if length > MAX_BODY_BYTES:
        return BODY_TOO_LONG  # at once: its body is not read (nor waited for)
    return length, forwarded_by


class DecideServer:
    """The decision API's answers as whole HTTP/1.1 responses."""

    def __init__(self, api: DecisionApi) -> None:
        self.api = api
        self._date = b""
        self._date_s = -1

    def at_once(self, body: bytes) -> bytes | None:
        """The response if the request is answered without waiting (None: :meth:`serve`)."""
        reply = self.api.decide_at_once(body)
        return None if reply is None else self.render(reply)

    async def serve(self, body: bytes, forwarded_by: str | None) -> bytes:
        return self.render(await self.api.serve_decide(body, forwarded_by))

    def render(self, reply: Reply) -> bytes:
        now = time.time()
        second = int(now)
        if second != self._date_s:
            self._date, self._date_s = formatdate(now, usegmt=True).encode(), second
        status = reply.status
        head = [
            b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode()),
            b"Content-Type: %s; charset=utf-8\r\n" % reply.content_type.encode(),
            b"Content-Length: %d\r\n" % len(reply.body),
        ]
        head.extend(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in reply.headers.items())
        head.append(b"Date: %s\r\nServer: rtim\r\n\r\n" % self._date)
        head.append(reply.body)
        return b"".join(head)


class FastSite(TCPSite):
    """aiohttp's TCP site, whose connections meet :class:`DecideConnection` first."""

    def __init__(self, runner: Any, host: str, port: int, *, fast: Callable[[], DecideServer]):
        super().__init__(runner, host, port)
        self._fast = fast
        self._connections: set[DecideConnection] = set()
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None
        fast = self._fast()
        connections = self._connections
        self._server = await asyncio.get_running_loop().create_server(
            lambda: DecideConnection(server, fast, connections),
            self._host,
            self._port,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        self._sweeper = asyncio.ensure_future(self._sweep())

    async def _sweep(self) -> None:
        """Close keep-alive connections idle for longer than :data:`KEEPALIVE_S`."""
        while True:
            await asyncio.sleep(KEEPALIVE_S / 5)
            stale = time.monotonic() - KEEPALIVE_S
            for connection in [c for c in self._connections if c.idle_since < stale]:
                if connection.transport is not None:
                    connection.transport.close()

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for connection in list(self._connections):
            if connection.transport is not None:
                connection.transport.close()
        await super().stop()


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's router answers a path no view serves (404) and a method a view does not
    serve (405) in plain text; the API answers every error in JSON, so these too. (Views'
    own answers are left alone.)"""
    refused = request.match_info.http_exception  # the router's 404 or 405, or None
    if refused is None:
        return await handler(request)
    if isinstance(refused, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(refused.allowed_methods))
        return _error(
            405,
            "method_not_allowed",
            f"{request.method} is not served at {request.path}; allowed: {allowed}",
            {"Allow": refused.headers.get("Allow", allowed)},
        )
    if isinstance(refused, web.HTTPNotFound):
        return _error(404, "not_found", f"nothing is served at {request.path}")
    return await handler(request)


def _error(
    status: int, error: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps({"error": error, "message": message}),
        content_type="application/json",
        charset="utf-8",
        headers=headers,
    )


class RtimWeb(AiohttpWeb):
    """Faust's aiohttp web driver, its TCP site the one with the decision API's fast path,
    and its 404 and 405 answers JSON (:func:`json_errors`)."""

    def __init__(self, app: Any, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.web_app.middlewares.append(json_errors)

    def _new_transport_tcp(self) -> BaseSite:
        conf = self.app.conf
        if conf.web_ssl_context is not None:
            return super()._new_transport_tcp()
        app: Any = self.app
        return FastSite(
            self._runner, conf.web_bind, conf.web_port, fast=lambda: DecideServer(app.rtim_api)
        )
