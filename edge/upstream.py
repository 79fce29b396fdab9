"""Lean keep-alive HTTP/1.1 client pool for the proxy's upstream side (asyncio + httptools).

Rules of this file
------------------
* One ``_Conn`` (an ``asyncio.Protocol``) per TCP connection, driven by the callbacks of one
  ``httptools.HttpResponseParser`` that lives as long as the connection (replaced only after a
  response to HEAD, whose body length llhttp cannot be told to ignore). At most one request is
  in flight per connection: no pipelining.
* Framing of a response is edge/framing.py's ``response_framing`` (RFC 9112 §6.1, §6.3):
  exactly one ``Transfer-Encoding`` field whose value is exactly ``chunked``, or at most one
  valid ``Content-Length``, or neither (then the body runs to EOF and the connection is not
  reused, §6.3 item 8). Both together, any other transfer coding, or conflicting / duplicate
  lengths are rejected (``ProtocolError``) and the connection is closed: a proxy must never
  forward or reuse a desynchronised stream (§6.3 items 3-5, §11.2).
* Responses to HEAD, 1xx, 204 and 304 never have a body (§6.3 items 1-2). 100 and 103 are
  interim and skipped (RFC 9110 §15.2); 101 and any other 1xx, and a status outside 200-599,
  are errors. Only HTTP/1.0 and HTTP/1.1 status lines are accepted (§2.3).
* Connection reuse (§9.3): only after a complete response with keep-alive semantics
  (HTTP/1.1 without ``Connection: close``; HTTP/1.0 only with ``Connection: keep-alive``), a
  fully written request body, and no byte beyond the end of the response. Bytes that arrive
  after the response or on an idle connection are never parsed as a response (§6.3, last
  paragraphs): the connection is closed.
* Retries (§9.3.1, RFC 9110 §9.2.2): only when a *reused* connection dies before any response
  byte; once on a fresh connection, and only if nothing was written yet or the request is
  idempotent with a replayable body. Never after response bytes, never with a streamed body.
* Flow control: reading is paused while more than ``HIGH_WATER`` body bytes wait for the
  caller; streamed request bodies wait for ``resume_writing`` (write_s timeout).
* Pool slots: a request holds one slot from acquisition until ``release()``/``abort()`` (or
  until it fails); every await point frees it on cancellation.
* Hot path budget: one ``transport.write`` for the head (and a small body), one future, one
  response object and one header list per request. Timeouts use one ``Deadline`` per
  connection (edge/deadline.py, shared with the front-end) instead of ``asyncio.wait_for``.
"""

from __future__ import annotations

import asyncio
import ssl as _ssl
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import NoReturn, cast

import httptools

from edge.deadline import Deadline
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
from edge.framing import CONTENT_LENGTH, NO_BODY, UNTIL_CLOSE, FramingError, response_framing

__all__ = ["Timeouts", "UpstreamPool", "UpstreamResponse"]

HIGH_WATER = 256 * 1024  # pause reading when this many body bytes wait for the caller
MAX_HEAD = 100 * 1024  # a response head (with interim responses) larger than this is refused
_SMALL_BODY = 64 * 1024  # bodies up to this size are copied into the head's write


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect_s: float = 2.0
    read_s: float = 30.0  # idle time waiting for response head or for the next body bytes
    write_s: float = 30.0  # time allowed for a write to drain
    pool_s: float = 5.0  # max time waiting for a free connection when the pool is full
    keepalive_s: float = 4.0  # idle pooled connections older than this are closed, not reused


class _Unsolicited(Exception):
    """Raised inside a parser callback to stop parsing bytes beyond the response."""


