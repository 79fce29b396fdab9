"""edge/upstream.py against real raw TCP servers on 127.0.0.1 (exact bytes on the wire)."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.errors import (
    ClosedBeforeResponse,
    ConnectError,
    ConnectTimeout,
    PoolTimeout,
    ProtocolError,
    ReadTimeout,
    ResponseAborted,
    UpstreamError,
    UpstreamTimeout,
    WriteTimeout,
)
from edge.upstream import HIGH_WATER, Timeouts, UpstreamPool, UpstreamResponse
from tests.rawserver import RawConn, RawServer, always, replies

pytestmark = pytest.mark.timeout(30)

GET = b"GET / HTTP/1.1\r\nHost: up\r\n\r\n"
HEAD = b"HEAD / HTTP/1.1\r\nHost: up\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
REAL = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nreal"
PWNED = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\npwned"


def post(n: int | None = None, *, chunked: bool = False) -> bytes:
    if chunked:
        return b"POST /p HTTP/1.1\r\nHost: up\r\nTransfer-Encoding: chunked\r\n\r\n"
    return b"POST /p HTTP/1.1\r\nHost: up\r\nContent-Length: %d\r\n\r\n" % (n or 0)


def run(fn: Callable[[], Coroutine[Any, Any, None]], *, uvloop: bool = False) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(25):
            await fn()

    if uvloop:
        uv = pytest.importorskip("uvloop")
        with asyncio.Runner(loop_factory=uv.new_event_loop) as runner:
            runner.run(bounded())
    else:
        asyncio.run(bounded())


async def read_all(resp: UpstreamResponse) -> bytes:
    out = bytearray()
    while data := await resp.read():
        out += data
    return bytes(out)


async def fetch(pool: UpstreamPool, head: bytes = GET, **kw: Any) -> tuple[UpstreamResponse, bytes]:
    resp = await pool.request(head, **kw)
    try:
        body = await read_all(resp)
    except BaseException:
        resp.abort()
        raise
    resp.release()
    return resp, body


async def eventually(cond: Callable[[], bool]) -> None:
    while not cond():
        await asyncio.sleep(0.005)


def by_conn(
    *handlers: Callable[[RawConn], Awaitable[None]],
) -> Callable[[RawConn], Awaitable[None]]:
    """Handler dispatching on the connection index (the last handler repeats)."""

    async def handler(conn: RawConn) -> None:
        await handlers[min(conn.index, len(handlers) - 1)](conn)

    return handler


def once(response: bytes) -> Callable[[RawConn], Awaitable[None]]:
    """Read one request, write `response`, then keep the connection open until EOF."""

    async def handler(conn: RawConn) -> None:
        await conn.read_request()
        conn.write(response)
        await conn.drain()
        await conn.reader.read()

    return handler


async def assert_poison_not_reused(srv: RawServer, pool: UpstreamPool, head: bytes = GET) -> None:
    """The next request must be answered by a fresh connection with the real response."""
    await eventually(lambda: pool.idle_count == 0)
    resp, body = await fetch(pool, head)
    assert (resp.status, body) == (200, b"real")
    assert srv.connections == 2
    assert pool.active_count == 0


# -- framing --------------------------------------------------------------------------------


def test_content_length_body() -> None:
    """A Content-Length body arrives with the head: complete, one read, connection pooled."""

    async def main() -> None:
        resp_bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello"
        async with RawServer(always(resp_bytes)) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            resp = await pool.request(GET)
            assert (resp.status, resp.http_version, resp.body_length) == (200, "1.1", 5)
            assert resp.has_body and resp.complete
            assert resp.headers == [(b"content-length", b"5"), (b"x-a", b"1")]
            assert await resp.read() == b"hello"
            assert await resp.read() == b""
            resp.release()
            assert (pool.idle_count, pool.active_count) == (1, 0)
            assert srv.requests[0].head == GET
            await pool.aclose()

    run(main)


def test_chunked_body_with_trailers_and_reuse() -> None:
    """A chunked body with trailers is de-chunked, trailers are dropped, the connection reused."""
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    )

    async def main() -> None:
        async with RawServer(always(chunked)) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            for _ in range(3):
                resp, body = await fetch(pool)
                assert body == b"hello world"
                assert resp.body_length is None
                assert resp.headers == [(b"transfer-encoding", b"chunked")]
            assert srv.connections == 1
            await pool.aclose()

    run(main)


def test_close_delimited_body_not_reused() -> None:
    """A body without CL/TE is read to EOF and that connection is never reused."""

    async def handler(conn: RawConn) -> None:
        await conn.read_request()
        conn.write(b"HTTP/1.1 200 OK\r\nX: y\r\n\r\nuntil")
        await conn.drain()
        conn.write(b" eof")

    async def main() -> None:
        async with RawServer(handler) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            for _ in range(2):
                resp, body = await fetch(pool)
                assert body == b"until eof"
                assert resp.body_length is None and resp.has_body
            assert srv.connections == 2
            assert pool.idle_count == 0
            await pool.aclose()

    run(main)


def test_head_response_with_content_length_then_reuse() -> None:
    """A HEAD response with Content-Length has no body; the connection is reused correctly."""

    async def handler(conn: RawConn) -> None:
        while (req := await conn.read_request()) is not None:
            if req.method == b"HEAD":
                conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
            else:
                conn.write(REAL)

    async def main() -> None:
        async with RawServer(handler) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            resp, body = await fetch(pool, HEAD, is_head=True)
            assert (resp.status, body, resp.has_body, resp.complete) == (200, b"", False, True)
            assert (b"content-length", b"1000") in resp.headers
            resp, body = await fetch(pool)
            assert body == b"real"
            resp, body = await fetch(pool, HEAD, is_head=True)
            assert body == b""
            assert srv.connections == 1
            await pool.aclose()

    run(main)


def test_head_response_with_body_bytes_is_not_reused() -> None:
    """Body bytes sent after a HEAD response close the connection; the next request is clean."""

    async def main() -> None:
        head_resp = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
        async with RawServer(by_conn(once(head_resp + b"pwned"), always(REAL))) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            resp, body = await fetch(pool, HEAD, is_head=True)
            assert (resp.status, body) == (200, b"")
            await assert_poison_not_reused(srv, pool)
            await pool.aclose()

    run(main)


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_statuses_reused(status: int) -> None:
    """204 and 304 responses end at the head (even with Content-Length) and are reused."""
    resp_bytes = b"HTTP/1.1 %d X\r\nContent-Length: 7\r\n\r\n" % status

    async def main() -> None:
        async with RawServer(replies(resp_bytes, REAL)) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            resp, body = await fetch(pool)
            assert (resp.status, body, resp.has_body, resp.body_length) == (
                status,
                b"",
                False,
                None,
            )
            resp, body = await fetch(pool)
            assert body == b"real"
            assert srv.connections == 1
            await pool.aclose()

    run(main)


def test_interim_100_and_103_are_skipped() -> None:
    """100 Continue and 103 Early Hints are skipped; the final response's headers only."""
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"

    async def main() -> None:
        async with RawServer(always(interim + REAL)) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            for _ in range(2):
                resp, body = await fetch(pool)
                assert (resp.status, body) == (200, b"real")
                assert resp.headers == [(b"content-length", b"4")]
            assert srv.connections == 1
            await pool.aclose()

    run(main)


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
        b"HTTP/1.1 102 Processing\r\n\r\n" + REAL,
        b"HTTP/1.1 999 Nine\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 600 Six\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 20 Two\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 2000 X\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\rb\r\nContent-Length: 0\r\n\r\n",
        b"garbage\r\n\r\n",
    ],
    ids=["101", "102", "999", "600", "two-digit", "four-digit", "http2", "bare-cr", "garbage"],
)
def test_invalid_status_or_head_is_protocol_error(response: bytes) -> None:
    """An unsolicited 101, other 1xx, status outside 200-599 or a bad head -> protocol error."""

    async def main() -> None:
        async with RawServer(by_conn(once(response), always(REAL))) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            with pytest.raises(ProtocolError) as ei:
                await pool.request(GET)
            assert isinstance(ei.value, ProtocolError), ei.value
            assert (pool.active_count, pool.idle_count) == (0, 0)
            await assert_poison_not_reused(srv, pool)
            await pool.aclose()

    run(main)


