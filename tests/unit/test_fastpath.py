"""The web port's fast path for ``POST /v1/decide`` (rtim/stream/fastpath.py), on a real
socket: answers in order, whole requests only, and everything else served by aiohttp."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import faust
import orjson
import pytest
from aiohttp import web

from rtim.stream import fastpath
from rtim.stream.api import FORWARDED, Reply
from rtim.stream.fastpath import DecideServer, FastSite


class Api:
    """Decides ``{"n": ...}`` at once, or (``"wait": s``) after ``s`` seconds in a task."""

    def __init__(self) -> None:
        self.at_once: list[int] = []

    def decide_at_once(self, body: bytes) -> Reply | None:
        data = orjson.loads(body)
        if "wait" in data:
            return None
        self.at_once.append(data["n"])
        return Reply(200, orjson.dumps({"n": data["n"], "by": "fast"}), {"X-RTIM-Worker": "w"})

    async def serve_decide(self, body: bytes, forwarded_by: str | None) -> Reply:
        data = orjson.loads(body)
        await asyncio.sleep(data["wait"])
        answer = {"n": data["n"], "by": "served", "forwarded_by": forwarded_by}
        return Reply(503 if forwarded_by else 200, orjson.dumps(answer))


@asynccontextmanager
async def server(api: Api) -> AsyncIterator[int]:
    app = web.Application()

    async def other(request: web.Request) -> web.Response:
        return web.json_response({"by": "aiohttp", "path": request.path})

    async def decide(request: web.Request) -> web.Response:
        return web.json_response({"by": "aiohttp", "body": (await request.read()).decode()})

    app.router.add_get("/other", other)
    app.router.add_post("/v1/decide", decide)
    runner = web.AppRunner(app)
    await runner.setup()
    site = FastSite(runner, "127.0.0.1", 0, fast=lambda: DecideServer(api))  # type: ignore[arg-type]
    await site.start()
    assert site._server is not None
    try:
        yield site._server.sockets[0].getsockname()[1]
    finally:
        await runner.cleanup()


def post(body: dict[str, Any], *headers: str) -> bytes:
    raw = orjson.dumps(body)
    head = "".join(f"{h}\r\n" for h in headers)
    return (
        f"POST /v1/decide HTTP/1.1\r\nHost: x\r\n{head}Content-Length: {len(raw)}\r\n\r\n".encode()
        + raw
    )


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], Any]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if line)
    body = await reader.readexactly(int(headers["Content-Length"]))
    return int(lines[0].split()[1]), headers, orjson.loads(body)


def run(test: Any) -> None:
    asyncio.run(test())


def test_pipelined_requests_are_answered_in_order_whether_at_once_or_not() -> None:
    async def test() -> None:
        api = Api()
        async with server(api) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            # One at once, one that waits in a task, one at once again: all sent together.
            writer.write(post({"n": 1}) + post({"n": 2, "wait": 0.2}) + post({"n": 3}))
            answers = [await read_answer(reader) for _ in range(3)]
            assert [(s, b["n"], b["by"]) for s, _, b in answers] == [
                (200, 1, "fast"),
                (200, 2, "served"),
                (200, 3, "fast"),
            ]
            # The third was decided only after the second's answer: nothing out of order.
            assert api.at_once == [1, 3]
            _, headers, _ = answers[0]
            assert headers["Content-Type"] == "application/json; charset=utf-8"
            assert headers["X-RTIM-Worker"] == "w" and "Date" in headers
            writer.close()

    run(test)


def test_a_client_sending_on_while_its_request_waits_is_answered_in_full_in_order() -> None:
    async def test() -> None:
        api = Api()
        async with server(api) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            # A waiting request, then far more than the server reads ahead meanwhile.
            many = b"".join(post({"n": i}) for i in range(1, 3001))
            assert len(many) > 2 * (fastpath.MAX_HEAD_BYTES + fastpath.MAX_BODY_BYTES)
            writer.write(post({"n": 0, "wait": 0.2}) + many)
            answers = [(await read_answer(reader))[2]["n"] for _ in range(3001)]
            assert answers == list(range(3001))
            assert api.at_once == list(range(1, 3001))
            writer.close()

    run(test)


def test_a_request_arriving_in_pieces_is_answered_once_whole() -> None:
    async def test() -> None:
        api = Api()
        async with server(api) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            raw = post({"n": 7})
            for piece in (raw[:10], raw[10:-5], raw[-5:]):
                assert api.at_once == []
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.05)
            status, _, body = await read_answer(reader)
            assert (status, body["n"], api.at_once) == (200, 7, [7])
            writer.close()

    run(test)


def test_a_forwarded_request_carries_who_forwarded_it() -> None:
    async def test() -> None:
        async with server(Api()) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(post({"n": 1, "wait": 0}, f"{FORWARDED}: http://other:6066"))
            status, _, body = await read_answer(reader)
            assert (status, body["forwarded_by"]) == (503, "http://other:6066")
            writer.close()

    run(test)


@pytest.mark.parametrize(
    "request_",
    [
        b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /v1/decide HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'8\r\n{"n": 5}\r\n0\r\n\r\n',
        b'POST /v1/decide HTTP/1.0\r\nHost: x\r\nContent-Length: 8\r\n\r\n{"n": 5}',
    ],
)
def test_anything_else_is_served_by_aiohttp_from_then_on(request_: bytes) -> None:
    async def test() -> None:
        api = Api()
        async with server(api) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(post({"n": 1}))
            assert (await read_answer(reader))[2]["by"] == "fast"
            writer.write(request_)
            status, _, body = await read_answer(reader)
            assert (status, body["by"]) == (200, "aiohttp")
            if b"HTTP/1.1" in request_:
                # The connection stays aiohttp's.
                writer.write(post({"n": 2}))
                assert (await read_answer(reader))[2]["by"] == "aiohttp"
            assert api.at_once == [1]
            writer.close()

    run(test)


def test_idle_connections_are_closed_after_the_keepalive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fastpath, "KEEPALIVE_S", 0.3)

    async def test() -> None:
        async with server(Api()) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(post({"n": 1}))
            await read_answer(reader)
            assert await asyncio.wait_for(reader.read(), 3) == b""  # closed by the server
            writer.close()

    run(test)


async def read_refusal(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], Any]:
    """An answer, and the connection closed after it."""
    answer = await read_answer(reader)
    assert await asyncio.wait_for(reader.read(), 5) == b"", "the connection stays open"
    return answer


@pytest.mark.parametrize(
    "request_",
    [
        b'POST /v1/decide HTTP/1.1\nHost: x\nContent-Length: 8\n\n{"n": 5}',
        b"GET /v1/catalog HTTP/1.1\nHost: x\n\n",
        # Not even the request line whole yet: refused as soon as its bare LF is read.
        b"POST /v1/decide HTTP/1.1\n",
        # A bare LF among CRLFs: one parser's line end is another's header value.
        b'POST /v1/decide HTTP/1.1\r\nHost: x\nContent-Length: 8\r\n\r\n{"n": 5}',
        b'POST /v1/decide HTTP/1.1\r\nHost: x\r\nContent-Length: 8\n\r\n{"n": 5}',
    ],
)
def test_a_head_with_bare_lf_line_ends_is_a_400_at_once(request_: bytes) -> None:
    async def test() -> None:
        api = Api()
        async with server(api) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request_)
            started = asyncio.get_running_loop().time()
            status, headers, body = await read_refusal(reader)
            assert asyncio.get_running_loop().time() - started < 1
            assert (status, body["error"]) == (400, "bad_request")
            assert "bare LF" in body["message"] and "CRLF" in body["message"]
            assert headers["Content-Type"] == "application/json; charset=utf-8"
            assert headers["Connection"] == "close"
            assert api.at_once == []
            writer.close()

    run(test)


def test_a_bare_lf_after_answered_requests_is_refused_after_their_answers() -> None:
    async def test() -> None:
        api = Api()
        async with server(api) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(post({"n": 1}) + post({"n": 2, "wait": 0.1}) + b"GET / HTTP/1.1\n\n")
            assert (await read_answer(reader))[2]["n"] == 1
            assert (await read_answer(reader))[2]["n"] == 2
            status, _, body = await read_refusal(reader)
            assert (status, body["error"]) == (400, "bad_request")
            writer.close()

    run(test)


def test_a_crlf_request_arriving_a_byte_at_a_time_is_answered() -> None:
    """CR and LF in separate reads are no bare LF."""

    async def test() -> None:
        api = Api()
        async with server(api) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for byte in post({"n": 9}):
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0)
            status, _, body = await read_answer(reader)
            assert (status, body["n"], api.at_once) == (200, 9, [9])
            writer.close()

    run(test)


@asynccontextmanager
async def rtim_web() -> AsyncIterator[int]:
    """The aiohttp application of RTIM's web driver (RtimWeb), with a route like the
    decision API's, served on a socket."""
    driver = fastpath.RtimWeb(faust.App("test-json-errors", broker="memory://"))

    async def decide(request: web.Request) -> web.Response:
        return web.json_response({"by": "aiohttp"})

    async def gone(request: web.Request) -> web.Response:
        raise web.HTTPNotFound(text="customer not known")

    driver.web_app.router.add_route("POST", "/v1/decide", decide)
    driver.web_app.router.add_route("GET", "/v1/decide", decide)
    driver.web_app.router.add_route("GET", "/gone", gone)
    runner = web.AppRunner(driver.web_app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    assert site._server is not None
    try:
        yield site._server.sockets[0].getsockname()[1]
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("request_", "status", "error", "message"),
    [
        (
            b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\n\r\n",
            404,
            "not_found",
            "nothing is served at /v1/nothing",
        ),
        (
            b"PUT /v1/decide HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            405,
            "method_not_allowed",
            "PUT is not served at /v1/decide; allowed: GET, POST",
        ),
    ],
)
def test_404_and_405_are_json_like_the_apis_other_errors(
    request_: bytes, status: int, error: str, message: str
) -> None:
    async def test() -> None:
        async with rtim_web() as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request_)
            got, headers, body = await read_answer(reader)
            assert (got, body) == (status, {"error": error, "message": message})
            assert headers["Content-Type"] == "application/json; charset=utf-8"
            if status == 405:
                assert set(headers["Allow"].split(",")) == {"GET", "POST"}
            # A view's own 404 keeps its words.
            writer.write(b"GET /gone HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 404") and b"text/plain" in head
            writer.close()

    run(test)