class UpstreamResponse:
    """A response whose head has arrived; the body is read with ``read()``."""

    __slots__ = (
        "_aborted",
        "_conn",
        "body_length",
        "complete",
        "has_body",
        "headers",
        "http_version",
        "peak_buffered",
        "status",
    )

    def __init__(self, conn: _Conn) -> None:
        self._conn: _Conn | None = conn
        self._aborted = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.http_version = "1.1"
        self.complete = False  # True once the whole body has been received
        self.body_length: int | None = None
        self.has_body = True
        self.peak_buffered = 0  # most body bytes ever buffered for the caller (flow-control probe)

    async def read(self) -> bytes:
        """Next body bytes (everything buffered so far); b"" at the end of the body.

        Raises ProtocolError / ReadTimeout when the body cannot be completed.
        A read interrupted by cancellation aborts the response; a read after (or during)
        ``abort()`` raises ResponseAborted.
        """
        c = self._conn
        if c is None:
            if self._aborted:
                raise ResponseAborted("upstream response was aborted")
            return b""
        chunks = c._chunks
        while not chunks:
            if self._conn is None:  # aborted by another task while we waited
                raise ResponseAborted("upstream response was aborted")
            if c._exc is not None:
                raise c._exc
            if c._msg_done:
                return b""
            waiter: asyncio.Future[None] = c._loop.create_future()
            c._body_waiter = waiter
            c._arm(c._pool._read_s, ReadTimeout)
            try:
                await waiter
            except BaseException:
                self.abort()
                raise
            finally:
                c._body_waiter = None
                c._deadline.when = 0.0  # clear(), inlined: once per body wait
        return self.take()

    def take(self) -> bytes:
        """The body bytes buffered so far, without waiting (all of it once ``complete``)."""
        c = self._conn
        if c is None:
            return b""
        chunks = c._chunks
        if not chunks:
            return b""
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        c._buffered = 0
        if c._read_paused:
            c._read_paused = False
            if not c._closed:
                c._transport.resume_reading()  # type: ignore[union-attr]
        return data

    def release(self) -> None:
        """Done with the response: pool the connection if it is clean, else close it."""
        c = self._conn
        if c is not None:
            self._conn = None
            c._pool._finish(c, True)

    def abort(self) -> None:
        """Give up on the response: close the connection, never pool it. Idempotent."""
        c = self._conn
        if c is not None:
            self._conn = None
            self._aborted = True
            c._pool._finish(c, False)