def test_te_and_cl_with_appended_fake_response_is_rejected() -> None:
    """TE + CL is rejected and the connection closed: the appended 'pwned' is never seen."""
    smuggle = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 45\r\n\r\n"
        b"0\r\n\r\n" + PWNED
    )

    async def main() -> None:
        async with RawServer(by_conn(once(smuggle), always(REAL))) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            with pytest.raises(ProtocolError):
                await pool.request(GET)
            await assert_poison_not_reused(srv, pool)
            await pool.aclose()

    run(main)


@pytest.mark.parametrize(
    "head",
    [
        b"Transfer-Encoding: gzip\r\n",
        b"Transfer-Encoding: chunked, gzip\r\n",
        b"Transfer-Encoding: gzip, chunked\r\n",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: xchunked\r\n",
        b"Content-Length: 2\r\nContent-Length: 3\r\n",
        b"Content-Length: 2\r\nContent-Length: 2\r\n",
        b"Content-Length: 2, 2\r\n",
        b"Content-Length: +2\r\n",
        b"Content-Length: 0x2\r\n",
        b"Content-Length: 18446744073709551618\r\n",
    ],
    ids=[
        "gzip",
        "chunked-gzip",
        "gzip-chunked",
        "two-te",
        "xchunked",
        "cl-conflict",
        "cl-dup",
        "cl-list",
        "cl-plus",
        "cl-hex",
        "cl-overflow",
    ],
)
def test_bad_response_framing_is_rejected(head: bytes) -> None:
    """Unknown/duplicate transfer codings and invalid or duplicate lengths -> 502, closed."""
    response = b"HTTP/1.1 200 OK\r\n" + head + b"\r\nok\r\n0\r\n\r\n" + PWNED

    async def main() -> None:
        async with RawServer(by_conn(once(response), always(REAL))) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            with pytest.raises(ProtocolError):
                resp = await pool.request(GET)
                resp.abort()
            await assert_poison_not_reused(srv, pool)
            await pool.aclose()

    run(main)