def refusal(request_: bytes) -> tuple[int, dict[str, str], Any]:
    """What a request is refused with (the connection closed after it), within 5 s."""
    answers = []

    async def test() -> None:
        async with server(Api()) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request_)
            answers.append(await asyncio.wait_for(read_refusal(reader), 5))
            writer.close()

    run(test)
    return answers[0]


@pytest.mark.parametrize(
    "request_",
    [
        # The whole head, its request line over aiohttp's 8,190 bytes.
        b"GET /v1/customers/" + b"c" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        # Its request line alone, not even ended yet.
        b"GET /v1/customers/" + b"c" * 10_000,
    ],
)
def test_a_request_line_too_long_is_a_json_414(request_: bytes) -> None:
    """Not aiohttp's plain-text 400 and its logged traceback (with the customer's id)."""
    status, headers, body = refusal(request_)
    assert (status, body["error"]) == (414, "uri_too_long")
    assert headers["Content-Type"] == "application/json; charset=utf-8"


def test_a_body_declared_longer_than_any_request_is_refused_without_waiting_for_it() -> None:
    status, _, body = refusal(
        b"POST /v1/decide HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n{}"
    )
    assert (status, body["field"]) == (400, "body")
    assert "longer than 16384 bytes" in body["message"]


@pytest.mark.parametrize(
    "lengths", [b"Content-Length: -1", b"Content-Length: 2\r\nContent-Length: 3"]
)
def test_a_content_length_that_is_no_length_is_a_json_400(lengths: bytes) -> None:
    status, _, body = refusal(b"POST /v1/decide HTTP/1.1\r\nHost: x\r\n" + lengths + b"\r\n\r\n{}")
    assert (status, body["error"]) == (400, "bad_request")
    assert "Content-Length" in body["message"]