class _Conn(asyncio.Protocol):
    """One upstream connection; parser callbacks fill the current ``UpstreamResponse``."""

    __slots__ = (
        "_body_waiter",
        "_buffered",
        "_chunks",
        "_cl",
        "_closed",
        "_deadline",
        "_drain_waiter",
        "_eof_body",
        "_exc",
        "_got_bytes",
        "_hdrs",
        "_head_bytes",
        "_head_fut",
        "_headers_done",
        "_idle_since",
        "_interim",
        "_is_head",
        "_keep_alive",
        "_loop",
        "_msg_done",
        "_nreq",
        "_parser",
        "_on_deadline",
        "_pool",
        "_read_paused",
        "_req_done",
        "_resp",
        "_te",
        "_te_n",
        "_transport",
        "_write_paused",
    )

    def __init__(self, pool: UpstreamPool, loop: asyncio.AbstractEventLoop) -> None:
        self._pool = pool
        self._loop = loop
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._resp: UpstreamResponse | None = None
        self._hdrs: list[tuple[bytes, bytes]] = []
        self._head_fut: asyncio.Future[None] | None = None
        self._body_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._cl: bytes | None = None
        self._te: bytes | None = None
        self._te_n = 0
        self._exc: UpstreamError | None = None
        self._headers_done = False
        self._msg_done = False
        self._interim = False
        self._is_head = False
        self._keep_alive = False
        self._eof_body = False
        self._got_bytes = False
        self._req_done = False
        self._head_bytes = 0
        self._read_paused = False
        self._write_paused = False
        self._closed = False
        self._nreq = 0
        self._idle_since = 0.0
        self._deadline = Deadline(loop, self._expired)
        self._on_deadline: type[UpstreamTimeout] = ReadTimeout

    # -- request side ---------------------------------------------------------------------

    def _start(
        self, head: bytes, body: bytes | None, is_head: bool, streamed: bool
    ) -> UpstreamResponse | None:
        """Set up the exchange and write the head; None if the connection is already closed."""
        transport = self._transport
        if self._closed or transport is None or transport.is_closing():
            return None
        resp = UpstreamResponse(self)
        self._resp = resp
        self._hdrs = resp.headers
        self._head_fut = self._loop.create_future()
        self._headers_done = self._msg_done = self._interim = self._got_bytes = False
        self._eof_body = False
        self._cl = self._te = None
        self._te_n = self._head_bytes = 0
        self._exc = None
        self._is_head = is_head
        self._req_done = not streamed
        if body is None:
            transport.write(head)
        elif len(body) <= _SMALL_BODY:
            transport.write(head + body)
        else:
            transport.writelines((head, body))
        if not streamed:
            self._on_deadline = ReadTimeout  # _arm(), inlined: once per request
            self._deadline.arm(self._pool._read_s)
        return resp

    async def _send_body(self, body: AsyncIterator[bytes], chunked: bool) -> None:
        """Stream a request body; stops early if the response or an error arrives first."""
        transport = self._transport
        assert transport is not None
        head_fut = self._head_fut
        assert head_fut is not None
        async for chunk in body:
            if self._exc is not None:
                raise self._exc
            if self._closed or head_fut.done():
                return  # early response (or closed): body incomplete, never reused
            if not chunk:
                continue
            if chunked:
                transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                transport.write(chunk)
            if self._write_paused:
                await self._drain()
        if self._exc is not None:
            raise self._exc
        if self._closed:
            return
        if chunked:
            transport.write(b"0\r\n\r\n")
        self._req_done = True

    async def _drain(self) -> None:
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._drain_waiter = waiter
        self._arm(self._pool._write_s, WriteTimeout)
        try:
            await waiter
        finally:
            self._drain_waiter = None
            self._deadline.clear()
        if self._exc is not None:
            raise self._exc

    # -- timers -----------------------------------------------------------------------------

    def _arm(self, delay: float, on_deadline: type[UpstreamTimeout]) -> None:
        """Fail with `on_deadline` unless progress re-arms or clears it within `delay`."""
        if not self._closed:
            self._on_deadline = on_deadline
            self._deadline.arm(delay)

    def _expired(self) -> None:
        if not self._closed:
            self._fail(self._on_deadline("upstream timed out"))

    # -- state changes ----------------------------------------------------------------------

    def _wake(self) -> None:
        for fut in (self._head_fut, self._body_waiter, self._drain_waiter):
            if fut is not None and not fut.done():
                fut.set_result(None)

    def _fail(self, exc: UpstreamError) -> None:
        if self._exc is None:
            self._exc = exc
        self._close()
        self._wake()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._deadline.cancel()
            if self._transport is not None:
                self._transport.abort()

    def _complete(self) -> None:
        self._msg_done = True
        self._deadline.when = 0.0  # clear(), inlined: once per response
        resp = self._resp
        if resp is not None:
            resp.complete = True
        w = self._body_waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._resp is None or self._msg_done:
            self._close()  # unsolicited bytes: never parse them as a response (RFC 9112 §6.3)
            return
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:
            self._parse_error(e)
            return
        if not self._headers_done:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD:
                self._fail(ProtocolError("response head too large"))

    def _parse_error(self, e: Exception) -> None:
        if self._msg_done:
            self._close()  # bytes after the end of a valid response: never reuse
        elif self._exc is None:
            cause = e.__context__
            if isinstance(cause, ProtocolError):
                self._fail(cause)  # raised by one of our callbacks
            else:
                msg = f"invalid response from upstream: {e}"
                self._fail(ProtocolError(msg))

    def eof_received(self) -> bool | None:
        if self._eof_body and self._headers_done and not self._msg_done:
            self._complete()  # close-delimited body ends at EOF (RFC 9112 §6.3 item 8)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._deadline.cancel()
        self._pool._lost(self)
        if self._resp is not None and not self._msg_done and self._exc is None:
            if self._headers_done:
                self._exc = ProtocolError("upstream closed the connection mid-body")
            elif self._got_bytes:
                self._exc = ProtocolError("upstream closed the connection inside the response head")
            else:
                self._exc = ClosedBeforeResponse("upstream closed the connection before responding")
        self._wake()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._msg_done:
            raise _Unsolicited  # a second response where only one was asked for

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._headers_done:
            return  # trailer field (RFC 9112 §7.1.2): validated by llhttp, not forwarded
        name = name.lower()
        self._hdrs.append((name, value))
        if name == b"transfer-encoding":
            self._te = value
            self._te_n += 1
        elif name == b"content-length":
            self._cl = value

    def _reject(self, message: str) -> NoReturn:
        raise ProtocolError(message)

    def on_headers_complete(self) -> None:
        if self._msg_done:
            raise _Unsolicited
        parser = self._parser
        status = parser.get_status_code()
        resp = self._resp
        assert resp is not None
        if status < 200:
            if status == 100 or status == 103:
                self._interim = True  # interim response: skip it (RFC 9110 §15.2)
                self._hdrs.clear()
                self._cl = self._te = None
                self._te_n = 0
                return
            self._reject(f"unexpected {status} response from upstream")
        elif status > 599:
            self._reject(f"invalid status {status} from upstream")
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            self._reject(f"unsupported HTTP version {version} from upstream")
        try:
            framing, length = response_framing(
                status,
                self._cl,
                self._te,
                transfer_encodings=self._te_n,
                head=self._is_head,
            )
        except FramingError as exc:
            self._reject(f"{exc.message} from upstream")
        resp.status = status
        resp.http_version = version
        self._keep_alive = parser.should_keep_alive()
        self._headers_done = True
        if framing == NO_BODY:
            resp.has_body = False
        elif framing == CONTENT_LENGTH:
            resp.body_length = length
        elif framing == UNTIL_CLOSE:
            self._eof_body = True  # close-delimited (RFC 9112 §6.3 item 8)
            self._keep_alive = False
        if self._on_deadline is ReadTimeout:
            self._deadline.when = 0.0  # clear(), inlined: the head arrived
        fut = self._head_fut
        if fut is not None and not fut.done():
            fut.set_result(None)
        if self._is_head:
            self._complete()  # llhttp would expect a body: the parser is replaced before reuse

    def on_body(self, body: bytes) -> None:
        if self._msg_done:
            raise _Unsolicited  # body bytes after a response to HEAD
        self._chunks.append(body)
        n = self._buffered + len(body)
        self._buffered = n
        resp = self._resp
        if resp is not None and n > resp.peak_buffered:
            resp.peak_buffered = n
        if n > HIGH_WATER and not self._read_paused and not self._closed:
            self._read_paused = True
            self._transport.pause_reading()  # type: ignore[union-attr]
        w = self._body_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if not self._msg_done:
            self._complete()