@pytest.mark.parametrize(
    "first",
    [
        b"HTTP/1.1 204 No Content\r\n\r\n" + PWNED,
        b"HTTP/1.1 304 Not Modified\r\n\r\n" + PWNED,
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + PWNED,
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokxyz",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 20",
    ],
    ids=["204-body", "304-body", "extra-response", "extra-garbage", "extra-partial"],
)
def test_bytes_beyond_the_response_close_the_connection(first: bytes) -> None:
    """Bytes after a complete response (204/304 body, > CL) never reach the next request."""

    async def main() -> None:
        async with RawServer(by_conn(once(first), always(REAL))) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            resp, body = await fetch(pool)
            assert body in (b"", b"ok")
            assert pool.idle_count == 0
            await assert_poison_not_reused(srv, pool)
            await pool.aclose()

    run(main)


def test_bytes_on_idle_connection_close_it() -> None:
    """Bytes arriving on an idle pooled connection remove it; the next request is clean."""
    sent = asyncio.Event()

    async def poisoner(conn: RawConn) -> None:
        await conn.read_request()
        conn.write(OK)
        await conn.drain()
        await asyncio.sleep(0.05)
        conn.write(PWNED)
        await conn.drain()
        sent.set()
        await conn.reader.read()

    async def main() -> None:
        async with RawServer(by_conn(poisoner, always(REAL))) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            resp, body = await fetch(pool)
            assert body == b"ok" and pool.idle_count == 1
            await sent.wait()
            await assert_poison_not_reused(srv, pool)
            await pool.aclose()

    run(main)


@pytest.mark.parametrize(
    ("response", "reused"),
    [
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", False),
        (b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 2\r\n\r\nok", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", True),
        (b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", True),
    ],
    ids=["close", "close-token", "http10", "http10-keepalive", "http11-keepalive"],
)
def test_connection_close_and_http10(response: bytes, reused: bool) -> None:
    """Connection: close and HTTP/1.0 without keep-alive are not reused; keep-alive is."""

    async def main() -> None:
        async with RawServer(always(response)) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            for _ in range(2):
                resp, body = await fetch(pool)
                assert body == b"ok"
            assert srv.connections == (1 if reused else 2)
            await pool.aclose()

    run(main)


def test_header_order_duplicates_and_case() -> None:
    """Header names are lower-cased; order and duplicates (two Set-Cookie) are kept."""
    response = (
        b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1; Path=/\r\nX-Mixed-Case: V\r\n"
        b"set-cookie: b=2; Path=/\r\nContent-Length: 0\r\n\r\n"
    )

    async def main() -> None:
        async with RawServer(always(response)) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            resp, _ = await fetch(pool)
            assert resp.headers == [
                (b"set-cookie", b"a=1; Path=/"),
                (b"x-mixed-case", b"V"),
                (b"set-cookie", b"b=2; Path=/"),
                (b"content-length", b"0"),
            ]
            await pool.aclose()

    run(main)


def test_oversized_response_head_is_rejected() -> None:
    """A response head larger than the limit is a protocol error, not unbounded buffering."""

    async def handler(conn: RawConn) -> None:
        await conn.read_request()
        conn.write(b"HTTP/1.1 200 OK\r\n")
        for _ in range(200):
            conn.write(b"X-Big: " + b"a" * 1000 + b"\r\n")
            await conn.drain()
        await conn.reader.read()

    async def main() -> None:
        async with RawServer(handler) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            with pytest.raises(ProtocolError):
                await pool.request(GET)
            assert pool.active_count == 0
            await pool.aclose()

    run(main)


@settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    body=st.binary(max_size=300),
    chunk_sizes=st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=6),
    cuts=st.lists(st.integers(min_value=1, max_value=400), max_size=6),
    use_chunked=st.booleans(),
)
def test_fragmented_responses_parse_identically(
    body: bytes, chunk_sizes: list[int], cuts: list[int], use_chunked: bool
) -> None:
    """A response split into arbitrary TCP segments yields the same body and stays reusable."""
    if use_chunked:
        parts, i, k = [], 0, 0
        while i < len(body):
            n = chunk_sizes[k % len(chunk_sizes)]
            parts.append(b"%x\r\n%b\r\n" % (len(body[i : i + n]), body[i : i + n]))
            i, k = i + n, k + 1
        wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"".join(parts)
        wire += b"0\r\n\r\n"
    else:
        wire = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    points = sorted({c % len(wire) for c in cuts} - {0})
    segments = [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True)]

    async def handler(conn: RawConn) -> None:
        while await conn.read_request() is not None:
            for seg in segments:
                conn.write(seg)
                await conn.drain()
                await asyncio.sleep(0.0005)

    async def main() -> None:
        async with RawServer(handler) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            for _ in range(2):
                _, got = await fetch(pool)
                assert got == body
            assert srv.connections == 1
            await pool.aclose()

    run(main)


# -- request bodies -------------------------------------------------------------------------


def test_bytes_body_is_sent_with_the_head() -> None:
    """A bytes body goes out after the head; the server receives exactly those bytes."""

    async def main() -> None:
        async with RawServer(always(OK)) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            await fetch(pool, post(5), body=b"hello")
            big = b"x" * 200_000
            await fetch(pool, post(len(big)), body=big)
            assert [r.body for r in srv.requests] == [b"hello", big]
            assert srv.connections == 1
            await pool.aclose()

    run(main)


