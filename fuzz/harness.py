"""What the fuzzers share: a Turnout front-end driven through `asyncio.Protocol`'s public
surface with a fake client transport, a stub upstream on loopback, and the invariants of
HARDENING §6 checked after every input.

Invariants (a `Violation` when broken):
* no exception escapes `connection_made` / `data_received` / `eof_received`, and none reaches
  the event loop's exception handler (a task that died);
* what Turnout writes to the client parses as a sequence of HTTP/1.1 responses, at most one per
  request the client began (a strict reference parse of the same bytes), and at least one when
  the client sent a complete request;
* what reaches the upstream parses strictly, is never framed two ways (Content-Length with
  Transfer-Encoding, two Content-Lengths, a coding other than `chunked`), and is never more
  requests than the client began;
* (response fuzzing) bytes an upstream sends beyond its one response are never served to the
  client as the answer to a later request (HARDENING table (b) row 6).

The front-end is built through its constructors only (`Pipeline`, `EdgeServer`,
`EdgeConnection`), so the harness survives a reshaping of its internals; `build_edge` is the
one place to adapt when those constructors change.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import httptools

from edge.frontend import EdgeConnection, EdgeServer
from edge.identity import CookieSigner, Identity
from edge.metrics import EdgeMetrics
from edge.pipeline import Pipeline
from edge.targets import PoolSet
from edge.upstream import Timeouts
from flags.document import load_document
from flags.evaluate import compile_snapshot

SETTLE_STEPS = 400  # loop turns (of ~1 ms at most) an input may take to be answered
CLEAN_BODY = b"clean"


class Violation(AssertionError):
    """An invariant of HARDENING §6 did not hold for this input."""


class FakeTransport(asyncio.Transport):
    """The client side: collects what Turnout writes; closing it ends the connection."""

    def __init__(self, protocol: asyncio.Protocol, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.protocol = protocol
        self.loop = loop
        self.out = bytearray()
        self.closing = False
        self.lost = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return ("127.0.0.1", 40000)
        if name == "sockname":
            return ("127.0.0.1", 8080)
        return default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing:
            return
        self.out += data

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.loop.call_soon(self._lose)

    def abort(self) -> None:
        self.close()

    def _lose(self) -> None:
        if not self.lost:
            self.lost = True
            self.protocol.connection_lost(None)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_reading(self) -> bool:
        return not self.closing

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def can_write_eof(self) -> bool:
        return False

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol


def document(port: int) -> dict[str, Any]:
    upstream = f"http://127.0.0.1:{port}"
    return {
        "releases": {"shop": {"stable": [upstream], "canary": [upstream], "stage": "beta"}},
        "routes": [{"release": "shop"}],
    }


def build_edge(port: int, loop: asyncio.AbstractEventLoop) -> EdgeServer:
    """A pipeline and server towards `port`, as edge/app.py builds them, with short timeouts."""
    timeouts = Timeouts(connect_s=0.5, read_s=0.5, write_s=0.5, pool_s=0.5, keepalive_s=1.0)
    pipeline = Pipeline(
        identity=Identity(
            CookieSigner(b"fuzz-secret-0123456789"),
            cookie_name="turnout_uid",
            max_age_s=3600,
            secure=False,
        ),
        pools=PoolSet(timeouts, 8),
        metrics=EdgeMetrics(),
        unit_header="x-user-id",
        email_header="x-user-email",
        trusted_hops=0,
        expose_decision_headers=False,
        via_name="turnout",
        max_body_bytes=64 * 1024,
    )
    pipeline.apply(compile_snapshot(load_document(document(port))))
    server = EdgeServer(
        pipeline, host="127.0.0.1", port=0, header_timeout_s=0.5, idle_timeout_s=0.5
    )
    server.loop = loop
    return server


def count_messages(data: bytes, response: bool, head_requests: int = 0) -> tuple[int, int, bool]:
    """(messages begun, messages complete, parsed without error) by llhttp."""

    class Counter:
        begun = 0
        done = 0

        def on_message_begin(self) -> None:
            self.begun += 1

        def on_message_complete(self) -> None:
            self.done += 1

    counter = Counter()
    parser: Any = (httptools.HttpResponseParser if response else httptools.HttpRequestParser)(
        counter
    )
    ok = True
    try:
        parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError:
        ok = False
    return counter.begun, counter.done, ok


@dataclass
class UpstreamLog:
    """What the stub upstream received, per connection."""

    received: list[bytearray] = field(default_factory=list)
    reused_after_fuzz: bool = False


def check_forwarded(data: bytes) -> None:
    """The upstream side: one framing only, strict syntax."""
    heads: list[list[tuple[bytes, bytes]]] = []

    class Collect:
        def on_message_begin(self) -> None:
            heads.append([])

        def on_header(self, name: bytes, value: bytes) -> None:
            heads[-1].append((name.lower(), value))

    parser = httptools.HttpRequestParser(Collect())
    try:
        parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError as exc:
        raise Violation(f"forwarded bytes do not parse: {exc}: {data[:300]!r}") from None
    for head in heads:
        names = [n for n, _ in head]
        te = [v for n, v in head if n == b"transfer-encoding"]
        if names.count(b"content-length") > 1 or (te and b"content-length" in names):
            raise Violation(f"forwarded with two framings: {head!r}")
        if te and te != [b"chunked"]:
            raise Violation(f"forwarded Transfer-Encoding {te!r}")
        for name, value in head:
            if any(c in value for c in b"\r\n\x00"):
                raise Violation(f"forwarded a control character in {name!r}")


class EdgeRig:
    """One event loop, one stub upstream and one front-end server, reused across inputs."""

    def __init__(self, mode: str) -> None:
        self.mode = mode  # "request": the stub answers 200; "response": it sends `reply`
        self.loop = asyncio.new_event_loop()
        self.errors: list[str] = []
        self.loop.set_exception_handler(
            lambda _loop, ctx: self.errors.append(str(ctx.get("message")))
        )
        self.reply = b""
        self.log = UpstreamLog()
        self.upstream = self.loop.run_until_complete(
            asyncio.start_server(self._upstream, "127.0.0.1", 0)
        )
        port = self.upstream.sockets[0].getsockname()[1]
        self.server = build_edge(port, self.loop)

    async def _upstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = bytearray()
        self.log.received.append(got)
        answered = 0
        start = 0  # where the request not yet answered begins
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                got += data
                if self.mode == "response" and got.startswith(b"GET /a ", start):
                    # The fuzzed answer, on whichever connection the pool picked; a request
                    # that then arrives on this connection is recorded and never answered.
                    # The half-close ends a close-delimited or truncated answer at once.
                    writer.write(self.reply)
                    writer.write_eof()
                    if await reader.read(65536):
                        self.log.reused_after_fuzz = True
                    return
                _, done, _ = count_messages(bytes(got), response=False)
                for _ in range(done - answered):
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Clean: 1\r\n\r\n" + CLEAN_BODY
                    )
                if done > answered:
                    answered, start = done, len(got)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        finally:
            writer.close()

    def run(self, chunks: list[bytes], eof: bool = True) -> bytes:
        """Feed one client connection; check the invariants; return what the client got."""
        self.log = UpstreamLog()
        self.errors.clear()
        conn = EdgeConnection(self.server)
        transport = FakeTransport(conn, self.loop)
        sent = b"".join(chunks)
        try:
            conn.connection_made(transport)
            for chunk in chunks:
                if transport.closing:
                    break
                conn.data_received(chunk)
                self.loop.run_until_complete(asyncio.sleep(0))
            if eof and not transport.closing and not conn.eof_received():
                transport.close()
        except Exception as exc:
            raise Violation(f"{type(exc).__name__} escaped the protocol: {exc}") from exc
        self._settle(conn, transport)
        if not transport.lost:
            transport.close()
            self.loop.run_until_complete(asyncio.sleep(0))
        self._settle_upstream()
        if self.errors:
            raise Violation(f"unhandled error in the loop: {self.errors[0]}")
        out = bytes(transport.out)
        self._check(sent, out)
        return out

    def _settle(self, conn: EdgeConnection, transport: FakeTransport) -> None:
        async def wait() -> None:
            for _ in range(SETTLE_STEPS):
                if transport.lost or (conn.active is None and not conn.queue and transport.closing):
                    return
                if conn.active is None and not conn.queue and conn.parsing is None:
                    return
                await asyncio.sleep(0.001)

        self.loop.run_until_complete(wait())

    def _settle_upstream(self) -> None:
        self.loop.run_until_complete(asyncio.sleep(0))

    def _check(self, sent: bytes, out: bytes) -> None:
        begun, complete, _ = count_messages(sent, response=False)
        is_head = b"HEAD" in sent
        if out and not is_head:
            r_begun, r_done, ok = count_messages(out, response=True)
            if not ok:
                raise Violation(f"the client got unparseable bytes: {out[:300]!r}")
            if r_begun > max(1, begun):
                raise Violation(f"{r_begun} responses to {begun} requests")
        if complete and not out:
            raise Violation("a complete request got no response")
        upstream = b"".join(bytes(b) for b in self.log.received)
        if self.mode == "request":
            check_forwarded(upstream)
            up_begun, _, _ = count_messages(upstream, response=False)
            if up_begun > begun:
                raise Violation(f"{up_begun} requests forwarded for {begun} sent")

    def close(self) -> None:
        for pool in self.server.pipeline.pools.pools.values():
            self.loop.run_until_complete(pool.aclose())
        self.upstream.close()

        async def cancel_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.upstream.wait_closed()

        self.loop.run_until_complete(cancel_rest())
        self.loop.close()


def responses(data: bytes) -> list[tuple[int, set[bytes]]]:
    """(status, lower-case header names) of each response llhttp reads from `data`."""
    out: list[tuple[int, set[bytes]]] = []
    parser: Any = None

    class Collect:
        def on_message_begin(self) -> None:
            out.append((0, set()))

        def on_header(self, name: bytes, value: bytes) -> None:
            out[-1][1].add(name.lower())

        def on_headers_complete(self) -> None:
            out[-1] = (parser.get_status_code(), out[-1][1])

    parser = httptools.HttpResponseParser(Collect())
    with contextlib.suppress(httptools.HttpParserError):
        parser.feed_data(data)
    return out


TURNOUT_ERRORS = frozenset({502, 503, 504})


def check_response_input(rig: EdgeRig, reply: bytes) -> None:
    """Response fuzzing: the upstream answers GET #1 with `reply`; GET #2 follows on the same
    client connection and must be answered by a clean upstream connection or by Turnout's own
    error, never from `reply`'s leftover bytes (HARDENING table (b) row 6)."""
    rig.reply = reply
    out = rig.run([b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n", b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n"])
    check_second_answer(out)


def check_second_answer(out: bytes) -> None:
    """The client's second response is a clean upstream's or Turnout's own error."""
    answers = responses(out)
    if len(answers) >= 2:
        status, names = answers[1]
        if b"x-clean" not in names and status not in TURNOUT_ERRORS:
            raise Violation(
                f"request 2 was answered from the upstream's extra bytes: {out[:400]!r}"
            )


def statuses(out: bytes) -> list[int]:
    """The final (non-1xx) statuses of the responses in `out`."""
    return [status for status, _ in responses(out) if status >= 200]


def check_split_agrees(rig: EdgeRig, body: bytes, pieces: list[bytes]) -> None:
    """The same bytes at once and in pieces get the same answers (h11's afl invariant): how
    TCP happens to cut a request must never change how it is read."""
    whole = statuses(rig.run([body]))
    split = statuses(rig.run(pieces))
    if whole != split:
        raise Violation(f"at once {whole}, in pieces {split}: {body[:300]!r}")