def _pool_timeout(fut: asyncio.Future[_Conn | None]) -> None:
    if not fut.done():
        fut.set_exception(PoolTimeout("no free upstream connection in time"))


class UpstreamPool:
    """Keep-alive connections to one ``host:port``; at most ``max_connections`` at a time."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        max_connections: int = 512,
        timeouts: Timeouts = Timeouts(),  # frozen: a shared default is safe
        ssl: _ssl.SSLContext | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        self.host = host
        self.port = port
        self.label = f"{host}:{port}"  # what the access log records (edge/accesslog.py)
        self.ssl = ssl  # TLS to the upstream (server_hostname = host) when set
        self._max = max_connections
        self._timeouts = timeouts
        self._read_s = timeouts.read_s
        self._write_s = timeouts.write_s
        self._keepalive_s = timeouts.keepalive_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: deque[_Conn] = deque()
        self._waiters: deque[asyncio.Future[_Conn | None]] = deque()
        self._conns: set[_Conn] = set()
        self._active = 0
        self._closed = False
        # Closes connections idle past keepalive_s (oldest first, at the deque's left: the
        # request path takes the newest from the right): armed while any is parked.
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def timeouts(self) -> Timeouts:
        return self._timeouts

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    @property
    def active_count(self) -> int:
        return self._active

    @property
    def waiting_count(self) -> int:
        return len(self._waiters)

    @property
    def full(self) -> bool:
        """A request now would wait for a slot (no idle connection, every slot taken)."""
        return not self._idle and self._active >= self._max

    async def request(
        self,
        head: bytes,
        body: bytes | AsyncIterator[bytes] | None = None,
        *,
        chunked: bool = False,
        is_head: bool = False,
        idempotent: bool = True,
    ) -> UpstreamResponse:
        """Send one request and return once the final response head has arrived.

        The caller must call ``release()`` or ``abort()`` on the response.
        """
        if self._closed:
            raise ConnectError("upstream pool is closed")
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        stream: AsyncIterator[bytes] | None = None
        if body is None or isinstance(body, bytes):
            raw_body = body
            if chunked:  # the head says chunked: frame the whole body as one chunk
                raw_body = b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
        else:
            raw_body, stream = None, body
        conn: _Conn | None = None
        idle = self._idle
        if idle:
            now = loop.time()
            keepalive_s = self._keepalive_s
            while idle:
                c = idle.pop()
                if not c._closed and now - c._idle_since < keepalive_s:
                    conn = c
                    self._active += 1
                    break
                c._close()
        if conn is None:
            conn = await self._acquire(loop)
        # From here on this task holds one slot (self._active) and owns `conn`.
        retried = False
        while True:
            reused = conn._nreq > 0
            written = False
            try:
                resp = conn._start(head, raw_body, is_head, stream is not None)
                if resp is None:
                    raise ConnectError("pooled connection was closed")
                written = True
                fut = conn._head_fut
                assert fut is not None
                if stream is not None:
                    await conn._send_body(stream, chunked)
                    if not fut.done():
                        conn._arm(self._read_s, ReadTimeout)
                if not fut.done():
                    await fut
                exc = conn._exc
                if exc is None:
                    return resp
                raise exc
            except BaseException as e:
                conn._resp = None
                conn._close()
                if (
                    isinstance(e, ConnectError)
                    and reused
                    and not retried
                    and not (written and conn._got_bytes)
                    and (not written or (idempotent and stream is None))
                ):
                    retried = True  # RFC 9110 §9.2.2: the request was not processed
                    try:
                        conn = await self._connect(loop)
                    except BaseException:
                        self._free_slot()
                        raise
                    continue
                self._free_slot()
                raise

    async def _acquire(self, loop: asyncio.AbstractEventLoop) -> _Conn:
        """Take a slot (waiting up to pool_s when full) and return a usable connection."""
        if self._active + len(self._idle) < self._max:
            self._active += 1
        else:
            fut: asyncio.Future[_Conn | None] = loop.create_future()
            self._waiters.append(fut)
            timer = loop.call_later(self._timeouts.pool_s, _pool_timeout, fut)
            try:
                got = await fut
            except BaseException:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    granted = fut.result()  # granted just as we were cancelled: hand it back
                    if granted is not None:
                        self._put(granted)
                    else:
                        self._free_slot()
                else:
                    try:
                        self._waiters.remove(fut)
                    except ValueError:
                        pass
                raise
            finally:
                timer.cancel()
            if got is not None:
                if not got._closed and loop.time() - got._idle_since < self._keepalive_s:
                    return got
                got._close()
        try:
            return await self._connect(loop)
        except BaseException:
            self._free_slot()
            raise

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Conn:
        """Open a new connection for a slot the caller already holds."""
        conn = _Conn(self, loop)
        try:
            async with asyncio.timeout(self._timeouts.connect_s):
                await loop.create_connection(lambda: conn, self.host, self.port, ssl=self.ssl)
        except TimeoutError:
            raise ConnectTimeout("connect to upstream timed out") from None
        except OSError as e:
            raise ConnectError(f"cannot connect to upstream: {e}") from e
        if self._closed:
            conn._close()
            raise ConnectError("upstream pool is closed")
        self._conns.add(conn)
        return conn

    def _finish(self, conn: _Conn, reuse: bool) -> None:
        """The caller is done with conn's response: pool or close it, free the slot."""
        conn._resp = None
        if (
            reuse
            and conn._msg_done
            and conn._keep_alive
            and conn._req_done
            and conn._exc is None
            and not conn._closed
            and not self._closed
        ):
            conn._nreq += 1
            if conn._chunks:
                conn._chunks.clear()
                conn._buffered = 0
            if conn._read_paused:
                conn._read_paused = False
                conn._transport.resume_reading()  # type: ignore[union-attr]
            if conn._is_head:
                conn._parser = httptools.HttpResponseParser(conn)
            self._put(conn)
        else:
            conn._close()
            conn._wake()  # a read() pending in another task returns at once
            self._free_slot()

    def _put(self, conn: _Conn) -> None:
        """Return a clean connection: hand it to a waiter (slot moves along) or park it."""
        conn._idle_since = conn._loop.time()
        waiters = self._waiters
        while waiters:
            w = waiters.popleft()
            if not w.done():
                w.set_result(conn)
                return
        self._active -= 1
        self._idle.append(conn)
        if self._sweeper is None:
            self._sweeper = conn._loop.call_later(self._keepalive_s, self._sweep)

    def _sweep(self) -> None:
        """Close the connections idle for `keepalive_s` or more (with a FIN, nothing is in
        flight on them), like nginx's `keepalive_timeout` in an upstream block; re-arm for
        the next one to expire."""
        self._sweeper = None
        idle = self._idle
        if not idle or self._closed:
            return
        loop = idle[0]._loop
        now = loop.time()
        expired = False
        while idle and now - idle[0]._idle_since >= self._keepalive_s:
            conn = idle.popleft()
            expired = True
            if not conn._closed:
                conn._closed = True
                conn._deadline.cancel()
                if conn._transport is not None:
                    conn._transport.close()
        if idle:
            delay = idle[0]._idle_since + self._keepalive_s - now
            self._sweeper = loop.call_later(max(delay, 0.001), self._sweep)
        if expired:
            self._grant()  # their places in the pool are free for waiters

    def _free_slot(self) -> None:
        self._active -= 1
        self._grant()

    def _grant(self) -> None:
        waiters = self._waiters
        while waiters and self._active + len(self._idle) < self._max:
            w = waiters.popleft()
            if not w.done():
                self._active += 1
                w.set_result(None)

    def _lost(self, conn: _Conn) -> None:
        """connection_lost: forget conn; an idle one frees its place in the pool."""
        self._conns.discard(conn)
        if conn._resp is None:
            try:
                self._idle.remove(conn)
            except ValueError:
                return
            self._grant()

    async def aclose(self) -> None:
        """Close every connection and fail waiters; later requests raise."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        waiters = self._waiters
        while waiters:
            w = waiters.popleft()
            if not w.done():
                w.set_exception(ConnectError("upstream pool is closed"))
        idle = self._idle
        while idle:
            idle.pop()._close()
        for conn in list(self._conns):
            conn._close()
        await asyncio.sleep(0)