def test_streamed_chunked_body_is_chunk_encoded() -> None:
    """A streamed body with chunked=True is chunk-encoded (empty chunks skipped) and ended."""

    async def gen() -> AsyncIterator[bytes]:
        for part in (b"hello", b"", b" ", b"world"):
            yield part

    async def main() -> None:
        async with RawServer(always(OK)) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            await fetch(pool, post(chunked=True), body=gen(), chunked=True)
            req = srv.requests[0]
            assert req.raw_body == b"5\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\n\r\n"
            await fetch(pool)
            assert srv.connections == 1
            await pool.aclose()

    run(main)


def test_streamed_body_iterator_error_closes_connection() -> None:
    """If the body iterator raises, the error propagates and the connection is never pooled."""

    class Boom(Exception):
        pass

    async def gen() -> AsyncIterator[bytes]:
        yield b"part"
        raise Boom

    async def main() -> None:
        async with RawServer(always(OK)) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            await fetch(pool)
            with pytest.raises(Boom):
                await pool.request(post(10), body=gen())
            assert (pool.active_count, pool.idle_count) == (0, 0)
            resp, body = await fetch(pool)
            assert body == b"ok" and srv.connections == 2
            await pool.aclose()

    run(main)


def test_early_response_stops_streamed_body_and_is_not_reused() -> None:
    """An answer that arrives before the streamed body ends is returned; the conn is closed."""
    gate = asyncio.Event()

    async def handler(conn: RawConn) -> None:
        await conn.read_head()
        conn.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
        await conn.drain()
        await conn.reader.read()

    async def gen() -> AsyncIterator[bytes]:
        yield b"a" * 10
        await gate.wait()
        yield b"b" * 10

    async def main() -> None:
        async with RawServer(handler) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            task = asyncio.ensure_future(pool.request(post(1000), body=gen()))
            await eventually(lambda: srv.connections == 1)
            await asyncio.sleep(0.05)
            gate.set()
            resp = await task
            assert resp.status == 413
            resp.release()
            assert (pool.active_count, pool.idle_count) == (0, 0)
            await pool.aclose()

    run(main)


def test_chunked_flag_with_bytes_body_frames_it() -> None:
    """chunked=True with a bytes (or no) body sends it as one chunk plus the last chunk."""

    async def main() -> None:
        async with RawServer(always(OK)) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            await fetch(pool, post(chunked=True), body=b"hello", chunked=True)
            await fetch(pool, post(chunked=True), body=None, chunked=True)
            assert [r.raw_body for r in srv.requests] == [b"5\r\nhello\r\n0\r\n\r\n", b"0\r\n\r\n"]
            assert srv.connections == 1
            await pool.aclose()

    run(main)


def test_write_timeout_when_upstream_stops_reading() -> None:
    """A streamed body to an upstream that stops reading -> WriteTimeout."""

    async def handler(conn: RawConn) -> None:
        await conn.read_request()
        conn.write(OK)
        await conn.drain()
        await conn.read_head()
        await asyncio.sleep(20)  # never reads the body

    async def gen() -> AsyncIterator[bytes]:
        chunk = b"w" * 65536
        for _ in range(4096):
            yield chunk

    async def main() -> None:
        async with RawServer(handler) as srv:
            # read_s is long: the pending read timer must be pulled in for the short write_s
            pool = UpstreamPool("127.0.0.1", srv.port, timeouts=Timeouts(write_s=0.2))
            await fetch(pool)
            with pytest.raises(UpstreamTimeout) as ei:
                await pool.request(post(4096 * 65536), body=gen())
            assert isinstance(ei.value, WriteTimeout), ei.value
            assert (pool.active_count, pool.idle_count) == (0, 0)
            await pool.aclose()

    run(main)


