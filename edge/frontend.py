"""The edge's own HTTP/1.1 server: `asyncio.Protocol` + httptools, driving the pipeline.
It is the only server on the data plane (issue #9): no ASGI, no uvicorn on the edge.

Rules of this file:
* It only frames bytes. Routing, header hygiene, identity and forwarding are the pipeline's
  (edge/pipeline.py), which this module drives through the `Downstream` seam with one
  `RequestContext` per exchange (edge/context.py). Body framing rules are edge/framing.py's.
* Measured, not assumed (benchmarks/proxy.py): under uvicorn each request paid for a scope
  dict, a cycle object, ASGI message dicts and a `receive` round trip; here a request is one
  object, one context, one task, one `transport.write` for a small response (head and body).
* Requests are parsed by llhttp in strict mode; a parse error, an unknown method or an
  HTTP version other than 1.0/1.1 ends the connection after a 400/505 (HARDENING §2.1, row 37).
  The request line and head are capped (414/431) while they arrive, never buffered unbounded
  (row 29-30), and every wait on the client has a deadline (§2.7, rows 33-34): the head must
  be complete within `header_timeout_s` of its first byte (else 408), a started body and a
  full send buffer may stall for at most `idle_timeout_s`, and an idle keep-alive connection is
  closed after `keepalive_timeout_s`. The deadlines share one `Deadline` per connection
  (edge/deadline.py, shared with the upstream pool): moving one is one float assignment.
* Response framing is re-derived here (edge/framing.py `outgoing_framing`): `Content-Length`
  when the pipeline gives one, else chunked for HTTP/1.1 and close-delimited for HTTP/1.0
  (RFC 9112 §6.1, HARDENING §2.10); no body for HEAD, 1xx, 204 and 304. A connection whose
  request body was not read to its end is closed after the response, never reused.
* Pipelined requests are answered in order, one at a time; reading pauses while one waits.
* A WebSocket upgrade is admitted by the pipeline like any request; after the upstream's 101
  the transport is handed to a byte tunnel (edge/tunnel.py) and this protocol lets go of it.
  Any other answer closes the connection: the bytes after the handshake are never parsed.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import socket
import struct
import time
from asyncio import current_task
from collections import deque
from typing import Any

import httptools

from edge.accesslog import AccessLog
from edge.context import RequestContext
from edge.deadline import Deadline
from edge.framing import CHUNKED, CONTENT_LENGTH, NO_BODY, UNTIL_CLOSE, outgoing_framing
from edge.pipeline import (
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    Abortable,
    BodyTimedOut,
    ClientGone,
    Pipeline,
)
from edge.tunnel import CLOSE_GOING_AWAY

log = logging.getLogger("turnout.edge")

MAX_URL_BYTES = 16 * 1024  # request target (nginx: large_client_header_buffers 8k per line)
MAX_RAW_HEAD_BYTES = 1024 * 1024  # bytes fed to the parser without a complete head: a hard net
BODY_HIGH_WATER = 256 * 1024  # pause reading while this much request body waits for upstream

# Above this many open client connections, an idle keep-alive connection releases its parser
# until its next request (issue #9: 10,000 idle connections within 80 MB); below it, every
# connection keeps its parser and pays nothing per request.
PARSER_RELEASE_CONNECTIONS = 512

# Deadline kinds of a connection.
_NONE, _IDLE, _HEAD, _BODY, _SEND = range(5)


def _status_lines() -> dict[int, bytes]:
    lines = {}
    for status in range(100, 600):
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        lines[status] = b"HTTP/1.1 %d %s\r\n" % (status, phrase.encode("ascii"))
    return lines


STATUS_LINES = _status_lines()


class _Request:
    """One request on a connection, and the `Downstream` the pipeline answers it through."""

    __slots__ = (
        "conn",
        "method",
        "url",
        "headers",
        "head_bytes",
        "version",
        "keep_alive",
        "expect_continue",
        "body",
        "body_bytes",
        "complete",
        "waiter",
        "head",
        "started",
        "chunked",
        "close_delimited",
        "no_body",
        "finished",
        "timed_out",
        "began",
        "ctx",
    )

    def __init__(self, conn: EdgeConnection) -> None:
        self.conn = conn
        self.method = ""
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0
        self.version = "1.1"
        self.keep_alive = True
        self.expect_continue = False
        self.body: deque[bytes] = deque()
        self.body_bytes = 0
        self.complete = False  # the whole request body has been parsed
        self.waiter: asyncio.Future[None] | None = None
        self.head: bytes | None = None  # a response head held back for the first body write
        self.started = False  # response head given by the pipeline
        self.chunked = False
        self.close_delimited = False
        self.no_body = False
        self.finished = False  # response complete
        self.timed_out = False
        self.began = 0.0  # perf_counter of the first byte, set when the access log is on
        self.ctx: RequestContext | None = None  # the pipeline's context once it runs

    # -- Downstream: the request body ------------------------------------------------------------

    async def read_body(self) -> tuple[bytes, bool]:
        conn = self.conn
        while True:
            if conn.gone:
                raise ClientGone
            if self.timed_out:
                raise BodyTimedOut
            body = self.body
            if body:
                data = body.popleft() if len(body) == 1 else b"".join(body)
                body.clear()
                self.body_bytes = 0
                if conn.reading_paused:
                    conn.flow()
                return data, not self.complete
            if self.complete:
                return b"", False
            if conn.input_closed:
                raise ClientGone  # half-closed, refused or upgraded away: no more body comes
            if self.expect_continue and not self.started:
                self.expect_continue = False
                conn.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # HARDENING §2.9
            waiter = self.waiter = conn.loop.create_future()
            conn.arm(_BODY)
            try:
                await waiter
            finally:
                self.waiter = None
                if conn.deadline_kind == _BODY:
                    conn.deadline_kind = _NONE

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- Downstream: the response ----------------------------------------------------------------

    def _head(self, status: int, headers: list[tuple[bytes, bytes]], length: int) -> bytes:
        """The response head; decides framing and keep-alive. `length` is the body's size when
        the whole body is known, else -1."""
        parts = [STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status]
        has_length = False
        for name, value in headers:
            if name == b"content-length":
                has_length = True
            elif name == b"connection":
                if value.lower() == b"close":
                    self.keep_alive = False
                continue  # written once below
            parts += (name, b": ", value, b"\r\n")
        framing = outgoing_framing(
            status, self.version, 0 if has_length else length, head=self.method == "HEAD"
        )
        self.no_body = framing == NO_BODY
        if framing == CONTENT_LENGTH:
            if not has_length:
                parts.append(b"content-length: %d\r\n" % length)
        elif framing == UNTIL_CLOSE:
            self.close_delimited = True
            self.keep_alive = False
        elif framing == CHUNKED:
            self.chunked = True
            parts.append(b"transfer-encoding: chunked\r\n")
        if not self.complete:
            self.keep_alive = False  # unread request bytes: the connection cannot be reused
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        elif self.version == "1.0":
            parts.append(b"connection: keep-alive\r\n")  # 1.0 clients assume close otherwise
        parts.append(b"\r\n")
        return b"".join(parts)

    async def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        if self.started:
            raise RuntimeError("response already started")
        self.started = True
        conn = self.conn
        if conn.gone:
            return
        head = self._head(status, headers, len(body))
        if body and not self.no_body:
            conn.transport.write(head + body)
        else:
            conn.transport.write(head)
        self._finish()

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if self.started:
            raise RuntimeError("response already started")
        self.started = True
        self.head = self._head(status, headers, -1)

    async def write(self, data: bytes, more: bool) -> bool:
        conn = self.conn
        if conn.gone or self.finished:
            return False
        if self.no_body:
            data = b""
        elif self.chunked:
            if data:
                data = b"%x\r\n%b\r\n" % (len(data), data)
            if not more:
                data += b"0\r\n\r\n"
        head = self.head
        if head is not None:
            self.head = None
            data = head + data
        if data:
            conn.transport.write(data)
        if not more:
            self._finish()
            return True
        if conn.write_paused:
            await conn.drain()
        return not conn.gone

    def watch_disconnect(self, on_gone: Abortable) -> None:
        self.conn.on_gone = on_gone  # aborted by connection_lost: no task needed

    def _finish(self) -> None:
        self.finished = True
        self.conn.response_done(self)


class EdgeConnection(asyncio.Protocol):
    """One client connection: parses requests, runs the pipeline for each in turn."""

    # Slots: thousands of idle keep-alive connections each carry one of these (issue #9's
    # 10,000-connection memory target), and attribute access is a little faster too.
    __slots__ = (
        "server",
        "pipeline",
        "loop",
        "transport",
        "parser",
        "client",
        "gone",
        "closed",
        "input_closed",
        "refusal",
        "ws_request",
        "parsing",
        "active",
        "queue",
        "task",
        "on_gone",
        "raw_head",
        "in_head",
        "reading_paused",
        "write_paused",
        "drain_waiter",
        "deadline",
        "deadline_kind",
        "__weakref__",
    )

    def __init__(self, server: EdgeServer) -> None:
        self.server = server
        self.pipeline = server.pipeline
        self.loop = server.loop
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser: Any = httptools.HttpRequestParser(self)  # None while idle (see response_done)
        self.client: tuple[str, int] | None = None
        self.gone = False  # connection_lost was called
        self.closed = False  # close() was called
        self.input_closed = False  # no more requests are read (EOF, refusal, non-WS upgrade)
        self.refusal: bytes | None = None  # the error answer owed once the requests before it end
        self.ws_request: _Request | None = None
        self.parsing: _Request | None = None  # the request whose head or body is arriving
        self.active: _Request | None = None  # the request being answered
        # Pipelined requests waiting their turn. A list, not a deque: an empty list allocates
        # nothing, an empty deque a 64-slot block (0.6 KiB per idle connection; reading pauses
        # while anything waits here, so the list stays short).
        self.queue: list[_Request] = []
        # The task answering `active`; dropped when it ends so an idle keep-alive connection
        # does not keep its last request's finished task alive (0.6 KiB each).
        self.task: asyncio.Task[None] | None = None
        self.on_gone: Abortable | None = None
        self.raw_head = 0  # bytes fed while a head is incomplete
        self.in_head = False
        self.reading_paused = False
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.deadline = Deadline(self.loop, self._expired)
        self.deadline_kind = _NONE  # what expiry means; _NONE: ignore the deadline

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        server = self.server
        if len(server.connections) >= server.max_connections:
            server.refuse_connection(transport)  # HARDENING table (b) row 15
            return
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.client = (str(peer[0]), int(peer[1]))
        self.server.connections.add(self)
        self.arm(_IDLE)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self.server.connections.discard(self)
        self.deadline.cancel()
        on_gone = self.on_gone
        if on_gone is not None:
            self.on_gone = None
            on_gone.abort()  # the upstream connection is dropped, never pooled
        active, task = self.active, self.task
        if (
            active is not None
            and not active.started
            and task is not None
            and self.ws_request is None
        ):
            # Gone before its answer began: the exchange is abandoned (nginx's default
            # `proxy_ignore_client_abort off`), so a request still waiting for a pool slot
            # or for its upstream's head is never sent, or is cut off (issue #12).
            task.cancel()
        for request in (self.parsing, self.active, *self.queue):
            if request is not None:
                request.wake()
        self._wake_drain()

    def data_received(self, data: bytes) -> None:
        if self.input_closed:
            return
        parser = self.parser
        if parser is None:
            parser = self.parser = httptools.HttpRequestParser(self)
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade(data[int(exc.args[0]) :] if exc.args else b"")
            return
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, _Refused):  # raised by one of our callbacks below
                self._refuse(cause.status, cause.message)
            else:
                self._refuse(400, "invalid HTTP request")
            return
        if self.in_head:
            self.raw_head += len(data)
            if self.raw_head > MAX_RAW_HEAD_BYTES:
                self._refuse(431, "request header block too large")
            elif self.deadline_kind != _HEAD and self.active is None:
                self.arm(_HEAD)

    def eof_received(self) -> bool | None:
        # A half-close: answer the requests already read, then close. Except one still
        # queued for a full upstream pool's slot: a client that closed (a half-close looks
        # the same) has abandoned it, and it is never sent (nginx also takes EOF while
        # waiting on the upstream as an abort, `proxy_ignore_client_abort off`).
        active, task = self.active, self.task
        if active is not None and task is not None and not active.started:
            ctx = active.ctx
            if ctx is not None and ctx.queued:
                task.cancel()
        self._stop_input()
        if self.active is None and not self.queue:
            return None  # the transport closes itself
        return True

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_drain()

    # -- httptools callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.parsing = request = _Request(self)
        self.in_head = True
        self.raw_head = 0
        if self.pipeline.access_log is not None:
            request.began = time.perf_counter()

    def on_url(self, url: bytes) -> None:
        request = self.parsing
        assert request is not None
        request.url += url
        if len(request.url) > MAX_URL_BYTES:
            raise _Refused(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self.parsing
        assert request is not None
        request.head_bytes += len(name) + len(value)
        if request.head_bytes > MAX_HEADER_BYTES:
            raise _Refused(431, "request header block too large")
        if len(request.headers) >= MAX_HEADERS:
            raise _Refused(431, "too many request headers")
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            request.expect_continue = True
        request.headers.append((name, value))

    def on_headers_complete(self) -> None:
        request = self.parsing
        assert request is not None
        self.in_head = False
        parser = self.parser
        request.version = parser.get_http_version()
        request.method = parser.get_method().decode("ascii")
        if request.version not in ("1.1", "1.0"):
            if request.version.startswith("0."):
                raise _Refused(400, "HTTP/0.9 requests are not served")
            raise _Refused(505, "HTTP version not supported")
        request.keep_alive = parser.should_keep_alive()
        if parser.should_upgrade() and self._is_websocket(request):
            self.ws_request = request  # feed_data raises HttpParserUpgrade next
            return
        if self.active is None:
            self._start(request)
        else:
            self.queue.append(request)
            self.flow()

    def on_body(self, body: bytes) -> None:
        request = self.parsing
        assert request is not None
        request.body.append(body)
        request.body_bytes += len(body)
        if request.waiter is not None:
            request.wake()
        elif request.body_bytes > BODY_HIGH_WATER and not self.reading_paused:
            self.flow()

    def on_message_complete(self) -> None:
        request = self.parsing
        assert request is not None
        request.complete = True
        self.parsing = None
        request.wake()

    # -- requests --------------------------------------------------------------------------------

    def _start(self, request: _Request) -> None:
        self.active = request
        self.deadline_kind = _NONE  # the upstream's timeouts apply while it is answered
        self.task = self.loop.create_task(self._run(request))

    def _context(self, request: _Request) -> RequestContext:
        path, _, query = request.url.partition(b"?")
        return RequestContext(
            request.method,
            path,
            query,
            request.headers,
            request.version,
            self.client,
            "http",
            time.perf_counter(),
        )

    async def _run(self, request: _Request) -> None:
        try:
            await self._answer(request)
        finally:
            if self.task is current_task():
                self.task = None

    async def _answer(self, request: _Request) -> None:
        try:
            request.ctx = ctx = self._context(request)
            await self.pipeline.handle(ctx, request)
        except asyncio.CancelledError:
            # Abandoned by its client (connection_lost, eof_received) or by shutdown: the
            # exchange ends here and so does the connection.
            self.active = None
            if not self.gone:
                self.transport.abort()
            raise
        except Exception:
            log.exception("edge: unhandled error in the request pipeline")
            if not request.started and not self.gone:
                await request.respond(
                    *self.pipeline.error_response(500, "internal error", close=True)
                )
        if request.finished:
            return
        # The pipeline let go without an answer (client gone, body timed out or refused) or
        # mid-stream (upstream broke after the head): this connection cannot go on.
        self.active = None
        if self.gone:
            return
        if request.started:
            self.transport.abort()  # never end a broken body "cleanly" (HARDENING §2.12)
            return
        if request.timed_out:
            self.transport.write(self._error_bytes(408, "request body timed out"))
        elif self.refusal is not None:
            self.transport.write(self.refusal)
            self.refusal = None
        self.close()

    def response_done(self, request: _Request) -> None:
        self.active = None
        self.on_gone = None
        if self.gone:
            return
        if not request.keep_alive:
            self.close()
        elif self.queue:
            self._start(self.queue.pop(0))
            if self.reading_paused:
                self.flow()
        elif self.refusal is not None:
            self.transport.write(self.refusal)
            self.refusal = None
            self.close()
        elif self.input_closed:
            self.close()
        else:
            if self.reading_paused:
                self.flow()
            if self.in_head:
                self.arm(_HEAD)
            else:
                self.arm(_IDLE)
                if len(self.server.connections) > PARSER_RELEASE_CONNECTIONS:
                    # Between requests a parser holds no state: many idle connections give
                    # theirs back (1 KiB each) and make a new one (0.5 µs) on their next byte.
                    self.parser = None

    def flow(self) -> None:
        """Pause reading while a pipelined request waits or a request body piles up."""
        parsing = self.parsing
        pause = bool(self.queue) or (parsing is not None and parsing.body_bytes > BODY_HIGH_WATER)
        if pause != self.reading_paused and not self.gone and not self.closed:
            self.reading_paused = pause
            if pause:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    async def drain(self) -> None:
        if self.gone or not self.write_paused:
            return
        waiter = self.drain_waiter
        if waiter is None:
            waiter = self.drain_waiter = self.loop.create_future()
        self.arm(_SEND)
        try:
            await waiter
        finally:
            if self.deadline_kind == _SEND:
                self.deadline_kind = _NONE

    def _wake_drain(self) -> None:
        waiter = self.drain_waiter
        if waiter is not None:
            self.drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.input_closed = True
            self.transport.close()

    def _stop_input(self) -> None:
        """No more requests are read; a request whose body was still arriving gets no more."""
        self.input_closed = True
        self.in_head = False
        parsing = self.parsing
        if parsing is not None:
            self.parsing = None
            parsing.wake()

    def _error_bytes(self, status: int, message: str) -> bytes:
        """The pipeline's error answer, with `Connection: close`, for input no request owns."""
        status, headers, body = self.pipeline.error_response(status, message, close=True)
        head = b"".join(b"%s: %s\r\n" % header for header in headers)
        return STATUS_LINES[status] + head + b"\r\n" + body

    def _refuse(self, status: int, message: str) -> None:
        """Input that cannot be a request (unparseable, too large, too slow): the requests
        read before it are answered, then this error, then the connection closes. Nothing
        of it reaches the pipeline."""
        request = self.parsing
        self._stop_input()
        self.refusal = refusal = self._error_bytes(status, message)
        access_log = self.pipeline.access_log
        if access_log is not None:
            self._log_refusal(access_log, request, status, len(refusal))
        if self.active is None and not self.queue and not self.gone:
            self.transport.write(self.refusal)
            self.refusal = None
            self.close()

    def _log_refusal(
        self, access_log: AccessLog, request: _Request | None, status: int, size: int
    ) -> None:
        """The access-log line of input the front-end refused itself (400, 408, 414, 431,
        505...): what is known of the request so far, `-` for the rest. `bytes` counts the
        whole answer (there is no upstream body), and the duration runs from the request's
        first byte when a request had begun."""
        method, host, path, started = "-", None, b"-", 0.0
        if request is not None:
            method = request.method or "-"
            path = request.url.partition(b"?")[0] or b"-"
            for name, value in request.headers:
                if name == b"host":
                    host = value
                    break
            started = request.began
        elapsed = time.perf_counter() - started if started else 0.0
        access_log.record(method, host, path, status, size, elapsed, None, None, None)

    # -- deadlines -------------------------------------------------------------------------------

    def arm(self, kind: int) -> None:
        server = self.server
        if kind == _IDLE:
            seconds = server.keepalive_timeout_s
        elif kind == _HEAD:
            seconds = server.header_timeout_s
        else:
            seconds = server.idle_timeout_s
        self.deadline_kind = kind
        self.deadline.arm(seconds)

    def _expired(self) -> None:
        kind = self.deadline_kind
        if kind == _NONE or self.gone:
            return
        self.deadline_kind = _NONE
        if kind == _IDLE:
            self.close()
        elif kind == _HEAD:
            self._refuse(408, "request header timed out")  # HARDENING §2.7 (slowloris)
        elif kind == _BODY:
            request = self.active
            if request is not None:
                request.timed_out = True  # _run answers 408 once the pipeline lets go
                request.wake()
        else:  # _SEND: the client stopped reading
            self.reset()

    def reset(self) -> None:
        """Abort with a RST, dropping what the kernel still holds for this client (nginx's
        `reset_timedout_connection`): a plain close would keep retrying a zero window with
        up to megabytes of send buffer for minutes."""
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    # -- WebSocket -------------------------------------------------------------------------------

    def _is_websocket(self, request: _Request) -> bool:
        return any(
            name == b"upgrade" and value.lower() == b"websocket" for name, value in request.headers
        )

    def _upgrade(self, rest: bytes) -> None:
        request = self.ws_request
        self.ws_request = None
        if request is None:
            # Another protocol (h2c, ...): its request is answered as plain HTTP; the bytes
            # after it are not HTTP/1.1 and are never parsed (HARDENING row 36).
            self._stop_input()
            for pending in (self.active, *self.queue):
                if pending is not None:
                    pending.keep_alive = False
            return
        if self.active is not None or self.queue:
            self._refuse(400, "unexpected upgrade")
            return
        # No more requests on this connection: it becomes a tunnel, or closes after the answer.
        self._stop_input()
        request.keep_alive = False
        self.reading_paused = True
        self.transport.pause_reading()  # client bytes wait in the kernel until the 101
        self.active = request
        self.deadline_kind = _NONE
        self.task = self.loop.create_task(self._run_upgrade(request, rest))

    async def _run_upgrade(self, request: _Request, rest: bytes) -> None:
        try:
            await self.pipeline.upgrade(self._context(request), request, self._hand_over, rest)
        except Exception:
            log.exception("edge: unhandled error in a WebSocket upgrade")
            if not request.started and not self.gone and not self.closed:
                await request.respond(
                    *self.pipeline.error_response(500, "internal error", close=True)
                )
        if not request.finished and not self.closed:
            self.active = None
            self.close()

    def _hand_over(self) -> asyncio.Transport | None:
        """Give the transport to a tunnel: this protocol stops owning it (None if gone)."""
        if self.gone or self.closed:
            return None
        self.closed = True
        self.active = None
        self.server.connections.discard(self)
        self.deadline.cancel()
        return self.transport


class _Refused(Exception):
    """Raised in a parser callback: the parser stops, `data_received` answers `status`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _CapRefusal(asyncio.Protocol):
    """A connection refused at the cap once its 503 is written: reads and drops what the
    client sends until it closes its side or `LINGER_S` passes, then closes."""

    LINGER_S = 2.0

    def __init__(self, transport: asyncio.BaseTransport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self.timer = loop.call_later(self.LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool | None:
        self.timer.cancel()
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()


class EdgeServer:
    """The edge listener: accepts connections, shuts down gracefully.

    `serve()` runs until `should_exit` is set; it then stops accepting, closes idle
    connections, lets requests in flight finish for up to `graceful_timeout_s` and aborts the
    rest. `started` turns true once the socket listens."""

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        host: str,
        port: int,
        keepalive_timeout_s: float = 5.0,
        header_timeout_s: float = 10.0,
        idle_timeout_s: float = 60.0,
        graceful_timeout_s: float = 10.0,
        backlog: int = 4096,
        sock: Any = None,
        max_connections: int = 16384,
    ) -> None:
        self.pipeline = pipeline
        self.max_connections = max_connections
        self.sock = sock  # a socket bound beforehand (edge/listener.py), e.g. SO_REUSEPORT
        self.host = host
        self.port = port
        self.keepalive_timeout_s = keepalive_timeout_s
        self.header_timeout_s = header_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.graceful_timeout_s = graceful_timeout_s
        self.backlog = backlog
        self.connections: set[EdgeConnection] = set()
        self.started = False
        self._exit = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.sockets: list[Any] = []

    def refuse_connection(self, transport: asyncio.BaseTransport) -> None:
        """A connection beyond `max_connections`: answered at once with 503 and
        `Retry-After: 1`, then closed without reading a request (uvicorn's
        `--limit-concurrency` answers 503 too; nginx instead stops accepting, leaving clients
        in the listen queue until they time out). The client's request, if it sends one, is
        read and dropped until it half-closes or `_CapRefusal.LINGER_S` passes, so a close
        with unread bytes does not reset the connection under the 503 (RFC 9112 §9.6)."""
        self.pipeline.metrics.connections_refused += 1
        status, headers, body = self.pipeline.error_response(
            503,
            "too many connections, try again",
            close=True,
            headers=[(b"retry-after", b"1")],
        )
        head = b"".join(b"%s: %s\r\n" % header for header in headers)
        refusal = _CapRefusal(transport, self.loop)
        transport.set_protocol(refusal)
        writer: Any = transport
        writer.write(STATUS_LINES[status] + head + b"\r\n" + body)
        with contextlib.suppress(OSError, RuntimeError):
            writer.write_eof()

    @property
    def should_exit(self) -> bool:
        return self._exit.is_set()

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        if value:
            self._exit.set()

    async def serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        if self.sock is not None:
            server: Any = await self.loop.create_server(
                lambda: EdgeConnection(self), sock=self.sock, backlog=self.backlog
            )
        else:
            server = await self.loop.create_server(
                lambda: EdgeConnection(self),
                self.host,
                self.port,
                backlog=self.backlog,
                reuse_address=True,
            )
        # `server` is untyped on purpose: uvloop's `sockets` is a list where typeshed says
        # tuple, and under mypyc a wrong stub is a run-time TypeError (PERF.md).
        self.sockets = list(server.sockets)
        self.started = True
        try:
            await self._exit.wait()
        finally:
            server.close()
            await self._shutdown()
            await server.wait_closed()

    async def _shutdown(self) -> None:
        for conn in list(self.connections):
            if conn.active is None:
                conn.close()
            else:
                for request in (conn.active, *conn.queue):
                    request.keep_alive = False  # close after the answer in flight
        tunnels = self.pipeline.tunnels
        tunnels.close(code=CLOSE_GOING_AWAY)  # RFC 6455 §7.4.1: going away
        deadline = self.loop.time() + self.graceful_timeout_s
        while self.loop.time() < deadline:
            if not any(c.active is not None for c in self.connections):
                break
            await asyncio.sleep(0.05)
        tunnels.close(code=CLOSE_GOING_AWAY)  # opened by an upgrade that was in flight
        for conn in list(self.connections):
            conn.transport.abort()