def test_large_streamed_request_body_respects_write_flow_control() -> None:
    """A 16 MiB streamed body to a slow reader keeps the write buffer bounded."""
    total = 16 * 1024 * 1024
    chunk = b"z" * 65536
    peak = 0

    async def handler(conn: RawConn) -> None:
        head = await conn.read_head()
        assert b"content-length" in head.lower()
        h = hashlib.sha256()
        left = total
        while left:
            data = await conn.reader.read(min(left, 262144))
            h.update(data)
            left -= len(data)
            await asyncio.sleep(0.0005)
        conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 64\r\n\r\n" + h.hexdigest().encode())
        await conn.drain()
        await conn.reader.read()

    async def main() -> None:
        nonlocal peak
        async with RawServer(handler) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)

            async def gen() -> AsyncIterator[bytes]:
                nonlocal peak
                for _ in range(total // len(chunk)):
                    for conn in pool._conns:
                        assert conn._transport is not None
                        peak = max(peak, conn._transport.get_write_buffer_size())
                    yield chunk

            resp, body = await fetch(pool, post(total), body=gen())
            assert body == hashlib.sha256(chunk * (total // len(chunk))).hexdigest().encode()
            assert peak <= 1024 * 1024
            await pool.aclose()

    run(main)


# -- connection failures and retries --------------------------------------------------------


def test_connect_refused() -> None:
    """Nothing listening -> ConnectError, slot freed."""

    async def main() -> None:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        pool = UpstreamPool("127.0.0.1", port)
        with pytest.raises(ConnectError) as ei:
            await pool.request(GET)
        assert isinstance(ei.value, ConnectError), ei.value
        assert pool.active_count == 0
        await pool.aclose()

    run(main)


def saturated_listener() -> tuple[socket.socket, list[socket.socket]]:
    """A loopback listener whose accept queue is full, so new connects hang (no SYN-ACK)."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(0)
    fill = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(ls.getsockname())
        except BlockingIOError:
            pass
        fill.append(s)
    return ls, fill


def close_all(*socks: socket.socket) -> None:
    for s in socks:
        s.close()


def test_connect_timeout() -> None:
    """A listener with a full accept queue drops SYNs -> ConnectTimeout."""

    async def main() -> None:
        ls, fill = saturated_listener()
        port = ls.getsockname()[1]
        await asyncio.sleep(0.05)
        pool = UpstreamPool("127.0.0.1", port, timeouts=Timeouts(connect_s=0.2))
        try:
            with pytest.raises(UpstreamTimeout) as ei:
                await pool.request(GET)
            assert isinstance(ei.value, ConnectTimeout), ei.value
            assert pool.active_count == 0
        finally:
            await pool.aclose()
            close_all(ls, *fill)

    run(main)


def test_close_before_response_on_fresh_connection() -> None:
    """A fresh connection closed before any response byte -> ConnectError, no retry."""

    async def handler(conn: RawConn) -> None:
        await conn.read_request()

    async def main() -> None:
        async with RawServer(handler) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            with pytest.raises(ClosedBeforeResponse):
                await pool.request(GET)
            assert srv.connections == 1 and pool.active_count == 0
            await pool.aclose()

    run(main)


def test_reset_before_response_is_connect_error() -> None:
    """A reset before any response byte -> ConnectError."""

    async def handler(conn: RawConn) -> None:
        await conn.read_request()
        conn.reset()

    async def main() -> None:
        async with RawServer(handler) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            with pytest.raises(ClosedBeforeResponse):
                await pool.request(GET)
            assert pool.active_count == 0
            await pool.aclose()

    run(main)


def test_close_inside_head_is_protocol_error() -> None:
    """A close after part of the head -> ProtocolError (response bytes arrived)."""

    async def handler(conn: RawConn) -> None:
        await conn.read_request()
        conn.write(b"HTTP/1.1 200 OK\r\nContent-")

    async def main() -> None:
        async with RawServer(handler) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            with pytest.raises(ProtocolError):
                await pool.request(GET)
            assert pool.active_count == 0
            await pool.aclose()

    run(main)


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_close_mid_body_raises_on_read(reset: bool) -> None:
    """The upstream closing/resetting mid-body makes read() raise ProtocolError."""

    async def handler(conn: RawConn) -> None:
        await conn.read_request()
        conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await conn.drain()
        await asyncio.sleep(0.05)
        if reset:
            conn.reset()

    async def main() -> None:
        async with RawServer(handler) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            resp = await pool.request(GET)
            assert resp.body_length == 100
            with pytest.raises(ProtocolError):
                await read_all(resp)
            resp.release()
            assert (pool.active_count, pool.idle_count) == (0, 0)
            await pool.aclose()

    run(main)


def test_chunked_body_truncated_raises() -> None:
    """A chunked body cut off before the last chunk raises on read()."""

    async def handler(conn: RawConn) -> None:
        await conn.read_request()
        conn.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")

    async def main() -> None:
        async with RawServer(handler) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            resp = await pool.request(GET)
            with pytest.raises(ProtocolError):
                await read_all(resp)
            resp.abort()
            assert pool.active_count == 0
            await pool.aclose()

    run(main)


def stale_after_first(conn: RawConn) -> Awaitable[None]:
    """Connection 0 answers once, then reads the next request and closes without answering."""

    async def handler() -> None:
        await conn.read_request()
        conn.write(OK)
        await conn.drain()
        await conn.read_request()

    return handler()


def test_stale_pooled_connection_retried_for_idempotent() -> None:
    """A reused connection dead before any response byte is retried once on a fresh one."""

    async def main() -> None:
        async with RawServer(by_conn(stale_after_first, always(REAL))) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            await fetch(pool)
            resp, body = await fetch(pool, post(3), body=b"abc", idempotent=True)
            assert body == b"real" and srv.connections == 2
            assert [r.body for r in srv.requests] == [b"", b"abc", b"abc"]
            await pool.aclose()

    run(main)


def test_stale_pooled_connection_not_retried_for_non_idempotent() -> None:
    """A non-idempotent request that was written is not retried: ConnectError."""

    async def main() -> None:
        async with RawServer(by_conn(stale_after_first, always(REAL))) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            await fetch(pool)
            with pytest.raises(ConnectError):
                await pool.request(post(3), body=b"abc", idempotent=False)
            assert srv.connections == 1 and pool.active_count == 0
            await pool.aclose()

    run(main)


def test_stale_pooled_connection_not_retried_for_streamed_body() -> None:
    """A streamed body is never replayed, even for an idempotent request."""

    async def gen() -> AsyncIterator[bytes]:
        yield b"abc"

    async def main() -> None:
        async with RawServer(by_conn(stale_after_first, always(REAL))) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            await fetch(pool)
            with pytest.raises(ConnectError):
                await pool.request(post(3), body=gen(), idempotent=True)
            assert srv.connections == 1 and pool.active_count == 0
            await pool.aclose()

    run(main)


def test_connection_found_closed_before_write_is_retried_for_any_method() -> None:
    """A pooled connection already closing when taken is replaced even for a POST."""

    async def main() -> None:
        async with RawServer(always(OK)) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            await fetch(pool)
            (conn,) = pool._idle
            assert conn._transport is not None
            conn._transport.abort()  # closing, connection_lost not yet delivered
            resp, body = await fetch(pool, post(3), body=b"abc", idempotent=False)
            assert body == b"ok" and srv.connections == 2
            assert [r.body for r in srv.requests] == [b"", b"abc"]
            await pool.aclose()

    run(main)


def test_upstream_closing_idle_connection_is_detected() -> None:
    """An idle connection closed by the upstream leaves the pool; the next request succeeds."""

    async def handler(conn: RawConn) -> None:
        await conn.read_request()
        conn.write(OK)
        await conn.drain()

    async def main() -> None:
        async with RawServer(handler) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            await fetch(pool)
            await eventually(lambda: pool.idle_count == 0)
            resp, body = await fetch(pool)
            assert body == b"ok" and srv.connections == 2
            await pool.aclose()

    run(main)


def test_idle_connections_are_closed_when_they_expire_not_only_skipped() -> None:
    """Connections parked longer than keepalive_s are closed by the pool itself (the upstream
    sees EOF: a FIN, not a reset), oldest first, without a request to trigger it; the next
    request opens a fresh connection."""
    eofs: list[int] = []

    async def handler(conn: RawConn) -> None:
        while await conn.read_request():
            conn.write(OK)
            await conn.drain()
        eofs.append(conn.index)  # read_request returned nothing: the pool closed its side

    async def main() -> None:
        eofs.clear()
        async with RawServer(handler) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port, timeouts=Timeouts(keepalive_s=0.2))
            first, second = await asyncio.gather(pool.request(GET), pool.request(GET))
            for resp in (first, second):
                await read_all(resp)
                resp.release()
            assert pool.idle_count == 2 and srv.connections == 2
            await eventually(lambda: pool.idle_count == 0)
            await eventually(lambda: sorted(eofs) == [0, 1])
            _, body = await fetch(pool)
            assert body == b"ok" and srv.connections == 3
            await pool.aclose()

    run(main)
    run(main, uvloop=True)


# -- timeouts -------------------------------------------------------------------------------


def test_read_timeout_before_head() -> None:
    """A server that never answers -> ReadTimeout, connection closed."""

    async def handler(conn: RawConn) -> None:
        await conn.read_request()
        await conn.reader.read()

    async def main() -> None:
        async with RawServer(handler) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port, timeouts=Timeouts(read_s=0.1))
            with pytest.raises(UpstreamTimeout) as ei:
                await pool.request(GET)
            assert isinstance(ei.value, ReadTimeout), ei.value
            assert (pool.active_count, pool.idle_count) == (0, 0)
            await pool.aclose()

    run(main)


def test_stall_mid_body_times_out() -> None:
    """Body bytes that stop coming -> read() raises ReadTimeout."""

    async def handler(conn: RawConn) -> None:
        await conn.read_request()
        conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
        await conn.drain()
        await conn.reader.read()

    async def main() -> None:
        async with RawServer(handler) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port, timeouts=Timeouts(read_s=0.1))
            resp = await pool.request(GET)
            assert await resp.read() == b"01234"
            with pytest.raises(UpstreamTimeout) as ei:
                await resp.read()
            assert isinstance(ei.value, ReadTimeout), ei.value
            resp.release()
            assert pool.active_count == 0
            await pool.aclose()

    run(main)


def test_slow_consumer_does_not_trip_read_timeout() -> None:
    """Time the caller spends not reading (reading paused) does not count as upstream idle."""
    body = b"y" * (HIGH_WATER * 4)

    async def main() -> None:
        resp_bytes = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        async with RawServer(always(resp_bytes)) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port, timeouts=Timeouts(read_s=0.05))
            resp = await pool.request(GET)
            await asyncio.sleep(0.2)
            assert await read_all(resp) == body
            resp.release()
            await pool.aclose()

    run(main)


def test_pool_timeout_when_full() -> None:
    """max_connections=1 held by one response -> the next request gets PoolTimeout."""

    async def main() -> None:
        async with RawServer(always(OK)) as srv:
            pool = UpstreamPool(
                "127.0.0.1", srv.port, max_connections=1, timeouts=Timeouts(pool_s=0.1)
            )
            held = await pool.request(GET)
            with pytest.raises(UpstreamTimeout) as ei:
                await pool.request(GET)
            assert isinstance(ei.value, PoolTimeout), ei.value
            assert pool.waiting_count == 0
            held.release()
            resp, body = await fetch(pool)
            assert body == b"ok" and srv.connections == 1
            await pool.aclose()

    run(main)


def test_waiter_gets_released_connection() -> None:
    """A request waiting for a full pool gets the connection released by another."""

    async def main() -> None:
        async with RawServer(always(OK)) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port, max_connections=1)
            held = await pool.request(GET)
            task = asyncio.ensure_future(fetch(pool))
            await eventually(lambda: pool.waiting_count == 1)
            held.release()
            resp, body = await task
            assert body == b"ok" and srv.connections == 1
            assert (pool.active_count, pool.waiting_count, pool.idle_count) == (0, 0, 1)
            await pool.aclose()

    run(main)


# -- keep-alive -----------------------------------------------------------------------------


def test_sequential_requests_reuse_one_connection() -> None:
    """Sequential keep-alive requests all go over one upstream connection."""

    async def main() -> None:
        async with RawServer(always(OK)) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            for _ in range(20):
                resp, body = await fetch(pool)
                assert body == b"ok"
            assert srv.connections == 1 and len(srv.requests) == 20
            assert (pool.idle_count, pool.active_count) == (1, 0)
            await pool.aclose()

    run(main)


def test_idle_connection_older_than_keepalive_is_not_reused() -> None:
    """An idle connection older than keepalive_s is closed and a fresh one is opened."""

    async def main() -> None:
        async with RawServer(always(OK)) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port, timeouts=Timeouts(keepalive_s=0.05))
            await fetch(pool)
            await asyncio.sleep(0.1)
            await fetch(pool)
            assert srv.connections == 2 and pool.idle_count == 1
            await pool.aclose()

    run(main)


# -- flow control ---------------------------------------------------------------------------


def test_large_response_with_slow_consumer_is_bounded() -> None:
    """A 64 MiB response read slowly never has more than ~HIGH_WATER buffered in the pool."""
    total = 64 * 1024 * 1024
    block = b"q" * (1024 * 1024)

    async def handler(conn: RawConn) -> None:
        await conn.read_request()
        conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        for _ in range(total // len(block)):
            conn.write(block)
            await conn.drain()
        await conn.reader.read()

    async def main() -> None:
        async with RawServer(handler) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            resp = await pool.request(GET)
            got = 0
            while data := await resp.read():
                got += len(data)
                await asyncio.sleep(0.001)
            assert got == total
            assert resp.peak_buffered <= HIGH_WATER + 512 * 1024
            resp.release()
            assert pool.idle_count == 1
            await pool.aclose()

    run(main)


# -- concurrency and cancellation -----------------------------------------------------------


def test_200_concurrent_requests_16_connections() -> None:
    """200 concurrent requests through max_connections=16 all succeed; no slot is leaked."""

    async def handler(conn: RawConn) -> None:
        while await conn.read_request() is not None:
            await asyncio.sleep(0.001)
            conn.write(OK)

    async def main() -> None:
        async with RawServer(handler) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port, max_connections=16)
            results = await asyncio.gather(*(fetch(pool) for _ in range(200)))
            assert all(body == b"ok" for _, body in results)
            assert srv.connections <= 16 and len(srv.requests) == 200
            assert (pool.active_count, pool.waiting_count) == (0, 0)
            await pool.aclose()

    run(main)


@pytest.mark.parametrize("delay", [0.0, 0.001, 0.01, 0.03])
def test_200_requests_cancelled_mid_flight_leak_nothing(delay: float) -> None:
    """Cancelling 200 in-flight requests (waiting, connecting, awaiting head, reading) leaks no slot."""

    async def handler(conn: RawConn) -> None:
        while await conn.read_request() is not None:
            await asyncio.sleep(0.005)
            conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
            await asyncio.sleep(0.01)
            conn.write(b"cd")

    async def main() -> None:
        async with RawServer(handler) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port, max_connections=16)
            tasks = [asyncio.ensure_future(fetch(pool)) for _ in range(200)]
            await asyncio.sleep(delay)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            assert (pool.active_count, pool.waiting_count) == (0, 0)
            resp, body = await fetch(pool)
            assert body == b"abcd"
            assert pool.active_count == 0
            await pool.aclose()

    run(main)


def test_cancel_while_waiting_for_slot() -> None:
    """A request cancelled while waiting for a pool slot frees nothing it did not take."""

    async def main() -> None:
        async with RawServer(always(OK)) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port, max_connections=1)
            held = await pool.request(GET)
            waiting = [asyncio.ensure_future(pool.request(GET)) for _ in range(5)]
            await eventually(lambda: pool.waiting_count == 5)
            for t in waiting:
                t.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
            assert (pool.active_count, pool.waiting_count) == (1, 0)
            held.release()
            assert pool.active_count == 0
            resp, body = await fetch(pool)
            assert body == b"ok"
            await pool.aclose()

    run(main)


def test_cancel_right_after_slot_handoff() -> None:
    """A waiter cancelled after the released connection was handed to it gives it back."""

    async def main() -> None:
        async with RawServer(always(OK)) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port, max_connections=1)
            held = await pool.request(GET)
            waiter = asyncio.ensure_future(pool.request(GET))
            await eventually(lambda: pool.waiting_count == 1)
            held.release()  # hands the connection to `waiter`'s future...
            waiter.cancel()  # ...which is cancelled before it can run
            with pytest.raises(asyncio.CancelledError):
                await waiter
            assert (pool.active_count, pool.idle_count) == (0, 1)
            resp, body = await fetch(pool)
            assert body == b"ok" and srv.connections == 1
            await pool.aclose()

    run(main)


def test_cancel_while_connecting() -> None:
    """A request cancelled while connecting (accept queue full) frees its slot."""

    async def main() -> None:
        ls, fill = saturated_listener()
        port = ls.getsockname()[1]
        pool = UpstreamPool("127.0.0.1", port, max_connections=2)
        try:
            tasks = [asyncio.ensure_future(pool.request(GET)) for _ in range(5)]
            await asyncio.sleep(0.05)
            assert (pool.active_count, pool.waiting_count) == (2, 3)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            assert (pool.active_count, pool.waiting_count) == (0, 0)
        finally:
            await pool.aclose()
            close_all(ls, *fill)

    run(main)


def test_cancel_while_reading_body_aborts() -> None:
    """A read() cancelled mid-body aborts the response: slot freed, connection not pooled."""

    async def handler(conn: RawConn) -> None:
        await conn.read_request()
        conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
        await conn.drain()
        await conn.reader.read()

    async def main() -> None:
        async with RawServer(handler) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            resp = await pool.request(GET)
            assert await resp.read() == b"01234"
            reader = asyncio.ensure_future(resp.read())
            await asyncio.sleep(0.01)
            reader.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reader
            assert (pool.active_count, pool.idle_count) == (0, 0)
            resp.release()
            resp.abort()
            assert pool.active_count == 0
            await pool.aclose()

    run(main)


def test_abort_from_another_task_wakes_pending_read() -> None:
    """abort() (client gone) while another task waits in read() makes that read raise at once."""

    async def handler(conn: RawConn) -> None:
        await conn.read_request()
        conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
        await conn.drain()
        await conn.reader.read()

    async def main() -> None:
        async with RawServer(handler) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            resp = await pool.request(GET)
            assert await resp.read() == b"01234"
            reader = asyncio.ensure_future(resp.read())
            await asyncio.sleep(0.01)
            resp.abort()
            with pytest.raises(UpstreamError) as ei:
                await reader
            assert isinstance(ei.value, ResponseAborted), ei.value
            with pytest.raises(UpstreamError):
                await resp.read()
            assert (pool.active_count, pool.idle_count) == (0, 0)
            await pool.aclose()

    run(main)


def test_release_and_abort_are_idempotent() -> None:
    """release()/abort() may be called repeatedly and in any order; the slot is freed once."""

    async def main() -> None:
        async with RawServer(always(OK)) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            r1 = await pool.request(GET)
            r1.release()
            r1.release()
            r1.abort()
            assert (pool.active_count, pool.idle_count) == (0, 1)
            r2 = await pool.request(GET)
            r2.abort()
            r2.abort()
            r2.release()
            assert (pool.active_count, pool.idle_count) == (0, 0)
            with pytest.raises(UpstreamError):
                await r2.read()
            assert await r1.read() == b""
            r3 = await pool.request(GET)
            r3.release()  # released unread but complete: still clean
            assert (pool.active_count, pool.idle_count) == (0, 1)
            await pool.aclose()

    run(main)


def test_release_before_body_complete_closes() -> None:
    """Releasing a response whose body has not fully arrived closes the connection."""

    async def handler(conn: RawConn) -> None:
        await conn.read_request()
        conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
        await conn.drain()
        await conn.reader.read()

    async def main() -> None:
        async with RawServer(handler) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            resp = await pool.request(GET)
            resp.release()
            assert (pool.active_count, pool.idle_count) == (0, 0)
            await pool.aclose()

    run(main)


def test_aclose_fails_later_requests() -> None:
    """After aclose() idle connections are closed and new requests raise (ConnectError)."""

    async def main() -> None:
        async with RawServer(always(OK)) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            await fetch(pool)
            await pool.aclose()
            assert pool.idle_count == 0
            with pytest.raises(ConnectError) as ei:
                await pool.request(GET)
            assert isinstance(ei.value, ConnectError), ei.value

    run(main)


def test_tls_upstream(tmp_path: Path) -> None:
    """With ssl= the pool speaks TLS (hostname checked) and still reuses the connection."""
    import shutil
    import ssl
    import subprocess

    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl CLI not available")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))

    async def main() -> None:
        async with RawServer(always(OK), ssl=server_ctx) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port, ssl=client_ctx)
            assert (pool.host, pool.port, pool.ssl) == ("127.0.0.1", srv.port, client_ctx)
            for _ in range(3):
                _, body = await fetch(pool)
                assert body == b"ok"
            assert srv.connections == 1
            await pool.aclose()

    run(main)


# -- uvloop ---------------------------------------------------------------------------------


def test_works_under_uvloop() -> None:
    """Keep-alive reuse, chunked bodies, poisoning defence and flow control under uvloop."""
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    smuggle = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 45\r\n\r\n"
        b"0\r\n\r\n" + PWNED
    )
    big = b"u" * (HIGH_WATER * 8)

    async def main() -> None:
        async with RawServer(always(chunked)) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            for _ in range(5):
                _, body = await fetch(pool)
                assert body == b"ok"
            assert srv.connections == 1
            await pool.aclose()
        async with RawServer(by_conn(once(smuggle), always(REAL))) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            with pytest.raises(ProtocolError):
                await pool.request(GET)
            await assert_poison_not_reused(srv, pool)
            await pool.aclose()
        big_resp = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big
        async with RawServer(always(big_resp)) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port)
            resp = await pool.request(GET)
            await asyncio.sleep(0.05)
            assert await read_all(resp) == big
            assert resp.peak_buffered <= HIGH_WATER + 512 * 1024
            resp.release()
            await pool.aclose()

    run(main, uvloop=True)
